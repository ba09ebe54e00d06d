"""``metrics.jsonl``: every event of the run as one JSON object per line.

Lines (all with ``event`` and ``time``, seconds since the run's start):

- ``{"event": "step", "step": N, "jobs": {job: {...}}, "run": {...}}`` after each engine
  step (and with held-out losses at step 0 and as jobs finish); the same numbers as
  :func:`mlora_core.hookspecs.mlora_on_step_end` receives;
- ``{"event": "job_end", "job": name, "result": {...}}``, the job's summary.json entry;
- ``{"event": "train_end", "summary": {...}}``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class JsonlMonitor:
    def __init__(self, output_dir: str, path: str | None = None) -> None:
        self.path = Path(path) if path else Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")  # appends across --resume
        self.started = time.perf_counter()

    def _write(self, record: dict[str, Any]) -> None:
        record["time"] = round(time.perf_counter() - self.started, 3)
        self.file.write(json.dumps(record) + "\n")

    def on_train_start(self, run: Mapping[str, Any]) -> None:
        self._write({"event": "train_start", "jobs": list(run["jobs"])})

    def on_step_end(
        self, step: int, metrics: Mapping[str, Mapping[str, float]], run_metrics: Mapping[str, float]
    ) -> None:
        self._write(
            {"event": "step", "step": step, "jobs": {k: dict(v) for k, v in metrics.items()}, "run": dict(run_metrics)}
        )

    def on_job_end(self, job: str, result: Mapping[str, Any]) -> None:
        self._write({"event": "job_end", "job": job, "result": dict(result)})
        self.file.flush()

    def on_train_end(self, summary: Mapping[str, Any]) -> None:
        self._write({"event": "train_end", "summary": dict(summary)})
        self.file.close()
