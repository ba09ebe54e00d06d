"""For backends that load a transformers causal LM: its hidden-state stack and LM head, apart.

Every transformers ``*ForCausalLM`` is a decoder (``get_decoder()``, returning
``last_hidden_state``) followed by a linear head (``get_output_embeddings()``); the
families mlora loads apply nothing between the two (no logit scaling or soft-capping).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def split_causal_lm(model: Any) -> tuple[Callable[..., torch.Tensor], nn.Module]:
    """(hidden_states, lm_head) for :class:`mlora_core.plugin_api.protocols.LoadedModel`."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()

    def hidden_states(
        input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T), (B, T) or None, (B, T) or None -> (B, T, H).

        Packed rows: ``attention_mask`` None and ``position_ids`` restarting at 0 with each
        sample; transformers' masking utilities then confine attention to each sample.
        """
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state  # type: ignore[no-any-return]

    return hidden_states, head


def decoder_blocks(model: Any) -> Sequence[nn.Module]:
    """The decoder's transformer blocks (``model.get_decoder().layers``), in order."""
    return list(model.get_decoder().layers)
