"""The contracts plugins implement. The core only talks to plugins through these."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mlora_core.config import AdapterConfig, BaseModelConfig, DataConfig
    from mlora_core.routing import RowRouter


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
    #: Optional split of ``model`` for training: ``hidden_states(input_ids (B, T),
    #: attention_mask (B, T))`` -> final hidden states (B, T, H) before the LM head, and
    #: ``lm_head`` mapping (..., H) -> logits (..., V). With both set, the engine computes
    #: logits only at the positions whose next token is learned (see mlora_core.loss).
    hidden_states: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    lm_head: nn.Module | None = None
    #: Optional: the transformer blocks, in order; ``base_model.activation_checkpointing``
    #: recomputes each block's activations in the backward pass (see mlora_core.checkpointing).
    blocks: Sequence[nn.Module] | None = None


class ModelBackend(Protocol):
    """Loads one model family."""

    #: Short names of the linear layers adapters may target (``q_proj``, ...).
    target_modules: tuple[str, ...]

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


class DatasetLoader(Protocol):
    """Reads one data format into tokenized samples."""

    def validate(self, config: DataConfig) -> list[str]:
        """Problems found without a tokenizer (missing file, unknown template, ...)."""
        ...

    def load(self, config: DataConfig, tokenizer: Any, seed: int) -> SplitDataset:
        """Read, template, tokenize and split the data."""
        ...


# --- scheduling: see mlora_core.scheduling (JobView, StepBudget, BatchScheduler) ----------


# --- monitors -------------------------------------------------------------------------


class Monitor(Protocol):
    """Receives run events; metrics are plain floats keyed by name."""

    def on_train_start(self, run: Mapping[str, Any]) -> None: ...

    def on_step_end(
        self, step: int, metrics: Mapping[str, Mapping[str, float]], run_metrics: Mapping[str, float]
    ) -> None: ...

    def on_job_end(self, job: str, result: Mapping[str, Any]) -> None: ...

    def on_train_end(self, summary: Mapping[str, Any]) -> None: ...
