"""What schedulers see and return: job views, the step budget, admission by priority.

A scheduler plans one engine step: for some of the admitted jobs, how many rows of the
job's current optimizer batch go into the step. A job's rows may be split over several
steps in any way (the loss is normalised by the whole optimizer batch's tokens), so a plan
may give a job fewer rows than its micro-batch (to fit memory) or more (up to the rest of
its optimizer batch), and the adapter still learns exactly the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

from mlora_core.plugin_api.packing import PackedFill, packed_shape, row_length


class JobView(Protocol):
    """What a scheduler may know about an admitted job."""

    name: str
    #: Position in the config (0 = first job): FIFO order.
    order: int
    #: Higher runs first.
    priority: int
    micro_batch_size: int

    @property
    def waited(self) -> int:
        """Engine steps in a row this job was admitted but got no rows."""
        ...

    @property
    def remaining_tokens(self) -> int:
        """Non-pad tokens the job still has to train on, this optimizer batch included."""
        ...

    def next_lengths(self) -> list[int]:
        """Token lengths of the rows left in the job's current optimizer batch, in order."""
        ...


#: A plan: (job name, rows of its current optimizer batch) per job, in batch row order.
StepPlan = list[tuple[str, int]]


def _always_fits(rows: int, length: int) -> bool:
    return True


@dataclass(frozen=True)
class StepBudget:
    """Limits on one step.

    Attributes:
        max_tokens: rows x row length of the whole step (the tokens it computes, pads
            included), or None for no limit.
        fits: the memory check: would a step of ``rows`` rows of ``length`` tokens fit?
        packing: steps are packed (``scheduler.packing``): samples share rows of
            ``pack_length`` tokens (None: chosen per step, see
            :func:`~mlora_core.plugin_api.packing.row_length`, with ``attention_parity``), so
            a step costs about its real tokens rather than its rows times the longest one.
    """

    max_tokens: int | None = None
    fits: Callable[[int, int], bool] = field(default=_always_fits)
    packing: bool = False
    pack_length: int | None = None
    attention_parity: int | None = None

    def shape(self, lengths: Sequence[Sequence[int]]) -> tuple[int, int]:
        """(rows, row length) of a step holding these samples, ``lengths[j]`` job j's, in plan order."""
        if self.packing:
            return packed_shape(lengths, self.pack_length, self.attention_parity)
        flat = [n for job in lengths for n in job]
        return len(flat), max(flat, default=0)

    def plan_step(self, lengths: Sequence[Sequence[int]]) -> PlannedStep:
        """An empty step to add jobs to; ``lengths``: every row that may join it (per job).

        Packed: its row length is the one those rows would get, kept while jobs are added.
        """
        if not self.packing:
            return PlannedStep()
        width = row_length(lengths, self.pack_length, self.attention_parity)
        return PlannedStep(width=width, fill=PackedFill(width))

    def allows_step(self, lengths: Sequence[Sequence[int]]) -> bool:
        """Whether a step holding these samples (per job, in plan order) is within the limits."""
        rows, width = self.shape(lengths)
        return self.allows(rows, width)

    def with_default_tokens(self, jobs: Sequence[JobView]) -> StepBudget:
        """This budget, with :func:`default_token_budget` when ``max_tokens`` is None."""
        return self if self.max_tokens else replace(self, max_tokens=default_token_budget(jobs))

    def allows(self, rows: int, length: int) -> bool:
        within = self.max_tokens is None or rows * length <= self.max_tokens
        return within and self.fits(rows, length)


@dataclass(frozen=True)
class PlannedStep:
    """A step being planned job by job: its rows and row length so far (from :meth:`StepBudget.plan_step`)."""

    rows: int = 0
    width: int = 0
    #: Packed steps: the rows' free space.
    fill: PackedFill | None = None

    def with_job(self, lengths: Sequence[int]) -> PlannedStep:
        """This step with a job's rows of these lengths added after the others."""
        if self.fill is None:
            return PlannedStep(self.rows + len(lengths), max(self.width, max(lengths, default=0)))
        fill = self.fill.with_job(lengths)
        return PlannedStep(fill.rows, fill.width, fill)


class BatchScheduler(Protocol):
    """Plans each engine step from the admitted jobs."""

    def plan(self, jobs: Sequence[JobView], budget: StepBudget) -> StepPlan:
        """Rows per job for the next step; non-empty whenever ``jobs`` is non-empty."""
        ...


J = TypeVar("J", bound=JobView)


def admit(live: Sequence[J], max_jobs: int | None) -> list[J]:
    """The jobs allowed to run this step: highest priority first, then FIFO.

    Re-evaluated every step, so a higher-priority job that becomes live preempts the
    lowest-priority running job at the next step boundary; the preempted job keeps its
    adapter, optimizer state and accumulated gradients and resumes when admitted again.
    """
    ranked = sorted(live, key=lambda j: (-j.priority, j.order))
    return ranked if max_jobs is None else ranked[:max_jobs]


def default_token_budget(jobs: Sequence[JobView]) -> int:
    """Tokens the jobs' micro-batches take when each is padded on its own."""
    total = 0
    for job in jobs:
        lengths = job.next_lengths()[: job.micro_batch_size]
        total += len(lengths) * max(lengths, default=0)
    return total


# --- helpers for schedulers (public API) ---------------------------------------------


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
    everything = [(job, job.next_lengths()[: rows_wanted[job.name]]) for job in candidates]
    if budget.allows_step([lengths for _, lengths in everything]):  # the common case: one check
        return [(job.name, len(lengths)) for job, lengths in everything if lengths]
    plan: StepPlan = []
    step = budget.plan_step([lengths for _, lengths in everything])
    for job, wanted in everything:
        rows = len(wanted)
        while rows > 0 and not _allows(budget, step.with_job(wanted[:rows])):
            rows -= 1
        if rows == 0 and not plan:
            rows = 1
        if rows > 0:
            plan.append((job.name, rows))
            step = step.with_job(job.next_lengths()[:rows])
    return plan


def _allows(budget: StepBudget, step: PlannedStep) -> bool:
    return budget.allows(step.rows, step.width)


def starving(jobs: Sequence[JobView], max_wait: int) -> list[JobView]:
    """Jobs that have waited ``max_wait`` steps or more, longest wait first."""
    return sorted((j for j in jobs if j.waited >= max_wait), key=lambda j: (-j.waited, j.order))
