"""The ``lora`` adapter type: attach LoRA adapters to a base model and save them for PEFT."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from mlora_core.config import AdapterConfig
from mlora_core.errors import MloraError
from mlora_core.routing import RowRouter
from mlora_lora.layer import LoraLinear

#: PEFT prefixes adapter keys with this for causal LMs (``PeftModelForCausalLM``).
PEFT_PREFIX = "base_model.model."


class LoraAdapter:
    """One job's LoRA adapter on a shared base: its layers keyed by module path."""

    def __init__(self, name: str, config: AdapterConfig, layers: dict[str, LoraLinear]) -> None:
        self.name = name
        self.config = config
        self.layers = layers

    def parameters(self) -> list[nn.Parameter]:
        params = []
        for layer in self.layers.values():
            params += [layer.lora_A[self.name].weight, layer.lora_B[self.name].weight]
        return params

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under PEFT's key names (``base_model.model.<path>.lora_A.weight``)."""
        state = {}
        for path, layer in self.layers.items():
            state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[self.name].weight
            state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[self.name].weight
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy weights saved under PEFT's key names (as :meth:`state_dict` writes them) into the adapter."""
        expected = set(self.state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise MloraError(
                f"adapter {self.name!r}: state does not match (missing {missing[:3]}, unexpected {extra[:3]})"
            )
        with torch.no_grad():
            for path, layer in self.layers.items():
                layer.lora_A[self.name].weight.copy_(state[f"{PEFT_PREFIX}{path}.lora_A.weight"])
                layer.lora_B[self.name].weight.copy_(state[f"{PEFT_PREFIX}{path}.lora_B.weight"])

    def peft_config(self, base_model_name_or_path: str) -> dict[str, object]:
        """The adapter_config.json that PEFT's LoraConfig reads."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.config.r,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": sorted(set(self.config.target_modules)),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
            "use_rslora": False,
            "use_dora": False,
        }

    def save(self, directory: str, base_model_name_or_path: str) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        text = json.dumps(self.peft_config(base_model_name_or_path), indent=2)
        (out / "adapter_config.json").write_text(text + "\n")

    def detach(self) -> None:
        for layer in self.layers.values():
            layer.remove_adapter(self.name)
        self.layers = {}


class LoraAdapterType:
    """Wraps each targeted ``nn.Linear`` in a :class:`LoraLinear` (once) and adds the adapter.

    Over a quantized base (``base_model.quantize``) the wrapped layers are bitsandbytes
    layers and every ``lora`` job is a QLoRA job.
    """

    requires_quantized_base = False

    def validate(self, config: AdapterConfig, target_modules: Sequence[str]) -> list[str]:
        problems = []
        if config.r < 1:
            problems.append("r: must be at least 1")
        if config.alpha <= 0:
            problems.append("alpha: must be positive")
        if not 0 <= config.dropout < 1:
            problems.append("dropout: must be in [0, 1)")
        if not config.target_modules:
            problems.append("target_modules: name at least one module")
        unknown = [m for m in config.target_modules if target_modules and m not in target_modules]
        if unknown:
            problems.append(f"target_modules: unknown {unknown}; known: {', '.join(target_modules)}")
        if config.options:
            problems.append(f"options: the lora adapter takes no options, got {sorted(config.options)}")
        return problems

    def attach(self, model: nn.Module, name: str, config: AdapterConfig, router: RowRouter) -> LoraAdapter:
        wanted = set(config.target_modules)
        layers: dict[str, LoraLinear] = {}
        for path, module in list(model.named_modules()):
            if path.rsplit(".", 1)[-1] not in wanted:
                continue
            layer = self.layer_at(model, path, module, router)
            if layer is not None:
                self.add_to_layer(layer, name, config)
                layers[path] = layer
        if not layers:
            raise MloraError(f"adapter {name!r}: no linear layer named {sorted(wanted)} in the model")
        return self.make_adapter(name, config, layers)

    # Extension points for adapter types built on LoRA (the example DoRA plugin uses them).

    def layer_at(self, model: nn.Module, path: str, module: nn.Module, router: RowRouter) -> LoraLinear | None:
        """The adapted layer at ``path`` (wrapping a plain linear on first use), or None to skip it."""
        return _wrap(model, path, module, router)

    def add_to_layer(self, layer: LoraLinear, name: str, config: AdapterConfig) -> None:
        layer.add_adapter(name, config.r, config.alpha, config.dropout)

    def make_adapter(self, name: str, config: AdapterConfig, layers: dict[str, LoraLinear]) -> LoraAdapter:
        return LoraAdapter(name, config, layers)


def _wrap(model: nn.Module, path: str, module: nn.Module, router: RowRouter) -> LoraLinear | None:
    """The LoraLinear at ``path``, wrapping a plain linear there on first use."""
    if isinstance(module, LoraLinear):
        return module
    if not isinstance(module, nn.Linear):  # plain or bitsandbytes-quantized linears
        return None
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layer = LoraLinear(module, router)
    setattr(parent, child, layer)
    return layer


class QLoraAdapterType(LoraAdapterType):
    """``qlora``: LoRA that asserts the shared base is quantized (``base_model.quantize``).

    Quantization is a property of the one shared base, so it is set there; this type only
    lets a job say it expects a quantized base, and validation fails when it is not.
    """

    requires_quantized_base = True
