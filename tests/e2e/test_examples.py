"""Every YAML under examples/ (recursively) loads and validates against the plugins it names.

Configs of the example plugin package (examples/mlora-plugin-example/) are validated here
with that package's plugin module registered in-process (its directory on sys.path, not
installed); tests/test_plugin_example_install.py validates and runs them with the package
pip-installed. Paths in the configs are relative to the repository root, as documented.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from mlora_core.config.schema import load_config
from mlora_core.config.validation import validate_config
from mlora_core.plugin_api.host import create_plugin_manager

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
    validate_config(load_config(path), host)
