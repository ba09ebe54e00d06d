"""Fill a step's budget with jobs' rows in a given order of preference."""

from __future__ import annotations

from collections.abc import Sequence

from mlora_core.scheduling import JobView, StepBudget, StepPlan


def pack(candidates: Sequence[JobView], budget: StepBudget, rows_wanted: dict[str, int]) -> StepPlan:
    """Take each candidate's wanted rows, in order, shrinking a job's share to fit the budget.

    A job whose first row does not fit is deferred to a later step. The first candidate
    always gets at least one row, so the run progresses (the engine checks that one row
    fits memory before it asks).

    Args:
        candidates: jobs in order of preference.
        budget: token and memory limits of the step.
        rows_wanted: job name -> rows it would like (at most the rows left in its batch).
    """
    plan: StepPlan = []
    total_rows, width = 0, 0
    for job in candidates:
        lengths = job.next_lengths()
        rows = min(rows_wanted[job.name], len(lengths))
        while rows > 0 and not budget.allows(total_rows + rows, max(width, max(lengths[:rows]))):
            rows -= 1
        if rows == 0 and not plan:
            rows = 1
        if rows > 0:
            plan.append((job.name, rows))
            total_rows += rows
            width = max(width, max(lengths[:rows]))
    return plan


def starving(jobs: Sequence[JobView], max_wait: int) -> list[JobView]:
    """Jobs that have waited ``max_wait`` steps or more, longest wait first."""
    return sorted((j for j in jobs if j.waited >= max_wait), key=lambda j: (-j.waited, j.order))
