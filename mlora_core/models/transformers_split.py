"""For backends that load a transformers causal LM: its hidden-state stack and LM head, apart.

Every transformers ``*ForCausalLM`` is a decoder (``get_decoder()``, returning
``last_hidden_state``) followed by a linear head (``get_output_embeddings()``). Some families
post-process the head's logits in their ``forward``; the split keeps those steps, as
:class:`LogitsHead` (the families mlora loads: Gemma 2/3's final soft-capping, Granite's
logit scaling). A family with any other step between the two needs its own split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


class LogitsHead(nn.Module):
    """A linear LM head and the logit post-processing of its model: (..., H) -> (..., V).

    ``logits = softcap * tanh(linear(h) / divisor / softcap)`` (Gemma 2/3's
    ``final_logit_softcapping``), or ``linear(h) / divisor`` without soft-capping (Granite's
    ``logits_scaling``). The linear layer stays the model's own (shared, frozen) module.
    """

    def __init__(self, linear: nn.Linear, divisor: float = 1.0, softcap: float | None = None) -> None:
        super().__init__()
        self.linear = linear
        self.divisor = divisor
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform(self.linear(hidden))

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """The post-processing alone, on raw ``linear`` logits of any shape."""
        if self.divisor != 1.0:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def split_causal_lm(model: Any) -> tuple[Callable[..., torch.Tensor], nn.Module]:
    """(hidden_states, lm_head) for :class:`mlora_core.plugin_api.protocols.LoadedModel`."""
    decoder = model.get_decoder()

    def hidden_states(
        input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T), (B, T) or None, (B, T) or None -> (B, T, H).

        Packed rows: ``attention_mask`` None and ``position_ids`` restarting at 0 with each
        sample; transformers' masking utilities then confine attention to each sample.
        """
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state  # type: ignore[no-any-return]

    return hidden_states, lm_head(model)


def lm_head(model: Any) -> nn.Module:
    """The model's output layer, wrapped in :class:`LogitsHead` when its config post-processes logits."""
    head: nn.Module = model.get_output_embeddings()
    config = model.config
    divisor = float(getattr(config, "logits_scaling", None) or 1.0)
    softcap = getattr(config, "final_logit_softcapping", None)
    if divisor == 1.0 and softcap is None:
        return head
    assert isinstance(head, nn.Linear)
    return LogitsHead(head, divisor, float(softcap) if softcap is not None else None)


def decoder_blocks(model: Any) -> Sequence[nn.Module]:
    """The decoder's transformer blocks (``model.get_decoder().layers``), in order."""
    return list(model.get_decoder().layers)
