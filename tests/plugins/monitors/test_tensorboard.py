"""The TensorBoard monitor writes each job as its own run, with the same tags in every job, and
its hyper-parameters for the HParams dashboard; checked through a real ``tensorboard`` process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import job

from mlora_core.config.schema import load_config
from mlora_core.training.engine import run
from mlora_tensorboard.monitor import TensorBoardMonitor
from mlora_tensorboard.server import get, hparams_experiment, hparams_sessions, tensorboard, wait_for

EXAMPLE_PAIRS = Path(__file__).parents[3] / "examples" / "data" / "arith_preference.jsonl"
TRAIN_TAGS = {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "train/tokens_seen"}
RUN_TAGS = {"run/step_time_s", "run/rows", "run/tokens", "run/real_tokens", "run/padding_fraction"}


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> (step, value) points of one run directory, read by TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _three_jobs(make_config, data_dir: Path, log_dir: Path):
    dpo = job("dpo", EXAMPLE_PAIRS, max_steps=2, lr=5e-3)
    dpo["data"].update(type="preference", val_set_size=8, cutoff_len=64)
    dpo["objective"] = {"type": "dpo", "beta": 0.5}
    wide = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj"]}
    jobs = [job("a", data_dir / "a.jsonl", max_steps=4), job("b", data_dir / "b.jsonl", max_steps=2, adapter=wide), dpo]
    return load_config(make_config(jobs, monitor={"tensorboard": {"log_dir": str(log_dir)}}))


def test_each_job_is_a_run_with_the_same_tags_and_its_hparams(make_config, data_dir, host, tmp_path):
    log_dir = tmp_path / "tb"
    summary = run(_three_jobs(make_config, data_dir, log_dir), host)
    entries = {e["name"]: e for e in summary["jobs"]}
    assert sorted(p.name for p in log_dir.iterdir()) == ["_run", "a", "b", "dpo"]
    assert not list(log_dir.glob("events.out.tfevents.*"))  # no run named "."

    curves = {name: _scalars(log_dir / name) for name in entries}
    for name, entry in entries.items():
        tags = curves[name]
        assert TRAIN_TAGS | {"eval/loss"} <= set(tags)
        assert not any(tag.startswith(("run/", f"{name}/")) for tag in tags)
        assert [s for s, _ in tags["train/loss"]] == list(range(1, entry["steps"] + 1))  # the job's optimizer step
        assert tags["train/loss"][-1][1] == pytest.approx(entry["final_train_loss"], abs=1e-5)
        assert tags["eval/loss"] == [
            (0, pytest.approx(entry["eval_loss_before"], abs=1e-5)),
            (entry["steps"], pytest.approx(entry["eval_loss_after"], abs=1e-5)),
        ]
    assert set(curves["a"]) == set(curves["b"])  # SFT jobs: identical tag sets
    assert {"train/rewards/chosen", "train/rewards/margins", "eval/preference_accuracy"} <= set(curves["dpo"])
    pref = curves["dpo"]["eval/preference_accuracy"]
    assert pref[-1][1] == pytest.approx(entries["dpo"]["preference_accuracy_after"])
    run_curves = _scalars(log_dir / "_run")
    assert RUN_TAGS <= set(run_curves) and len(run_curves["run/step_time_s"]) == summary["engine_steps"]

    with tensorboard(log_dir) as url:
        sessions = wait_for(lambda: (s := hparams_sessions(url)) and set(s) == set(entries) and s)
        assert set(get(url, "/data/runs")) == {"_run", "a", "b", "dpo"}
        scalar_tags = get(url, "/data/plugin/scalars/tags")
        assert all(TRAIN_TAGS <= set(scalar_tags[name]) for name in entries)  # one chart per tag, a line per job
        experiment = hparams_experiment(url)
    columns = {h["name"]: h for h in experiment["hparamInfos"]}
    assert {"adapter.r", "adapter.alpha", "adapter.target_modules", "train.lr", "objective.type"} <= set(columns)
    assert columns["adapter.r"]["type"] == "DATA_TYPE_FLOAT64" and columns["adapter.r"]["differs"]
    assert columns["data.exact_match"]["type"] == "DATA_TYPE_BOOL"
    metric_tags = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert TRAIN_TAGS | {"eval/loss", "eval/preference_accuracy", "train/rewards/chosen"} <= metric_tags
    assert not any(tag.startswith("run/") for tag in metric_tags)  # _run is no session

    assert sessions["b"]["hparams"]["adapter.target_modules"] == "q_proj,k_proj,v_proj"
    assert sessions["b"]["hparams"]["adapter.r"] == 8 and sessions["a"]["hparams"]["adapter.r"] == 4
    assert sessions["dpo"]["hparams"]["objective.type"] == "dpo" and sessions["dpo"]["hparams"]["objective.beta"] == 0.5
    for name, entry in entries.items():
        assert sessions[name]["status"] == "SUCCESS"
        assert sessions[name]["metrics"]["eval/loss"] == pytest.approx(entry["eval_loss_after"], abs=1e-5)
        assert sessions[name]["metrics"]["train/loss"] == pytest.approx(entry["final_train_loss"], abs=1e-5)
    assert "eval/preference_accuracy" not in sessions["a"]["metrics"]


def _session_info(run_dir: Path) -> tuple[dict[str, object], int | None]:
    """A run's hyper-parameters and session status, as TensorBoard reads them (the first
    metadata of each tag across the run's event files); status None: the session is open."""
    from google.protobuf.json_format import MessageToDict
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata

    mux = EventMultiplexer({"run": str(run_dir)})
    mux.Reload()
    content = mux.PluginRunToTagToContent(metadata.PLUGIN_NAME)["run"]
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    hparams = {k: MessageToDict(v) for k, v in start.hparams.items()}
    end = content.get(metadata.SESSION_END_INFO_TAG)
    return hparams, None if end is None else metadata.parse_session_end_info_plugin_data(end).status


