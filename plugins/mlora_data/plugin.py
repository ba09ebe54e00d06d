"""Registers the ``alpaca``, ``chat`` and ``preference`` data loaders and the prompt templates.

The ``chat`` template (the tokenizer's own chat template) is not registered as a prompt
template: a :class:`~mlora_core.plugin_api.protocols.PromptTemplate` renders without a
tokenizer, and a chat template needs one. The loaders accept it as ``data.template: chat``.
"""

from __future__ import annotations

from mlora_core.plugin_api.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_datasets(register: Register) -> None:
    from mlora_data.alpaca import AlpacaLoader
    from mlora_data.chat import ChatLoader
    from mlora_data.preference import PreferenceLoader

    register("alpaca", AlpacaLoader)
    register("chat", ChatLoader)
    register("preference", PreferenceLoader)


@hookimpl
def mlora_register_templates(register: Register) -> None:
    from mlora_data.templates import TEMPLATES

    for name, template in TEMPLATES.items():
        register(name, lambda template=template: template)  # templates are immutable: share one
