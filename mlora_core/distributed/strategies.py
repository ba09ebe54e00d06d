"""How a run's work is split over its ranks: whole jobs per rank, or rows of every job per rank.

Both strategies keep every rank in lockstep over the same engine steps; they differ in
which jobs a rank trains and which rows of them.

``jobs``
    Each job trains on one rank (its *owner*), over that rank's own copy of the base.
    Jobs are placed when they are admitted: longest predicted work first, each on the
    least-loaded rank (the least remaining tokens of its live jobs) with room under
    ``scheduler.max_concurrent_jobs``; a job stays on its rank. No gradient traffic.
``rows``
    Every rank holds every adapter and runs the same plan; each takes a contiguous share
    of every job's planned rows. Per-job loss sums and learned-token counts are summed
    over the ranks every step, and a job's gradients are summed when its optimizer batch
    is complete. A job's loss is already normalised by the learned tokens of its whole
    optimizer batch (known from the data), so the summed gradient is exactly the
    one-process gradient, however unevenly the rows fall. Each job still has an owner,
    the rank that evaluates and saves it.

With one rank, ``jobs`` is the plain single-process engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch

from mlora_core.distributed.world import World
from mlora_core.plugin_api.scheduling import admit

if TYPE_CHECKING:
    from mlora_core.training.job import Job

S = TypeVar("S")


def choose_strategy(configured: str, jobs: int, ranks: int, shard_base: bool = False) -> str:
    """``auto``: ``jobs`` when there are at least as many jobs as ranks (and the base is not
    sharded), ``rows`` otherwise."""
    if configured != "auto":
        return configured
    return "jobs" if jobs >= ranks and not shard_base else "rows"


class Strategy:
    """What the engine asks of a strategy; this base is the one-rank-per-job part both share."""

    name = ""

    def __init__(self, world: World, orders: Mapping[str, int], max_jobs: int | None) -> None:
        self.world = world
        self.orders = dict(orders)
        self.max_jobs = max_jobs
        #: Remaining tokens of each job, as last reported by its owner (for placement).
        self.work: dict[str, int] = {}

    def owner(self, job: str) -> int:
        """The rank that evaluates, saves and reports ``job``."""
        return self.orders[job] % self.world.size

    def owns(self, job: str) -> bool:
        return self.owner(job) == self.world.rank

    def holds(self, job: str) -> bool:
        """Whether this rank keeps ``job``'s adapter (it trains the job, or may yet)."""
        return True

    def admit(self, ready: Sequence[Job]) -> list[Job]:
        """The ready jobs this rank plans this step (all ranks call this with the same jobs)."""
        raise NotImplementedError

    def my_rows(self, rows: list[S]) -> list[S]:
        """This rank's share of the rows a step plans for one job."""
        return rows

    def rows_per_rank(self, rows: int) -> int:
        """The most rows one rank gets when a step plans ``rows`` rows of a job."""
        return rows

    #: How many ranks share one step's planned rows (scales the per-rank token budget).
    step_ranks = 1
    #: Every rank must run every forward, backward and held-out evaluation (the base is
    #: sharded: :mod:`mlora_core.distributed.sharding`).
    collective_forward = False

    def reduce_step(self, values: torch.Tensor) -> torch.Tensor:
        """Per-step loss sums and token counts of the jobs this rank trained, made global."""
        return values

    def reduce_gradients(self, jobs: Sequence[Job]) -> None:
        """Make ``jobs``' accumulated gradients the whole optimizer batch's (before stepping)."""

    def checkpoint_gradients(self, job: Job) -> list[torch.Tensor | None]:
        """``job``'s accumulated gradients as a checkpoint stores them (summed over ranks)."""
        return [p.grad for p in job.params]

    def keeps_restored_gradients(self, job: str) -> bool:
        """Whether this rank takes a checkpoint's accumulated gradients of ``job`` (exactly one
        rank of those that train it must, so they are counted once)."""
        return True

    def placement(self) -> dict[str, list[int]]:
        """Job -> the ranks that train it (jobs not placed yet are left out)."""
        raise NotImplementedError


