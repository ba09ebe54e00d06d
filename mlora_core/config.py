"""The config schema (OmegaConf structured dataclasses), loading, overrides and validation.

``load_config`` checks the shape (unknown keys, wrong types) and reports every problem
with its key path; ``validate_config`` checks names against the plugin registries and
asks each plugin about its own section (files exist, options make sense). Neither loads
a model or writes anything.
"""

from __future__ import annotations

import dataclasses
import os
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mlora_core.errors import ConfigError, MloraError
from mlora_core.paths import resolve_model_path


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
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class AdapterConfig:
    type: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
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
    options: Dict[str, Any] = field(default_factory=dict)


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


@dataclass
class MloraConfig:
    base_model: BaseModelConfig = field(default_factory=BaseModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    #: Monitor name -> its options; set a monitor to null to turn it off.
    monitor: Dict[str, Any] = field(default_factory=lambda: {"console": {}, "jsonl": {}})
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
_SECTIONS = {f.name: f for f in dataclasses.fields(MloraConfig)}
#: Job names key adapter weights in torch module dicts (no '.') and name directories (no '/').
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def load_config(path: str | Path, overrides: list[str] = ()) -> MloraConfig:  # type: ignore[assignment]
    """Read a YAML config, apply ``key.path=value`` overrides and check it against the schema.

    Raises:
        ConfigError: listing every problem found, each with its key path.
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
    problems = _apply_overrides(raw, list(overrides))
    cfg = _check_shape(raw, problems)
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


def _check_shape(raw: DictConfig, problems: list[str]) -> MloraConfig | None:
    """Merge each section (and each job) separately so every problem is reported at once."""
    for key in raw:
        if key not in _SECTIONS:
            problems.append(f"{key!s}: unknown key; known: {', '.join(_SECTIONS)}")
    for name, schema in (("base_model", BaseModelConfig), ("scheduler", SchedulerConfig)):
        if name in raw:
            _merge(schema(), raw[name], name, problems)
    if "jobs" not in raw or not isinstance(raw.jobs, ListConfig) or len(raw.jobs) == 0:
        problems.append("jobs: a non-empty list of jobs is required")
    else:
        for i, job in enumerate(raw.jobs):
            _merge(JobConfig(), job, f"jobs[{i}]", problems)
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


def _merge(schema: Any, node: Any, prefix: str, problems: list[str]) -> None:
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


def to_dict(cfg: MloraConfig) -> dict[str, Any]:
    """The config as plain data (for summary.json, monitors and hooks)."""
    return dataclasses.asdict(cfg)


# --- semantic validation against the plugins ----------------------------------------


def validate_config(cfg: MloraConfig, host: Any) -> None:
    """Check names and plugin-specific settings without loading a model.

    Args:
        cfg: a config from :func:`load_config`.
        host: a :class:`mlora_core.plugins.PluginHost`.

    Raises:
        ConfigError: listing every problem, each with its key path.
    """
    problems: list[str] = []
    backend = _resolve_backend(cfg.base_model, host, problems)
    if backend is not None:
        problems += [f"base_model: {p}" for p in backend.validate(cfg.base_model)]
    if cfg.base_model.dtype not in DTYPES:
        problems.append(f"base_model.dtype: {cfg.base_model.dtype!r} is not one of {', '.join(DTYPES)}")
    problems += _quantization_problems(cfg)
    if cfg.checkpoint_every is not None and cfg.checkpoint_every < 1:
        problems.append("checkpoint_every: must be at least 1 or null")
    if cfg.scheduler.type not in host.schedulers:
        problems.append(f"scheduler.type: {host.schedulers.unknown_message(cfg.scheduler.type)}")
    _validate_monitors(cfg, host, problems)
    problems += _output_dir_problems(cfg.output_dir)
    seen: set[str] = set()
    targets = backend.target_modules if backend is not None else ()
    for i, job in enumerate(cfg.jobs):
        _validate_job(job, f"jobs[{i}]", host, cfg.base_model, targets, seen, problems)
    if problems:
        raise ConfigError(problems)


def _quantization_problems(cfg: MloraConfig) -> list[str]:
    from mlora_core.quantization import QUANT_TYPES

    base = cfg.base_model
    problems = []
    if base.quantize is not None and base.quantize not in QUANT_TYPES:
        problems.append(f"base_model.quantize: {base.quantize!r} is not one of {', '.join(QUANT_TYPES)} or null")
    if base.compute_dtype is not None and base.compute_dtype not in DTYPES:
        problems.append(f"base_model.compute_dtype: {base.compute_dtype!r} is not one of {', '.join(DTYPES)} or null")
    return problems


def resolve_backend(base: BaseModelConfig, host: Any) -> str:
    """``base.backend``; when it is null, the detected backend, stored into ``base`` first.

    For code that loads a base model without :func:`validate_config` (which does this too).

    Raises:
        ConfigError: no plugin recognises the checkpoint, or its path does not resolve.
    """
    problems: list[str] = []
    if base.backend is None:
        base.backend = _detect_backend(base.path, host, problems)
    if base.backend is None:
        raise ConfigError(problems)
    return base.backend


def _resolve_backend(base: BaseModelConfig, host: Any, problems: list[str]) -> Any:
    """The backend component, or None after recording why there is none.

    A null ``base.backend`` is first set to the detected name, so the engine loads with the
    backend that validated the config.
    """
    if base.backend is None:
        base.backend = _detect_backend(base.path, host, problems)
        if base.backend is None:
            return None
    return _lookup(host.backends, base.backend, "base_model.backend", problems)


def _detect_backend(model_path: str, host: Any, problems: list[str]) -> str | None:
    """Ask the plugins (``mlora_detect_backend``) which backend loads ``model_path``."""
    try:
        path = resolve_model_path(model_path)
    except MloraError as exc:
        problems.append(f"base_model.path: {exc}")
        return None
    if not path.exists():
        problems.append(f"base_model.path: {path} does not exist (base_model.backend is chosen from it)")
        return None
    model_config: dict[str, Any] | None = None
    if (path / "config.json").is_file():
        try:
            model_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"base_model.path: {path / 'config.json'} is not readable JSON: {exc}")
            return None
        if not isinstance(model_config, dict):
            problems.append(f"base_model.path: {path / 'config.json'} is not a JSON object")
            return None
    name: str | None = host.detect_backend(path, model_config)
    if name is None:
        seen = f"model_type {model_config.get('model_type')!r}" if model_config is not None else "no config.json"
        problems.append(
            f"base_model.backend: not set, and no plugin recognises {path} ({seen}); "
            f"set it to one of: {', '.join(host.backends)}"
        )
    return name


def _output_dir_problems(output_dir: str) -> list[str]:
    """The output dir must be creatable and writable (checked without creating it)."""
    path = Path(output_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        return [f"output_dir: {path} exists and is not a directory"]
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return [f"output_dir: {existing} is a file, not a directory"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"output_dir: cannot write in {existing}"]
    return []


def _lookup(registry: Any, name: str, key: str, problems: list[str]) -> Any:
    """Build the component ``name`` (no arguments), or record why it is unknown."""
    if name not in registry:
        problems.append(f"{key}: {registry.unknown_message(name)}")
        return None
    return registry.create(name)


def _validate_monitors(cfg: MloraConfig, host: Any, problems: list[str]) -> None:
    import inspect

    for name, options in cfg.monitor.items():
        if options is None:
            continue
        key = f"monitor.{name}"
        if name not in host.monitors:
            problems.append(f"{key}: {host.monitors.unknown_message(name)}")
            continue
        if not isinstance(options, dict):
            problems.append(f"{key}: expected a mapping of options or null")
            continue
        factory = host.monitors.get(name).factory
        try:
            inspect.signature(factory).bind(output_dir=cfg.output_dir, **options)
        except TypeError as exc:
            problems.append(f"{key}: {exc}")


def _validate_job(
    job: JobConfig,
    key: str,
    host: Any,
    base: BaseModelConfig,
    targets: tuple[str, ...],
    seen: set[str],
    problems: list[str],
) -> None:
    if not _JOB_NAME.match(job.name):
        problems.append(
            f"{key}.name: {job.name!r} must be letters, digits, '_' or '-', starting with a letter or digit"
        )
    elif job.name in seen:
        problems.append(f"{key}.name: duplicate job name {job.name!r}")
    seen.add(job.name)
    adapter_type = _lookup(host.adapters, job.adapter.type, f"{key}.adapter.type", problems)
    if adapter_type is not None:
        problems += [f"{key}.adapter.{p}" for p in adapter_type.validate(job.adapter, targets)]
        if getattr(adapter_type, "requires_quantized_base", False) and base.quantize is None:
            problems.append(
                f"{key}.adapter.type: {job.adapter.type!r} trains over a quantized base, but base_model.quantize "
                "is null; set base_model.quantize (nf4, fp4 or int8) or use type: lora"
            )
    loader = _lookup(host.datasets, job.data.type, f"{key}.data.type", problems)
    if loader is not None:
        problems += [f"{key}.data.{p}" for p in loader.validate(job.data)]
    problems += [f"{key}.train.{p}" for p in _train_problems(job.train)]


def _train_problems(t: TrainConfig) -> list[str]:
    problems = []
    for name in ("epochs", "batch_size", "micro_batch_size"):
        if getattr(t, name) < 1:
            problems.append(f"{name}: must be at least 1")
    if t.micro_batch_size >= 1 and t.batch_size % t.micro_batch_size:
        problems.append(f"batch_size: {t.batch_size} is not a multiple of micro_batch_size {t.micro_batch_size}")
    if t.lr <= 0:
        problems.append("lr: must be positive")
    if t.warmup_steps < 0:
        problems.append("warmup_steps: must be >= 0")
    if t.lr_scheduler not in LR_SCHEDULERS:
        problems.append(f"lr_scheduler: {t.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
    if len(t.adam_betas) != 2:
        problems.append("adam_betas: expected two numbers")
    if t.max_steps is not None and t.max_steps < 1:
        problems.append("max_steps: must be at least 1 or null")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        problems.append("max_grad_norm: must be positive or null")
    return problems
