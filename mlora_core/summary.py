"""summary.json: the documented result of a run (see docs/summary.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: Bumped only for incompatible changes; new fields may be added at any time.
SUMMARY_FORMAT = 1


def job_entry(job: Any, eval_before: float | None, eval_after: float | None, adapter_dir: str | None) -> dict[str, Any]:
    """One job's entry; ``job`` is a :class:`mlora_core.job.Job`."""
    return {
        "name": job.name,
        "status": job.status,
        "error": job.error,
        "steps": job.step,
        "total_steps": job.total_steps,
        "train_tokens": job.train_tokens,
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "final_train_loss": job.final_train_loss,
        "latency_s": round(job.latency_s, 3),
        "peak_memory_bytes": job.peak_memory_bytes,
        "adapter_dir": adapter_dir,
    }


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` through a temporary file, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
