"""Registers the ``mlora sweep`` command."""

from __future__ import annotations

from mlora_core.plugin_api.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_commands(register: Register) -> None:
    from mlora_sweep.command import SweepCommand

    register("sweep", SweepCommand)
