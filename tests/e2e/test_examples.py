"""Every YAML under examples/ (recursively) loads and validates against the plugins it names.

Configs of the example plugin package (examples/mlora-plugin-example/) are validated here
with that package's plugin module registered in-process (its directory on sys.path, not
installed); tests/test_plugin_example_install.py validates and runs them with the package
pip-installed. Paths in the configs are relative to the repository root, as documented.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mlora_core.config.schema import config_from_mapping, job_config_from_dict, load_config, read_config_file
from mlora_core.config.validation import validate_config
from mlora_core.plugin_api.host import PluginHost, create_plugin_manager
from mlora_sweep.config import load_sweep

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "examples"
PLUGIN_PACKAGE = EXAMPLES / "mlora-plugin-example"
CONFIGS = sorted(EXAMPLES.rglob("*.yaml"))


def test_examples_are_found():
    names = {p.relative_to(EXAMPLES).as_posix() for p in CONFIGS}
    assert {"quickstart.yaml", "mlora-plugin-example/example.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_example_config_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    extra = []
    if PLUGIN_PACKAGE in path.parents:
        monkeypatch.syspath_prepend(str(PLUGIN_PACKAGE))
        extra.append(importlib.import_module("mlora_plugin_example.plugin"))
    host = create_plugin_manager(autoload=False, extra=extra)
    load(path, host)


def load(path: Path, host: PluginHost) -> None:
    """Validate an example as the command it is written for does: a sweep file (``template``),
    a service config (no ``jobs``), one job for ``mlora submit`` (``name``), or a run config."""
    raw, problems = read_config_file(path)
    if "template" in raw:
        load_sweep(path, [], host)
    elif "name" in raw:
        job = job_config_from_dict(OmegaConf.to_container(raw), "job")  # type: ignore[arg-type]
        service = config_from_mapping(read_config_file(EXAMPLES / "serve.yaml")[0], [], jobs_required=False)
        validate_config(dataclasses.replace(service, jobs=[job]), host)
    elif "jobs" not in raw:
        validate_config(config_from_mapping(raw, problems, jobs_required=False), host)
    else:
        validate_config(load_config(path), host)
