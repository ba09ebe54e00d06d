"""The multi-job batch: several jobs' samples in one tensor, plus which part each job owns.

Two layouts: padded (:func:`build_batch`, one sample a row, right-padded; each job owns a run
of rows) and packed (:func:`build_packed_batch`, samples end to end in rows of bounded length;
each job owns a run of the flattened tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mlora_core.plugin_api.conventions import IGNORE_INDEX
from mlora_core.plugin_api.data import learned_tokens
from mlora_core.plugin_api.packing import pack_rows, row_length
from mlora_core.plugin_api.protocols import Sample
from mlora_core.plugin_api.routing import Segment


@dataclass
class MultiJobBatch:
    """One engine step's input.

    Padded rows: with causal attention, padding after a row's last token changes none of that
    row's logits, so a job's rows compute the same values as in a batch of their own. Packed
    rows: ``position_ids`` restart at 0 with every sample (and with a row's tail of pads), and
    the backend confines attention to each sample, so again every sample computes what it
    would alone. The first token of each packed sample is not a target (``labels`` holds
    IGNORE_INDEX there), as the first token of a padded row never is.
    """

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token
    labels: torch.Tensor  # (B, T) long, IGNORE_INDEX = not learned
    segments: tuple[Segment, ...]  # job j owns rows (packed: flattened tokens) segments[j].start:stop
    #: Per segment: its real tokens, and its learned positions (known without a device sync).
    segment_tokens: tuple[int, ...]
    segment_learned: tuple[int, ...]
    #: (B, T) long: positions within each sample; None for a padded batch.
    position_ids: torch.Tensor | None = None
    #: Per segment: the learned positions of each of its sequences, in batch order, and the
    #: index (in the job's part) of the sample each sequence belongs to. A sample's sequences
    #: are consecutive and in order in both layouts.
    sequence_learned: tuple[tuple[int, ...], ...] = ()
    sequence_samples: tuple[tuple[int, ...], ...] = ()
    #: Per segment: (S, K) fp32 reference log-probabilities of its samples' sequences
    #: (:attr:`Sample.reference_logps`, in the job's order), or None when its samples have none.
    reference_logps: tuple[torch.Tensor | None, ...] = ()

    @property
    def samples(self) -> int:
        """How many samples the batch holds."""
        return self.input_ids.shape[0] if self.position_ids is None else int(self.sample_count)

    #: Samples in a packed batch (several share a row).
    sample_count: int = 0

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def real_tokens(self) -> int:
        return sum(self.segment_tokens)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.input_ids.numel()

    def to(self, device: str | torch.device) -> MultiJobBatch:
        moved = {
            name: getattr(self, name).to(device)
            for name in ("input_ids", "attention_mask", "labels", "position_ids")
            if getattr(self, name) is not None
        }
        references = tuple(None if r is None else r.to(device) for r in self.reference_logps)
        return dataclasses.replace(self, **moved, reference_logps=references)


def build_batch(parts: Sequence[tuple[str, Sequence[Sample]]], pad_id: int) -> MultiJobBatch:
    """Stack each job's samples in order, one sequence a row (a preference pair takes two
    rows); ``parts`` is (job name, its samples) per job."""
    order = [list(range(len(samples))) for _, samples in parts]
    sequence_learned, sequence_samples = _sequence_layout(parts, order)
    references = tuple(reference_tensor(samples) for _, samples in parts)
    parts = [(name, [seq for s in samples for seq in s.sequences()]) for name, samples in parts]
    rows = [s for _, samples in parts for s in samples]
    if not rows:
        raise ValueError("a batch needs at least one sample")
    width = max(len(s) for s in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, s in enumerate(rows):
        n = len(s)
        input_ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    segments, start = [], 0
    for name, samples in parts:
        segments.append(Segment(name, start, start + len(samples)))
        start += len(samples)
    return MultiJobBatch(
        input_ids,
        mask,
        labels,
        tuple(segments),
        *_counts(parts),
        sequence_learned=sequence_learned,
        sequence_samples=sequence_samples,
        reference_logps=references,
    )


def build_packed_batch(
    parts: Sequence[tuple[str, Sequence[Sample]]],
    pad_id: int,
    pack_length: int | None = None,
    attention_parity: int | None = None,
) -> MultiJobBatch:
    """Lay the jobs' samples end to end in rows (:func:`~mlora_core.plugin_api.packing.pack_rows`).

    Rows are as long as :func:`~mlora_core.plugin_api.packing.row_length` says. Each row's tail
    of pads gets positions 0, 1, ... of its own, a sequence apart that no sample attends to.
    A sample of several sequences (:attr:`Sample.starts`) stays in one piece; its positions
    restart with each sequence, whose first token is not a target.
    """
    lengths = [[len(s) for s in samples] for _, samples in parts]
    if not any(lengths):
        raise ValueError("a batch needs at least one sample")
    width = row_length(lengths, pack_length, attention_parity)
    layout = pack_rows(lengths, width)
    shape = (len(layout), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    starts = [input_ids.numel()] * len(parts)  # flat index of each job's first token
    order: list[list[int]] = [[] for _ in parts]  # each job's samples, in batch order
    for r, row in enumerate(layout):
        col = 0
        for job, i in row:
            for seq in parts[job][1][i].sequences():
                n = len(seq)
                input_ids[r, col : col + n] = torch.tensor(seq.input_ids)
                labels[r, col + 1 : col + n] = torch.tensor(seq.labels[1:])
                mask[r, col : col + n] = 1
                positions[r, col : col + n] = torch.arange(n)
                starts[job] = min(starts[job], r * width + col)
                col += n
            order[job].append(i)
        positions[r, col:] = torch.arange(width - col)
    bounds = [*starts, input_ids.numel()]
    segments = tuple(Segment(name, bounds[j], bounds[j + 1]) for j, (name, _) in enumerate(parts))
    count = sum(len(samples) for _, samples in parts)
    sequence_learned, sequence_samples = _sequence_layout(parts, order)
    return MultiJobBatch(
        input_ids,
        mask,
        labels,
        segments,
        *_counts(parts),
        position_ids=positions,
        sample_count=count,
        sequence_learned=sequence_learned,
        sequence_samples=sequence_samples,
        reference_logps=tuple(reference_tensor(samples) for _, samples in parts),
    )


def reference_tensor(samples: Sequence[Sample]) -> torch.Tensor | None:
    """(S, K) fp32 of the samples' :attr:`Sample.reference_logps`; None when any has none."""
    if not samples or any(s.reference_logps is None for s in samples):
        return None
    return torch.tensor([s.reference_logps for s in samples], dtype=torch.float32)


def _sequence_layout(
    parts: Sequence[tuple[str, Sequence[Sample]]], order: Sequence[Sequence[int]]
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """Per job: learned positions of each sequence and its sample's index, samples in ``order``."""
    learned, owners = [], []
    for (_, samples), job_order in zip(parts, order, strict=True):
        sequences = [(i, seq) for i in job_order for seq in samples[i].sequences()]
        learned.append(tuple(learned_tokens(seq) for _, seq in sequences))
        owners.append(tuple(i for i, _ in sequences))
    return tuple(learned), tuple(owners)


def _counts(parts: Sequence[tuple[str, Sequence[Sample]]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(real tokens, learned positions) per job."""
    tokens = tuple(sum(len(s) for s in samples) for _, samples in parts)
    learned = tuple(sum(learned_tokens(s) for s in samples) for _, samples in parts)
    return tokens, learned
