"""Per-job losses of a multi-job batch, with the LM head run only where a token is learned.

Logits over a large vocabulary are the biggest activation of a step (SmolLM2: 49,152
values per position, kept in fp32 for the loss). Prompt and pad positions learn nothing,
so when the backend splits its model into hidden states and LM head
(:attr:`LoadedModel.hidden_states`, :attr:`LoadedModel.lm_head`) the head runs on the
learned positions only, and a frozen linear head runs through :class:`ChunkedLinearCrossEntropy`,
so the logits of the whole step are never held at once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlora_core.models.transformers_split import LogitsHead
from mlora_core.plugin_api.conventions import IGNORE_INDEX
from mlora_core.plugin_api.protocols import LoadedModel
from mlora_core.training.batch import MultiJobBatch

#: Positions per chunk of :class:`ChunkedLinearCrossEntropy` (SmolLM2: 128 x 49,152 fp32 = 24 MiB).
CHUNK_POSITIONS = 128
#: Heads with a smaller vocabulary materialise their logits: they are small, and one matmul
#: is cheaper than a loop of them.
CHUNKED_MIN_VOCAB = 8192


def learned_positions(batch: MultiJobBatch) -> torch.Tensor:
    """(B, T-1) bool: position t is learned when token t+1 has a label."""
    return batch.labels[:, 1:] != IGNORE_INDEX


def learned_targets(batch: MultiJobBatch) -> torch.Tensor:
    """(N,) the labels the batch's N learned positions predict, in row-major order."""
    return batch.labels[:, 1:][learned_positions(batch)]


def base_inputs(batch: MultiJobBatch) -> dict[str, torch.Tensor | None]:
    """The keyword arguments a backend's model takes for this batch.

    A packed batch passes its position ids and no attention mask: the backend derives the
    block-diagonal causal mask from where the positions restart.
    """
    if batch.position_ids is not None:
        return {"input_ids": batch.input_ids, "attention_mask": None, "position_ids": batch.position_ids}
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


def learned_hidden(loaded: LoadedModel, batch: MultiJobBatch) -> torch.Tensor:
    """(N, H): the final hidden states at the N learned positions; adapters apply as routed by the caller."""
    assert loaded.hidden_states is not None
    hidden = loaded.hidden_states(**base_inputs(batch))  # (B, T, H)
    return hidden[:, :-1][learned_positions(batch)]


def learned_logits(loaded: LoadedModel, batch: MultiJobBatch) -> torch.Tensor:
    """Logits (N, V) at the batch's N learned positions, in row-major order.

    Row ``n`` predicts the ``n``-th learned label. Adapters apply as routed by the caller.
    """
    if loaded.hidden_states is not None and loaded.lm_head is not None:
        return loaded.lm_head(learned_hidden(loaded, batch))  # type: ignore[no-any-return]
    logits = loaded.model(**base_inputs(batch)).logits  # (B, T, V)
    return logits[:, :-1][learned_positions(batch)]  # type: ignore[no-any-return]


def learned_token_losses(loaded: LoadedModel, batch: MultiJobBatch) -> torch.Tensor:
    """(N,) fp32 cross-entropy of each learned position, in row-major order.

    Adapters apply as routed by the caller. A frozen linear head (or a :class:`LogitsHead` over
    one) with a vocabulary of at least :data:`CHUNKED_MIN_VOCAB` goes through :class:`ChunkedLinearCrossEntropy`, when
    the positions span more than one chunk; any other head materialises its logits.
    """
    linear = _chunkable_linear(loaded, batch)
    if linear is not None:
        head = loaded.lm_head
        transform = head if isinstance(head, LogitsHead) else None
        hidden = learned_hidden(loaded, batch)  # (N, H)
        losses: torch.Tensor = ChunkedLinearCrossEntropy.apply(  # type: ignore[no-untyped-call]
            hidden, linear.weight, linear.bias, learned_targets(batch), CHUNK_POSITIONS, transform
        )
        return losses
    return F.cross_entropy(learned_logits(loaded, batch).float(), learned_targets(batch), reduction="none")


