"""The sweep's results: ``leaderboard.json``, the printed table, and ``best/``.

``leaderboard.json`` is a list with one object a trial, best first: ``name``, ``number``,
``params`` (space key -> value), ``value`` (the metric's last value: after training for a
completed trial, at the rung that stopped it for a pruned one), ``steps`` (optimizer steps
trained), ``status`` (completed / pruned / failed / running), ``error`` and ``adapter_dir``.
Completed trials come first, best value first; then pruned ones, those that trained longest
first; then the rest.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mlora_core.training.summary import write_json_atomic
from mlora_sweep.config import SweepConfig
from mlora_sweep.space import decode

LEADERBOARD = "leaderboard.json"
BEST = "best"
STATUSES = {
    TrialState.COMPLETE: "completed",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


def leaderboard(study: optuna.Study, sweep: SweepConfig) -> list[dict[str, Any]]:
    """Every trial of the study as a leaderboard entry, best first (see the module doc)."""
    out = Path(sweep.run.output_dir)
    axes = {a.key: a for a in sweep.space.axes}
    rows = []
    for t in study.get_trials(deepcopy=False):
        name = sweep.trial_name(t.number)
        adapter = out / name
        rows.append(
            {
                "name": name,
                "number": t.number,
                "params": {k: decode(axes[k], v) for k, v in t.params.items() if k in axes},
                "value": t.value if t.value is not None else _last_intermediate(t),
                "steps": int(t.user_attrs.get("steps", t.last_step or 0)),
                "status": STATUSES.get(t.state, t.state.name.lower()),
                "error": t.user_attrs.get("error"),
                "adapter_dir": str(adapter) if (adapter / "adapter_config.json").is_file() else None,
            }
        )
    sign = 1.0 if sweep.direction == "minimize" else -1.0

    def order(row: dict[str, Any]) -> tuple[int, float, float]:
        value = sign * row["value"] if row["value"] is not None else math.inf
        if row["status"] == "completed":
            return (0, value, row["number"])
        if row["status"] == "pruned":
            return (1, -row["steps"], value)
        return (2, row["number"], 0.0)

    return sorted(rows, key=order)


def _last_intermediate(t: optuna.trial.FrozenTrial) -> float | None:
    return t.intermediate_values[t.last_step] if t.last_step is not None else None


def write_results(study: optuna.Study, sweep: SweepConfig) -> list[dict[str, Any]]:
    """Write ``leaderboard.json`` and copy the best completed trial's adapter to ``best/``."""
    out = Path(sweep.run.output_dir)
    rows = leaderboard(study, sweep)
    write_json_atomic(out / LEADERBOARD, rows)
    best = next((r for r in rows if r["status"] == "completed" and r["adapter_dir"]), None)
    if best is not None:
        tmp = out / f".{BEST}.copying"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(best["adapter_dir"], tmp)
        shutil.rmtree(out / BEST, ignore_errors=True)
        os.replace(tmp, out / BEST)
    return rows


def format_table(rows: list[dict[str, Any]], sweep: SweepConfig) -> str:
    """The leaderboard as a text table: trial, each parameter, the metric, steps, status."""
    keys = [a.key for a in sweep.space.axes]
    head = ["trial", *keys, sweep.settings.metric, "steps", "status"]
    body = [
        [
            r["name"],
            *(_fmt(r["params"].get(k)) for k in keys),
            _fmt(r["value"]),
            str(r["steps"]),
            r["status"],
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [head, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)
