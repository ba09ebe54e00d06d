"""Property tests: random data files and configs only ever raise mlora's own errors."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlora_core.config.schema import load_config
from mlora_core.config.validation import validate_config
from mlora_core.errors import ConfigError, DataError
from mlora_core.plugin_api.host import create_plugin_manager
from mlora_data.alpaca import read_records

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
record_like = (
    st.fixed_dictionaries({}, optional={"instruction": json_values, "input": json_values, "output": json_values})
    | json_values
)
lines = st.lists(st.one_of(record_like.map(json.dumps), st.text(max_size=30)), max_size=6)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(lines=lines)
def test_random_jsonl_files_raise_only_data_errors(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    path.write_text("\n".join(lines))
    try:
        records = read_records(path)
    except DataError:
        return
    assert all(isinstance(r["instruction"], str) and isinstance(r["output"], str) for r in records)


@SETTINGS
@given(data=json_values)
def test_random_json_files_raise_only_data_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "d.json"
    path.write_text(json.dumps(data))
    try:
        read_records(path)
    except DataError:
        pass


config_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-1, 1) | st.sampled_from(["lora", "llama", "x", ""]),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["base_model", "jobs", "train", "adapter", "data", "name", "path", "lr", "r", "type", "x"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=15,
)


@SETTINGS
@given(raw=config_values, overrides=st.lists(st.text(max_size=20), max_size=2))
def test_random_configs_raise_only_config_errors(tmp_path_factory, raw, overrides):
    path = tmp_path_factory.mktemp("fuzz") / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    host = create_plugin_manager(autoload=False)
    try:  # anything but a ConfigError (another exception, a crash) fails the test
        validate_config(load_config(path, overrides), host)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)


def test_a_valid_config_survives_the_same_path(make_config, data_dir):
    from conftest import job

    path = make_config([job("a", data_dir / "a.jsonl")])
    validate_config(load_config(Path(path)), create_plugin_manager(autoload=False))
