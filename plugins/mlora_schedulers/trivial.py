"""``trivial``: every live job contributes its next micro-batch to every step."""

from __future__ import annotations

from collections.abc import Sequence

from mlora_core.config import SchedulerConfig
from mlora_core.protocols import JobView


class TrivialScheduler:
    """Takes every live job, in admission order, up to ``max_concurrent_jobs``.

    ``max_tokens_per_step`` is not used by this strategy.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.max_jobs = config.max_concurrent_jobs

    def select(self, jobs: Sequence[JobView]) -> list[str]:
        ordered = sorted(jobs, key=lambda job: job.order)
        if self.max_jobs is not None:
            ordered = ordered[: self.max_jobs]
        return [job.name for job in ordered]
