"""The plugin manager: built-in plugins, third-party entry points, name registries.

Built-in plugins are entry points of mlora's own distribution and load through the same
path as a third-party package's. :func:`create_plugin_manager` builds a fresh host on
every call (no global state), so tests can build one with only the plugins they want.

Environment variables:

- ``MLORA_DISABLE_PLUGIN_AUTOLOAD=1``: load no third-party entry points (built-ins still load).
- ``MLORA_DISABLED_PLUGINS=a,b``: block plugins by entry-point name (built-ins too).

A third-party plugin that fails to import, has a hook with an argument its spec lacks, or
raises in a registration hook is skipped with a warning naming its distribution, and is
listed in the registries' unknown-name messages (:attr:`PluginHost.failed`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pluggy

from mlora_core.errors import PluginError
from mlora_core.plugin_api import hookspecs
from mlora_core.plugin_api.registry import Registry

if TYPE_CHECKING:
    from mlora_core.plugin_api.protocols import (
        AdapterType,
        Command,
        DatasetLoader,
        ModelBackend,
        Monitor,
        Objective,
        PromptTemplate,
    )
    from mlora_core.plugin_api.scheduling import BatchScheduler

#: The distribution that ships mlora and its built-in plugins.
DIST_NAME = "mlora-trainer"
ENTRY_POINT_GROUP = "mlora"
#: The plugin name of the core's own commands (``run``, ``validate``, ``plan``, ``plugins``).
CORE_PLUGIN = "core"


@dataclass(frozen=True)
class RegistryKind:
    """One kind of component: its registry key, its name in messages, the hook that fills it."""

    key: str
    label: str
    hook: str


#: Every registry, in the order ``mlora plugins`` lists them.
REGISTRIES = (
    RegistryKind("backend", "backend", "mlora_register_backends"),
    RegistryKind("adapter_type", "adapter type", "mlora_register_adapters"),
    RegistryKind("scheduler", "scheduler", "mlora_register_schedulers"),
    RegistryKind("data_loader", "data loader", "mlora_register_datasets"),
    RegistryKind("objective", "objective", "mlora_register_objectives"),
    RegistryKind("template", "prompt template", "mlora_register_templates"),
    RegistryKind("monitor", "monitor", "mlora_register_monitors"),
    RegistryKind("command", "command", "mlora_register_commands"),
)


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin, for ``mlora plugins``."""

    name: str
    distribution: str
    version: str
    hooks: tuple[str, ...]


@dataclass(frozen=True)
class FailedPlugin:
    """A third-party plugin that was skipped: it failed to import, register or register components."""

    name: str
    distribution: str
    version: str
    error: str

    def describe(self) -> str:
        return f"plugin {self.name!r} from distribution {self.distribution} {self.version} ({self.error})"


