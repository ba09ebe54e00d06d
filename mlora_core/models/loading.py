"""Load the shared base model: the backend's loader, then quantization when asked for."""

from __future__ import annotations

from mlora_core.config.schema import BaseModelConfig, torch_dtype
from mlora_core.config.validation import resolve_backend
from mlora_core.models.quantization import disable_cpu_repacking, quantize_linears, resident_bytes
from mlora_core.plugin_api.host import PluginHost
from mlora_core.plugin_api.protocols import LoadedModel


def load_base_model(host: PluginHost, config: BaseModelConfig) -> LoadedModel:
    """Load ``config``'s base model through its backend and quantize it if ``config.quantize``.

    Whatever quantized it (``base_model.quantize`` or the backend itself, through
    transformers' ``BitsAndBytesConfig``), bitsandbytes' CPU repacking of 4-bit weights is
    switched off, so training, evaluation and generation can follow each other in any order.

    ``info`` gains ``quantize`` (None or the type), ``resident_bytes`` (weights, buffers and
    quantization state) and, when quantized, ``unquantized_layers``.
    """
    loaded: LoadedModel = host.backends.create(resolve_backend(config, host)).load(config)
    loaded.info["quantize"] = config.quantize
    if config.quantize:
        compute = torch_dtype(config.compute_dtype or config.dtype)
        report = quantize_linears(loaded.model, config.quantize, compute, config.double_quant, config.device)
        loaded.info["double_quant"] = config.double_quant if config.quantize != "int8" else None
        loaded.info["quantized_layers"] = len(report.quantized)
        loaded.info["unquantized_layers"] = report.unquantized
        loaded.info["quantized_params"] = report.quantized_params
        loaded.info["quantized_bytes"] = report.quantized_bytes
    disable_cpu_repacking(loaded.model)
    loaded.info["resident_bytes"] = resident_bytes(loaded.model)
    return loaded
