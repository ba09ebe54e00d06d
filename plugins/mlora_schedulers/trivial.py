"""``trivial``: every admitted job contributes one micro-batch to every step."""

from __future__ import annotations

from collections.abc import Sequence

from mlora_core.config.schema import SchedulerConfig
from mlora_core.plugin_api.scheduling import JobView, StepBudget, StepPlan, pack


class TrivialScheduler:
    """Admitted jobs in priority then admission order, one micro-batch each.

    ``max_tokens_per_step`` (when set) and the memory check can still shrink or defer a
    job's share; without them every admitted job is in every step.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        pass

    def plan(self, jobs: Sequence[JobView], budget: StepBudget) -> StepPlan:
        ordered = sorted(jobs, key=lambda j: (-j.priority, j.order))
        return pack(ordered, budget, {j.name: j.micro_batch_size for j in jobs})
