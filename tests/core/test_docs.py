"""The docs name every hook, every config key and every per-job summary field (no model needed)."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlora_core.config.schema import MloraConfig
from mlora_core.plugin_api import hookspecs
from mlora_core.plugin_api.host import create_plugin_manager
from mlora_core.training.early_stopping import EvalHistory
from mlora_core.training.job import JobProgress
from mlora_core.training.summary import job_entry

DOCS = Path(__file__).parents[2] / "docs"


def hookspec_signatures() -> list[str]:
    """``name(arg1, arg2)`` for every hookspec function."""
    out = []
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("mlora_"):
            params = ", ".join(inspect.signature(fn).parameters)
            out.append(f"{name}({params})")
    return out


def config_paths(cls: type = MloraConfig, prefix: str = "") -> list[str]:
    """Full dotted path of every field, recursively; list-of-dataclass fields use ``name[]``."""
    hints = typing.get_type_hints(cls)
    paths = []
    for field in dataclasses.fields(cls):
        path = f"{prefix}{field.name}"
        paths.append(path)
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            paths += config_paths(hint, f"{path}.")
        elif typing.get_origin(hint) is list:
            (item,) = typing.get_args(hint)
            if dataclasses.is_dataclass(item):
                paths += config_paths(item, f"{path}[].")
    return paths


def job_entry_fields() -> list[str]:
    stand_in = SimpleNamespace(name="j", progress=JobProgress(), history=EvalHistory(), total_steps=1, latency_s=0.5)
    return list(job_entry(stand_in, {"eval_loss": 2.0}, {"eval_loss": 1.0}, "out/j"))


def test_discovery_finds_things() -> None:
    """The signatures found are those of every hook the plugin manager knows."""
    host = create_plugin_manager(autoload=False)
    hooks = {name for name in vars(host.pm.hook) if name.startswith("mlora_")}
    assert {s.split("(")[0] for s in hookspec_signatures()} == hooks
    assert "jobs[].train.lr" in config_paths()
    assert "adapter_dir" in job_entry_fields()


@pytest.mark.parametrize("signature", hookspec_signatures())
def test_every_hook_is_documented(signature: str) -> None:
    assert signature in (DOCS / "plugins" / "hooks.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("path", config_paths())
def test_every_config_key_is_documented(path: str) -> None:
    assert f"`{path}`" in (DOCS / "config.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("field", job_entry_fields())
def test_every_summary_job_field_is_documented(field: str) -> None:
    assert f"`{field}`" in (DOCS / "summary.md").read_text(encoding="utf-8")
