"""Registers the ``mlora generate`` command."""

from __future__ import annotations

from mlora_core.plugin_api.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_commands(register: Register) -> None:
    from mlora_generate.command import GenerateCommand

    register("generate", GenerateCommand)
