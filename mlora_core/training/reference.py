"""Reference log-probabilities for preference objectives, computed once before training.

DPO compares the adapter's log-probabilities with a reference model's. Here the reference is
the frozen base itself (rows routed to no adapter) or a saved adapter over it, so it needs no
second model in memory; and since the reference never changes, its log-probabilities are
computed once, in batches without gradients, and kept with each sample
(:attr:`Sample.reference_logps`): a training step then runs the adapter's rows only. See
docs/objectives.md for what this costs against computing them in every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from mlora_core.plugin_api.protocols import LoadedModel, Sample
from mlora_core.plugin_api.routing import RowRouter, Segment
from mlora_core.training.batch import build_batch
from mlora_core.training.loss import learned_token_losses, per_job_sequence_logps

#: Samples per reference batch.
REFERENCE_BATCH = 16


def with_reference_logps(
    loaded: LoadedModel,
    router: RowRouter,
    samples: Sequence[Sample],
    pad_id: int,
    device: str,
    adapter: str | None = None,
) -> list[Sample]:
    """``samples`` with :attr:`Sample.reference_logps` set: per sequence, the summed
    log-probability of its learned tokens under the base (``adapter`` None) or under the
    attached ``adapter``. Dropout is off; the model's train/eval mode is restored."""
    if not samples:
        return []
    logps, _ = sequence_logps(loaded, router, samples, adapter, REFERENCE_BATCH, pad_id, device)
    values = logps.double().tolist()
    return [dataclasses.replace(s, reference_logps=tuple(v)) for s, v in zip(samples, values, strict=True)]


def sequence_logps(
    loaded: LoadedModel,
    router: RowRouter,
    samples: Sequence[Sample],
    adapter: str | None,
    rows: int,
    pad_id: int,
    device: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities (S, K), learned tokens (S, K)) of every sequence of ``samples`` (at
    least one) on the
    CPU, with ``adapter`` routed (None: the bare base), ``rows`` samples a batch, dropout off,
    no gradients; the model's train/eval mode is restored."""
    logps, tokens = [], []
    model = loaded.model
    was_training = model.training
    model.train(False)
    try:
        with torch.no_grad():
            for i in range(0, len(samples), rows):
                batch = build_batch([("part", list(samples[i : i + rows]))], pad_id).to(device)
                (seg,) = batch.segments
                with router.route([Segment(adapter, seg.start, seg.stop)]):
                    losses = learned_token_losses(loaded, batch)
                chunk_logps, chunk_tokens = per_job_sequence_logps(batch, losses)["part"]
                logps.append(chunk_logps.float().cpu())
                tokens.append(chunk_tokens.cpu())
    finally:
        model.train(was_training)
    return torch.cat(logps), torch.cat(tokens)
