"""The engine side of ``mlora serve``: queued jobs join the running engine, cancels stop them.

:class:`Service` is the engine's step-boundary callback
(:data:`~mlora_core.training.engine.BetweenSteps`) and a listener of the run's events. At each
boundary it stops the jobs whose cancel was requested, adds every queued job to the engine
(whose admission then applies priorities, ``max_concurrent_jobs`` and the memory limit), and
publishes each job's progress for the HTTP side. With nothing to train it waits on a
condition the HTTP side signals, so an idle service uses no CPU.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mlora_core.config.schema import job_config_from_dict, to_dict
from mlora_core.plugin_api.hookspecs import JobMetrics, hookimpl
from mlora_core.training.job import RUNNING as ENGINE_RUNNING
from mlora_serve.store import CANCELLED, FAILED, INTERRUPTED, QUEUED, RUNNING, TERMINAL, JobStore

if TYPE_CHECKING:
    from mlora_core.training.engine import Engine

#: Seconds between looks at the stop signal while idle.
IDLE_POLL_S = 0.5


class Service:
    """See the module doc."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.wake = threading.Condition()
        #: Job -> {step, total_steps, loss, trained_s}: what the engine last said (read by HTTP).
        self.progress: dict[str, dict[str, Any]] = {}
        self.engine_step = 0
        self.ready = False
        self._adopted = False

    # --- the HTTP side ---------------------------------------------------------------------

    def notify(self) -> None:
        """Something was submitted or cancelled: wake an idle engine."""
        with self.wake:
            self.wake.notify_all()

    # --- the engine side --------------------------------------------------------------------

    def __call__(self, engine: Engine) -> None:
        if not self._adopted:
            self._adopt(engine)
        self.ready = True
        self._serve_boundary(engine)
        while not any(j.status == ENGINE_RUNNING for j in engine.jobs) and engine.stop_signal is None:
            with self.wake:
                self.wake.wait(timeout=IDLE_POLL_S)
            self._serve_boundary(engine)
            engine.flush_events()

    def _serve_boundary(self, engine: Engine) -> None:
        self.engine_step = engine.steps
        self._cancel(engine)
        self._admit(engine)
        self._publish(engine)

    def _adopt(self, engine: Engine) -> None:
        """Make the store agree with a (re)started engine: its config's jobs are recorded, jobs
        the checkpoint restored run on, those it did not have start again."""
        self._adopted = True
        for job in engine.jobs:
            record = self.store.get(job.name) or self.store.add(job.name, to_dict(job.config), status=RUNNING)
            result = engine.results.get(job.name)
            if result is None:
                self.store.update(job.name, status=RUNNING, started_at=record["started_at"] or time.time())
            elif record["status"] not in TERMINAL:  # it ended, but the crash came before the store heard
                self._ended(job.name, result)
        restored = {j.name for j in engine.jobs}
        for record in self.store.with_status(RUNNING, INTERRUPTED):
            if record["name"] not in restored:  # admitted after the last checkpoint: from scratch
                self.store.update(record["name"], status=QUEUED, started_at=None)

    def _cancel(self, engine: Engine) -> None:
        for record in self.store.with_status(RUNNING):
            if record["cancel_requested"]:
                engine.stop_job(record["name"], CANCELLED, "cancelled by request")

    def _admit(self, engine: Engine) -> None:
        """Add every queued job to the engine; one that cannot be built fails alone."""
        for record in self.store.with_status(QUEUED):
            name = record["name"]
            try:
                engine.add_job(job_config_from_dict(record["config"], name))
            except Exception as exc:
                self.store.update(name, status=FAILED, error=f"could not start: {exc}", ended_at=time.time())
                print(f"mlora serve: {name}: could not start: {exc}", file=sys.stderr, flush=True)
                continue
            self.store.update(name, status=RUNNING, started_at=time.time())
            print(f"mlora serve: {name} joins at engine step {engine.steps}", flush=True)

    def _publish(self, engine: Engine) -> None:
        progress = {}
        for job in engine.jobs:
            last = self.progress.get(job.name, {})
            progress[job.name] = {
                "step": job.progress.step,
                "total_steps": job.total_steps,
                "loss": last.get("loss"),
                #: whether it has had rows yet (admission may hold it back: max_concurrent_jobs)
                "trained": job.progress.train_tokens > 0 or job.progress.step > 0,
            }
        self.progress = progress

    # --- events -------------------------------------------------------------------------------

    @hookimpl
    def mlora_on_step_end(self, metrics: JobMetrics) -> None:
        for job, values in metrics.items():
            line = {"event": "step", **values}
            self.store.add_line(job, line)
            known = self.progress.setdefault(job, {})
            known.update(step=int(values["step"]), total_steps=int(values["total_steps"]), loss=values["loss"])

    @hookimpl
    def mlora_on_evaluation(self, phase: str, results: JobMetrics) -> None:
        for job, values in results.items():
            self.store.add_line(job, {"event": "evaluation", "phase": phase, **values})

    @hookimpl
    def mlora_on_job_end(self, job: str, result: Mapping[str, Any]) -> None:
        self._ended(job, dict(result))

    def _ended(self, job: str, result: dict[str, Any]) -> None:
        self.store.add_line(job, {"event": "job_end", "result": result})
        status = result["status"] if result["status"] in TERMINAL else INTERRUPTED
        self.store.update(job, status=status, error=result.get("error"), result=result, ended_at=time.time())
