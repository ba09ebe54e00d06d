"""Registers the ``alpaca`` data loader and its prompt templates."""

from __future__ import annotations

from mlora_core.plugin_api.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_datasets(register: Register) -> None:
    from mlora_data.alpaca import AlpacaLoader

    register("alpaca", AlpacaLoader)


@hookimpl
def mlora_register_templates(register: Register) -> None:
    from mlora_data.templates import TEMPLATES

    for name, template in TEMPLATES.items():
        register(name, lambda template=template: template)  # templates are immutable: share one
