"""Checkpoints and resume: a killed or stopped run continues to exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import job, wait_for_checkpoint
from safetensors.torch import load_file

from mlora_core.config.schema import load_config
from mlora_core.errors import MloraError
from mlora_core.training.engine import Engine

NAMES = ("quick", "slow", "noisy")


def _jobs(data_dir: Path) -> list[dict]:
    jobs = [
        job("quick", data_dir / "c.jsonl", max_steps=2),
        job("slow", data_dir / "a.jsonl", epochs=3, max_steps=25, lr=2e-3),
        job("noisy", data_dir / "b.jsonl", epochs=3, max_steps=20),
    ]
    jobs[2]["adapter"]["dropout"] = 0.1  # resume must restore the RNG behind dropout masks too
    return jobs


def _adapters(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_file(str(out / n / "adapter_model.safetensors")) for n in NAMES}


def _assert_same(ours, reference) -> None:
    for name, weights in reference.items():
        for key, value in weights.items():
            torch.testing.assert_close(ours[name][key], value, atol=1e-6, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture
def reference(make_config, data_dir, host, tmp_path):
    """The uninterrupted run's adapters (checkpointing on, which must not change results)."""
    config = load_config(make_config(_jobs(data_dir)), [f"output_dir={tmp_path / 'reference'}", "checkpoint_every=3"])
    Engine(config, host).run()
    return _adapters(Path(config.output_dir))


def _start(config_path: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlora_core.cli.main", "run", str(config_path), "checkpoint_every=3", *extra]
    env = {**os.environ, "MLORA_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_sigkill_then_resume_equals_uninterrupted(make_config, data_dir, tmp_path, reference):
    path = make_config(_jobs(data_dir))
    out = tmp_path / "out"
    proc = _start(path)
    wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()  # it really died mid-run
    quick_adapter = out / "quick" / "adapter_model.safetensors"
    assert quick_adapter.is_file()
    mtime = quick_adapter.stat().st_mtime_ns

    resumed = _start(path, "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert quick_adapter.stat().st_mtime_ns == mtime  # the finished job was not trained again
    summary = json.loads((out / "summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["completed"] * 3
    assert [j["steps"] for j in summary["jobs"]] == [2, 25, 20]
    _assert_same(_adapters(out), reference)


def test_sigterm_checkpoints_and_stops_then_resume_finishes(make_config, data_dir, tmp_path, reference):
    path = make_config(_jobs(data_dir))
    out = tmp_path / "out"
    proc = _start(path)
    wait_for_checkpoint(out, proc, min_step=3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr and "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert {j["status"] for j in summary["jobs"][1:]} == {"interrupted"}

    resumed = _start(path, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    _assert_same(_adapters(out), reference)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(
    make_config, data_dir, host, tmp_path, reference, monkeypatch
):
    import mlora_core.training.run_directory as checkpoint

    config = load_config(make_config(_jobs(data_dir)), ["checkpoint_every=3"])
    engine = Engine(config, host)
    engine.setup()
    real_save, calls = checkpoint.save_file, []

    def crash_on_the_fifth_file(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 5:  # in the middle of the second checkpoint
            raise OSError("disk vanished")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", crash_on_the_fifth_file)
    with pytest.raises(OSError, match="disk vanished"):
        engine.train()
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    out = Path(config.output_dir)
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 3
    assert any(p.name.endswith(".tmp") for p in (out / "checkpoints").iterdir())  # the half-written one

    kept = out / "checkpoints" / "step-00000003"
    assert {p.suffix for p in kept.iterdir()} == {".json", ".safetensors"}  # no pickles anywhere
    resumed = Engine(config, host, resume=True)
    summary = resumed.run()
    assert [j["status"] for j in summary["jobs"]] == ["completed"] * 3
    _assert_same(_adapters(out), reference)
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("train_start") == 2 and events[-1] == "train_end"  # the resumed run appended


def test_output_dir_holding_a_run_needs_resume_or_overwrite(make_config, data_dir, host):
    config = load_config(make_config([job("a", data_dir / "a.jsonl", max_steps=1)]))
    Engine(config, host).run()
    with pytest.raises(MloraError, match="already holds a run; pass --resume"):
        Engine(config, host).run()
    summary = Engine(config, host, overwrite=True).run()
    assert summary["jobs"][0]["status"] == "completed"
    events = [
        json.loads(line)["event"] for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    assert events.count("train_start") == 1  # the overwritten run's metrics are gone
