"""Held-out evaluation of the engine's jobs, through the adapters attached for training."""

from __future__ import annotations

import time
from collections.abc import Sequence

from mlora_core.evaluation.metrics import held_out_losses, held_out_metrics
from mlora_core.evaluation.objective_metrics import objective_held_out
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
        """Per job: held-out ``eval_loss`` and, for ``exact_match`` data, ``accuracy``; for
        preference objectives ``eval_loss`` is the objective's and ``preference_accuracy`` is added."""
        started = time.perf_counter()
        plain = [j for j in jobs if next_token_loss(j)]
        sets = [(j.name, j.data.eval, j.micro_batch_size, j.config.data.exact_match) for j in plain]
        results: Results = held_out_metrics(self.loaded, self.router, sets, self.pad_id, self.device)
        for job in jobs:
            if not next_token_loss(job):
                results[job.name] = self._objective_metrics(job)
        self.seconds += time.perf_counter() - started
        return results

    def losses(self, jobs: Sequence[Job]) -> dict[str, float | None]:
        """Per job: held-out loss only (None: no held-out samples); for ``eval_every``."""
        started = time.perf_counter()
        sets = [(j.name, j.data.eval, j.micro_batch_size) for j in jobs if j.data.eval and next_token_loss(j)]
        losses = held_out_losses(self.loaded, self.router, sets, self.pad_id, self.device)
        for job in jobs:
            if not next_token_loss(job):
                losses[job.name] = self._objective_metrics(job)["eval_loss"]
        self.seconds += time.perf_counter() - started
        return {j.name: losses.get(j.name) for j in jobs}

    def _objective_metrics(self, job: Job) -> dict[str, float | None]:
        return objective_held_out(
            self.loaded,
            self.router,
            job.name,
            job.data.eval,
            job.micro_batch_size,
            job.objective,
            self.pad_id,
            self.device,
        )


def next_token_loss(job: Job) -> bool:
    """Whether the job's held-out loss is the plain token-mean loss (objective ``sft``)."""
    return job.config.objective.type == "sft"
