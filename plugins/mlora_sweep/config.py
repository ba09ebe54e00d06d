"""``sweep.yaml``: the run keys of ``mlora run``, one ``template`` job, a ``space`` and ``sweep`` settings.

Validation is as strict as ``mlora run``'s and happens before any model loads: the run keys
and the template go through the run config's schema and plugin checks, every space key
must be a job key, and every grid value, choice and range end is tried on the template
(so ``adapter.r: [0, 8]`` fails here, naming ``space.adapter.r``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from mlora_core.config.schema import (
    MloraConfig,
    config_from_mapping,
    job_config_from_dict,
    merge_section,
    read_config_file,
)
from mlora_core.config.validation import validate_config
from mlora_core.errors import ConfigError
from mlora_core.plugin_api.host import PluginHost
from mlora_sweep.space import SearchSpace, encode, parse_space, trial_job

METRICS = ("eval_loss", "accuracy")
DIRECTIONS = ("minimize", "maximize")
PRUNERS = ("successive_halving", "hyperband", "none")
#: The keys of sweep.yaml that ``mlora run`` does not have.
SWEEP_KEYS = ("template", "space", "sweep")
#: Engine steps between checkpoints when the file does not say (``--resume`` continues from
#: the latest one).
DEFAULT_CHECKPOINT_EVERY = 10


@dataclass
class SweepSettings:
    """The ``sweep:`` section."""

    #: Trials to run in all; null: the grid's size (required when the space samples).
    trials: Optional[int] = None
    #: Trials training at once in the one engine; a trial that ends frees its room.
    max_concurrent: int = 4
    #: eval_loss (held-out loss) | accuracy (held-out exact match; needs data.exact_match).
    metric: str = "eval_loss"
    #: minimize | maximize; null: minimize eval_loss, maximize accuracy.
    direction: Optional[str] = None
    #: successive_halving | hyperband | none. Rungs come every template train.eval_every steps.
    pruner: str = "successive_halving"
    #: Seeds the sampler; the same seed and space give the same trials.
    seed: int = 0
    #: successive_halving, hyperband: keep the best 1/reduction_factor of the trials at a rung.
    reduction_factor: int = 3


@dataclass
class SweepConfig:
    #: The run keys, with no jobs: the trials are added while the engine runs.
    run: MloraConfig
    #: The template job as written (plain data; each trial's job is a copy with its values).
    template: dict[str, Any]
    space: SearchSpace
    settings: SweepSettings

    @property
    def prefix(self) -> str:
        return str(self.template["name"])

    @property
    def trials(self) -> int:
        assert self.settings.trials is not None  # filled in by load_sweep
        return self.settings.trials

    @property
    def direction(self) -> str:
        assert self.settings.direction is not None
        return self.settings.direction

    def trial_name(self, number: int) -> str:
        return f"{self.prefix}-{number:0{max(3, len(str(self.trials - 1)))}d}"


def load_sweep(path: str | Path, overrides: list[str], host: PluginHost) -> SweepConfig:
    """Read and check a sweep file (see the module doc).

    Raises:
        ConfigError: listing every problem, each with its key path.
    """
    raw, problems = read_config_file(path, overrides)
    if "jobs" in raw:
        problems.append("jobs: a sweep's jobs are its trials; describe them with template and space")
    if "template" not in raw:
        problems.append("template: required in a sweep file: the job every trial copies (see docs/sweep.md)")
    template = _mapping(raw, "template", problems)
    space, space_problems = parse_space(_mapping(raw, "space", problems))
    problems += space_problems
    settings = _settings(raw.get("sweep"), problems)
    if settings is not None:
        problems += _settings_problems(settings, space, template)
    run_raw = OmegaConf.create({k: v for k, v in raw.items() if k not in (*SWEEP_KEYS, "jobs")})
    run_raw.jobs = [template]
    try:
        run = config_from_mapping(run_raw, [])
    except ConfigError as exc:
        raise ConfigError(problems + [_as_template(p) for p in exc.problems]) from None
    if problems:
        raise ConfigError(problems)
    assert settings is not None
    sweep = SweepConfig(run=_run_config(run), template=template, space=space, settings=settings)
    _validate_trials(sweep, host)
    return sweep


def _mapping(raw: DictConfig, key: str, problems: list[str]) -> dict[str, Any]:
    """``raw[key]`` as plain data, which must be a mapping (else a problem, and ``{}``)."""
    if key not in raw:
        return {}
    value = OmegaConf.to_container(raw[key]) if isinstance(raw[key], DictConfig) else None
    if not isinstance(value, dict):
        problems.append(f"{key}: expected a mapping, got {raw[key]!r}")
        return {}
    return {str(k): v for k, v in value.items()}


def _settings(node: Any, problems: list[str]) -> SweepSettings | None:
    if node is None:
        return SweepSettings()
    before = len(problems)
    merge_section(SweepSettings(), node, "sweep", problems)
    if len(problems) > before:
        return None
    settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepSettings), node))
    assert isinstance(settings, SweepSettings)
    return settings


def _settings_problems(s: SweepSettings, space: SearchSpace, template: dict[str, Any]) -> list[str]:
    """What the ``sweep`` section and the template cannot be; fills in trials and direction."""
    problems = []
    grid = len(space.grid_points())
    if s.trials is None:
        if space.sampled:
            problems.append(
                f"sweep.trials: required when the space samples ({', '.join(a.key for a in space.sampled)})"
            )
        s.trials = grid
    elif s.trials < 1:
        problems.append(f"sweep.trials: must be at least 1, not {s.trials}")
    elif not space.sampled and s.trials > grid:
        problems.append(f"sweep.trials: {s.trials} is more than the grid's {grid} points; leave it out to run each")
    if s.max_concurrent < 1:
        problems.append(f"sweep.max_concurrent: must be at least 1, not {s.max_concurrent}")
    if s.metric not in METRICS:
        problems.append(f"sweep.metric: {s.metric!r} is not one of {', '.join(METRICS)}")
    if s.direction is None:
        s.direction = "maximize" if s.metric == "accuracy" else "minimize"
    elif s.direction not in DIRECTIONS:
        problems.append(f"sweep.direction: {s.direction!r} is not one of {', '.join(DIRECTIONS)}")
    if s.pruner not in PRUNERS:
        problems.append(f"sweep.pruner: {s.pruner!r} is not one of {', '.join(PRUNERS)}")
    if s.reduction_factor < 2:
        problems.append(f"sweep.reduction_factor: must be at least 2, not {s.reduction_factor}")
    train, data = template.get("train") or {}, template.get("data") or {}
    if s.pruner != "none" and not train.get("eval_every"):
        problems.append(
            "template.train.eval_every: the pruner compares trials at held-out evaluations; "
            "say every how many optimizer steps (or set sweep.pruner: none)"
        )
    if s.metric == "accuracy" and not data.get("exact_match"):
        problems.append("template.data.exact_match: sweep.metric accuracy needs exact_match: true")
    if data.get("val_set_size", 1) == 0:
        problems.append("template.data.val_set_size: a sweep compares trials on held-out data; must be above 0")
    return problems


def _run_config(run: MloraConfig) -> MloraConfig:
    """The engine's config: no jobs yet, one process, and checkpoints to resume from."""
    every = run.checkpoint_every or DEFAULT_CHECKPOINT_EVERY
    distributed = dataclasses.replace(run.distributed, strategy="jobs")
    return dataclasses.replace(run, jobs=[], checkpoint_every=every, distributed=distributed)


