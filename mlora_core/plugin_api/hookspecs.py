"""Every hook mlora calls. Declarations only; see docs/plugins/hooks.md for the reference.

Registration hooks receive ``register(name, factory)``: the core owns the names, rejects
duplicates and lists the known names in its errors. The one selection hook,
:func:`mlora_detect_backend`, is ``firstresult``. Event hooks are broadcast: every
implementation is called and return values are ignored.

Event hooks are the run's one event channel. Plugins implement them for the whole process;
a monitor (``monitor:`` in the config) implements them on an object that is registered
with the plugin manager for the length of one run, as pytest registers its terminal
reporter. The engine emits each event once and pluggy delivers it to both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

hookspec = pluggy.HookspecMarker("mlora")
hookimpl = pluggy.HookimplMarker("mlora")

if TYPE_CHECKING:
    from pathlib import Path

Register = Callable[[str, Callable[..., Any]], None]
#: Per job: metric name -> value.
JobMetrics = Mapping[str, Mapping[str, float]]

# --- registration -----------------------------------------------------------------------


@hookspec
def mlora_register_backends(register: Register) -> None:
    """Register model backends (``base_model.backend``).

    Called once when the plugin manager's registries are first built.

    :param register: ``register(name, factory)``; ``factory()`` returns a
        :class:`mlora_core.plugin_api.protocols.ModelBackend`.

    .. versionadded:: 0.1
    """


@hookspec
def mlora_register_adapters(register: Register) -> None:
    """Register adapter types (``jobs[].adapter.type``).

    :param register: ``register(name, factory)``; ``factory()`` returns a
        :class:`mlora_core.plugin_api.protocols.AdapterType`.

    .. versionadded:: 0.1
    """


@hookspec
def mlora_register_schedulers(register: Register) -> None:
    """Register batch schedulers (``scheduler.type``).

    :param register: ``register(name, factory)``; ``factory(config)`` gets the
        :class:`mlora_core.config.schema.SchedulerConfig` and returns a
        :class:`mlora_core.plugin_api.protocols.BatchScheduler`.

    .. versionadded:: 0.1
    """


@hookspec
def mlora_register_datasets(register: Register) -> None:
    """Register data loaders (``jobs[].data.type``).

    :param register: ``register(name, factory)``; ``factory()`` returns a
        :class:`mlora_core.plugin_api.protocols.DatasetLoader`.

    .. versionadded:: 0.1
    """


@hookspec
def mlora_register_objectives(register: Register) -> None:
    """Register training objectives (``jobs[].objective.type``: ``sft``, ``dpo``, ...).

    :param register: ``register(name, factory)``; ``factory(config)`` gets the job's
        :class:`mlora_core.config.schema.ObjectiveConfig` and returns a
        :class:`mlora_core.plugin_api.protocols.Objective`; it raises
        :class:`mlora_core.errors.ConfigError` for settings it cannot take (config validation
        builds it once, before anything loads).

    .. versionadded:: 0.3
    """


@hookspec
def mlora_register_monitors(register: Register) -> None:
    """Register monitors, the metric sinks named under the config's ``monitor`` section.

    :param register: ``register(name, factory)``; ``factory(output_dir=..., resume=..., **options)``
        gets the run's output dir, whether the run continues an earlier one (``--resume``,
        or ``mlora eval`` adding to a finished run: keep what is there) or starts afresh
        (the monitor decides what to do with an earlier run's files: the ``jsonl`` monitor
        replaces metrics.jsonl), and the options from ``monitor.<name>``; it
        returns a :class:`mlora_core.plugin_api.protocols.Monitor`.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2 the factory gets ``resume``.
    """


@hookspec
def mlora_register_commands(register: Register) -> None:
    """Register ``mlora`` sub-commands (``mlora bench``, ``mlora generate``, ...).

    Called when the ``mlora`` command starts, before its arguments are parsed.

    :param register: ``register(name, factory)``; ``factory()`` returns a
        :class:`mlora_core.plugin_api.protocols.Command`.

    .. versionadded:: 0.2
    """


@hookspec
def mlora_register_templates(register: Register) -> None:
    """Register prompt templates, for code that turns instructions into prompts outside a data
    loader (``mlora generate --template``). A data loader that registers its templates here
    still checks ``jobs[].data.template`` against its own.

    :param register: ``register(name, factory)``; ``factory()`` returns a
        :class:`mlora_core.plugin_api.protocols.PromptTemplate`.

    .. versionadded:: 0.2
    """


# --- selection --------------------------------------------------------------------------


@hookspec(firstresult=True)
def mlora_detect_backend(path: Path, config: Mapping[str, Any] | None) -> str | None:
    """Name the backend for a checkpoint, when ``base_model.backend`` is not set.

    Called during config validation, before any model loads. Later-registered plugins are
    asked first, so a third-party plugin can claim a checkpoint ahead of the built-ins.

    firstresult: stops at the first non-None result.

    :param path: the resolved ``base_model.path`` (a directory or a file such as a ``.gguf``).
    :param config: the parsed ``config.json`` of a checkpoint directory, or None when
        ``path`` is a file or a directory without config.json.
    :return: a registered backend name, or None when the plugin does not recognise the checkpoint.

    .. versionadded:: 0.1
    """


# --- events -----------------------------------------------------------------------------


@hookspec
def mlora_on_train_start(run: Mapping[str, Any]) -> None:
    """Called once after the model, adapters and data are ready, before the first step.

    :param run: ``config`` (the resolved config as a dict), ``output_dir`` and ``jobs``
        (job names).

    .. versionadded:: 0.1
    """


@hookspec
def mlora_on_step_end(run: Mapping[str, Any], step: int, metrics: JobMetrics, run_metrics: Mapping[str, float]) -> None:
    """Called after every engine step. Must be cheap.

    :param run: as in :func:`mlora_on_train_start`.
    :param step: the engine's global step (1, 2, ...).
    :param metrics: job name to that job's numbers. A job that finished an optimizer
        step reports ``step`` and ``total_steps`` (its own optimizer steps), ``loss``,
        ``lr``, ``grad_norm``, ``tokens_per_s`` and ``tokens_seen``. Jobs that only
        accumulated gradients in this step are absent.
    :param run_metrics: the step as a whole: ``step_time_s``, ``rows``, ``tokens`` (rows x
        padded length), ``real_tokens``, ``padding_fraction``, ``peak_memory_bytes`` (this
        step's peak) and either ``gpu_utilisation`` (CUDA with nvidia-ml-py: NVML's share of
        time a kernel ran) or ``cpu_utilisation`` (process CPU time / wall time / cores).

    .. versionadded:: 0.1
    .. versionchanged:: 0.2 held-out results moved to :func:`mlora_on_evaluation`.
    """


@hookspec
def mlora_on_evaluation(run: Mapping[str, Any], step: int, phase: str, results: JobMetrics) -> None:
    """Called with held-out results: before training, every ``eval_every`` steps, when a job
    ends, and by ``mlora eval``.

    :param run: as in :func:`mlora_on_train_start`.
    :param step: the engine's global step (0 before training; for ``mlora eval``, 0).
    :param phase: ``before`` (the adapters as initialised, i.e. the bare base), ``during``
        (``eval_every``), ``after`` (a job's final adapter).
    :param results: job name to its numbers: ``step`` (the job's own optimizer step, the x
        axis of its curves) and whichever was measured of ``eval_loss`` and
        ``eval_accuracy`` (exact-match accuracy, ``data.exact_match``).

    .. versionadded:: 0.2
    """


@hookspec
def mlora_on_job_end(run: Mapping[str, Any], job: str, result: Mapping[str, Any]) -> None:
    """Called when a job completes or fails, after its adapter is saved.

    :param run: as in :func:`mlora_on_train_start`.
    :param job: the job's name.
    :param result: the job's entry of summary.json.

    .. versionadded:: 0.1
    """


@hookspec
def mlora_on_train_end(run: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
    """Called once when every job has ended, after summary.json is written.

    :param run: as in :func:`mlora_on_train_start`.
    :param summary: the content of summary.json.

    .. versionadded:: 0.1
    """
