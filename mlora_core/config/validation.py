"""Semantic checks of a loaded config against the plugins, before any model loads.

``validate_config`` checks names against the plugin registries, asks each plugin about its
own section (files exist, options make sense) and checks the values the core owns; it
reports every problem at once, each with its key path.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mlora_core.config.schema import (
    BACKENDS,
    DTYPES,
    LR_SCHEDULERS,
    STRATEGIES,
    AdapterConfig,
    BaseModelConfig,
    DistributedConfig,
    JobConfig,
    MloraConfig,
    TrainConfig,
)
from mlora_core.errors import ConfigError, MloraError
from mlora_core.models.paths import resolve_model_path
from mlora_core.plugin_api.conventions import JOB_NAME, JOB_NAME_RULE, device_problems
from mlora_core.plugin_api.registry import Registry

if TYPE_CHECKING:
    from mlora_core.plugin_api.host import PluginHost
    from mlora_core.plugin_api.protocols import ModelBackend

T = TypeVar("T")


def validate_config(cfg: MloraConfig, host: PluginHost) -> None:
    """Check names and plugin-specific settings without loading a model.

    Args:
        cfg: a config from :func:`load_config`.
        host: the plugin host whose registries name the components.

    Raises:
        ConfigError: listing every problem, each with its key path.
    """
    problems: list[str] = []
    backend = _resolve_backend(cfg.base_model, host, problems)
    if backend is not None:
        problems += [f"base_model: {p}" for p in backend.validate(cfg.base_model)]
    problems += [f"base_model.{p}" for p in device_problems(cfg.base_model.device)]
    if cfg.base_model.dtype not in DTYPES:
        problems.append(f"base_model.dtype: {cfg.base_model.dtype!r} is not one of {', '.join(DTYPES)}")
    problems += _quantization_problems(cfg)
    if cfg.checkpoint_every is not None and cfg.checkpoint_every < 1:
        problems.append("checkpoint_every: must be at least 1 or null")
    if cfg.scheduler.type not in host.schedulers:
        problems.append(f"scheduler.type: {host.schedulers.unknown_message(cfg.scheduler.type)}")
    problems += [f"scheduler.{p}" for p in _packing_problems(cfg, backend)]
    _validate_monitors(cfg, host, problems)
    problems += [f"distributed.{p}" for p in distributed_problems(cfg.distributed, cfg.base_model)]
    problems += _output_dir_problems(cfg.output_dir)
    seen: set[str] = set()
    targets = backend.target_modules if backend is not None else ()
    for i, job in enumerate(cfg.jobs):
        if backend is not None:
            problems += [f"jobs[{i}].adapter.{p}" for p in fill_default_targets(job.adapter, backend)]
        _validate_job(job, f"jobs[{i}]", host, cfg.base_model, targets, seen, problems)
    if problems:
        raise ConfigError(problems)


def fill_default_targets(adapter: AdapterConfig, backend: ModelBackend) -> list[str]:
    """Set a null ``adapter.target_modules`` to the backend's ``default_target_modules``.

    Backends without that attribute default to q_proj and v_proj when they have both;
    otherwise the job must name its targets, and the problem says so.
    """
    if adapter.target_modules is not None:
        return []
    default = getattr(backend, "default_target_modules", None)
    if default is None and {"q_proj", "v_proj"} <= set(backend.target_modules):
        default = ("q_proj", "v_proj")
    if not default:
        return [f"target_modules: this backend has no default; name some of: {', '.join(backend.target_modules)}"]
    adapter.target_modules = list(default)
    return []


def _packing_problems(cfg: MloraConfig, backend: ModelBackend | None) -> list[str]:
    """What ``scheduler.packing`` and ``scheduler.pack_length`` cannot be."""
    sched = cfg.scheduler
    problems = []
    supported = backend is not None and bool(getattr(backend, "supports_packing", False))
    if sched.packing is None:  # the default: pack when the backend can
        sched.packing = supported
    if sched.pack_length is not None and sched.pack_length < 1:
        problems.append("pack_length: must be at least 1 or null")
    if sched.pack_length is not None and not sched.packing:
        problems.append("pack_length: only applies when steps are packed (packing: true)")
    if sched.packing and backend is not None and not supported:
        problems.append(
            f"packing: backend {cfg.base_model.backend!r} cannot run packed rows (its model takes no "
            "per-sample position ids); set packing: false"
        )
    return problems


def distributed_problems(d: DistributedConfig, base: BaseModelConfig) -> list[str]:
    """Problems of the ``distributed`` section (checked also in single-process runs)."""
    problems = []
    device = base.device
    if d.strategy not in STRATEGIES:
        problems.append(f"strategy: {d.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if d.backend not in BACKENDS:
        problems.append(f"backend: {d.backend!r} is not one of {', '.join(BACKENDS)}")
    elif d.backend == "nccl" and not device.startswith("cuda"):
        problems.append(f"backend: nccl needs a CUDA device (base_model.device is {device!r}); use gloo or auto")
    if not d.timeout_s > 0:
        problems.append("timeout_s: must be positive")
    if d.shard_base:
        problems += [f"shard_base: {p}" for p in _sharding_problems(d, base)]
    return problems


def _sharding_problems(d: DistributedConfig, base: BaseModelConfig) -> list[str]:
    """What ``shard_base`` cannot be combined with (yet)."""
    problems = []
    if d.strategy == "jobs":
        problems.append("needs strategy rows (or auto): under jobs each rank holds its own whole base")
    if base.quantize is not None:
        problems.append(
            "a quantized base cannot be sharded: bitsandbytes weights under FSDP2 lose their quantization "
            "state (bitsandbytes issue #1945); use quantize or shard_base, not both"
        )
    if base.activation_checkpointing:
        problems.append("not supported together with base_model.activation_checkpointing yet")
    return problems


def _quantization_problems(cfg: MloraConfig) -> list[str]:
    from mlora_core.models.quantization import QUANT_TYPES

    base = cfg.base_model
    problems = []
    if base.quantize is not None and base.quantize not in QUANT_TYPES:
        problems.append(f"base_model.quantize: {base.quantize!r} is not one of {', '.join(QUANT_TYPES)} or null")
    if base.compute_dtype is not None and base.compute_dtype not in DTYPES:
        problems.append(f"base_model.compute_dtype: {base.compute_dtype!r} is not one of {', '.join(DTYPES)} or null")
    return problems


def resolve_backend(base: BaseModelConfig, host: PluginHost) -> str:
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


def _resolve_backend(base: BaseModelConfig, host: PluginHost, problems: list[str]) -> ModelBackend | None:
    """The backend component, or None after recording why there is none.

    A null ``base.backend`` is first set to the detected name, so the engine loads with the
    backend that validated the config.
    """
    if base.backend is None:
        base.backend = _detect_backend(base.path, host, problems)
        if base.backend is None:
            return None
    return _lookup(host.backends, base.backend, "base_model.backend", problems)


def _detect_backend(model_path: str, host: PluginHost, problems: list[str]) -> str | None:
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
    name = host.detect_backend(path, model_config)
    if name is None:
        seen = f"model_type {model_config.get('model_type')!r}" if model_config is not None else "no config.json"
        problems.append(
            f"base_model.path: no backend recognises {path} ({seen}); supported model types: "
            f"{', '.join(supported_model_types(host))}; a plugin adds a backend through the "
            "mlora_register_backends and mlora_detect_backend hooks (docs/plugins/hooks.md)"
        )
    return name


def supported_model_types(host: PluginHost) -> list[str]:
    """config.json ``model_type`` values the registered backends load (their ``model_types``),
    or the backend's name for backends that do not say."""
    types: list[str] = []
    for name in host.backends:
        types += getattr(host.backends.create(name), "model_types", (name,))
    return sorted(set(types))