def _chunkable_linear(loaded: LoadedModel, batch: MultiJobBatch) -> nn.Linear | None:
    """The frozen linear layer of a head the chunked loss can run (plain or a :class:`LogitsHead`), or None."""
    head = loaded.lm_head
    linear = head.linear if isinstance(head, LogitsHead) else head
    if type(linear) is not nn.Linear or loaded.hidden_states is None:
        return None
    chunkable = (
        not linear.weight.requires_grad
        and linear.out_features >= CHUNKED_MIN_VOCAB
        and sum(batch.segment_learned) > CHUNK_POSITIONS
    )
    return linear if chunkable else None


def per_job_loss_sums(batch: MultiJobBatch, losses: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """Per job: (sum of its token cross-entropies, number of learned tokens), over its own segment.

    Args:
        losses: (N,) per learned position, as :func:`learned_token_losses` returns them. A
            job's learned positions are consecutive in row-major order, in both layouts.
    """
    out = {}
    for seg, job_losses in zip(batch.segments, torch.split(losses, list(batch.segment_learned)), strict=True):
        assert seg.adapter is not None
        out[seg.adapter] = (job_losses.sum(), job_losses.shape[0])
    return out


def per_job_sequence_logps(batch: MultiJobBatch, losses: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per job: (log-probabilities (S, K), learned tokens (S, K)) of each sequence of its samples.

    Args:
        losses: (N,) per learned position, as :func:`learned_token_losses` returns them.

    ``S`` is the job's samples in the order it gave them (not the batch's), ``K`` the
    sequences per sample; a sequence's log-probability is minus the sum of its tokens' losses.
    """
    out = {}
    for seg, job_losses, counts, owners in zip(
        batch.segments,
        torch.split(losses, list(batch.segment_learned)),
        batch.sequence_learned,
        batch.sequence_samples,
        strict=True,
    ):
        assert seg.adapter is not None
        n_seq = len(counts)
        which = torch.repeat_interleave(torch.arange(n_seq), torch.tensor(counts, dtype=torch.long))
        sums = job_losses.new_zeros(n_seq).index_add(0, which.to(job_losses.device), job_losses)
        per_sample = n_seq // len(set(owners))
        # batch order -> the job's order: row k of the result is the batch's row inverse[k]
        inverse = torch.argsort(torch.tensor(owners[::per_sample]))
        tokens = torch.tensor(counts, dtype=torch.float32).view(-1, per_sample)[inverse]
        logps = -sums.view(-1, per_sample)[inverse.to(sums.device)]
        out[seg.adapter] = (logps, tokens.to(job_losses.device))
    return out


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(transform(hidden @ weight.T + bias), targets, reduction="none")`` a chunk of positions at a time.

    For a frozen head only the gradient with respect to ``hidden`` is needed, and it is
    known in the forward: ``(softmax(logits) - onehot(target)) @ weight`` per position, to be
    scaled by the incoming gradient in the backward. So each chunk's logits (chunk, V) are
    freed before the next one, and the step never holds (N, V) logits or their gradient.
    Logits are computed in the head's dtype and taken to fp32, as the unfused path does.
    ``transform`` (a :class:`LogitsHead`'s division and soft-capping) applies to them in fp32;
    the chain rule through it is ``1 / divisor`` times ``1 - tanh^2`` of the capped value.
    (PyTorch 2.13's ``F.linear_cross_entropy`` with chunking options does the same; on this
    CPU it ran 2x slower than this loop, see docs/benchmarks.md.)
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk: int,
        transform: LogitsHead | None = None,
    ) -> torch.Tensor:
        """hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) -> losses (N,) fp32."""
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            raw = F.linear(hidden[start:stop], weight, bias).float()  # (c, V)
            logits = raw if transform is None else transform.transform(raw)
            lse = logits.logsumexp(dim=-1)  # (c,)
            tc = targets[start:stop]
            losses[start:stop] = lse - logits.gather(1, tc[:, None])[:, 0]
            if grad is not None:
                slope = None if transform is None else _transform_slope(transform, logits)
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(stop - start, device=probs.device), tc] -= 1
                if slope is not None:
                    probs.mul_(slope)
                grad[start:stop] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None
        return grad * grad_losses[:, None].to(grad.dtype), None, None, None, None, None


def _transform_slope(transform: LogitsHead, logits: torch.Tensor) -> torch.Tensor | float:
    """d logits / d raw logits, elementwise, from the transformed ``logits`` (c, V)."""
    slope: torch.Tensor | float = 1.0 / transform.divisor
    if transform.softcap is not None:
        slope = (1 - (logits / transform.softcap) ** 2) * slope  # tanh' = 1 - tanh^2
    return slope
