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
    """One tokenized training example. ``labels[i]`` is ``input_ids[i]`` or -100 (not learned).

    A sample may hold several sequences that train together (a preference pair: the prompt
    with the chosen completion, then the prompt with the rejected one): ``starts`` gives
    where the second and later sequences begin in ``input_ids``. Each sequence gets its own
    positions and attention (:meth:`sequences`); schedulers see the sample as one unit of
    ``len(sample)`` tokens.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    #: Start of each sequence after the first (empty: one sequence).
    starts: tuple[int, ...] = ()
    #: Per sequence, the summed log-probability of its learned tokens under the objective's
    #: reference model (filled in by the engine for objectives that need one; else None).
    reference_logps: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def sequences(self) -> list[Sample]:
        """The sequences of this sample, each a one-sequence :class:`Sample`, in order."""
        if not self.starts:
            return [self]
        bounds = [0, *self.starts, len(self.input_ids)]
        return [Sample(self.input_ids[a:b], self.labels[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


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


# --- objectives -----------------------------------------------------------------------


@dataclass
class SequenceLogps:
    """What one job's rows of a step (or its held-out samples) give an objective.

    ``S`` samples of ``K`` sequences each (:attr:`Objective.sequences_per_sample`), in the
    order of the samples; a preference pair is (chosen, rejected).
    """

    #: (S, K) fp32: per sequence, the summed log-probability of its learned tokens.
    logps: torch.Tensor
    #: (S, K) fp32: per sequence, how many tokens it learns.
    tokens: torch.Tensor
    #: (S, K) fp32 reference log-probabilities (:attr:`Sample.reference_logps`), or None when
    #: the objective needs none.
    reference_logps: torch.Tensor | None = None


class Objective(Protocol):
    """How a job learns from its samples (``jobs[].objective.type``): next-token loss, a preference loss, ...

    Built with ``factory(config=ObjectiveConfig)``. The core computes the per-token
    cross-entropy of every learned position in one forward for all jobs; an objective turns
    its job's share into that job's loss. A job's loss is the mean over its optimizer batch of
    whatever the objective averages over (tokens, pairs): :meth:`units` counts them for the
    whole optimizer batch, so micro-batches add up to the full batch's loss.
    """

    #: Sequences per sample: 1 (a prompt and its completion), 2 (a preference pair: chosen,
    #: then rejected). The job's data loader must give samples of that many sequences.
    sequences_per_sample: int
    #: Whether :meth:`loss` reads :attr:`SequenceLogps.reference_logps` (the core computes the
    #: reference model's log-probabilities once, before training, and keeps them with the samples).
    needs_reference: bool
    #: Names of the training metrics :meth:`loss` reports (``rewards/chosen``, ...): each the
    #: mean over the optimizer batch's samples; shown with the job's loss.
    metric_names: tuple[str, ...]

    def units(self, samples: Sequence[Sample]) -> dict[str, int]:
        """What an optimizer batch's loss is averaged over, counted over ``samples`` (e.g.
        ``{"tokens": learned tokens}`` or ``{"pairs": n, "chosen_tokens": m}``)."""
        ...

    def loss(self, out: SequenceLogps, units: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(these samples' share of the optimizer batch's loss, per metric the sum over these samples)."""
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
