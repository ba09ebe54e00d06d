"""The ``lora`` adapter type: attach LoRA adapters to a base model and save them for PEFT.

Public API for adapter types built on LoRA (the example DoRA plugin): :data:`PEFT_PREFIX`,
:class:`LoraAdapter` (``layers``, ``state_dict``, ``load_state_dict``, ``peft_config``, all
meant to be extended) and :class:`LoraAdapterType`'s extension points ``layer_at``,
``add_to_layer`` and ``make_adapter``; with :class:`mlora_lora.layer.LoraLinear`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mlora_core.config.schema import AdapterConfig
from mlora_core.errors import MloraError
from mlora_core.plugin_api.routing import RowRouter
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
            params += [layer.lora_a(self.name).weight, layer.lora_b(self.name).weight]
        return params

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under PEFT's key names (``base_model.model.<path>.lora_A.weight``)."""
        state = {}
        for path, layer in self.layers.items():
            state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_a(self.name).weight
            state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_b(self.name).weight
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
                layer.lora_a(self.name).weight.copy_(state[f"{PEFT_PREFIX}{path}.lora_A.weight"])
                layer.lora_b(self.name).weight.copy_(state[f"{PEFT_PREFIX}{path}.lora_B.weight"])

    def peft_config(self, base_model_name_or_path: str) -> dict[str, object]:
        """The adapter_config.json that PEFT's LoraConfig reads."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.config.r,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": sorted({path.rsplit(".", 1)[-1] for path in self.layers}),
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

    Public API: :meth:`layer_at`, :meth:`add_to_layer` and :meth:`make_adapter` are the
    extension points adapter types built on LoRA override (the example DoRA plugin does).
    """

    requires_quantized_base = False
    peft_type: str | None = "LORA"

    def validate(self, config: AdapterConfig, target_modules: Sequence[str]) -> list[str]:
        problems = []
        if config.r < 1:
            problems.append("r: must be at least 1")
        if config.alpha <= 0:
            problems.append("alpha: must be positive")
        if not 0 <= config.dropout < 1:
            problems.append("dropout: must be in [0, 1)")
        if config.target_modules is not None and not config.target_modules:
            problems.append("target_modules: name at least one module")
        unknown = [m for m in config.target_modules or () if target_modules and m not in target_modules]
        if unknown:
            problems.append(
                f"target_modules: {unknown} match no layer of this model; its layers adapters may target: "
                f"{', '.join(target_modules)}"
            )
        if config.options:
            problems.append(f"options: the lora adapter takes no options, got {sorted(config.options)}")
        return problems

    def attach(self, model: nn.Module, name: str, config: AdapterConfig, router: RowRouter) -> LoraAdapter:
        if config.target_modules is None:
            raise MloraError(f"adapter {name!r}: target_modules not set (config validation fills in the default)")
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

    def load(self, model: nn.Module, name: str, directory: str, router: RowRouter) -> LoraAdapter:
        """Attach adapter ``name`` from a PEFT LoRA directory (saved by mlora or by PEFT itself).

        The layers adapted are exactly those the weights name; ``r`` and ``lora_alpha`` come from
        ``adapter_config.json`` (rsLoRA's ``alpha / sqrt(r)`` scaling is kept), dropout is 0.
        Settings LoRA here cannot reproduce (DoRA, biases, ``modules_to_save``, per-layer ranks,
        ...) and weights that do not fit ``model`` raise :class:`MloraError`.
        """
        where = Path(directory)
        raw = _read_peft_config(where)
        state = _read_peft_weights(where)
        r, alpha = int(raw["r"]), float(raw["lora_alpha"])
        if raw.get("use_rslora"):
            alpha *= math.sqrt(r)  # scaling alpha / sqrt(r) instead of alpha / r
        paths = sorted({key[len(PEFT_PREFIX) :].rsplit(".", 2)[0] for key in state})
        targets = sorted({p.rsplit(".", 1)[-1] for p in paths})
        config = AdapterConfig(type="lora", r=r, alpha=alpha, dropout=0.0, target_modules=targets)
        layers: dict[str, LoraLinear] = {}
        try:
            for path in paths:
                layer = self._loadable_layer(model, path, router, where)
                self.add_to_layer(layer, name, config)
                layers[path] = layer
            adapter = self.make_adapter(name, config, layers)
            _check_shapes(adapter, state, where)
            adapter.load_state_dict(state)
        except BaseException:
            for layer in layers.values():
                layer.remove_adapter(name)
            raise
        return adapter

    def _loadable_layer(self, model: nn.Module, path: str, router: RowRouter, where: Path) -> LoraLinear:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise MloraError(f"{where}: the adapter adapts {path}, which the base model lacks (other base?)") from None
        layer = self.layer_at(model, path, module, router)
        if layer is None:
            raise MloraError(f"{where}: the adapter adapts {path}, which is not a linear layer in the base model")
        return layer

    # Extension points (public API) for adapter types built on LoRA.

    def layer_at(self, model: nn.Module, path: str, module: nn.Module, router: RowRouter) -> LoraLinear | None:
        """The adapted layer at ``path`` (wrapping a plain linear on first use), or None to skip it."""
        return _wrap(model, path, module, router)

    def add_to_layer(self, layer: LoraLinear, name: str, config: AdapterConfig) -> None:
        """Add job ``name``'s weights to one adapted layer."""
        layer.add_adapter(name, config.r, config.alpha, config.dropout)

    def make_adapter(self, name: str, config: AdapterConfig, layers: dict[str, LoraLinear]) -> LoraAdapter:
        """The :class:`~mlora_core.plugin_api.protocols.Adapter` over the layers of job ``name``."""
        return LoraAdapter(name, config, layers)


