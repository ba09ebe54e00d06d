"""Registers ``mlora serve`` and its client commands ``submit``, ``status``, ``cancel``, ``logs``, ``fetch``."""

from __future__ import annotations

from mlora_core.plugin_api.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_commands(register: Register) -> None:
    from mlora_serve.client_commands import CancelCommand, FetchCommand, LogsCommand, StatusCommand, SubmitCommand
    from mlora_serve.serve_command import ServeCommand

    register("serve", ServeCommand)
    register("submit", SubmitCommand)
    register("status", StatusCommand)
    register("cancel", CancelCommand)
    register("logs", LogsCommand)
    register("fetch", FetchCommand)
