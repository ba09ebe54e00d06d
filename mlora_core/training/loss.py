"""Per-job losses of a multi-job batch, with logits computed only where a token is learned.

Logits over a large vocabulary are the biggest activation of a step (SmolLM2: 49,152
values per position, kept in fp32 for the loss). Prompt and pad positions learn nothing,
so when the backend splits its model into hidden states and LM head
(:attr:`LoadedModel.hidden_states`, :attr:`LoadedModel.lm_head`) the head runs on the
learned positions only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlora_core.plugin_api.conventions import IGNORE_INDEX
from mlora_core.plugin_api.protocols import LoadedModel
from mlora_core.training.batch import MultiJobBatch


def learned_positions(batch: MultiJobBatch) -> torch.Tensor:
    """(B, T-1) bool: position t is learned when token t+1 has a label."""
    return batch.labels[:, 1:] != IGNORE_INDEX


def learned_logits(loaded: LoadedModel, batch: MultiJobBatch) -> torch.Tensor:
    """Logits (N, V) at the batch's N learned positions, in row-major order.

    Row ``n`` predicts the ``n``-th learned label. Adapters apply as routed by the caller.
    """
    learned = learned_positions(batch)
    if loaded.hidden_states is not None and loaded.lm_head is not None:
        hidden = loaded.hidden_states(batch.input_ids, batch.attention_mask)  # (B, T, H)
        return loaded.lm_head(hidden[:, :-1][learned])  # type: ignore[no-any-return]
    logits = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    return logits[:, :-1][learned]  # type: ignore[no-any-return]


def per_job_loss_sums(batch: MultiJobBatch, logits: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """Per job: (sum of its token cross-entropies, number of learned tokens), over its own rows.

    Args:
        logits: (N, V) at the learned positions, as :func:`learned_logits` returns them
            (any float dtype; the loss is computed in fp32).
    """
    learned = learned_positions(batch)
    targets = batch.labels[:, 1:][learned]  # (N,)
    losses = F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
    per_row = learned.sum(dim=1).tolist()
    out, offset = {}, 0
    for seg in batch.segments:
        assert seg.adapter is not None
        n = sum(per_row[seg.start : seg.stop])
        out[seg.adapter] = (losses[offset : offset + n].sum(), n)
        offset += n
    return out
