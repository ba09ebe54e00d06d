"""The multi-job batch: several jobs' samples padded into one tensor, plus each job's rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mlora_core.plugin_api.conventions import IGNORE_INDEX
from mlora_core.plugin_api.protocols import Sample
from mlora_core.plugin_api.routing import Segment


@dataclass
class MultiJobBatch:
    """One engine step's input.

    Rows are right-padded: with causal attention, padding after a row's last token changes
    none of that row's logits, so a job's rows compute the same values as in a batch of
    its own.
    """

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token
    labels: torch.Tensor  # (B, T) long, IGNORE_INDEX = not learned
    segments: tuple[Segment, ...]  # job j owns rows segments[j].start:stop

    @property
    def padding_fraction(self) -> float:
        return 1.0 - float(self.attention_mask.float().mean())

    def to(self, device: str | torch.device) -> MultiJobBatch:
        return MultiJobBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.segments
        )


def build_batch(parts: Sequence[tuple[str, Sequence[Sample]]], pad_id: int) -> MultiJobBatch:
    """Stack each job's samples in order; ``parts`` is (job name, its samples) per job."""
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
    return MultiJobBatch(input_ids, mask, labels, tuple(segments))


def learned_tokens(sample: Sample) -> int:
    """Number of positions of ``sample`` that count in the loss (after the shift)."""
    return sum(1 for label in sample.labels[1:] if label != IGNORE_INDEX)
