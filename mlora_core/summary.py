"""summary.json: the documented result of a run (see docs/summary.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any

#: Bumped only for incompatible changes; new fields may be added at any time.
SUMMARY_FORMAT = 1


def job_entry(
    job: Any, before: Mapping[str, float | None], after: Mapping[str, float | None], adapter_dir: str | None
) -> dict[str, Any]:
    """One job's entry; ``job`` is a :class:`mlora_core.job.Job`; ``before`` and ``after`` hold
    ``eval_loss`` and ``accuracy`` (either may be missing or None)."""
    return {
        "name": job.name,
        "status": job.status,
        "error": job.error,
        "steps": job.step,
        "total_steps": job.total_steps,
        "train_tokens": job.train_tokens,
        "eval_loss_before": before.get("eval_loss"),
        "eval_loss_after": after.get("eval_loss"),
        "accuracy_before": before.get("accuracy"),
        "accuracy_after": after.get("accuracy"),
        "best_eval_loss": job.best_eval_loss,
        "best_step": job.best_step,
        "stopped_early": job.stopped_early,
        "final_train_loss": job.final_train_loss,
        "latency_s": round(job.latency_s, 3),
        "peak_memory_bytes": job.peak_memory_bytes,
        "adapter_dir": adapter_dir,
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
