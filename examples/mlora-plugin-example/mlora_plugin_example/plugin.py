"""The plugin module named by the ``mlora`` entry point: one hook per component kind.

Imports of the components happen inside the hooks, so loading the plugin (which every
``mlora`` command does) stays cheap.
"""

from __future__ import annotations

from mlora_core.plugin_api.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_adapters(register: Register) -> None:
    from mlora_plugin_example.dora import DoraAdapterType

    register("dora", DoraAdapterType)


@hookimpl
def mlora_register_schedulers(register: Register) -> None:
    from mlora_plugin_example.sjf import ShortestJobFirstScheduler

    register("shortest_job_first", ShortestJobFirstScheduler)


@hookimpl
def mlora_register_datasets(register: Register) -> None:
    from mlora_plugin_example.chat import ChatLoader

    register("chat_markup", ChatLoader)


@hookimpl
def mlora_register_commands(register: Register) -> None:
    from mlora_plugin_example.preview import ChatPreviewCommand

    register("chat_preview", ChatPreviewCommand)