class PluginHost:
    """A plugin manager plus the registries its plugins fill, with typed hook calls."""

    def __init__(
        self,
        pm: pluggy.PluginManager,
        distributions: Mapping[str, tuple[str, str]],
        failed: Iterable[FailedPlugin] = (),
    ) -> None:
        self.pm = pm
        self._distributions = dict(distributions)
        self._registries: dict[str, Registry[Any]] | None = None
        #: Third-party plugins skipped because they are broken, in the order found.
        self.failed: list[FailedPlugin] = list(failed)
        self._failure_notes: list[str] = [f.describe() for f in self.failed]  # shared with the registries

    # --- registries ---------------------------------------------------------------------

    def registry(self, kind: str) -> Registry[Any]:
        """The registry of ``kind`` (a :attr:`RegistryKind.key`), built on first use."""
        if self._registries is None:
            self._registries = {k.key: self._build_registry(k.label, k.hook) for k in REGISTRIES}
        return self._registries[kind]

    def _build_registry(self, label: str, hook_name: str) -> Registry[Any]:
        registry: Registry[Any] = Registry(label, failed_plugins=self._failure_notes)
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            if self.distribution_of(impl.plugin_name)[0] in (DIST_NAME, "(in-process)"):
                impl.function(register=partial(_register_as, registry, impl.plugin_name))
                continue
            # A third-party hook that raises (an import inside it, say) registers nothing.
            pending: list[tuple[str, Callable[..., Any]]] = []
            try:
                impl.function(register=partial(_collect, pending))
            except Exception as exc:
                self._skip(impl.plugin_name, f"{hook_name} raised {exc!r}")
                continue
            for name, factory in pending:
                registry.register(name, factory, plugin=impl.plugin_name)
        return registry

    def _skip(self, plugin_name: str, error: str) -> None:
        dist, version = self.distribution_of(plugin_name)
        failure = FailedPlugin(plugin_name, dist, version, error)
        warnings.warn(f"skipping {failure.describe()}", stacklevel=3)
        self.failed.append(failure)
        self._failure_notes.append(failure.describe())

    @property
    def backends(self) -> Registry[ModelBackend]:
        return cast("Registry[ModelBackend]", self.registry("backend"))

    @property
    def adapters(self) -> Registry[AdapterType]:
        return cast("Registry[AdapterType]", self.registry("adapter_type"))

    @property
    def schedulers(self) -> Registry[BatchScheduler]:
        return cast("Registry[BatchScheduler]", self.registry("scheduler"))

    @property
    def data_loaders(self) -> Registry[DatasetLoader]:
        return cast("Registry[DatasetLoader]", self.registry("data_loader"))

    @property
    def objectives(self) -> Registry[Objective]:
        return cast("Registry[Objective]", self.registry("objective"))

    @property
    def templates(self) -> Registry[PromptTemplate]:
        return cast("Registry[PromptTemplate]", self.registry("template"))

    @property
    def monitors(self) -> Registry[Monitor]:
        return cast("Registry[Monitor]", self.registry("monitor"))

    @property
    def commands(self) -> Registry[Command]:
        return cast("Registry[Command]", self.registry("command"))

    # --- introspection ------------------------------------------------------------------

    def distribution_of(self, plugin_name: str) -> tuple[str, str]:
        """(distribution, version) that provides ``plugin_name``; in-process plugins say so."""
        return self._distributions.get(plugin_name, ("(in-process)", ""))

    def plugins(self) -> list[PluginInfo]:
        """Every registered plugin with the hooks it implements, in registration order."""
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            hooks = tuple(sorted(c.name for c in self.pm.get_hookcallers(plugin) or ()))
            dist, version = self.distribution_of(name)
            infos.append(PluginInfo(name, dist, version, hooks))
        return infos

    # --- selection hook (typed facade) --------------------------------------------------

    def detect_backend(self, path: Path, config: Mapping[str, Any] | None) -> str | None:
        """The backend name the first answering plugin gives for a checkpoint, or None.

        ``config`` is the checkpoint's parsed config.json, or None for a file (``.gguf``)
        or a directory without one. Later-registered plugins are asked first.
        """
        name = self.pm.hook.mlora_detect_backend(path=path, config=config)
        return None if name is None else str(name)

    # --- event hooks (typed facade) -----------------------------------------------------

    def add_listener(self, listener: object, name: str) -> None:
        """Register ``listener`` (a monitor) so that it receives the event hooks it implements.

        Raises:
            PluginError: it implements a hook mlora does not have, or with wrong arguments.
        """
        try:
            self.pm.register(listener, name=name)
            self.pm.check_pending()  # a misspelt mlora_on_* method
        except (pluggy.PluginValidationError, ValueError) as exc:
            self.remove_listener(listener)
            raise PluginError(f"{name}: {exc}") from exc

    def remove_listener(self, listener: object) -> None:
        """Stop sending events to a listener added with :meth:`add_listener`."""
        if self.pm.is_registered(listener):
            self.pm.unregister(listener)

    def on_train_start(self, run: Mapping[str, Any]) -> None:
        self.pm.hook.mlora_on_train_start(run=run)

    def on_step_end(
        self, run: Mapping[str, Any], step: int, metrics: hookspecs.JobMetrics, run_metrics: Mapping[str, float]
    ) -> None:
        self.pm.hook.mlora_on_step_end(run=run, step=step, metrics=metrics, run_metrics=run_metrics)

    def on_evaluation(self, run: Mapping[str, Any], step: int, phase: str, results: hookspecs.JobMetrics) -> None:
        self.pm.hook.mlora_on_evaluation(run=run, step=step, phase=phase, results=results)

    def on_job_end(self, run: Mapping[str, Any], job: str, result: Mapping[str, Any]) -> None:
        self.pm.hook.mlora_on_job_end(run=run, job=job, result=result)

    def on_train_end(self, run: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
        self.pm.hook.mlora_on_train_end(run=run, summary=summary)


def _register_as(registry: Registry[Any], plugin: str, name: str, factory: Callable[..., Any]) -> None:
    registry.register(name, factory, plugin=plugin)


def _collect(pending: list[tuple[str, Callable[..., Any]]], name: str, factory: Callable[..., Any]) -> None:
    pending.append((name, factory))


def create_plugin_manager(
    *, autoload: bool = True, extra: Iterable[object] = (), blocked: Iterable[str] = ()
) -> PluginHost:
    """Build a fresh plugin host.

    Order: the core's commands, mlora's own entry points (the built-ins), then, unless ``autoload`` is false
    or ``MLORA_DISABLE_PLUGIN_AUTOLOAD`` is set, other distributions' entry points, then
    the ``extra`` plugin objects (tests, notebooks). Names in ``blocked`` and in
    ``MLORA_DISABLED_PLUGINS`` are not loaded.

    Raises:
        PluginError: mlora's distribution is not installed, or a plugin has a bad hook.
    """
    pm = pluggy.PluginManager("mlora")
    pm.add_hookspecs(hookspecs)
    blocked_names = set(blocked) | _env_list("MLORA_DISABLED_PLUGINS")
    for name in blocked_names:
        pm.set_blocked(name)
    if os.environ.get("MLORA_DISABLE_PLUGIN_AUTOLOAD"):
        autoload = False

    builtin, third_party = _entry_points()
    from mlora_core.cli import core_commands

    pm.register(core_commands, name=CORE_PLUGIN)
    distributions: dict[str, tuple[str, str]] = {CORE_PLUGIN: (DIST_NAME, metadata.version(DIST_NAME))}
    failed: list[FailedPlugin] = []
    for ep in builtin + (third_party if autoload else []):
        if pm.is_blocked(ep.name):
            continue
        _load_entry_point(pm, ep, distributions, failed)
    for i, obj in enumerate(extra):
        pm.register(obj, name=getattr(obj, "__name__", None) or f"{type(obj).__name__}-{i}")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        culprit = pm.get_name(exc.plugin) or "?"
        dist = distributions.get(culprit, ("(in-process)", ""))[0]
        raise PluginError(f"plugin {culprit!r} from distribution {dist} implements an unknown hook: {exc}") from exc
    return PluginHost(pm, distributions, failed)


def _entry_points() -> tuple[list[metadata.EntryPoint], list[metadata.EntryPoint]]:
    """(built-in, third-party) entry points of the ``mlora`` group."""
    eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    builtin = [ep for ep in eps if ep.dist is not None and ep.dist.name == DIST_NAME]
    if not builtin:
        raise PluginError(
            f"mlora's built-in plugins are not registered: the {DIST_NAME!r} distribution is not "
            "installed. Install it (for a checkout: pip install -e .)."
        )
    third_party = [ep for ep in eps if ep not in builtin]
    return builtin, third_party


def _load_entry_point(
    pm: pluggy.PluginManager,
    ep: metadata.EntryPoint,
    distributions: dict[str, tuple[str, str]],
    failed: list[FailedPlugin],
) -> None:
    dist = (ep.dist.name, ep.dist.version) if ep.dist is not None else ("(unknown)", "")
    try:
        plugin = ep.load()
    except Exception as exc:  # a broken third-party plugin must not take mlora down
        if dist[0] == DIST_NAME:
            raise
        _skip_entry_point(ep.name, dist, f"import failed: {exc!r}", failed)
        return
    try:
        pm.register(plugin, name=ep.name)
    except pluggy.PluginValidationError as exc:  # e.g. a hookimpl with an argument the spec lacks
        if dist[0] == DIST_NAME:
            raise PluginError(f"plugin {ep.name!r} from distribution {dist[0]} cannot be registered: {exc}") from exc
        _skip_entry_point(ep.name, dist, f"bad hook: {exc}", failed)
        return
    except ValueError as exc:
        raise PluginError(f"plugin {ep.name!r} from distribution {dist[0]} cannot be registered: {exc}") from exc
    distributions[ep.name] = dist


def _skip_entry_point(name: str, dist: tuple[str, str], error: str, failed: list[FailedPlugin]) -> None:
    failure = FailedPlugin(name, dist[0], dist[1], error)
    warnings.warn(f"skipping {failure.describe()}", stacklevel=3)
    failed.append(failure)


def _env_list(var: str) -> set[str]:
    return {part.strip() for part in os.environ.get(var, "").split(",") if part.strip()}
