"""Registers the ``jsonl`` monitor."""

from __future__ import annotations

from mlora_core.plugin_api.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_monitors(register: Register) -> None:
    from mlora_jsonl.monitor import JsonlMonitor

    register("jsonl", JsonlMonitor)
