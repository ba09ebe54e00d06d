"""The sweep's Optuna study: kept in SQLite in the output dir, asked and told one trial at a time.

Trial ``n`` always becomes job ``<template>-<n>`` and is always the ``n``-th trial admitted,
so a resumed sweep maps the engine's jobs back to the study's trials by name. Its values are
fixed when it is first asked (grid values enqueued, the rest drawn by a sampler seeded with
``seed`` and ``n``), so asking again after a crash gives the stored trial, not a new draw.
"""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.pruners import BasePruner, HyperbandPruner, NopPruner, SuccessiveHalvingPruner
from optuna.trial import Trial, TrialState

from mlora_core.errors import MloraError
from mlora_sweep.config import SweepConfig

STUDY_FILE = "study.db"
STUDY_NAME = "mlora-sweep"


def study_path(sweep: SweepConfig) -> Path:
    return Path(sweep.run.output_dir) / STUDY_FILE


def open_study(sweep: SweepConfig, *, resume: bool) -> optuna.Study:
    """The sweep's study: a new one, or (``resume``) the one in the output dir."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
    path = study_path(sweep)
    path.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=f"sqlite:///{path}",
        direction="maximize" if sweep.direction == "maximize" else "minimize",
        pruner=make_pruner(sweep),
        load_if_exists=resume,
    )
    made = study.direction.name.lower()
    if resume and made != sweep.direction:
        raise MloraError(f"{path}: the study was made to {made}, but the sweep file says {sweep.direction}")
    return study


def make_pruner(sweep: SweepConfig) -> BasePruner:
    """Optuna's pruner for ``sweep.pruner``; its rungs are counted in the trials' evaluations
    (``template.train.eval_every`` optimizer steps apart)."""
    s = sweep.settings
    every = int((sweep.template.get("train") or {}).get("eval_every") or 1)
    if s.pruner == "successive_halving":
        return SuccessiveHalvingPruner(min_resource=every, reduction_factor=s.reduction_factor)
    if s.pruner == "hyperband":
        return HyperbandPruner(min_resource=every, reduction_factor=s.reduction_factor)
    return NopPruner()


def trial_for(study: optuna.Study, sweep: SweepConfig, number: int) -> Trial | None:
    """Trial ``number`` to run: the stored one if it was asked before and is still running,
    else a new one asked now; None when the study says it has already finished."""
    stored = {t.number: t for t in study.get_trials(deepcopy=False)}
    existing = stored.get(number)
    if existing is not None and existing.state.is_finished():
        return None
    if existing is not None and existing.state == TrialState.RUNNING:
        return Trial(study, existing._trial_id)
    if existing is None:
        if number != len(stored):
            raise MloraError(f"{study_path(sweep)}: trial {number} is missing; the study was changed outside mlora")
        grid = sweep.space.grid_point(number)
        if grid:
            study.enqueue_trial(grid)
    study.sampler = optuna.samplers.TPESampler(seed=sweep.settings.seed * 1_000_003 + number)
    trial = study.ask(sweep.space.distributions())
    if trial.number != number:
        raise MloraError(f"{study_path(sweep)}: asked for trial {number}, got {trial.number}")
    return trial
