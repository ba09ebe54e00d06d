"""Registers the ``mlora eval`` command."""

from __future__ import annotations

from mlora_core.plugin_api.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_commands(register: Register) -> None:
    from mlora_eval.command import EvalCommand

    register("eval", EvalCommand)
