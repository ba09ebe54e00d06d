"""Config loading and validation: every problem named with its key path, before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import job

from mlora_core.cli.main import main
from mlora_core.config.schema import load_config
from mlora_core.config.validation import validate_config
from mlora_core.errors import ConfigError


def _edit(path: Path, change) -> Path:
    cfg = yaml.safe_load(path.read_text())
    change(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return path


BAD = {
    "unknown key": (
        lambda c: c["jobs"][0]["train"].update(lrr=1),
        r"jobs\[0\]\.train\.lrr: Key 'lrr' not in 'TrainConfig'",
    ),
    "unknown top-level key": (lambda c: c.update(trainer={}), r"trainer: unknown key"),
    "wrong type": (lambda c: c["jobs"][0]["adapter"].update(r="eight"), r"jobs\[0\]\.adapter\.r: Value 'eight'"),
    "missing data file": (
        lambda c: c["jobs"][1]["data"].update(path="nope.jsonl"),
        r"jobs\[1\]\.data\.path: data file not found: nope.jsonl",
    ),
    "unknown scheduler": (
        lambda c: c["scheduler"].update(type="foo"),
        r"scheduler.type: unknown scheduler 'foo'; known: fast_fit, optimal_fit, trivial",
    ),
    "unknown adapter type": (
        lambda c: c["jobs"][0]["adapter"].update(type="dora"),
        r"jobs\[0\]\.adapter\.type: unknown adapter type 'dora'; known: lora",
    ),
    "unknown monitor": (
        lambda c: c["monitor"].update(wandb={}),
        r"monitor.wandb: unknown monitor 'wandb'; known: console, jsonl, tensorboard",
    ),
    "unknown target module": (
        lambda c: c["jobs"][0]["adapter"].update(target_modules=["qkv"]),
        r"jobs\[0\]\.adapter\.target_modules: \['qkv'\] match no layer of this model",
    ),
    "missing model": (
        lambda c: c["base_model"].update(path="/no/such/model"),
        r"base_model: path: /no/such/model does not exist",
    ),
    "bad batch split": (
        lambda c: c["jobs"][0]["train"].update(batch_size=5),
        r"jobs\[0\]\.train\.batch_size: 5 is not a multiple",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_fails_before_loading_with_key_path(case, make_config, data_dir, tmp_path, capsys):
    change, message = BAD[case]
    path = _edit(make_config([job("a", data_dir / "a.jsonl"), job("b", data_dir / "b.jsonl")]), change)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()  # nothing written


def test_every_problem_is_reported_at_once(make_config, data_dir):
    def break_three(c):
        c["jobs"][0]["train"]["lrr"] = 1
        c["jobs"][1]["adapter"]["r"] = "x"
        c["base_model"]["dtypo"] = "bf16"

    path = _edit(make_config([job("a", data_dir / "a.jsonl"), job("b", data_dir / "b.jsonl")]), break_three)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 3


def test_command_line_overrides_any_key(make_config, data_dir, tmp_path, host):
    path = make_config([job("a", data_dir / "a.jsonl"), job("b", data_dir / "b.jsonl")])
    cfg = load_config(
        path, ["jobs.1.train.lr=0.05", f"output_dir={tmp_path / 'elsewhere'}", "jobs.0.adapter.target_modules=[k_proj]"]
    )
    assert cfg.jobs[1].train.lr == 0.05
    assert cfg.output_dir == str(tmp_path / "elsewhere")
    assert cfg.jobs[0].adapter.target_modules == ["k_proj"]
    validate_config(cfg, host)
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.train\.bogus: Key 'bogus' not in 'TrainConfig'"):
        load_config(path, ["jobs.0.train.bogus=1"])


def test_interpolation_resolves_output_dir(make_config, data_dir):
    path = make_config([job("a", data_dir / "a.jsonl")], monitor={"tensorboard": {"log_dir": "${output_dir}/tb"}})
    cfg = load_config(path, ["output_dir=/tmp/x"])
    assert cfg.monitor["tensorboard"]["log_dir"] == "/tmp/x/tb"


def test_validate_command_checks_without_writing(make_config, data_dir, tmp_path, capsys):
    path = make_config([job("a", data_dir / "a.jsonl")])
    assert main(["validate", str(path)]) == 0
    assert "OK (1 job(s): a)" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_malformed_data_line_is_reported_with_file_and_line(make_config, data_dir, capsys):
    bad = data_dir / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x", "output": \n')
    path = make_config([job("a", data_dir / "a.jsonl"), job("b", bad)])
    assert main(["validate", str(path)]) == 2
    assert f"jobs[1].data.path: {bad}:2: malformed JSON" in capsys.readouterr().err


def test_missing_config_file(capsys):
    assert main(["validate", "does-not-exist.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err


MORE_BAD = {
    "malformed yaml": (None, r"not valid YAML"),
    "name with ..": (lambda c: c["jobs"][0].update(name="../x"), r"jobs\[0\]\.name: '\.\./x' must be letters"),
    "absolute name": (lambda c: c["jobs"][0].update(name="/abs"), r"jobs\[0\]\.name: '/abs' must be letters"),
    "empty name": (lambda c: c["jobs"][0].update(name=""), r"jobs\[0\]\.name: '' must be letters"),
    "duplicate names": (lambda c: c["jobs"][1].update(name="a"), r"jobs\[1\]\.name: duplicate job name 'a'"),
    "zero batch": (lambda c: c["jobs"][0]["train"].update(micro_batch_size=0), r"micro_batch_size: must be at least 1"),
    "negative lr": (lambda c: c["jobs"][0]["train"].update(lr=-1), r"jobs\[0\]\.train\.lr: must be positive"),
    "zero rank": (lambda c: c["jobs"][0]["adapter"].update(r=0), r"jobs\[0\]\.adapter\.r: must be at least 1"),
    "empty data file": ("empty", r"jobs\[1\]\.data\.path: .*b\.jsonl: no records"),
    "non-string field": ("nonstring", r"b\.jsonl:1: missing or non-string 'output'"),
    "output dir under a file": ("under_file", r"output_dir: .*a\.jsonl is a file, not a directory"),
    "not a llama model": ("gpt2", r"base_model: path: .* holds a 'gpt2' model \(model_type\), not a llama one"),
    "held out more than the data": (
        lambda c: c["jobs"][0]["data"].update(val_set_size=39),
        r"jobs\[0\]\.data\.val_set_size: 39 holds out 39 of the file's 40 records, leaving 1 to train on",
    ),
    "device": (lambda c: c["base_model"].update(device="tpu"), r"base_model\.device: 'tpu' is not 'cpu' or 'cuda"),
}


@pytest.mark.parametrize("case", sorted(MORE_BAD))
def test_more_bad_input_is_one_clear_line(case, make_config, data_dir, tmp_path, capsys):
    change, message = MORE_BAD[case]
    path = make_config([job("a", data_dir / "a.jsonl"), job("b", data_dir / "b.jsonl")])
    if change is None:
        path.write_text(path.read_text() + "\njobs: [unclosed\n")
    elif change == "empty":
        (data_dir / "b.jsonl").write_text("")
    elif change == "nonstring":
        (data_dir / "b.jsonl").write_text('{"instruction": "x", "output": 3}\n')
    elif change == "under_file":
        _edit(path, lambda c: c.update(output_dir=str(data_dir / "a.jsonl" / "out")))
    elif change == "gpt2":
        import shutil

        model = tmp_path / "gpt2"
        shutil.copytree(yaml.safe_load(path.read_text())["base_model"]["path"], model)
        (model / "config.json").write_text('{"model_type": "gpt2"}')
        _edit(path, lambda c: c["base_model"].update(path=str(model), backend="llama"))
    else:
        _edit(path, change)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_every_example_longer_than_cutoff_fails_cleanly(make_config, data_dir, tmp_path, capsys):
    path = make_config([job("a", data_dir / "a.jsonl", data_opts={"cutoff_len": 8})])
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "a.jsonl: no example has a response token left within cutoff_len 8" in err
    assert not (tmp_path / "out").exists()  # failed before anything was written


def test_target_modules_matching_nothing_in_the_model_fail_cleanly(make_config, data_dir, tmp_path, capsys):
    """A backend that promises a module name its model lacks: caught when the adapter attaches."""
    from mlora_core.plugin_api.hookspecs import hookimpl
    from mlora_core.plugin_api.host import create_plugin_manager
    from mlora_decoders.backend import DecoderBackend

    class Overpromising(DecoderBackend):
        target_modules = (*DecoderBackend().target_modules, "w_gate")

    class Plugin:
        __name__ = "overpromising"

        @hookimpl
        def mlora_register_backends(self, register):
            register("overpromising", Overpromising)

    host = create_plugin_manager(autoload=False, extra=[Plugin()])
    jobs = [job("a", data_dir / "a.jsonl", adapter={"type": "lora", "r": 2, "target_modules": ["w_gate"]})]
    config = load_config(make_config(jobs), ["base_model.backend=overpromising"])
    from mlora_core.errors import MloraError
    from mlora_core.training.engine import Engine

    with pytest.raises(MloraError, match=r"adapter 'a': no linear layer named \['w_gate'\] in the model"):
        Engine(config, host).run()
    assert not (tmp_path / "out").exists()


def test_job_names_with_dots_are_rejected(make_config, data_dir, host):
    config = load_config(make_config([job("v1.5", data_dir / "a.jsonl")]))
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.name: 'v1\.5' must be letters, digits"):
        validate_config(config, host)
