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
        x = self.dropout(name)(x.to(self.lora_a(name).weight.dtype))
        return self.low_rank(name, x)

    def low_rank(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``scaling * B A x`` for an input already dropped out: (..., in) fp32 -> (..., out)."""
        return self.lora_b(name)(self.lora_a(name)(x)) * self.scaling[name]  # type: ignore[no-any-return]

    def segment_delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to its tokens: ``x`` (..., in), ``base_out`` (..., out).

        The shapes are (rows, T, ...) in the reference path and (tokens, ...) in the default
        one. LoRA ignores ``base_out``; subclasses whose update depends on it (DoRA) override this.
        """
        return self.delta(name, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, in) -> (B, T, out); each segment's rows (or tokens) get their own adapter."""
        result = self.base_layer(x)  # (B, T, out)
        spans = self._spans(x)
        if spans is None:
            return result  # type: ignore[no-any-return]
        if self.reference:
            return self._forward_reference(x, result)
        return self._forward_split(x, result, spans)

    #: Run the per-segment loop over row slices (the simple implementation the tests compare
    #: the default one against) instead of one split of the flattened tokens.
    reference: bool = False

    def _spans(self, x: torch.Tensor) -> list[tuple[str | None, int]] | None:
        """(adapter here or None, tokens) per run of the flattened batch; None when no adapter applies."""
        segments = self.router.segments
        if not any(self.has_adapter(seg.adapter) for seg in segments):
            return None
        per_unit = 1 if self.router.by_tokens else math.prod(x.shape[1:-1])
        total = math.prod(x.shape[:-1])
        if segments[-1].stop * per_unit != total:
            unit = "tokens" if self.router.by_tokens else "rows"
            raise ValueError(f"segments cover {segments[-1].stop} {unit}, the batch has {total // per_unit}")
        spans: list[tuple[str | None, int]] = []
        for seg in segments:
            name = seg.adapter if self.has_adapter(seg.adapter) else None
            tokens = (seg.stop - seg.start) * per_unit
            if spans and spans[-1][0] == name:
                spans[-1] = (name, spans[-1][1] + tokens)
            else:
                spans.append((name, tokens))
        return spans

    def _forward_split(
        self, x: torch.Tensor, result: torch.Tensor, spans: list[tuple[str | None, int]]
    ) -> torch.Tensor:
        """The default path: the flattened tokens split once into each adapter's run.

        ``split`` and ``cat`` cost one copy each way, whatever the number of adapters (slices of
        the batch would each backpropagate a zero-filled gradient of the whole batch). Plain
        LoRA adapters share one dropout draw over the whole input.
        """
        sizes = [tokens for _, tokens in spans]
        flat_x = x.reshape(-1, x.shape[-1])  # (N, in)
        outs = result.reshape(-1, result.shape[-1]).split(sizes)  # (n_j, out) each
        plain = type(self).segment_delta is LoraLinear.segment_delta
        if plain:  # adapters compute in their weights' dtype (fp32)
            adapter_dtype = self.lora_a(next(name for name, _ in spans if name is not None)).weight.dtype
            flat_x = self._dropped(flat_x.to(adapter_dtype), spans)
        xs = flat_x.split(sizes)
        pieces = []
        for (name, _), x_j, out_j in zip(spans, xs, outs, strict=True):
            if name is not None:
                delta = self.low_rank(name, x_j) if plain else self.segment_delta(name, x_j, out_j)
                out_j = out_j + delta.to(out_j.dtype)
            pieces.append(out_j)
        joined = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        return joined.view(result.shape)

    def _dropped(self, x: torch.Tensor, spans: list[tuple[str | None, int]]) -> torch.Tensor:
        """x (N, in) with each adapter's dropout applied to its own tokens, from one random draw.

        Each token is kept with its adapter's ``1 - p`` and scaled by ``1 / (1 - p)``: the same
        distribution as one ``nn.Dropout`` per adapter.
        """
        rates = [self._dropout_rate(name) for name, _ in spans]
        if not any(rates):
            return x
        sizes = torch.tensor([tokens for _, tokens in spans], device=x.device)
        keep = torch.repeat_interleave(1 - torch.tensor(rates, dtype=x.dtype, device=x.device), sizes)[:, None]
        mask = torch.bernoulli(keep.expand_as(x))
        return x * (mask / keep)

    def _dropout_rate(self, name: str | None) -> float:
        """The dropout probability adapter ``name`` applies now (0 in eval mode or without dropout)."""
        module = self.dropout(name) if name is not None else None
        return float(module.p) if isinstance(module, nn.Dropout) and module.training else 0.0

    def _forward_reference(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The reference path: each segment's rows sliced out, one adapter at a time."""
        if self.router.by_tokens:
            shape = result.shape
            x, result = x.reshape(1, -1, x.shape[-1]), result.reshape(1, -1, result.shape[-1])
            pieces = [
                self._segment_out(seg.adapter, x[:, seg.start : seg.stop], result[:, seg.start : seg.stop])
                for seg in self.router.segments
            ]
            return torch.cat(pieces, dim=1).view(shape) if len(pieces) > 1 else pieces[0].view(shape)
        pieces = [
            self._segment_out(seg.adapter, x[seg.start : seg.stop], result[seg.start : seg.stop])
            for seg in self.router.segments
        ]
        return torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]

    def _segment_out(self, name: str | None, x: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        if name is None or not self.has_adapter(name):
            return part
        return part + self.segment_delta(name, x, part).to(part.dtype)