def _validate_trials(sweep: SweepConfig, host: PluginHost) -> None:
    """Validate the template with the first trial's values, then each grid value, choice and
    range end on it, as ``mlora run`` validates a job (no model loads)."""
    first = {a.key: (a.values[0] if a.kind != "int" else int(a.values[0])) for a in sweep.space.axes}
    base = trial_job(sweep.template, sweep.space, _encoded(first), sweep.trial_name(0))
    problems = _job_problems(sweep, host, base, "template")
    if problems:
        raise ConfigError(problems)
    for key, value in sweep.space.extremes():
        job = trial_job(base, sweep.space, _encoded({**first, key: value}), base["name"])
        problems += _job_problems(sweep, host, job, f"space.{key}: {value!r} gives")
    if problems:
        raise ConfigError(sorted(set(problems), key=problems.index))


def _encoded(values: dict[str, Any]) -> dict[str, Any]:
    return {k: encode(v) for k, v in values.items()}


def _job_problems(sweep: SweepConfig, host: PluginHost, job: dict[str, Any], where: str) -> list[str]:
    try:
        config = dataclasses.replace(sweep.run, jobs=[job_config_from_dict(job, "jobs[0]")])
        validate_config(config, host)
    except ConfigError as exc:
        return [f"{where} {_as_template(p)}" if where != "template" else _as_template(p) for p in exc.problems]
    return []


def _as_template(problem: str) -> str:
    return problem.replace("jobs[0]", "template", 1)
