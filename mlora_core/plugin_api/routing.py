"""Row routing: which rows (or tokens) of the current batch belong to which adapter.

The engine owns one :class:`RowRouter` per base model and hands it to every adapter type.
Before a forward it opens :meth:`RowRouter.route` with the batch's segments; each adapted
layer reads :attr:`RowRouter.segments` and adds adapter ``name``'s update to rows
``start:stop`` only. Outside a ``route`` block no adapter is applied (the bare base).

A packed batch (``scheduler.packing``) lays several jobs' samples end to end in each row, so
its segments are token ranges: ``route(segments, by_tokens=True)`` means positions
``start:stop`` of the batch flattened to ``(B * T)`` tokens, row-major.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of the batch (token positions when routing by tokens) belong to
    adapter ``adapter`` (None: the bare base)."""

    adapter: str | None
    start: int
    stop: int


class RowRouter:
    """Holds the row segments of the forward in progress; read by adapted layers."""

    def __init__(self) -> None:
        self._segments: tuple[Segment, ...] = ()
        self._by_tokens = False

    @property
    def segments(self) -> tuple[Segment, ...]:
        """The current segments, in row order; empty outside :meth:`route`."""
        return self._segments

    @property
    def by_tokens(self) -> bool:
        """Whether the current segments are token ranges of the flattened batch, not rows."""
        return self._by_tokens

    @contextmanager
    def route(self, segments: Sequence[Segment], *, by_tokens: bool = False) -> Iterator[None]:
        """Apply ``segments`` to every forward run inside the block.

        Segments must be contiguous, in order and start at 0, so together they cover rows
        (``by_tokens``: flattened token positions) ``0:segments[-1].stop`` exactly once.
        """
        check_segments(segments)
        previous = self._segments, self._by_tokens
        self._segments, self._by_tokens = tuple(segments), by_tokens
        try:
            yield
        finally:
            self._segments, self._by_tokens = previous

    @contextmanager
    def single(self, adapter: str | None, rows: int) -> Iterator[None]:
        """Apply one adapter (or none) to all ``rows`` rows of the batch."""
        with self.route([Segment(adapter, 0, rows)]):
            yield


def check_segments(segments: Sequence[Segment]) -> None:
    """Raise ValueError unless the segments tile ``0:stop`` in order without gaps."""
    expected = 0
    for seg in segments:
        if seg.start != expected or seg.stop <= seg.start:
            raise ValueError(f"row segments must tile the batch in order; got {list(segments)}")
        expected = seg.stop
