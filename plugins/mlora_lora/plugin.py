"""Registers the ``lora`` adapter type."""

from __future__ import annotations

from mlora_core.plugin_api.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_adapters(register: Register) -> None:
    from mlora_lora.adapter import LoraAdapterType, QLoraAdapterType

    register("lora", LoraAdapterType)
    register("qlora", QLoraAdapterType)
