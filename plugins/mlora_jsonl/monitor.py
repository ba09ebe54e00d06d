"""``metrics.jsonl``: every event of the run as one JSON object per line.

Lines (all with ``event`` and ``time``, seconds since the monitor started):

- ``{"event": "train_start", "jobs": [...]}``;
- ``{"event": "step", "step": N, "jobs": {job: {...}}, "run": {...}}`` after each engine
  step: the numbers :func:`mlora_core.plugin_api.hookspecs.mlora_on_step_end` receives;
- ``{"event": "evaluation", "step": N, "phase": "before" | "during" | "after", "jobs": {job: {...}}}``:
  held-out results (:func:`~mlora_core.plugin_api.hookspecs.mlora_on_evaluation`);
- ``{"event": "job_end", "job": name, "result": {...}}``, the job's summary.json entry;
- ``{"event": "train_end", "summary": {...}}``.

A fresh run replaces the file; a resumed run (and ``mlora eval``) appends to it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlora_core.plugin_api.hookspecs import JobMetrics, hookimpl


class JsonlMonitor:
    def __init__(self, output_dir: str, resume: bool = False, path: str | None = None) -> None:
        self.path = Path(path) if path else Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a" if resume else "w", encoding="utf-8")
        self.started = time.perf_counter()

    def _write(self, record: dict[str, Any]) -> None:
        record["time"] = round(time.perf_counter() - self.started, 3)
        self.file.write(json.dumps(record) + "\n")

    @hookimpl
    def mlora_on_train_start(self, run: Mapping[str, Any]) -> None:
        self._write({"event": "train_start", "jobs": list(run["jobs"])})

    @hookimpl
    def mlora_on_step_end(self, step: int, metrics: JobMetrics, run_metrics: Mapping[str, float]) -> None:
        jobs = {k: dict(v) for k, v in metrics.items()}
        self._write({"event": "step", "step": step, "jobs": jobs, "run": dict(run_metrics)})

    @hookimpl
    def mlora_on_evaluation(self, step: int, phase: str, results: JobMetrics) -> None:
        jobs = {k: dict(v) for k, v in results.items()}
        self._write({"event": "evaluation", "step": step, "phase": phase, "jobs": jobs})
        self.file.flush()

    @hookimpl
    def mlora_on_job_end(self, job: str, result: Mapping[str, Any]) -> None:
        self._write({"event": "job_end", "job": job, "result": dict(result)})
        self.file.flush()

    @hookimpl
    def mlora_on_train_end(self, summary: Mapping[str, Any]) -> None:
        self._write({"event": "train_end", "summary": dict(summary)})

    def close(self) -> None:
        self.file.close()
