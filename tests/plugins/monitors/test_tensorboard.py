"""The TensorBoard monitor writes each job's curves into real event files."""

from __future__ import annotations

from pathlib import Path

from conftest import job

from mlora_core.config.schema import load_config
from mlora_core.training.engine import run


def test_event_files_hold_each_jobs_loss_curve(make_config, data_dir, host, tmp_path):
    jobs = [job("a", data_dir / "a.jsonl", max_steps=4), job("b", data_dir / "b.jsonl", max_steps=2)]
    log_dir = tmp_path / "tb"
    config = load_config(make_config(jobs, monitor={"tensorboard": {"log_dir": str(log_dir)}}))
    summary = run(config, host)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for entry in summary["jobs"]:
        name = entry["name"]
        assert {f"{name}/train_loss", f"{name}/lr", f"{name}/eval_loss"} <= tags
        losses = acc.Scalars(f"{name}/train_loss")
        assert [e.step for e in losses] == list(range(1, entry["steps"] + 1))
        assert abs(losses[-1].value - entry["final_train_loss"]) < 1e-5
        evals = acc.Scalars(f"{name}/eval_loss")
        assert [e.step for e in evals] == [0, entry["steps"]]
        assert abs(evals[0].value - entry["eval_loss_before"]) < 1e-5
    assert any(Path(log_dir).glob("events.out.tfevents.*"))
