"""The contracts plugins implement. The core only talks to plugins through these."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import argparse

    import torch
    from torch import nn

    from mlora_core.config.schema import AdapterConfig, BaseModelConfig, DataConfig
    from mlora_core.plugin_api.host import PluginHost
    from mlora_core.plugin_api.routing import RowRouter


# --- model backends -------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A frozen base model ready for adapters.

    ``model(input_ids=(B, T), attention_mask=(B, T))`` must return an object whose
    ``logits`` are ``(B, T, vocab)``.
    """

    model: nn.Module
    tokenizer: Any
    name_or_path: str
    #: Extra facts for summary.json (dtype, parameter bytes, ...).
    info: dict[str, Any] = field(default_factory=dict)
    #: Optional split of ``model`` for training: ``hidden_states(input_ids=(B, T),
    #: attention_mask=(B, T))`` -> final hidden states (B, T, H) before the LM head, and
    #: ``lm_head`` mapping (..., H) -> logits (..., V). With both set, the engine computes
    #: logits only at the positions whose next token is learned (see mlora_core.training.loss).
    #: Backends with ``supports_packing`` also take ``position_ids=(B, T)`` with
    #: ``attention_mask=None`` (packed rows), in ``hidden_states`` and in ``model``.
    hidden_states: Callable[..., torch.Tensor] | None = None
    lm_head: nn.Module | None = None
    #: Optional: the transformer blocks, in order; ``base_model.activation_checkpointing``
    #: recomputes each block's activations in the backward pass (see mlora_core.models.recompute).
    blocks: Sequence[nn.Module] | None = None


class ModelBackend(Protocol):
    """Loads one model family."""

    #: Short names of the linear layers adapters may target (``q_proj``, ...).
    target_modules: tuple[str, ...]
    # Optional attribute ``supports_packing: bool`` (read with getattr, default False): the
    # loaded model runs packed rows (``scheduler.packing``): ``position_ids`` (B, T) restarting
    # at 0 with each sample and ``attention_mask=None``, attention confined to each sample.
    # The default packs exactly when it is set; an explicit packing: true without it is refused.
    # Optional attribute ``default_target_modules: tuple[str, ...]``: the targets of a job that
    # names none (default: q_proj and v_proj when the backend has both).
    # Optional attribute ``model_types: tuple[str, ...]``: the config.json ``model_type`` values
    # it loads, listed when no backend recognises a checkpoint (default: the backend's name).

    def validate(self, config: BaseModelConfig) -> list[str]:
        """Problems with ``config`` found without loading the model (missing files, ...)."""
        ...

    def load(self, config: BaseModelConfig) -> LoadedModel:
        """Load the base model and tokenizer, frozen (no parameter requires grad)."""
        ...


# --- adapters -------------------------------------------------------------------------


class Adapter(Protocol):
    """One job's adapter, attached to the shared base model."""

    name: str

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters (fp32), and nothing else."""
        ...

    def save(self, directory: str, base_model_name_or_path: str) -> None:
        """Write the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
        ...

    def detach(self) -> None:
        """Remove the adapter's weights from the base model, freeing them."""
        ...


class AdapterType(Protocol):
    """Builds adapters of one kind (LoRA, ...)."""

    #: Jobs of this type train over a quantized base only: config validation refuses them
    #: when ``base_model.quantize`` is null (``qlora``).
    requires_quantized_base: bool
    #: The ``peft_type`` of the ``adapter_config.json`` files :meth:`load` reads (``"LORA"``),
    #: or None when this type loads no saved adapters. Saved adapters are loaded by the one
    #: registered type that names their ``peft_type``.
    peft_type: str | None

    def validate(self, config: AdapterConfig, target_modules: Sequence[str]) -> list[str]:
        """Problems with ``config``; ``target_modules`` are the backend's allowed names."""
        ...

    def attach(self, model: nn.Module, name: str, config: AdapterConfig, router: RowRouter) -> Adapter:
        """Add adapter ``name`` to ``model``; its layers read their rows from ``router``."""
        ...

    def load(self, model: nn.Module, name: str, directory: str, router: RowRouter) -> Adapter:
        """Attach adapter ``name`` with the weights saved in ``directory`` (PEFT's format).

        Optional: types without it cannot serve saved adapters (``mlora generate``), and the
        core says so. ``directory`` holds ``adapter_config.json`` (its ``peft_type`` picks the
        type) and the weights. Raises :class:`~mlora_core.errors.MloraError` for settings the
        type cannot reproduce and for weights that do not fit ``model`` (another base model).

        .. versionadded:: 0.1
        """
        ...


# --- data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One tokenized training example. ``labels[i]`` is ``input_ids[i]`` or -100 (not learned)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class SplitDataset:
    """A job's tokenized data: training samples and held-out samples."""

    train: list[Sample]
    eval: list[Sample]


class PromptTemplate(Protocol):
    """Turns an instruction (and an optional input) into the prompt the model sees."""

    def prompt(self, instruction: str, input_text: str = "") -> str:
        """The prompt text; the response follows it directly."""
        ...


class DatasetLoader(Protocol):
    """Reads one data format into tokenized samples."""

    def validate(self, config: DataConfig) -> list[str]:
        """Problems found without a tokenizer (missing file, unknown template, ...)."""
        ...

    def load(self, config: DataConfig, tokenizer: Any, seed: int) -> SplitDataset:
        """Read, template, tokenize and split the data."""
        ...


# --- scheduling: see mlora_core.plugin_api.scheduling (JobView, StepBudget, BatchScheduler) ----------


# --- monitors -------------------------------------------------------------------------


class Monitor(Protocol):
    """A metric sink named under ``monitor:`` in the config, built once per run.

    A monitor receives the run's events by implementing the event hooks of
    :mod:`mlora_core.plugin_api.hookspecs` as methods marked ``@hookimpl``
    (``mlora_on_step_end(self, step, metrics, run_metrics)``, ...), taking only the
    arguments it needs; the core registers it with the plugin manager for the run, so the
    events reach plugins and monitors through the same channel. Every event is optional.
    """

    def close(self) -> None:
        """Called once after the last event (also when the run fails): flush and close files."""
        ...


# --- commands -------------------------------------------------------------------------


class Command(Protocol):
    """One ``mlora`` sub-command (``mlora bench``, ...)."""

    #: One line for ``mlora --help``.
    help: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare the command's arguments; options and positionals may come in any order."""
        ...

    def run(self, args: argparse.Namespace, host: PluginHost) -> int:
        """Run the command; returns the exit status. Raise
        :class:`~mlora_core.errors.MloraError` for errors the user can fix (exit status 2)."""
        ...
