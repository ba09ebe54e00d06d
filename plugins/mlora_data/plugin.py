"""Registers the ``alpaca`` data loader."""

from __future__ import annotations

from mlora_core.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_datasets(register: Register) -> None:
    from mlora_data.alpaca import AlpacaLoader

    register("alpaca", AlpacaLoader)
