"""Name registries: the core owns component names, catches duplicates and lists known names."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from mlora_core.errors import PluginError, UnknownComponentError

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component: its name, its factory and the plugin that registered it."""

    name: str
    factory: Callable[..., T]
    plugin: str


class Registry(Generic[T]):
    """Maps lowercase snake_case names of one kind of component to factories of ``T``.

    ``kind`` names the kind in messages ("adapter type", ...).
    """

    def __init__(self, kind: str, failed_plugins: Sequence[str] = ()) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        #: Plugins that failed to load, described for error messages (the host's live list).
        self.failed_plugins = failed_plugins

    def register(self, name: str, factory: Callable[..., T], *, plugin: str) -> None:
        """Add ``name``; raises PluginError on a bad or duplicate name, naming both plugins."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginError(
                f"plugin {plugin!r} registered {self.kind} name {name!r}: names must be lowercase snake_case"
            )
        if not callable(factory):
            raise PluginError(f"plugin {plugin!r} registered {self.kind} {name!r} with a non-callable factory")
        if name in self._entries:
            other = self._entries[name].plugin
            raise PluginError(
                f"duplicate {self.kind} name {name!r}: registered by plugin {other!r} and again by plugin {plugin!r}"
            )
        self._entries[name] = Entry(name, factory, plugin)

    def get(self, name: str) -> Entry[T]:
        """The entry for ``name``; raises UnknownComponentError listing the known names."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownComponentError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = ", ".join(sorted(self._entries)) or "(none registered)"
        message = f"unknown {self.kind} {name!r}; known: {known}"
        if self.failed_plugins:
            failed = "; ".join(self.failed_plugins)
            message += f" (plugins that failed to load, which may provide it: {failed})"
        return message

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the component registered as ``name`` with ``kwargs``."""
        return self.get(name).factory(**kwargs)

    @property
    def entries(self) -> Mapping[str, Entry[T]]:
        """A read-only view of the registered entries."""
        return MappingProxyType(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))
