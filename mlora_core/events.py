"""The run's one event channel: plugins and the config's monitors hear every event through pluggy.

Why monitors are hook implementations (and not the reverse): pluggy already delivers an
event to every implementation, in a defined order, passing each only the arguments it
names, with tracing and error reports naming the plugin. A monitor is a hook
implementation with per-run state and a config section, the way pytest's terminal
reporter is a plugin registered for one session. So :class:`RunEvents` builds the monitors
named under ``monitor:``, registers them with the plugin manager for the run (they are
called before the plugins loaded at start-up, which pluggy calls last-registered first),
emits each event once, and closes the monitors at the end.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlora_core.config.schema import MloraConfig, to_dict
from mlora_core.plugin_api.hookspecs import JobMetrics
from mlora_core.plugin_api.host import PluginHost
from mlora_core.plugin_api.protocols import Monitor


class RunEvents:
    """Emits a run's events to plugins and monitors alike.

    With ``hold``, a job's ``evaluation`` and ``job_end`` events are held until
    :meth:`take_pending`: the engine emits them after the step's ``step_end``
    (:meth:`replay`), gathered from every rank in a distributed run, so the main rank's
    monitors hear every job whatever rank trained it.

    Args:
        host: the plugin host.
        config: the run's config; its ``monitor`` section names the monitors.
        resume: the run continues an earlier one (monitors keep what is in their files).
        emit: this process reports (false on every rank but the main one: no monitors,
            no hook calls).
        hold: hold evaluation and job-end events for :meth:`take_pending`.
    """

    def __init__(
        self, host: PluginHost, config: MloraConfig, *, resume: bool, emit: bool = True, hold: bool = False
    ) -> None:
        self.host = host
        self.emit, self.hold = emit, hold
        #: Held events: (method name, its arguments).
        self.pending: list[tuple[str, tuple[Any, ...]]] = []
        #: What every event hook receives as ``run``.
        self.run: dict[str, Any] = {
            "config": to_dict(config),
            "output_dir": config.output_dir,
            "jobs": [j.name for j in config.jobs],
        }
        named = [(n, options) for n, options in config.monitor.items() if options is not None and emit]
        self.monitors: list[Monitor] = []
        try:
            for name, options in named:
                monitor = host.monitors.create(name, output_dir=config.output_dir, resume=resume, **options)
                self.monitors.append(monitor)
            # pluggy calls the last registered first: register in reverse, so monitors hear
            # each event in the order the config lists them
            for (name, _), monitor in reversed(list(zip(named, self.monitors, strict=False))):
                host.add_listener(monitor, f"monitor:{name}")
        except BaseException:
            self.close()
            raise

    def train_start(self) -> None:
        if self.emit:
            self.host.on_train_start(self.run)

    def step_end(self, step: int, metrics: JobMetrics, run_metrics: Mapping[str, float]) -> None:
        if self.emit:
            self.host.on_step_end(self.run, step, metrics, run_metrics)

    def evaluation(self, step: int, phase: str, results: Mapping[str, tuple[int, Mapping[str, float | None]]]) -> None:
        """Report held-out results: job -> (the job's optimizer step, {metric: value or None}).

        ``accuracy`` is reported as ``eval_accuracy``; unmeasured values (None) are left out,
        and jobs with nothing measured too.
        """
        reported: dict[str, dict[str, float]] = {}
        for name, (job_step, values) in results.items():
            found = {_EVAL_NAMES.get(k, k): float(v) for k, v in values.items() if v is not None}
            if found:
                reported[name] = {**found, "step": job_step}
        if reported:
            self._event("evaluation", (step, phase, reported))

    def job_end(self, job: str, result: Mapping[str, Any]) -> None:
        self._event("job_end", (job, dict(result)))

    def _event(self, kind: str, args: tuple[Any, ...]) -> None:
        if self.hold:
            self.pending.append((kind, args))
        else:
            self.replay([(kind, args)])

    def take_pending(self) -> list[tuple[str, tuple[Any, ...]]]:
        """The held events, in order (and forget them)."""
        pending, self.pending = self.pending, []
        return pending

    def replay(self, events: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Emit events held by :meth:`take_pending` (on this or another rank)."""
        if not self.emit:
            return
        for kind, args in events:
            if kind == "evaluation":
                self.host.on_evaluation(self.run, *args)
            else:
                self.host.on_job_end(self.run, *args)

    def train_end(self, summary: Mapping[str, Any]) -> None:
        if self.emit:
            self.host.on_train_end(self.run, summary)

    def close(self) -> None:
        """Unregister and close every monitor (once, also after a failed run)."""
        for monitor in self.monitors:
            self.host.remove_listener(monitor)
            monitor.close()
        self.monitors = []


#: Held-out metric names as measured -> as reported.
_EVAL_NAMES = {"accuracy": "eval_accuracy"}