class JobsStrategy(Strategy):
    """Whole jobs per rank (see the module docstring)."""

    name = "jobs"

    def __init__(self, world: World, orders: Mapping[str, int], max_jobs: int | None) -> None:
        super().__init__(world, orders, max_jobs)
        #: Job -> its rank, once placed.
        self.placed: dict[str, int] = {}

    def owner(self, job: str) -> int:
        placed = self.placed.get(job)
        return super().owner(job) if placed is None else placed

    def holds(self, job: str) -> bool:
        return self.placed.get(job, self.world.rank) == self.world.rank

    def admit(self, ready: Sequence[Job]) -> list[Job]:
        for job in self._place(ready):
            if self.world.distributed and self.world.is_main:
                print(f"mlora: job {job.name!r} placed on rank {self.placed[job.name]}", flush=True)
        return admit([j for j in ready if self.placed.get(j.name) == self.world.rank], self.max_jobs)

    def _place(self, ready: Sequence[Job]) -> list[Job]:
        """Place ready jobs not placed yet; returns the jobs placed now (same on every rank)."""
        live = {j.name for j in ready}
        waiting = [j for j in ready if j.name not in self.placed]
        waiting.sort(key=lambda j: (-j.priority, -self.work.get(j.name, j.remaining_tokens), j.order))
        placed_now = []
        for job in waiting:
            rank = self._least_loaded(live)
            if rank is None:
                break
            self.placed[job.name] = rank
            self.work.setdefault(job.name, job.remaining_tokens)
            placed_now.append(job)
        return placed_now

    def _least_loaded(self, live: set[str]) -> int | None:
        """The rank with the least remaining work among those with room (None: none has)."""
        loads = [0] * self.world.size
        counts = [0] * self.world.size
        for name, rank in self.placed.items():
            if name in live:
                loads[rank] += self.work.get(name, 0)
                counts[rank] += 1
        room = [
            r
            for r in range(self.world.size)
            if self.max_jobs is None or self.world.size == 1 or counts[r] < self.max_jobs
        ]
        return min(room, key=lambda r: (loads[r], r)) if room else None

    def placement(self) -> dict[str, list[int]]:
        return {name: [rank] for name, rank in self.placed.items()}


class RowsStrategy(Strategy):
    """Every rank takes a share of every job's rows (see the module docstring)."""

    name = "rows"

    @property
    def step_ranks(self) -> int:  # type: ignore[override]
        return self.world.size

    def admit(self, ready: Sequence[Job]) -> list[Job]:
        return admit(ready, self.max_jobs)

    def my_rows(self, rows: list[S]) -> list[S]:
        n, size, rank = len(rows), self.world.size, self.world.rank
        return rows[rank * n // size : (rank + 1) * n // size]

    def rows_per_rank(self, rows: int) -> int:
        return -(-rows // self.world.size)

    def reduce_step(self, values: torch.Tensor) -> torch.Tensor:
        return self.world.all_reduce_sum(values)

    def reduce_gradients(self, jobs: Sequence[Job]) -> None:
        """One flat all-reduce of every given job's gradients (a job with no rows on this rank
        in its whole optimizer batch contributes zeros)."""
        params = [p for job in jobs for p in job.params]
        if not params:
            return
        summed = self._sum([p.grad for p in params], params)
        for param, grad in zip(params, summed, strict=True):
            param.grad = grad

    def checkpoint_gradients(self, job: Job) -> list[torch.Tensor | None]:
        return list(self._sum([p.grad for p in job.params], job.params))

    def keeps_restored_gradients(self, job: str) -> bool:
        return self.owns(job)

    def placement(self) -> dict[str, list[int]]:
        return {name: list(range(self.world.size)) for name in self.orders}

    def _sum(self, grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        flat = torch.cat(
            [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params, strict=True)]
        )
        self.world.all_reduce_sum(flat)
        out, offset = [], 0
        for p in params:
            out.append(flat[offset : offset + p.numel()].view_as(p).clone())
            offset += p.numel()
        return out


def make_strategy(name: str, world: World, orders: Mapping[str, int], max_jobs: int | None) -> Strategy:
    """The strategy called ``name`` (``jobs`` or ``rows``, after :func:`choose_strategy`)."""
    kinds: dict[str, type[Strategy]] = {"jobs": JobsStrategy, "rows": RowsStrategy}
    return kinds[name](world, orders, max_jobs)
