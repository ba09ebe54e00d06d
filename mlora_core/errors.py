"""Domain exceptions. Every error a user can cause is one of these, with an actionable message."""

from __future__ import annotations


class MloraError(Exception):
    """Base class of every error mlora raises on purpose."""


class ConfigError(MloraError):
    """The configuration is invalid. ``problems`` lists every problem found, each with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


class PluginError(MloraError):
    """A plugin is broken or two plugins clash (for example over a component name)."""


class UnknownComponentError(MloraError, KeyError):
    """A config names a component (scheduler, adapter type, ...) that no plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(MloraError):
    """A data file is missing or malformed; the message names the file and line."""


class Interrupted(MloraError):
    """The run was stopped by a signal; a checkpoint was written and it can be resumed."""

    def __init__(self, signal_name: str, message: str) -> None:
        self.signal_name = signal_name
        super().__init__(message)
