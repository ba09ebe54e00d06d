"""Activation checkpointing of the frozen base, with the row routing kept for the recomputation.

A frozen base still stores every block's activations for the backward pass to reach the
adapters, and they dominate a step's memory (docs/benchmarks.md). With checkpointing each
block keeps only its input and recomputes the rest during backward: less memory, about one
more forward of compute.

The recomputation runs inside ``backward()``, after the engine's ``router.route`` block has
closed, so each checkpointed block captures the segments of its forward and routes them again
while it recomputes. Dropout draws the same masks both times (the RNG state is restored for
the recomputation), so training is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlora_core.plugin_api.routing import RowRouter


def checkpoint_blocks(blocks: Iterable[nn.Module], router: RowRouter) -> int:
    """Make each block recompute its activations in backward; returns how many blocks.

    The block's ``forward`` is replaced on the instance, so module paths (and the adapter
    keys saved for PEFT) stay the same. Without grad (evaluation, generation) blocks run as usual.
    """
    count = 0
    for block in blocks:
        block.forward = _routed_checkpoint(block.forward, router)
        count += 1
    return count


def _routed_checkpoint(forward: Callable[..., Any], router: RowRouter) -> Callable[..., Any]:
    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        segments, by_tokens = router.segments, router.by_tokens  # routed again in the recomputation

        def run(*a: Any, **k: Any) -> Any:
            with router.route(segments, by_tokens=by_tokens) if segments else contextlib.nullcontext():
                return forward(*a, **k)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return checkpointed