def _objective_problems(job: JobConfig, key: str, host: PluginHost, loader: Any) -> list[str]:
    """The objective must be registered, accept its settings and fit the data's samples."""
    kind = job.objective.type
    if kind not in host.objectives:
        return [f"{key}.objective.type: {host.objectives.unknown_message(kind)}"]
    try:
        objective = host.objectives.create(kind, config=job.objective)
    except ConfigError as exc:
        return [f"{key}.objective.{p}" for p in exc.problems]
    given = getattr(loader, "sequences_per_sample", 1) if loader is not None else None
    if given is not None and given != objective.sequences_per_sample:
        shape = {1: "one sequence per sample", 2: "preference pairs"}
        return [
            f"{key}.objective.type: {kind!r} trains on {shape.get(objective.sequences_per_sample, 'other samples')}, "
            f"but data.type {job.data.type!r} gives {shape.get(given, f'{given} sequences per sample')}"
            + (" (use data.type: preference)" if objective.sequences_per_sample == 2 else "")
        ]
    return []


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


def _lookup(registry: Registry[T], name: str, key: str, problems: list[str]) -> T | None:
    """Build the component ``name`` (no arguments), or record why it is unknown."""
    if name not in registry:
        problems.append(f"{key}: {registry.unknown_message(name)}")
        return None
    return registry.create(name)