#: PEFT LoRA settings this type cannot reproduce, with the value that means "off".
_UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "lora_bias": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "target_parameters": None,
}
#: ``base_model.model.<path>.lora_A.weight``, optionally with an adapter-name infix (``lora_A.default.weight``).
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<ab>lora_[AB])(?:\.[^.]+)?\.weight$")


def _read_peft_config(where: Path) -> dict[str, Any]:
    """adapter_config.json as a mapping; raises MloraError for what LoRA here cannot load."""
    try:
        raw = json.loads((where / "adapter_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MloraError(f"{where}: no adapter_config.json (expected a PEFT adapter directory)") from None
    except (OSError, ValueError) as exc:
        raise MloraError(f"{where}/adapter_config.json: not readable JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise MloraError(f"{where}/adapter_config.json: not a LoRA adapter (peft_type must be 'LORA')")
    problems = [f"{key}={raw[key]!r}" for key, off in _UNSUPPORTED.items() if raw.get(key) not in (off, None)]
    if raw.get("bias", "none") != "none":
        problems.append(f"bias={raw['bias']!r}")
    if problems:
        raise MloraError(f"{where}: unsupported PEFT LoRA settings: {', '.join(problems)}")
    if not isinstance(raw.get("r"), int) or raw["r"] < 1 or not isinstance(raw.get("lora_alpha"), (int, float)):
        raise MloraError(f"{where}/adapter_config.json: needs an integer r >= 1 and a number lora_alpha")
    return raw


def _read_peft_weights(where: Path) -> dict[str, torch.Tensor]:
    """The adapter's weights under mlora's keys (``base_model.model.<path>.lora_A.weight``)."""
    if (where / "adapter_model.safetensors").is_file():
        raw = load_file(str(where / "adapter_model.safetensors"))
    elif (where / "adapter_model.bin").is_file():
        raw = torch.load(where / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise MloraError(f"{where}: no adapter_model.safetensors or adapter_model.bin")
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise MloraError(f"{where}: unsupported weight {key!r} (only LoRA A/B matrices of linear layers load)")
        name = f"{PEFT_PREFIX}{match['path']}.{match['ab']}.weight"
        if name in state:
            raise MloraError(f"{where}: the weights hold more than one adapter ({key!r} again)")
        state[name] = value
    if not state:
        raise MloraError(f"{where}: the weights file holds no LoRA weights")
    return state


def _check_shapes(adapter: LoraAdapter, state: dict[str, torch.Tensor], where: Path) -> None:
    """Raise MloraError naming the first weight whose shape does not fit the base model."""
    for key, expected in adapter.state_dict().items():
        got = state.get(key)
        if got is None:
            raise MloraError(f"{where}: {key} is missing (each adapted layer needs lora_A and lora_B)")
        if tuple(got.shape) != tuple(expected.shape):
            raise MloraError(
                f"{where}: {key} has shape {tuple(got.shape)}, the base model needs {tuple(expected.shape)} "
                "(an adapter trained for another base model, or r in adapter_config.json is wrong)"
            )


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
    peft_type = None  # its saved adapters are plain LoRA ones, loaded by ``lora``