def _live_run(*names: str) -> dict[str, Any]:
    """``run`` as the hooks get it: jobs' config dicts (``max_steps`` null: left out of the hparams)."""
    settings = {"adapter": {"r": 4, "target_modules": ["q_proj"]}, "train": {"lr": 1e-3, "max_steps": None}}
    return {"config": {"jobs": [{"name": n, **settings} for n in names]}, "jobs": list(names)}


def _steps(monitor: TensorBoardMonitor, live: dict[str, Any], name: str, steps: range) -> None:
    for s in steps:
        monitor.mlora_on_step_end(live, s, {name: {"step": s, "total_steps": 9, "loss": 1.0 / s, "lr": 1e-3}}, {})


def test_sessions_end_with_the_jobs_status_and_a_resume_continues_them(tmp_path):
    from tensorboard.plugins.hparams import api_pb2

    live = _live_run("a", "b")
    first = TensorBoardMonitor(output_dir=str(tmp_path))
    first.mlora_on_train_start(live)
    _steps(first, live, "a", range(1, 3))
    _steps(first, live, "b", range(1, 2))
    # a sweep adds a trial to the running engine: its config is appended before its first event
    live["config"]["jobs"].append({"name": "trial-1", "adapter": {"r": 16}, "train": {"lr": 3e-4}})
    live["jobs"].append("trial-1")
    _steps(first, live, "trial-1", range(1, 2))
    first.mlora_on_job_end(live, "trial-1", {"status": "pruned", "steps": 1})
    first.mlora_on_job_end(live, "b", {"status": "failed", "error": "loss became nan", "steps": 1})
    first.mlora_on_job_end(live, "a", {"status": "interrupted", "steps": 2})
    first.close()
    log_dir = tmp_path / "tensorboard"
    hparams, status = _session_info(log_dir / "a")
    assert hparams == {"adapter.r": 4, "adapter.target_modules": "q_proj", "train.lr": 1e-3} and status is None
    assert _session_info(log_dir / "b")[1] == api_pb2.STATUS_FAILURE
    assert _session_info(log_dir / "trial-1") == ({"adapter.r": 16, "train.lr": 3e-4}, api_pb2.STATUS_UNKNOWN)

    resumed = TensorBoardMonitor(output_dir=str(tmp_path), resume=True)
    _steps(resumed, live, "a", range(3, 5))
    resumed.mlora_on_job_end(live, "a", {"status": "completed", "steps": 4})
    resumed.close()
    assert len(list((log_dir / "a").glob("events.out.tfevents.*"))) == 2  # the resumed run's file beside the first
    assert _session_info(log_dir / "a")[1] == api_pb2.STATUS_SUCCESS
    # (sorted: both files were written in the same second, and their names sort by a counter)
    assert sorted(s for s, _ in _scalars(log_dir / "a")["train/loss"]) == [1, 2, 3, 4]

    fresh = TensorBoardMonitor(output_dir=str(tmp_path))  # --overwrite: the job's earlier files go
    _steps(fresh, live, "a", range(1, 2))
    fresh.close()
    assert len(list((log_dir / "a").glob("events.out.tfevents.*"))) == 1
    assert _session_info(log_dir / "a")[1] is None and _scalars(log_dir / "a")["train/loss"] == [(1, 1.0)]
