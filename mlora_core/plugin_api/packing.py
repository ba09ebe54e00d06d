"""The layout of a packed step: samples laid end to end in rows of bounded length.

With ``scheduler.packing`` a step's samples (of every job) share rows: each row holds whole
samples one after another, each with its own position ids from 0, and attention stays inside
each sample (the backend builds the block-diagonal causal mask from the position ids). Each
job's samples form one contiguous range of the row-major flattened tokens, so adapters are
routed by token range (:meth:`~mlora_core.plugin_api.routing.RowRouter.route` with
``by_tokens=True``).

Public API for schedulers: :func:`packed_shape` is what a packed step of given sample lengths
costs (rows x row length), the same layout :func:`pack_rows` gives the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def row_length(lengths: Sequence[Sequence[int]], pack_length: int | None, attention_parity: int | None = None) -> int:
    """Tokens per packed row: the candidate length that makes the step cheapest by :func:`step_cost`.

    Candidates run from the longest sample up to ``pack_length`` (None: no cap): 1x to 4x the
    longest sample in half steps, and the lengths that split the step's tokens evenly over 1
    to 8 rows. Longer rows leave fewer pad tokens at their ends, but attention over a row
    grows with its length squared. A ``pack_length`` below the longest sample gives way to it.
    """
    flat = [n for job in lengths for n in job]
    longest, total = max(flat, default=0), sum(flat)
    cap = max(longest, min(pack_length or total, total))
    candidates = {longest * k // 2 for k in range(2, 9)} | {-(-total // rows) for rows in range(1, 9)}
    fitting = sorted(w for w in candidates if longest <= w <= cap) or [cap]
    return min(fitting, key=lambda width: step_cost(len(pack_rows(lengths, width)), width, attention_parity))


def step_cost(rows: int, width: int, attention_parity: int | None) -> float:
    """Relative cost of a step of ``rows`` x ``width`` tokens.

    Each token costs its linear layers (1) plus its attention over the row (``width /
    attention_parity``): ``attention_parity`` is the row length at which a token's attention
    costs as much as its linear layers, about 6 x the hidden size for a LLaMA-shaped block
    (forward: 24 d^2 FLOPs of projections against 4 L d of scores and weighted values).
    None: attention counted as free.
    """
    per_token = 1 + (width / attention_parity if attention_parity else 0.0)
    return rows * width * per_token


def pack_rows(lengths: Sequence[Sequence[int]], width: int) -> list[list[tuple[int, int]]]:
    """Place samples in rows of ``width`` tokens; ``lengths[j][i]``: job j's sample i.

    Returns the rows, each a list of (job, sample) in the order they sit in the row. Jobs are
    laid out in order; each job fills the last row left open by the jobs before it and the
    rows it opens, first fit, longest sample first. So a job's tokens are one contiguous run
    of the flattened rows (row tails of pad tokens included), and rows are rarely left half empty.
    """
    rows: list[list[tuple[int, int]]] = []
    free: list[int] = []
    for job, job_lengths in enumerate(lengths):
        first_open = max(len(rows) - 1, 0)  # the previous job's last row, shared
        for i in sorted(range(len(job_lengths)), key=lambda k: -job_lengths[k]):
            row = _first_fit(free, first_open, job_lengths[i], width)
            if row == len(rows):
                rows.append([])
            rows[row].append((job, i))
    return rows


def _first_fit(free: list[int], first_open: int, n: int, width: int) -> int:
    """Put a sample of ``n`` tokens in the first row from ``first_open`` on with room (or a new
    row at the end); ``free`` holds each row's free tokens and is updated. Returns the row."""
    if n > width:
        raise ValueError(f"a sample of {n} tokens does not fit a packed row of {width}")
    row = next((r for r in range(first_open, len(free)) if free[r] >= n), len(free))
    if row == len(free):
        free.append(width)
    free[row] -= n
    return row


@dataclass(frozen=True)
class PackedFill:
    """Rows of ``width`` tokens filled job by job as :func:`pack_rows` fills them; only their
    free space is kept. Schedulers use it to try a job's rows in a step being planned."""

    width: int
    free: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        return len(self.free)

    def with_job(self, job_lengths: Sequence[int]) -> PackedFill:
        """These rows with one more job's samples placed after the others'."""
        free, first_open = list(self.free), max(len(self.free) - 1, 0)
        for n in sorted(job_lengths, reverse=True):
            _first_fit(free, first_open, n, self.width)
        return PackedFill(self.width, tuple(free))


def packed_shape(
    lengths: Sequence[Sequence[int]], pack_length: int | None, attention_parity: int | None = None
) -> tuple[int, int]:
    """(rows, row length) of the packed step holding these samples (job by job, in order)."""
    width = row_length(lengths, pack_length, attention_parity)
    return len(pack_rows(lengths, width)), width
