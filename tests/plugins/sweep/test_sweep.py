"""``mlora sweep``: trials as concurrent jobs of one engine, pruning, resume, validation."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import job, wait_for_checkpoint
from safetensors.torch import load_file

from mlora_core.config.schema import load_config
from mlora_core.errors import ConfigError
from mlora_core.training.engine import run
from mlora_sweep.command import dry_run, run_sweep
from mlora_sweep.config import load_sweep


@pytest.fixture
def make_sweep(tmp_path: Path, tiny_llama_dir: Path):
    """Write a sweep file over the tiny model; returns its path."""

    def make(template: dict[str, Any], space: dict[str, Any], sweep: dict[str, Any], **top: Any) -> Path:
        cfg: dict[str, Any] = {
            "base_model": {"backend": "llama", "path": str(tiny_llama_dir), "dtype": "fp32"},
            "scheduler": {"type": "optimal_fit"},
            "monitor": {"console": None, "jsonl": {}},
            "output_dir": str(tmp_path / "sweep"),
            "template": template,
            "space": space,
            "sweep": sweep,
            **top,
        }
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return make


def adapter_weights(directory: str | Path) -> dict[str, Any]:
    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def leaderboard(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "leaderboard.json").read_text())


def test_grid_of_four_trials_equals_the_same_jobs_run_by_mlora_run(make_sweep, make_config, data_dir, host, tmp_path):
    template = job("arith", data_dir / "a.jsonl", max_steps=4)
    space = {"train.lr": [1e-3, 3e-3], "adapter.r": [2, 4]}
    path = make_sweep(template, space, {"max_concurrent": 2, "pruner": "none"})
    sweep = load_sweep(path, [], host)
    assert sweep.trials == 4  # the grid's size
    assert run_sweep(sweep, host) == 0

    out = tmp_path / "sweep"
    board = leaderboard(out)
    assert sorted(r["name"] for r in board) == ["arith-000", "arith-001", "arith-002", "arith-003"]
    assert all(r["status"] == "completed" and r["steps"] == 4 for r in board)
    values = [r["value"] for r in board]
    assert values == sorted(values)  # best (lowest eval_loss) first
    grid = {(r["params"]["train.lr"], r["params"]["adapter.r"]) for r in board}
    assert grid == {(1e-3, 2), (1e-3, 4), (3e-3, 2), (3e-3, 4)}

    jobs = []
    for r in board:
        alone = job(r["name"], data_dir / "a.jsonl", max_steps=4, lr=r["params"]["train.lr"])
        alone["adapter"]["r"] = r["params"]["adapter.r"]
        jobs.append(alone)
    reference = run(load_config(make_config(jobs, output_dir=str(tmp_path / "run"))), host)
    by_name = {e["name"]: e for e in reference["jobs"]}
    for r in board:
        ours, theirs = adapter_weights(r["adapter_dir"]), adapter_weights(tmp_path / "run" / r["name"])
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].allclose(theirs[key], rtol=1e-4, atol=1e-6), (r["name"], key)
        assert r["value"] == pytest.approx(by_name[r["name"]]["eval_loss_after"], rel=1e-5)
    best = adapter_weights(out / "best")
    assert all(best[k].equal(v) for k, v in adapter_weights(board[0]["adapter_dir"]).items())
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["jobs"]) == 4


PRUNING_SPACE = {"train.lr": [2e-3, 1.0, 5e-3, 3e-3]}


def pruning_template(data_dir: Path) -> dict[str, Any]:
    return job("arith", data_dir / "a.jsonl", max_steps=6, eval_every=1)


def test_the_worst_trial_is_pruned_and_a_new_trial_takes_its_room(make_sweep, data_dir, host, tmp_path, capsys):
    # lr 1.0 wrecks trial 1's adapter in one step: its held-out loss is the worst at the first rung
    sweep = {"max_concurrent": 2, "pruner": "successive_halving", "trials": 3}
    path = make_sweep(pruning_template(data_dir), PRUNING_SPACE, sweep)
    run_sweep(load_sweep(path, [], host), host)
    printed = capsys.readouterr().out

    board = {r["name"]: r for r in leaderboard(tmp_path / "sweep")}
    worst = board["arith-001"]
    assert worst["status"] == "pruned" and worst["steps"] == 1
    assert "pruned by successive_halving at step 1" in worst["error"]
    assert worst["value"] > board["arith-000"]["value"]
    assert Path(worst["adapter_dir"], "adapter_model.safetensors").is_file()  # keeps its adapter
    assert board["arith-000"]["status"] == "completed" and board["arith-000"]["steps"] == 6
    # the new trial joins at the boundary after the prune, while trial 0 still trains
    starts = {m[0]: int(m[1]) for m in re.findall(r"(arith-\d+) starts at engine step (\d+)", printed)}
    assert starts["arith-000"] == starts["arith-001"] == 0
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    steps_of = {e["name"]: e["steps"] for e in summary["jobs"]}
    assert steps_of["arith-001"] == 1
    assert 0 < starts["arith-002"] < summary["engine_steps"]
    events = [json.loads(line) for line in (tmp_path / "sweep" / "metrics.jsonl").read_text().splitlines()]
    trained_after = [e for e in events if e["event"] == "step" and e["step"] > starts["arith-002"]]
    assert {name for e in trained_after for name in e["jobs"]} >= {"arith-000", "arith-002"}


def mlora(*args: str) -> subprocess.Popen[str]:
    exe = shutil.which("mlora") or str(Path(sys.executable).parent / "mlora")
    env = {**os.environ, "MLORA_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_resume_after_sigkill_gives_the_uninterrupted_leaderboard(make_sweep, data_dir, tmp_path):
    space = {"train.lr": {"loguniform": [1e-3, 1.0]}, "adapter.r": [2, 4]}
    settings = {"max_concurrent": 2, "pruner": "successive_halving", "trials": 5, "seed": 7}
    template = job("arith", data_dir / "a.jsonl", max_steps=8, eval_every=1)
    path = make_sweep(template, space, settings, checkpoint_every=2)

    whole = mlora("sweep", str(path), f"output_dir={tmp_path / 'whole'}")
    out, err = whole.communicate(timeout=600)
    assert whole.returncode in (0, 1), err
    expected = leaderboard(tmp_path / "whole")

    killed = mlora("sweep", str(path), f"output_dir={tmp_path / 'killed'}")
    wait_for_checkpoint(tmp_path / "killed", killed, min_step=6)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert not (tmp_path / "killed" / "leaderboard.json").exists()

    resumed = mlora("sweep", str(path), f"output_dir={tmp_path / 'killed'}", "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode in (0, 1), err
    got = leaderboard(tmp_path / "killed")

    def outcome(rows: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
        return [(r["name"], r["status"], r["steps"]) for r in rows]

    assert outcome(got) == outcome(expected)
    for ours, theirs in zip(got, expected, strict=True):
        assert ours["params"] == theirs["params"]
        assert ours["value"] == pytest.approx(theirs["value"], rel=1e-5)
    assert {r["status"] for r in expected} >= {"completed", "pruned"}


def test_bad_sweep_files_fail_before_any_model_loads(make_sweep, data_dir, host):
    template = job("arith", data_dir / "a.jsonl")
    space = {
        "train.learning_rate": [1e-3],
        "adapter.r": [],
        "train.lr": {"loguniform": [1e-2, 1e-4]},
        "train.epochs": {"int": [1, 2.5]},
        "adapter": [1],
    }
    path = make_sweep(template, space, {"metric": "f1", "trials": 0})
    with pytest.raises(ConfigError) as caught:
        load_sweep(path, [], host)
    problems = caught.value.problems
    assert "space.train.learning_rate: not a job key; train has: " in problems[0] if problems else False
    text = "\n".join(problems)
    assert "space.adapter.r: an empty list gives no trials" in text
    assert "space.train.lr: loguniform: low 0.01 is above high 0.0001" in text
    assert "space.train.epochs: int: expected whole numbers" in text
    assert "space.adapter: names a section" in text
    assert "sweep.metric: 'f1' is not one of eval_loss, accuracy" in text
    assert "sweep.trials: must be at least 1, not 0" in text
    assert "template.train.eval_every: the pruner compares trials" in text

    path = make_sweep(template, {"adapter.r": [4, 0]}, {"pruner": "none", "trials": 2})
    with pytest.raises(ConfigError, match=r"space.adapter.r: 0 gives template.adapter.r"):
        load_sweep(path, [], host)
    path = make_sweep(template, {"adapter.r": [4, 8]}, {"pruner": "none", "trials": 3})
    with pytest.raises(ConfigError, match=r"sweep.trials: 3 is more than the grid's 2 points"):
        load_sweep(path, [], host)


def test_dry_run_lists_the_trials_and_predicts_memory(make_sweep, data_dir, host):
    space = {"adapter.r": [2, 4], "train.lr": {"loguniform": [1e-4, 1e-2]}}
    path = make_sweep(job("arith", data_dir / "a.jsonl"), space, {"pruner": "none", "trials": 3, "max_concurrent": 2})
    text = dry_run(load_sweep(path, [], host), host)
    assert "3 trial(s), 2 at a time" in text
    assert "arith-000  adapter.r=2  train.lr~loguniform(0.0001, 0.01)" in text
    assert "arith-002  adapter.r=2" in text  # the grid cycles
    assert re.search(r"a step with every job's micro-batch \(4 rows x \d+ tokens\): [\d.]+ GiB predicted", text)


def test_a_trial_that_cannot_start_fails_alone(make_sweep, data_dir, host, tmp_path):
    # validation reads the files but has no tokenizer: a cutoff_len that leaves no response
    # token only shows when the trial's data is tokenized, as it starts
    template = job("arith", data_dir / "a.jsonl", max_steps=2)
    path = make_sweep(template, {"data.cutoff_len": [256, 4, 128]}, {"pruner": "none", "max_concurrent": 2})
    assert run_sweep(load_sweep(path, [], host), host) == 1

    board = {r["name"]: r for r in leaderboard(tmp_path / "sweep")}
    assert board["arith-001"]["status"] == "failed" and board["arith-001"]["steps"] == 0
    assert "could not start" in board["arith-001"]["error"] and "cutoff_len 4" in board["arith-001"]["error"]
    assert board["arith-000"]["status"] == board["arith-002"]["status"] == "completed"
    assert board["arith-002"]["steps"] == 2


def test_accuracy_metric_is_measured_at_every_rung_and_maximized(make_sweep, data_dir, host, tmp_path):
    import optuna

    template = job("arith", data_dir / "a.jsonl", max_steps=3, eval_every=1, data_opts={"exact_match": True})
    path = make_sweep(template, {"train.lr": [1e-3, 2e-3]}, {"metric": "accuracy", "pruner": "none"})
    sweep = load_sweep(path, [], host)
    assert sweep.direction == "maximize"
    run_sweep(sweep, host)

    summary = {e["name"]: e for e in json.loads((tmp_path / "sweep" / "summary.json").read_text())["jobs"]}
    study = optuna.load_study(study_name="mlora-sweep", storage=f"sqlite:///{tmp_path / 'sweep' / 'study.db'}")
    for trial in study.trials:
        name = f"arith-{trial.number:03d}"
        assert sorted(trial.intermediate_values) == [1, 2]  # the evaluations before the last step
        assert all(0.0 <= v <= 1.0 for v in trial.intermediate_values.values())
        assert trial.value == summary[name]["accuracy_after"]
