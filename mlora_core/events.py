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

    Args:
        host: the plugin host.
        config: the run's config; its ``monitor`` section names the monitors.
        resume: the run continues an earlier one (monitors keep what is in their files).
    """

    def __init__(self, host: PluginHost, config: MloraConfig, *, resume: bool) -> None:
        self.host = host
        #: What every event hook receives as ``run``.
        self.run: dict[str, Any] = {
            "config": to_dict(config),
            "output_dir": config.output_dir,
            "jobs": [j.name for j in config.jobs],
        }
        named = [(n, options) for n, options in config.monitor.items() if options is not None]
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
        self.host.on_train_start(self.run)

    def step_end(self, step: int, metrics: JobMetrics, run_metrics: Mapping[str, float]) -> None:
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
            self.host.on_evaluation(self.run, step, phase, reported)

    def job_end(self, job: str, result: Mapping[str, Any]) -> None:
        self.host.on_job_end(self.run, job, result)

    def train_end(self, summary: Mapping[str, Any]) -> None:
        self.host.on_train_end(self.run, summary)

    def close(self) -> None:
        """Unregister and close every monitor (once, also after a failed run)."""
        for monitor in self.monitors:
            self.host.remove_listener(monitor)
            monitor.close()
        self.monitors = []


#: Held-out metric names as measured -> as reported.
_EVAL_NAMES = {"accuracy": "eval_accuracy"}
