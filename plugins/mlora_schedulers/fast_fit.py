"""``fast_fit``: lower job completion times by serving the jobs closest to done first.

Shortest-remaining-work first: jobs are ranked by the tokens they have left (after
priority), and each may take the rest of its current optimizer batch in one step, so the
job nearest completion finishes sooner while longer jobs fill what budget is left. Any job
that has waited ``max_wait_steps`` steps is served first with a micro-batch, so none
starves. The token budget defaults to what the admitted jobs' micro-batches take when each
is padded on its own (the work of a ``trivial`` step).
"""

from __future__ import annotations

from collections.abc import Sequence

from mlora_core.config.schema import SchedulerConfig
from mlora_core.plugin_api.scheduling import JobView, StepBudget, StepPlan, pack, starving


class FastFitScheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.max_wait = config.max_wait_steps

    def plan(self, jobs: Sequence[JobView], budget: StepBudget) -> StepPlan:
        budget = budget.with_default_tokens(jobs)
        forced = starving(jobs, self.max_wait)
        rest = sorted((j for j in jobs if j not in forced), key=lambda j: (-j.priority, j.remaining_tokens, j.order))
        wanted = {j.name: j.micro_batch_size for j in forced}
        wanted.update({j.name: len(j.next_lengths()) for j in rest})
        return pack([*forced, *rest], budget, wanted)
