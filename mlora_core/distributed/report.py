"""What a rank tells the others after each engine step: the one control message of a step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepReport:
    """What a rank tells the others after each engine step (the per-step control exchange).

    Job fields are about the jobs this rank owns; the main rank turns the reports of all
    ranks into the step's events, and every rank applies the statuses of jobs it does not own.
    """

    #: Job -> its optimizer-step metrics, for jobs that stepped.
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    #: This rank's run metrics of the step (None: it trained nothing in it).
    run: dict[str, float] | None = None
    #: Job -> (status, error) of every owned job.
    statuses: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    #: Evaluation and job-end events, in order (:meth:`RunEvents.take_pending`).
    events: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    #: summary.json entries of owned jobs that ended.
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Held-out metrics before training of owned jobs.
    eval_before: dict[str, dict[str, float | None]] = field(default_factory=dict)
    #: Remaining tokens of owned live jobs (placement of later jobs).
    work: dict[str, int] = field(default_factory=dict)
    #: A stop signal this rank received.
    stop: str | None = None
    #: Seconds this rank has spent in collectives, and in held-out evaluation, so far.
    collective_s: float = 0.0
    eval_s: float = 0.0
    #: (rows, padded length, peak bytes) of this rank's step, for every rank's memory model.
    observed: tuple[int, int, int] | None = None
    #: (rows, padded length) of a step that ran out of memory on this rank.
    out_of_memory: tuple[int, int] | None = None
