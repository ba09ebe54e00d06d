"""Registers the ``llama`` backend."""

from __future__ import annotations

from mlora_core.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_backends(register: Register) -> None:
    from mlora_llama.backend import LlamaBackend

    register("llama", LlamaBackend)
