"""A job's training order: which samples form each optimizer batch, and its learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mlora_core.config.schema import TrainConfig

#: group_by_length sorts samples by length within windows of this many batches.
LENGTH_GROUP_BATCHES = 8


def optimizer_batches(lengths: list[int], train: TrainConfig) -> list[list[int]]:
    """Sample indices of every optimizer batch, in training order.

    Each epoch visits the samples once, shuffled with seed ``train.seed + epoch`` (or in
    file order when ``shuffle`` is off); the last batch of an epoch may be smaller. With
    ``group_by_length``, samples are sorted by length inside windows of
    ``LENGTH_GROUP_BATCHES`` batches, so a batch's rows have similar lengths, and the
    batches of a window are then shuffled with the same seed.
    """
    n_samples = len(lengths)
    batches = []
    for epoch in range(train.epochs):
        generator = torch.Generator().manual_seed(train.seed + epoch)
        order = torch.randperm(n_samples, generator=generator).tolist() if train.shuffle else list(range(n_samples))
        if train.group_by_length:
            epoch_batches = _group_by_length(order, lengths, train.batch_size, generator, train.shuffle)
        else:
            epoch_batches = [order[i : i + train.batch_size] for i in range(0, n_samples, train.batch_size)]
        batches += epoch_batches
    return batches[: train.max_steps] if train.max_steps else batches


def _group_by_length(
    order: list[int], lengths: list[int], batch_size: int, generator: torch.Generator, shuffle: bool
) -> list[list[int]]:
    window = batch_size * LENGTH_GROUP_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        group = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        if shuffle:
            group = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        batches += group
    return batches


def lr_multiplier(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """LR factor at optimizer step ``s``: linear warmup to 1, then linear/cosine decay to 0, or constant."""

    def factor(s: int) -> float:
        if s < warmup:
            return s / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor
