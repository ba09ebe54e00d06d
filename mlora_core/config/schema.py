"""The config schema (OmegaConf structured dataclasses), loading and overrides.

``load_config`` checks the shape (unknown keys, wrong types) and reports every problem
with its key path; :func:`mlora_core.config.validation.validate_config` then checks names and
values against the plugins. Neither loads a model or writes anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mlora_core.errors import ConfigError


@dataclass
class BaseModelConfig:
    """The shared, frozen base model."""

    #: A registered backend name; null: chosen from the checkpoint (``mlora_detect_backend``).
    backend: Optional[str] = None
    #: A Hugging Face checkpoint directory, a ``.gguf`` file, or ``pkg:DIST/FILE`` for a
    #: file shipped inside an installed distribution (found without importing it).
    path: str = MISSING
    dtype: str = "fp32"  # fp32 | bf16
    #: null, or nf4 | fp4 | int8: quantize the base's linear layers with bitsandbytes (QLoRA).
    quantize: Optional[str] = None
    #: 4-bit only: also quantize the per-block scales.
    double_quant: bool = True
    #: dtype the quantized layers compute in (null: ``dtype``).
    compute_dtype: Optional[str] = None
    device: str = "cpu"
    #: Recompute each transformer block's activations in the backward pass: much less memory
    #: per row, about a third more compute (see docs/benchmarks.md).
    activation_checkpointing: bool = False


@dataclass
class SchedulerConfig:
    type: str = "trivial"
    #: Rows x padded length per step (null: optimal_fit and fast_fit use the tokens the
    #: admitted jobs' micro-batches take when padded separately; trivial has no limit).
    max_tokens_per_step: Optional[int] = None
    #: Jobs admitted at once, highest priority first (null: all).
    max_concurrent_jobs: Optional[int] = None
    #: optimal_fit and fast_fit always serve a job that has waited this many steps.
    max_wait_steps: int = 8
    #: Refuse steps predicted to need more memory than this many bytes (null: the device's
    #: memory, or the available RAM on CPU, less 10%). Set to 0 to turn the check off.
    memory_limit: Optional[int] = None
    #: Lay each step's samples (of every job) end to end in rows, each sample with its own
    #: positions and attention, instead of one padded row per sample. null: when the backend
    #: supports it (validation sets true or false).
    packing: Optional[bool] = None
    #: The most tokens a packed row may hold (null: no cap); a longer sample gets a row of its
    #: own length. Each step picks the row length that costs least (padding at row ends
    #: against attention, which grows with the row length squared).
    pack_length: Optional[int] = None
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DistributedConfig:
    """How the work is split when the run has several processes (``--nproc``, torchrun)."""

    #: auto | jobs | rows. ``jobs``: whole jobs per rank; ``rows``: every rank takes a share
    #: of every job's rows; ``auto``: ``jobs`` when there are at least as many jobs as ranks.
    strategy: str = "auto"
    #: auto | gloo | nccl (auto: nccl on CUDA, gloo otherwise).
    backend: str = "auto"
    #: Seconds a rank waits for the others before the run stops with an error.
    timeout_s: float = 600.0
    #: Shard the frozen base's decoder blocks over the ranks with FSDP2 (strategy rows).
    shard_base: bool = False


@dataclass
class AdapterConfig:
    type: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    #: Short names of the linear layers to adapt; null: the backend's default targets
    #: (``default_target_modules``: q_proj and v_proj for LLaMA-like families, qkv_proj for
    #: Phi-3, query_key_value for ChatGLM), filled in by config validation.
    target_modules: Optional[List[str]] = None
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    type: str = "alpaca"
    path: str = MISSING
    template: str = "alpaca"
    cutoff_len: int = 256
    train_on_inputs: bool = False
    #: Held-out examples: a fraction of the data (< 1) or a count (>= 1).
    val_set_size: float = 0.1
    #: The answers can be checked exactly: also report the exact-match accuracy of greedy
    #: answers on the held-out examples (before and after training, and in ``mlora eval``).
    exact_match: bool = False
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EarlyStopConfig:
    """End a job when its held-out loss has not improved for ``patience`` evaluations."""

    patience: int = 3
    #: An evaluation improves on the best only by more than this.
    min_delta: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 1
    #: Examples per optimizer step; a multiple of micro_batch_size.
    batch_size: int = 16
    #: Examples per engine step (gradient accumulation covers the rest).
    micro_batch_size: int = 4
    lr: float = 3.0e-4
    warmup_steps: int = 0
    lr_scheduler: str = "linear"  # linear | cosine | constant
    weight_decay: float = 0.0
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1.0e-8
    max_grad_norm: Optional[float] = 1.0
    #: Stop after this many optimizer steps (None: run every epoch).
    max_steps: Optional[int] = None
    shuffle: bool = True
    seed: int = 42
    #: Sort samples by length within windows of 8 batches, so a batch's rows pad little.
    group_by_length: bool = False
    #: Held-out loss every this many optimizer steps of the job (null: only before and after).
    eval_every: Optional[int] = None
    #: Stop early on held-out loss and keep the best adapter (needs eval_every); null: off.
    early_stop: Optional[EarlyStopConfig] = None


@dataclass
class ObjectiveConfig:
    """What a job learns from its data: ``sft`` (next-token loss) or a preference objective."""

    type: str = "sft"
    #: dpo, cpo, orpo: the strength of the preference term (DPO's and CPO's beta, ORPO's lambda).
    beta: float = 0.1
    #: dpo, cpo: the assumed fraction of pairs whose preference label is wrong (conservative DPO).
    label_smoothing: float = 0.0
    #: cpo: weight of the negative log-likelihood term on the chosen completions.
    alpha: float = 1.0
    #: dpo: the reference model, ``base`` (the frozen base itself) or the directory of a saved
    #: adapter (PEFT format) over the same base.
    reference: str = "base"
    #: Settings of third-party objectives.
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class JobConfig:
    name: str = MISSING
    #: Higher runs first when max_concurrent_jobs limits admission; preempts at step boundaries.
    priority: int = 0
    #: The job becomes live at this engine step (0: at once).
    start_step: int = 0
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


@dataclass
class MloraConfig:
    base_model: BaseModelConfig = field(default_factory=BaseModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    #: Monitor name -> its options; set a monitor to null to turn it off.
    monitor: Dict[str, Any] = field(default_factory=lambda: {"console": {}, "jsonl": {}})
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: str = "out"
    #: Write a checkpoint every this many engine steps (and when a job ends); null: never.
    checkpoint_every: Optional[int] = None
    jobs: List[JobConfig] = MISSING


def torch_dtype(name: str) -> Any:
    """The torch dtype for a config dtype name (``fp32``, ``bf16``); imports torch lazily."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


LR_SCHEDULERS = ("linear", "cosine", "constant")
DTYPES = ("fp32", "bf16")
STRATEGIES = ("auto", "jobs", "rows")
BACKENDS = ("auto", "gloo", "nccl")
_SECTIONS = {f.name: f for f in dataclasses.fields(MloraConfig)}


def load_config(path: str | Path, overrides: list[str] = ()) -> MloraConfig:  # type: ignore[assignment]
    """Read a YAML config, apply ``key.path=value`` overrides and check it against the schema.

    Raises:
        ConfigError: listing every problem found, each with its key path.
    """
    raw, problems = read_config_file(path, overrides)
    return config_from_mapping(raw, problems)


def read_config_file(path: str | Path, overrides: list[str] = ()) -> tuple[DictConfig, list[str]]:  # type: ignore[assignment]
    """A YAML file's top-level mapping with ``key.path=value`` overrides applied, and the
    overrides' problems.

    Raises:
        ConfigError: the file is missing, not YAML, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry line and column
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
    if not isinstance(raw, DictConfig):
        raise ConfigError([f"{path}: the top level must be a mapping"])
    return raw, _apply_overrides(raw, list(overrides))


def config_from_mapping(raw: DictConfig, problems: list[str], jobs_required: bool = True) -> MloraConfig:
    """Check a run config's mapping against the schema (``jobs_required``: a non-empty ``jobs``
    list must be there; otherwise a missing one is empty).

    Raises:
        ConfigError: listing ``problems`` and every problem found, each with its key path.
    """
    if not jobs_required and "jobs" not in raw:
        raw.jobs = []
    cfg = _check_shape(raw, problems, jobs_required)
    if problems:
        raise ConfigError(problems)
    assert cfg is not None
    return cfg


def _apply_overrides(raw: DictConfig, overrides: list[str]) -> list[str]:
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected key.path=value")
            continue
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))
            assert isinstance(parsed, dict)
            OmegaConf.update(raw, key, parsed["v"], merge=True)
        except Exception as exc:  # omegaconf and yaml errors alike; report, do not crash
            problems.append(f"override {key}: {_first_line(exc)}")
    return problems


def _check_shape(raw: DictConfig, problems: list[str], jobs_required: bool = True) -> MloraConfig | None:
    """Merge each section (and each job) separately so every problem is reported at once."""
    for key in raw:
        if key not in _SECTIONS:
            problems.append(f"{key!s}: unknown key; known: {', '.join(_SECTIONS)}")
    for name, schema in (("base_model", BaseModelConfig), ("scheduler", SchedulerConfig)):
        if name in raw:
            merge_section(schema(), raw[name], name, problems)
    if "jobs" not in raw or not isinstance(raw.jobs, ListConfig) or (jobs_required and len(raw.jobs) == 0):
        problems.append("jobs: a non-empty list of jobs is required")
    else:
        for i, job in enumerate(raw.jobs):
            merge_section(JobConfig(), job, f"jobs[{i}]", problems)
    if problems:
        return None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(MloraConfig), raw)
        OmegaConf.resolve(merged)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        problems.append(f"{exc.full_key or '(top level)'}: {_first_line(exc)}")
        return None
    except (TypeError, ValueError) as exc:  # e.g. a list where a mapping belongs
        problems.append(f"(top level): {_first_line(exc)}")
        return None
    assert isinstance(cfg, MloraConfig)
    return cfg


def merge_section(schema: Any, node: Any, prefix: str, problems: list[str]) -> None:
    """Check ``node`` against the dataclass instance ``schema``; add each problem, with its key
    path under ``prefix``, to ``problems``."""
    if not isinstance(node, DictConfig):
        problems.append(f"{prefix}: expected a mapping of settings, got {node!r}")
        return
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        OmegaConf.to_container(merged, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = f"{prefix}.{exc.full_key}" if exc.full_key else prefix
        problems.append(f"{key}: {_first_line(exc)}")


def _first_line(exc: Exception) -> str:
    msg = getattr(exc, "msg", None) or str(exc)
    return str(msg).splitlines()[0]


def to_dict(cfg: MloraConfig | JobConfig) -> dict[str, Any]:
    """The config (or one job's) as plain data (for summary.json, monitors, hooks, checkpoints)."""
    return dataclasses.asdict(cfg)


def job_config_from_dict(data: Mapping[str, Any], where: str = "job") -> JobConfig:
    """A job's config from plain data (:func:`to_dict`'s output, or a job as a user writes it).

    Raises:
        ConfigError: listing every problem, each key path prefixed with ``where``.
    """
    problems: list[str] = []
    node = OmegaConf.create(dict(data))
    merge_section(JobConfig(), node, where, problems)
    if problems:
        raise ConfigError(problems)
    job = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), node))
    assert isinstance(job, JobConfig)
    return job
