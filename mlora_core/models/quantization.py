"""Quantize a loaded base model's linear layers with bitsandbytes (QLoRA's frozen base).

Every ``nn.Linear`` except the output embedding (the LM head) becomes a bitsandbytes
``Linear4bit`` (nf4 / fp4, blocksize 64, optional double quantization of the scales) or
``Linear8bitLt`` (int8, LLM.int8() with outlier threshold 6.0), as transformers'
``BitsAndBytesConfig`` does. Works for any backend whose adaptable layers are plain
``nn.Linear`` modules.

Trap (FACTS.md): on CPUs with AVX512-BF16, an eval-mode ``Linear4bit`` forward whose input
does not require grad permanently repacks the weight into an inference layout; training
then silently gets no gradients. Every layer made here has the repacking switched off.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from mlora_core.errors import MloraError

QUANT_TYPES = ("nf4", "fp4", "int8")


@dataclass
class QuantizationReport:
    """What :func:`quantize_linears` did."""

    quantize: str
    quantized: list[str] = field(default_factory=list)
    #: Weights in the quantized layers (their count of numbers, whatever the storage).
    quantized_params: int = 0
    #: Bytes the quantized layers take: packed weights, scales, biases.
    quantized_bytes: int = 0
    #: Layers bitsandbytes could not take, left in full precision (a warning names each).
    unquantized: list[str] = field(default_factory=list)


def quantize_linears(
    model: nn.Module, quantize: str, compute_dtype: torch.dtype, double_quant: bool, device: str
) -> QuantizationReport:
    """Replace the model's linear layers (not the LM head) with bitsandbytes layers, in place.

    Args:
        model: a frozen base model; ``model.get_output_embeddings()`` (if defined) is kept.
        quantize: ``nf4``, ``fp4`` or ``int8``.
        compute_dtype: dtype the 4-bit layers dequantize to for their matmuls.
        double_quant: also quantize the 4-bit blocks' scales (saves ~0.4 bits per weight).
        device: where the quantized weights live (quantization happens on the move there).
    """
    if quantize not in QUANT_TYPES:
        raise MloraError(f"unknown quantization {quantize!r}; known: {', '.join(QUANT_TYPES)}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise MloraError("quantized bases need bitsandbytes: pip install bitsandbytes") from exc
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    report = QuantizationReport(quantize)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is head:
            continue
        try:
            layer = _quantized(module, quantize, compute_dtype, double_quant, device)
        except Exception as exc:  # bitsandbytes rejects some shapes on some devices
            warnings.warn(
                f"{name}: bitsandbytes cannot quantize this {module.out_features}x{module.in_features} "
                f"layer to {quantize} ({exc}); it stays unquantized",
                stacklevel=2,
            )
            report.unquantized.append(name)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        report.quantized.append(name)
        report.quantized_params += module.weight.numel()
        report.quantized_bytes += resident_bytes(layer)
    return report


def _quantized(
    linear: nn.Linear, quantize: str, compute_dtype: torch.dtype, double_quant: bool, device: str
) -> nn.Module:
    import bitsandbytes as bnb

    has_bias = linear.bias is not None
    weight = linear.weight.data
    layer: Any
    if quantize == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quantize,
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=double_quant, quant_type=quantize
        )
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    layer = layer.to(device)  # bitsandbytes quantizes here
    if quantize != "int8":
        layer.support_avx512bf16_for_cpu = False  # never repack for CPU inference (see module doc)
    layer.requires_grad_(False)
    return cast(nn.Module, layer)


def disable_cpu_repacking(model: nn.Module) -> None:
    """Switch off bitsandbytes' CPU repacking of 4-bit weights (the trap in FACTS.md).

    For models quantized elsewhere (a backend loading with transformers'
    ``BitsAndBytesConfig``): every layer that :func:`quantize_linears` makes has it off
    already. :func:`mlora_core.models.loading.load_base_model` calls this on every base it
    loads, before any eval-mode, no-grad forward (evaluation, generation) could trigger it.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 - not a declared attribute


def resident_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy: parameters, buffers and 4-bit quantization state."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        state = getattr(t, "quant_state", None)
        while state is not None:  # absmax and code of the blocks, and of double quantization
            add(state.absmax)
            add(getattr(state, "code", None))
            state = getattr(state, "state2", None)
        add(getattr(t, "SCB", None))  # int8 row scales
    return total
