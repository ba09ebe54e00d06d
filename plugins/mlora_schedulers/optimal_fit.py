"""``optimal_fit``: the jobs whose rows pad least together, within the step's token budget.

For each candidate padded width ``L`` (the width of some job's next micro-batch, at least
the anchor's), take the jobs whose micro-batches are no wider than ``L``, widest first, and
fill the token budget; keep the width whose step has the highest share of real tokens
(ties: more real tokens). The anchor is the job that has waited longest (then higher
priority, then FIFO), and any job that has waited ``max_wait_steps`` steps is always
taken, so no job waits longer than that.

With ``scheduler.packing`` a step's padding is only what packing leaves at row ends, whatever
the widths, so there is one candidate: the anchor (and the starving jobs), then every other
job, widest first, filling the token budget.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlora_core.config.schema import SchedulerConfig
from mlora_core.plugin_api.scheduling import JobView, StepBudget, StepPlan, pack, starving


class OptimalFitScheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.max_wait = config.max_wait_steps

    def plan(self, jobs: Sequence[JobView], budget: StepBudget) -> StepPlan:
        budget = budget.with_default_tokens(jobs)
        forced = starving(jobs, self.max_wait)
        anchor = max(jobs, key=lambda j: (j.waited, j.priority, -j.order))
        must = forced or [anchor]
        width = {j.name: max(j.next_lengths()[: j.micro_batch_size]) for j in jobs}
        wanted = {j.name: j.micro_batch_size for j in jobs}
        floor = max(width[j.name] for j in must)
        caps = sorted({w for w in width.values() if w >= floor})
        if budget.packing:  # packed rows pad little whatever the widths: one candidate, every job
            caps = caps[-1:]
        best: tuple[float, int, StepPlan] | None = None
        for cap in caps:
            fitting = [j for j in jobs if j not in must and width[j.name] <= cap]
            rest = sorted(fitting, key=lambda j: (-width[j.name], j.order))
            plan = pack([*must, *rest], budget, wanted)
            score = _fill(plan, jobs, budget)
            if best is None or score > best[:2]:
                best = (*score, plan)
        assert best is not None
        return best[2]


def _fill(plan: StepPlan, jobs: Sequence[JobView], budget: StepBudget) -> tuple[float, int]:
    """(real tokens / computed tokens, real tokens) of a plan (computed: rows x row length)."""
    by_name = {j.name: j for j in jobs}
    lengths = [by_name[name].next_lengths()[:rows] for name, rows in plan]
    rows, width = budget.shape(lengths)
    real = sum(map(sum, lengths))
    return real / (rows * width), real
