"""Held-out evaluation of the engine's jobs, through the adapters attached for training."""

from __future__ import annotations

import time
from collections.abc import Sequence

from mlora_core.evaluation.metrics import held_out_losses, held_out_metrics
from mlora_core.plugin_api.protocols import LoadedModel
from mlora_core.plugin_api.routing import RowRouter
from mlora_core.training.job import Job

#: Per job: ``eval_loss`` and ``accuracy`` (None: not measured).
Results = dict[str, dict[str, float | None]]


class HeldOutEvaluator:
    """Measures jobs on their held-out samples, several jobs per batch, and counts the time."""

    def __init__(self, loaded: LoadedModel, router: RowRouter, pad_id: int, device: str) -> None:
        self.loaded, self.router, self.pad_id, self.device = loaded, router, pad_id, device
        #: Seconds spent evaluating so far.
        self.seconds = 0.0

    def metrics(self, jobs: Sequence[Job]) -> Results:
        """Per job: held-out ``eval_loss`` and, for ``exact_match`` data, ``accuracy``."""
        started = time.perf_counter()
        sets = [(j.name, j.data.eval, j.micro_batch_size, j.config.data.exact_match) for j in jobs]
        results = held_out_metrics(self.loaded, self.router, sets, self.pad_id, self.device)
        self.seconds += time.perf_counter() - started
        return results

    def losses(self, jobs: Sequence[Job]) -> dict[str, float | None]:
        """Per job: held-out loss only (None: no held-out samples); for ``eval_every``."""
        started = time.perf_counter()
        sets = [(j.name, j.data.eval, j.micro_batch_size) for j in jobs if j.data.eval]
        losses = held_out_losses(self.loaded, self.router, sets, self.pad_id, self.device)
        self.seconds += time.perf_counter() - started
        return {j.name: losses.get(j.name) for j in jobs}
