"""A frozen linear layer with several LoRA adapters, each applied to its own rows.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", §4.1):
``h = W0 x + (alpha / r) * B A x`` with ``A`` (r x in) Kaiming-initialised and ``B``
(out x r) zero-initialised, so an adapter starts as the identity on the base output.

Public API: adapter types built on LoRA (the example DoRA plugin) subclass
:class:`LoraLinear` and override :meth:`LoraLinear.segment_delta` (and ``add_adapter`` /
``remove_adapter`` to keep weights of their own); they reach an adapter's weights through
:meth:`lora_a`, :meth:`lora_b`, :meth:`dropout` and :attr:`scaling`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mlora_core.plugin_api.conventions import module_key
from mlora_core.plugin_api.routing import RowRouter


class LoraLinear(nn.Module):
    """Wraps ``base_layer`` (frozen); adapters are kept per name, as in PEFT.

    Which rows each adapter applies to comes from ``router.segments``; rows whose
    segment names no adapter of this layer get the base output unchanged. The module
    dicts ``lora_A``, ``lora_B``, ``lora_dropout`` are keyed by
    :func:`~mlora_core.plugin_api.conventions.module_key` of the adapter name, so any job
    name works (``train``, ``to``, ...); every method here takes the adapter name itself.
    """

    def __init__(self, base_layer: nn.Linear, router: RowRouter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.router = router
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        #: adapter name -> alpha / r; its keys are the adapters this layer holds.
        self.scaling: dict[str, float] = {}

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def has_adapter(self, name: str | None) -> bool:
        return name in self.scaling

    def lora_a(self, name: str) -> nn.Linear:
        """Adapter ``name``'s ``A`` (in -> r)."""
        return self.lora_A[module_key(name)]  # type: ignore[return-value]

    def lora_b(self, name: str) -> nn.Linear:
        """Adapter ``name``'s ``B`` (r -> out)."""
        return self.lora_B[module_key(name)]  # type: ignore[return-value]

    def dropout(self, name: str) -> nn.Module:
        """Adapter ``name``'s dropout on the layer input (identity when its dropout is 0)."""
        return self.lora_dropout[module_key(name)]

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float) -> None:
        """Add adapter ``name`` with fp32 weights on the base layer's device."""
        device = self.base_layer.weight.device
        a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        b = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        key = module_key(name)
        self.lora_A[key], self.lora_B[key] = a, b
        self.lora_dropout[key] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / r

    def remove_adapter(self, name: str) -> None:
        key = module_key(name)
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[key]
        del self.scaling[name]

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Adapter ``name``'s update for input ``x`` (..., in) -> (..., out), in fp32."""
        a, b = self.lora_a(name), self.lora_b(name)
        x = self.dropout(name)(x.to(a.weight.dtype))
        return b(a(x)) * self.scaling[name]  # type: ignore[no-any-return]

    def segment_delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to its rows: ``x`` (rows, T, in), ``base_out`` (rows, T, out).

        LoRA ignores ``base_out``; subclasses whose update depends on it (DoRA) override this.
        """
        return self.delta(name, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, in) -> (B, T, out); each segment's rows get their own adapter."""
        result = self.base_layer(x)  # (B, T, out)
        segments = self.router.segments
        if not any(self.has_adapter(seg.adapter) for seg in segments):
            return result  # type: ignore[no-any-return]
        if segments[-1].stop != x.shape[0]:
            raise ValueError(f"row segments cover {segments[-1].stop} rows, the batch has {x.shape[0]}")
        pieces = []
        for seg in segments:
            part = result[seg.start : seg.stop]  # (rows_j, T, out)
            if seg.adapter is not None and self.has_adapter(seg.adapter):
                part = part + self.segment_delta(seg.adapter, x[seg.start : seg.stop], part).to(part.dtype)
            pieces.append(part)
        return torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]  # type: ignore[no-any-return]
