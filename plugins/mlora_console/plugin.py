"""Registers the ``console`` monitor."""

from __future__ import annotations

from mlora_core.plugin_api.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_monitors(register: Register) -> None:
    from mlora_console.monitor import ConsoleMonitor

    register("console", ConsoleMonitor)
