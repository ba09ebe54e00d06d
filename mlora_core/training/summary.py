"""summary.json: the documented result of a run (see docs/summary.md)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlora_core.training.job import Job

#: Bumped only for incompatible changes; new fields may be added at any time.
SUMMARY_FORMAT = 1


def job_entry(
    job: Job, before: Mapping[str, float | None], after: Mapping[str, float | None], adapter_dir: str | None
) -> dict[str, Any]:
    """One job's entry; ``before`` and ``after`` hold ``eval_loss``, ``accuracy`` and
    ``preference_accuracy`` (any may be missing or None)."""
    p, h = job.progress, job.history
    return {
        "name": job.name,
        "status": p.status,
        "error": p.error,
        "steps": p.step,
        "total_steps": job.total_steps,
        "train_tokens": p.train_tokens,
        "eval_loss_before": before.get("eval_loss"),
        "eval_loss_after": after.get("eval_loss"),
        "accuracy_before": before.get("accuracy"),
        "accuracy_after": after.get("accuracy"),
        "preference_accuracy_before": before.get("preference_accuracy"),
        "preference_accuracy_after": after.get("preference_accuracy"),
        "best_eval_loss": h.best_eval_loss,
        "best_step": h.best_step,
        "stopped_early": h.stopped_early,
        "final_train_loss": p.final_train_loss,
        "latency_s": round(job.latency_s, 3),
        "peak_memory_bytes": p.peak_memory_bytes,
        "adapter_dir": adapter_dir,
    }


def run_summary(run: Mapping[str, Any], totals: Mapping[str, Any], jobs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """summary.json: the run's facts (``output_dir``, ``base_model``, ``scheduler``), its
    totals (:meth:`mlora_core.training.run_stats.RunStats.totals`) and one entry per job."""
    latencies = [j["latency_s"] for j in jobs]
    return {
        "format": SUMMARY_FORMAT,
        **run,
        **totals,
        "makespan_s": round(max(latencies, default=0.0), 3),
        "mean_job_latency_s": round(sum(latencies) / max(len(latencies), 1), 3),
        "jobs": list(jobs),
    }


def fmt_number(value: float | None) -> str:
    """A loss for a table: 4 decimals, or ``-`` when not measured."""
    return "-" if value is None else f"{value:.4f}"


def fmt_percent(value: float | None) -> str:
    """An accuracy for a table: a percentage, or ``-`` when not measured."""
    return "-" if value is None else f"{value:.1%}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` through a temporary file, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
