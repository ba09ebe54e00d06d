"""Held-out loss (and exact-match accuracy) of several jobs at once, through multi-job batches."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

import torch

from mlora_core.evaluation.accuracy import exact_match_accuracy
from mlora_core.plugin_api.protocols import LoadedModel, Sample
from mlora_core.plugin_api.routing import RowRouter
from mlora_core.training.batch import build_batch
from mlora_core.training.loss import learned_token_losses, per_job_loss_sums

Parts = list[tuple[str, list[Sample]]]
#: (adapter name, held-out samples, rows per batch, whether to measure exact-match accuracy)
HeldOutSet = tuple[str, Sequence[Sample], int, bool]


def held_out_metrics(
    loaded: LoadedModel, router: RowRouter, sets: Sequence[HeldOutSet], pad_id: int, device: str
) -> dict[str, dict[str, float | None]]:
    """Per adapter: ``eval_loss`` and ``accuracy`` (None when there is nothing to measure or
    accuracy was not asked for), all adapters in shared batches."""
    losses = held_out_losses(loaded, router, [(n, s, rows) for n, s, rows, _ in sets if s], pad_id, device)
    checked = [(n, s) for n, s, _, exact in sets if exact and s]
    accuracy = exact_match_accuracy(loaded.model, router, loaded.tokenizer, checked, pad_id)
    return {n: {"eval_loss": losses.get(n), "accuracy": accuracy.get(n)} for n, *_ in sets}


def held_out_losses(
    loaded: LoadedModel,
    router: RowRouter,
    eval_sets: Sequence[tuple[str, Sequence[Sample], int]],
    pad_id: int,
    device: str,
) -> dict[str, float | None]:
    """Token-mean loss of each adapter on its held-out samples (None when it has none).

    Args:
        eval_sets: (adapter name, held-out samples, rows per batch) per job.

    Dropout is off during evaluation; the model's train/eval mode is restored afterwards.
    A batch that runs out of memory is evaluated again in halves.
    """
    chunks = {name: [list(s[i : i + rows]) for i in range(0, len(s), rows)] for name, s, rows in eval_sets}
    totals = {name: [0.0, 0] for name in chunks}
    model = loaded.model
    was_training = model.training
    model.train(False)
    try:
        with torch.no_grad():
            for i in range(max((len(c) for c in chunks.values()), default=0)):
                parts = [(name, c[i]) for name, c in chunks.items() if i < len(c)]
                for name, (loss_sum, n) in _loss_sums(loaded, router, parts, pad_id, device):
                    totals[name][0] += loss_sum
                    totals[name][1] += n
    finally:
        model.train(was_training)
    return {name: (s / n if n else None) for name, (s, n) in totals.items()}


def _loss_sums(
    loaded: LoadedModel, router: RowRouter, parts: Parts, pad_id: int, device: str
) -> list[tuple[str, tuple[float, int]]]:
    """(job, (loss sum, learned tokens)) for one batch of parts, halving it on out-of-memory."""
    try:
        batch = build_batch(parts, pad_id).to(device)
        with router.route(batch.segments):
            losses = learned_token_losses(loaded, batch)  # (learned positions,)
        return [(name, (float(s), n)) for name, (s, n) in per_job_loss_sums(batch, losses).items()]
    except torch.OutOfMemoryError:
        rows = [(name, s) for name, samples in parts for s in samples]
        if len(rows) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(rows) // 2
        return [
            r
            for piece in (rows[:half], rows[half:])
            for r in _loss_sums(loaded, router, _regroup(piece), pad_id, device)
        ]


def _regroup(rows: list[tuple[str, Sample]]) -> Parts:
    return [(name, [s for _, s in group]) for name, group in groupby(rows, key=lambda r: r[0])]
