"""The example plugin package, pip-installed and used through the ``mlora`` command.

``pip install --no-deps --no-build-isolation --target <tmp>`` installs a copy of
examples/mlora-plugin-example (a copy, so the build leaves nothing in the checkout) and a
broken distribution (its plugin module fails to import) into a private directory. Only the
``mlora`` subprocesses get it on PYTHONPATH, so the rest of the test session never sees
either package; torch, mlora-trainer and the other dependencies come from the project venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "mlora-plugin-example"
BROKEN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "mlora-broken-example"
version = "0.1.0"

[project.entry-points.mlora]
broken = "mlora_broken_example"

[tool.setuptools]
py-modules = ["mlora_broken_example"]
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the installed example plugin and a broken plugin distribution."""
    tmp = tmp_path_factory.mktemp("plugin-install")
    example = shutil.copytree(EXAMPLE, tmp / "src" / "example", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    broken = tmp / "src" / "broken"
    broken.mkdir()
    (broken / "pyproject.toml").write_text(BROKEN_PYPROJECT)
    (broken / "mlora_broken_example.py").write_text("import a_dependency_that_is_not_installed\n")
    target = tmp / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*pip, "--target", str(target), str(example), str(broken)], check=True, timeout=300)
    return target


def mlora(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``mlora ARGS`` in a subprocess that sees the packages installed in ``site``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLORA_")}
    clean["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), clean.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "mlora_core.cli.main", *args]
    return subprocess.run(command, cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=300)


def test_mlora_plugins_shows_the_three_components_and_names_the_broken_distribution(site):
    result = mlora(site, "plugins")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert (
        "example  (mlora-plugin-example 0.1.0)  hooks: mlora_register_adapters, mlora_register_commands, "
        "mlora_register_datasets" in out
    )
    for name in ("dora", "shortest_job_first", "chat_markup", "chat_preview"):
        assert f"  {name:<16} plugin example, from mlora-plugin-example 0.1.0" in out
    assert "  bench            plugin bench, from mlora-trainer" in out
    assert "  lora             plugin lora, from mlora-trainer" in out
    assert "skipping plugin 'broken' from distribution mlora-broken-example 0.1.0 (import failed: " in result.stderr
    assert "a_dependency_that_is_not_installed" in result.stderr

    for env in ({"MLORA_DISABLE_PLUGIN_AUTOLOAD": "1"}, {"MLORA_DISABLED_PLUGINS": "example,broken"}):
        result = mlora(site, "plugins", **env)
        assert result.returncode == 0, result.stderr
        assert "mlora-plugin-example" not in result.stdout and "dora" not in result.stdout
        assert "mlora-broken-example" not in result.stderr


def test_the_plugin_adds_a_command(site, tmp_path):
    data = "examples/mlora-plugin-example/data/antonyms.jsonl"
    result = mlora(site, "chat_preview", "--limit", "2", data, "--template", "plain")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- conversation ") == 2
    first = json.loads((ROOT / data).read_text().splitlines()[0])["messages"]
    assert result.stdout.splitlines()[1] == f"{first[0]['role']}: {first[0]['content']}"
    assert "chat_preview" in mlora(site, "--help").stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = mlora(site, "chat_preview", str(bad))
    assert result.returncode == 2
    assert f"mlora: error: {bad}:1: no assistant message to learn" in result.stderr
    # without the plugin the command does not exist
    result = mlora(site, "chat_preview", data, MLORA_DISABLED_PLUGINS="example")
    assert result.returncode == 2 and "invalid choice: 'chat_preview'" in result.stderr


def test_example_config_validates_and_trains_with_all_three(site, tiny_llama_dir, tmp_path):
    config = "examples/mlora-plugin-example/example.yaml"
    result = mlora(site, "validate", config)
    assert result.returncode == 0, result.stdout + result.stderr

    out = tmp_path / "out"
    small = [
        f"base_model.path={tiny_llama_dir}",
        "base_model.dtype=fp32",
        f"output_dir={out}",
        "monitor.console=null",
        "jobs.0.train.max_steps=2",
        "jobs.1.train.max_steps=2",
        "jobs.1.data.val_set_size=4",
    ]
    result = mlora(site, "run", config, *small)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [(j["name"], j["status"]) for j in summary["jobs"]] == [("antonyms", "completed"), ("numbers", "completed")]
    assert json.loads((out / "antonyms" / "adapter_config.json").read_text())["use_dora"] is True
    assert json.loads((out / "numbers" / "adapter_config.json").read_text())["use_dora"] is False


def test_a_config_using_a_disabled_or_broken_plugin_fails_clearly(site):
    config = "examples/mlora-plugin-example/example.yaml"
    result = mlora(site, "validate", config, MLORA_DISABLED_PLUGINS="example")
    assert result.returncode == 2
    assert "jobs[0].adapter.type: unknown adapter type 'dora'; known: lora, qlora" in result.stderr
    assert "scheduler.type: unknown scheduler 'shortest_job_first'" in result.stderr

    # The broken plugin's components cannot be known; the message names it and its error.
    result = mlora(site, "validate", config, "scheduler.type=broken_scheduler")
    assert result.returncode == 2
    assert "scheduler.type: unknown scheduler 'broken_scheduler'; known: " in result.stderr
    assert "plugin 'broken' from distribution mlora-broken-example 0.1.0 (import failed: " in result.stderr
