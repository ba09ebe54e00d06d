"""The ``dora`` adapter type: weight-decomposed LoRA, saved in PEFT's ``use_dora=True`` format.

DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", §4.1, eq. 5) splits
the adapted weight into a magnitude and a direction:

    W' = m * (W0 + s * B A) / ||W0 + s * B A||_c

``||.||_c`` is the L2 norm of each output row (PEFT's ``torch.linalg.norm(W, dim=1)``), and
``m`` (one value per output feature) starts as that norm at init, ``||W0||_c`` since B is 0.
As in the paper (§4.3) and PEFT, the norm is treated as a constant: it gets no gradient.
For an input x (after the adapter's dropout) the layer adds, on top of ``W0 x + bias``:

    (m / norm - 1) * W0 x + (m / norm) * s * B A x

which is PEFT 0.21's ``DoraLinearLayer.forward``. Without dropout (or in eval mode) ``W0 x``
is the base output less its bias; with dropout it is recomputed from the dropped-out input.

This plugin reuses the built-in ``mlora_lora`` pieces: :class:`DoraLinear` subclasses
``LoraLinear`` (so LoRA and DoRA jobs can share one wrapped layer, each on its own rows) and
:class:`DoraAdapter` subclasses ``LoraAdapter`` (A/B handling and PEFT key names).
The shared base must be unquantized: DoRA needs the full-precision ``W0`` for the norm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mlora_core.config.schema import AdapterConfig
from mlora_core.errors import MloraError
from mlora_core.plugin_api.conventions import module_key
from mlora_core.plugin_api.routing import RowRouter
from mlora_lora.adapter import PEFT_PREFIX, LoraAdapter, LoraAdapterType
from mlora_lora.layer import LoraLinear


class DoraLinear(LoraLinear):
    """A ``LoraLinear`` that also holds DoRA adapters (a magnitude vector per adapter name).

    Adapters without a magnitude are plain LoRA and behave exactly as in ``LoraLinear``.
    """

    def __init__(self, base_layer: nn.Linear, router: RowRouter) -> None:
        super().__init__(base_layer, router)
        self.lora_magnitude = nn.ParameterDict()

    @classmethod
    def upgrade(cls, layer: LoraLinear) -> DoraLinear:
        """Turn an existing ``LoraLinear`` (with its LoRA adapters) into a ``DoraLinear`` in place.

        In place, so the built-in LoRA adapters that already hold this layer keep working.
        """
        if not isinstance(layer, cls):
            layer.__class__ = cls
            layer.lora_magnitude = nn.ParameterDict()
        assert isinstance(layer, cls)
        return layer

    def add_dora_adapter(self, name: str, r: int, alpha: float, dropout: float) -> None:
        """Add LoRA weights for ``name`` (A Kaiming, B zero), then m = ||W0 + s B A||_c (fp32)."""
        self.add_adapter(name, r, alpha, dropout)
        with torch.no_grad():
            norm = self._weight_norm(name)  # (out,)
        self.lora_magnitude[module_key(name)] = nn.Parameter(norm.clone())

    def has_dora(self, name: str) -> bool:
        """Whether adapter ``name`` is a DoRA adapter (it has a magnitude vector)."""
        return module_key(name) in self.lora_magnitude

    def magnitude(self, name: str) -> nn.Parameter:
        """DoRA adapter ``name``'s magnitude vector m, (out,)."""
        return self.lora_magnitude[module_key(name)]

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        if self.has_dora(name):
            del self.lora_magnitude[module_key(name)]

    def _weight_norm(self, name: str) -> torch.Tensor:
        """||W0 + s B A||_c per output row, (out,), detached from B and A (paper §4.3)."""
        a, b = self.lora_a(name).weight, self.lora_b(name).weight
        w0 = self.base_layer.weight.to(torch.float32)  # (out, in)
        lora_weight = (b @ a).detach()  # (out, in)
        return torch.linalg.norm(w0 + self.scaling[name] * lora_weight, dim=1).detach()

    def dora_delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """DoRA's update for rows x (rows, T, in) whose base output is base_out (rows, T, out); fp32."""
        a, b, dropout = self.lora_a(name), self.lora_b(name), self.dropout(name)
        scaling = self.scaling[name]
        x = x.to(torch.float32)
        if isinstance(dropout, nn.Identity) or not self.training:
            base = base_out.to(torch.float32)  # W0 x + bias
            if self.base_layer.bias is not None:
                base = base - self.base_layer.bias.to(torch.float32)
        else:
            x = dropout(x)
            base = F.linear(x, self.base_layer.weight.to(torch.float32))  # W0 dropout(x)
        scale = self.magnitude(name) / self._weight_norm(name)  # (out,)
        return (scale - 1) * base + scale * b(a(x)) * scaling

    def segment_delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """DoRA rows use :meth:`dora_delta`; LoRA adapters sharing the layer keep LoRA's update."""
        if self.has_dora(name):
            return self.dora_delta(name, x, base_out)
        return super().segment_delta(name, x, base_out)


