"""Monitors: metrics.jsonl, the console's live and log modes, TensorBoard's run scalars."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import job

from mlora_console.monitor import ConsoleMonitor, format_table
from mlora_core.config.schema import load_config
from mlora_core.training.engine import run

RUN_KEYS = {"step_time_s", "rows", "tokens", "real_tokens", "padding_fraction", "peak_memory_bytes", "cpu_utilisation"}


def _run(make_config, data_dir, host, tmp_path, **monitor):
    jobs = [job("a", data_dir / "a.jsonl", max_steps=3), job("b", data_dir / "b.jsonl", max_steps=2)]
    config = load_config(make_config(jobs, monitor=monitor))
    return config, run(config, host)


def test_metrics_jsonl_holds_every_step_job_end_and_summary(make_config, data_dir, host, tmp_path):
    config, summary = _run(make_config, data_dir, host, tmp_path)
    records = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events[0] == "train_start" and events[-1] == "train_end"
    steps = [r for r in records if r["event"] == "step"]
    assert len(steps) == summary["engine_steps"]
    assert all(RUN_KEYS <= set(r["run"]) for r in steps)
    losses = [r["jobs"]["a"]["loss"] for r in steps if "loss" in r["jobs"].get("a", {})]
    assert len(losses) == 3 and abs(losses[-1] - summary["jobs"][0]["final_train_loss"]) < 1e-9
    assert [r["job"] for r in records if r["event"] == "job_end"] == ["b", "a"]
    evaluations = [(r["phase"], sorted(r["jobs"])) for r in records if r["event"] == "evaluation"]
    assert evaluations == [("before", ["a", "b"]), ("after", ["b"]), ("after", ["a"])]
    assert records[-1]["summary"]["jobs"] == summary["jobs"]
    assert {"tokens_seen", "grad_norm", "tokens_per_s", "lr"} <= set(steps[-1]["jobs"]["a"])
    # Each job's peak is the highest step peak among the steps that held its rows.
    for entry in summary["jobs"]:
        own = [r["run"]["peak_memory_bytes"] for r in steps if entry["name"] in r["jobs"]]
        assert 0 < entry["peak_memory_bytes"] <= summary["peak_memory_bytes"]
        assert entry["peak_memory_bytes"] >= max(own, default=0)


def test_utilisation_falls_back_to_cpu_without_a_gpu():
    import torch

    from mlora_core.training.utilisation import UtilisationMeter

    meter = UtilisationMeter("cuda:0")
    if torch.cuda.is_available():  # pragma: no cover - exercised on GPU machines only
        pytest.skip("this checks the fallback on machines without CUDA")
    assert meter.metric == "cpu_utilisation"
    meter.start()
    sum(i * i for i in range(200_000))  # busy for a moment
    busy = meter.read(0.05)["cpu_utilisation"]
    assert busy > 0


def test_tensorboard_has_run_scalars(make_config, data_dir, host, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, summary = _run(make_config, data_dir, host, tmp_path, tensorboard={"log_dir": str(tmp_path / "tb")})
    acc = EventAccumulator(str(tmp_path / "tb" / "_run"))
    acc.Reload()
    assert {f"run/{k}" for k in RUN_KEYS} <= set(acc.Tags()["scalars"])
    assert len(acc.Scalars("run/padding_fraction")) == summary["engine_steps"]
    job_acc = EventAccumulator(str(tmp_path / "tb" / "a"))
    job_acc.Reload()
    assert {"train/tokens_seen", "train/grad_norm", "train/tokens_per_s"} <= set(job_acc.Tags()["scalars"])


def _feed(monitor: ConsoleMonitor) -> None:
    monitor.mlora_on_train_start({"jobs": ["a", "b"]})
    for step in (1, 2):
        metrics = {"a": {"step": step, "total_steps": 4, "loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": 100.0}}
        monitor.mlora_on_step_end(metrics)
    monitor.mlora_on_job_end("b", {"status": "failed", "error": "loss became nan", "steps": 1, "latency_s": 2.0})


def test_console_redraws_one_line_per_job_on_a_terminal(monkeypatch):
    import mlora_console.monitor as console

    monkeypatch.setattr(console, "REDRAW_EVERY_S", 0.0)
    stream = io.StringIO()
    _feed(ConsoleMonitor(output_dir=".", live=True, stream=stream))
    out = stream.getvalue()
    assert "\x1b[2F" in out  # later draws move back up over the two job lines
    last = out.rsplit("\x1b[2F", 1)[1]
    assert "a" in last and "2/4" in last and "loss   0.5000" in last and "ETA" in last
    assert "failed after 1 steps" in last and "loss became nan" in last


def test_console_prints_plain_lines_elsewhere():
    stream = io.StringIO()
    _feed(ConsoleMonitor(output_dir=".", every=2, live=False, stream=stream))
    out = stream.getvalue()
    assert "\x1b[" not in out
    assert "[a] step 2/4  loss 0.5000" in out and "[a] step 1/4" not in out
    assert "[b] failed after 1 steps" in out


def test_end_table_shows_throughput_and_peak_memory(make_config, data_dir, host, tmp_path):
    _, summary = _run(make_config, data_dir, host, tmp_path)
    table = format_table(summary)
    assert "tok/s" in table.splitlines()[0] and "peak memory" in table
    assert table.count("completed") == 2
