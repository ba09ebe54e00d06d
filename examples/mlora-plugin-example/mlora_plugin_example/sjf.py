"""``shortest_job_first``: the admitted jobs with the fewest tokens left train first.

Shortest-job-first minimises the mean time to a finished adapter: short jobs complete (and
free their memory) early instead of sharing every step with the long ones. Long jobs wait
while shorter ones run; ``jobs_per_step`` > 1 lets several of the shortest share a step.
Priorities still decide admission (``scheduler.max_concurrent_jobs``), before this order.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlora_core.config.schema import SchedulerConfig
from mlora_core.errors import ConfigError
from mlora_core.plugin_api.scheduling import JobView, StepBudget, StepPlan, pack

OPTIONS = ("jobs_per_step",)


class ShortestJobFirstScheduler:
    """Each step: the ``jobs_per_step`` jobs with the fewest remaining tokens, one micro-batch each.

    Ties go to the job listed first in the config. ``max_tokens_per_step`` and the memory
    check can shrink a job's share (``pack`` from ``mlora_core.plugin_api.scheduling``).

    Options (``scheduler.options``):
        jobs_per_step: how many of the shortest jobs share a step (default 1).
    """

    def __init__(self, config: SchedulerConfig) -> None:
        unknown = sorted(set(config.options) - set(OPTIONS))
        if unknown:
            raise ConfigError([f"scheduler.options: unknown {unknown}; known: {', '.join(OPTIONS)}"])
        self.jobs_per_step = config.options.get("jobs_per_step", 1)
        if not isinstance(self.jobs_per_step, int) or self.jobs_per_step < 1:
            raise ConfigError([f"scheduler.options.jobs_per_step: must be an integer >= 1, got {self.jobs_per_step!r}"])

    def plan(self, jobs: Sequence[JobView], budget: StepBudget) -> StepPlan:
        shortest = sorted(jobs, key=lambda job: (job.remaining_tokens, job.order))[: self.jobs_per_step]
        return pack(shortest, budget, {job.name: job.micro_batch_size for job in shortest})
