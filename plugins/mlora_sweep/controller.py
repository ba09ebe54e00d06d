"""Runs a study's trials as jobs of one engine, pruning losers and admitting new trials.

The controller is the engine's step-boundary callback (:data:`~mlora_core.training.engine.BetweenSteps`)
and a listener of the run's events. At each boundary it

1. reports every held-out evaluation of a trial since the last boundary to Optuna (the
   rung values) and asks the pruner; a pruned trial stops now, keeping its adapter;
2. tells Optuna the trials whose jobs ended (completed: the held-out metric after training;
   failed);
3. fills the free room (``max_concurrent``) with the next trials, asked now.

Crash safety: each decision is written to the study before it is acted on (the trial's
``rung_<step>`` attribute, ``continue`` or ``prune``), and a resumed sweep replays the
engine's steps since its checkpoint following the stored decisions instead of deciding
again, so it ends with the study an uninterrupted sweep would have.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import Trial, TrialState

from mlora_core.config.schema import job_config_from_dict
from mlora_core.plugin_api.hookspecs import JobMetrics, hookimpl
from mlora_core.training.job import RUNNING
from mlora_sweep.config import SweepConfig
from mlora_sweep.space import trial_job
from mlora_sweep.study import trial_for

if TYPE_CHECKING:
    from mlora_core.training.engine import Engine

#: The sweep metric -> its name in evaluation events and in a job's summary entry.
EVENT_NAMES = {"eval_loss": "eval_loss", "accuracy": "eval_accuracy"}
AFTER_NAMES = {"eval_loss": "eval_loss_after", "accuracy": "accuracy_after"}
PRUNED = "pruned"


class SweepController:
    """See the module doc. Register it as a listener (``host.add_listener``) and pass it to
    the engine as ``between_steps``."""

    def __init__(self, sweep: SweepConfig, study: optuna.Study) -> None:
        self.sweep, self.study = sweep, study
        #: Job name -> its trial.
        self.trials: dict[str, Trial] = {}
        #: The next trial number to admit.
        self.next_number = 0
        #: Held-out results since the last boundary: (job, its optimizer step, metric value).
        self.evaluations: list[tuple[str, int, float]] = []
        #: Jobs that ended since the last boundary, with their summary entries.
        self.ended: list[tuple[str, dict[str, Any]]] = []
        self._adopted = False

    # --- events ---------------------------------------------------------------------------

    @hookimpl
    def mlora_on_evaluation(self, phase: str, results: JobMetrics) -> None:
        if phase != "during":
            return
        name = EVENT_NAMES[self.sweep.settings.metric]
        for job, values in results.items():
            if job in self.trials and values.get(name) is not None:
                self.evaluations.append((job, int(values["step"]), float(values[name])))

    @hookimpl
    def mlora_on_job_end(self, job: str, result: Mapping[str, Any]) -> None:
        if job in self.trials:
            self.ended.append((job, dict(result)))

    # --- the step boundary ------------------------------------------------------------------

    def __call__(self, engine: Engine) -> None:
        if not self._adopted:
            self._adopt(engine)
        evaluations, self.evaluations = self.evaluations, []
        for job, step, value in evaluations:
            self._rung(engine, job, step, value)
        self.settle()
        while self._running(engine) < self.sweep.settings.max_concurrent and self.next_number < self.sweep.trials:
            self._admit(engine, self.next_number)
            self.next_number += 1

    def settle(self) -> None:
        """Tell the study about every job that ended (also called once after the run)."""
        ended, self.ended = self.ended, []
        for job, result in ended:
            self._finish(job, result)

    def _adopt(self, engine: Engine) -> None:
        """Map the jobs a resumed engine restored back to their trials."""
        self._adopted = True
        by_number = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        for job in engine.jobs:
            number = int(job.name.rsplit("-", 1)[1])
            self.trials[job.name] = Trial(self.study, by_number[number]._trial_id)
            self.next_number = max(self.next_number, number + 1)

    def _running(self, engine: Engine) -> int:
        return sum(1 for j in engine.jobs if j.status == RUNNING)

    def _state(self, trial: Trial) -> optuna.trial.FrozenTrial:
        return self.study._storage.get_trial(trial._trial_id)

    def _rung(self, engine: Engine, job: str, step: int, value: float) -> None:
        """Report a held-out value; stop the trial if the pruner (now or before a crash) says so."""
        trial = self.trials[job]
        stored = self._state(trial)
        decision = stored.user_attrs.get(f"rung_{step}")
        if stored.state.is_finished():  # decided before a crash: follow it
            if stored.state == TrialState.PRUNED and stored.user_attrs.get("steps") == step:
                engine.stop_job(job, PRUNED, stored.user_attrs["error"])
            return
        if decision is None:
            trial.report(value, step)
            decision = "prune" if trial.should_prune() else "continue"
            trial.set_user_attr(f"rung_{step}", decision)
        if decision == "prune":
            metric = self.sweep.settings.metric
            reason = f"pruned by {self.sweep.settings.pruner} at step {step} ({metric} {value:.4g})"
            trial.set_user_attr("steps", step)
            trial.set_user_attr("error", reason)
            engine.stop_job(job, PRUNED, reason)
            self.study.tell(trial, state=TrialState.PRUNED)
            print(f"mlora sweep: {job}: {reason}", flush=True)

    def _finish(self, job: str, result: dict[str, Any]) -> None:
        trial = self.trials[job]
        if self._state(trial).state.is_finished() or result["status"] in ("interrupted", PRUNED):
            return
        value = result.get(AFTER_NAMES[self.sweep.settings.metric])
        trial.set_user_attr("steps", result["steps"])
        if result["status"] == "completed" and value is not None:
            self.study.tell(trial, float(value))
            return
        error = result.get("error") or f"no held-out {self.sweep.settings.metric} was measured"
        trial.set_user_attr("error", error)
        self.study.tell(trial, state=TrialState.FAIL)

    def _admit(self, engine: Engine, number: int) -> None:
        """Start trial ``number`` as a job (unless the study has it finished already); a trial
        whose job cannot be built fails alone."""
        trial = trial_for(self.study, self.sweep, number)
        if trial is None:
            return
        name = self.sweep.trial_name(number)
        self.trials[name] = trial
        try:
            job = trial_job(self.sweep.template, self.sweep.space, trial.params, name)
            engine.add_job(job_config_from_dict(job, name))
        except Exception as exc:  # one bad trial must not take the sweep down
            trial.set_user_attr("steps", 0)
            trial.set_user_attr("error", f"could not start: {exc}")
            self.study.tell(trial, state=TrialState.FAIL)
            print(f"mlora sweep: {name}: could not start: {exc}", file=sys.stderr, flush=True)
            return
        shown = ", ".join(f"{k}={v}" for k, v in trial.params.items())
        print(f"mlora sweep: {name} starts at engine step {engine.steps} ({shown})", flush=True)