def _validate_monitors(cfg: MloraConfig, host: PluginHost, problems: list[str]) -> None:
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
            inspect.signature(factory).bind(output_dir=cfg.output_dir, resume=False, **options)
        except TypeError as exc:
            problems.append(f"{key}: {exc}")


def _validate_job(
    job: JobConfig,
    key: str,
    host: PluginHost,
    base: BaseModelConfig,
    targets: tuple[str, ...],
    seen: set[str],
    problems: list[str],
) -> None:
    if not JOB_NAME.match(job.name):
        problems.append(f"{key}.name: {job.name!r} must be {JOB_NAME_RULE}")
    elif job.name in seen:
        problems.append(f"{key}.name: duplicate job name {job.name!r}")
    seen.add(job.name)
    adapter_type = _lookup(host.adapters, job.adapter.type, f"{key}.adapter.type", problems)
    if adapter_type is not None:
        problems += [f"{key}.adapter.{p}" for p in adapter_type.validate(job.adapter, targets)]
        if adapter_type.requires_quantized_base and base.quantize is None:
            problems.append(
                f"{key}.adapter.type: {job.adapter.type!r} trains over a quantized base, but base_model.quantize "
                "is null; set base_model.quantize (nf4, fp4 or int8) or use type: lora"
            )
    loader = _lookup(host.data_loaders, job.data.type, f"{key}.data.type", problems)
    if loader is not None:
        problems += [f"{key}.data.{p}" for p in loader.validate(job.data)]
    problems += _objective_problems(job, key, host, loader)
    problems += [f"{key}.train.{p}" for p in _train_problems(job.train)]
    problems += [f"{key}.{p}" for p in _evaluation_problems(job)]


def _evaluation_problems(job: JobConfig) -> list[str]:
    """eval_every, early_stop and exact_match need held-out data and make sense together."""
    t, problems = job.train, []
    if t.eval_every is not None and t.eval_every < 1:
        problems.append("train.eval_every: must be at least 1 or null")
    if t.early_stop is not None:
        if t.eval_every is None:
            problems.append("train.early_stop: needs train.eval_every (how often to check the held-out loss)")
        if t.early_stop.patience < 1:
            problems.append("train.early_stop.patience: must be at least 1")
        if t.early_stop.min_delta < 0:
            problems.append("train.early_stop.min_delta: must be >= 0")
    wanted = [k for k, on in (("train.eval_every", t.eval_every), ("data.exact_match", job.data.exact_match)) if on]
    if wanted and job.data.val_set_size <= 0:
        problems.append(f"data.val_set_size: {' and '.join(wanted)} need held-out examples; set val_set_size > 0")
    if job.data.exact_match and job.data.train_on_inputs:
        problems.append(
            "data.exact_match: needs train_on_inputs false (the unlearned prompt shows where answers start)"
        )
    return problems


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