class DoraAdapter(LoraAdapter):
    """One job's DoRA adapter: LoRA's A and B plus a magnitude vector per layer."""

    layers: dict[str, DoraLinear]  # type: ignore[assignment]

    def parameters(self) -> list[nn.Parameter]:
        return super().parameters() + [layer.magnitude(self.name) for layer in self.layers.values()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's keys: LoRA's, plus ``base_model.model.<path>.lora_magnitude_vector``."""
        state = super().state_dict()
        for path, layer in self.layers.items():
            magnitude = layer.magnitude(self.name).detach().to("cpu", torch.float32).clone()
            state[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = magnitude
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        magnitudes = {k: v for k, v in state.items() if k.endswith(".lora_magnitude_vector")}
        expected = {f"{PEFT_PREFIX}{path}.lora_magnitude_vector" for path in self.layers}
        if set(magnitudes) != expected:
            raise MloraError(f"adapter {self.name!r}: magnitude vectors do not match the adapter's layers")
        super().load_state_dict({k: v for k, v in state.items() if k not in magnitudes})
        with torch.no_grad():
            for path, layer in self.layers.items():
                layer.magnitude(self.name).copy_(magnitudes[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"])

    def peft_config(self, base_model_name_or_path: str) -> dict[str, object]:
        return {**super().peft_config(base_model_name_or_path), "use_dora": True}


class DoraAdapterType(LoraAdapterType):
    """Wraps each targeted ``nn.Linear`` in a :class:`DoraLinear` (or upgrades a ``LoraLinear``)."""

    peft_type = None  # saved DoRA adapters are not loaded back (``mlora generate``) by this example

    def validate(self, config: AdapterConfig, target_modules: Sequence[str]) -> list[str]:
        problems = super().validate(dataclasses.replace(config, options={}), target_modules)
        if config.options:
            problems.append(f"options: the dora adapter takes no options, got {sorted(config.options)}")
        return problems

    def layer_at(self, model: nn.Module, path: str, module: nn.Module, router: RowRouter) -> DoraLinear | None:
        return _dora_layer(model, path, module, router)

    def add_to_layer(self, layer: LoraLinear, name: str, config: AdapterConfig) -> None:
        assert isinstance(layer, DoraLinear)
        layer.add_dora_adapter(name, config.r, config.alpha, config.dropout)

    def make_adapter(self, name: str, config: AdapterConfig, layers: dict[str, LoraLinear]) -> DoraAdapter:
        return DoraAdapter(name, config, layers)


def _dora_layer(model: nn.Module, path: str, module: nn.Module, router: RowRouter) -> DoraLinear | None:
    """The DoraLinear at ``path``: wraps a plain linear, upgrades a LoraLinear, skips the rest."""
    if isinstance(module, LoraLinear):
        _check_unquantized(path, module.base_layer)
        return DoraLinear.upgrade(module)
    if not isinstance(module, nn.Linear):
        return None
    _check_unquantized(path, module)
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layer = DoraLinear(module, router)
    setattr(parent, child, layer)
    return layer


def _check_unquantized(path: str, linear: nn.Module) -> None:
    if type(linear) is not nn.Linear:  # bitsandbytes layers subclass nn.Linear
        raise MloraError(
            f"dora: {path} is a {type(linear).__name__}; DoRA needs an unquantized base "
            "(set base_model.quantize to null)"
        )
