"""Registers the ``llama`` backend and recognises LLaMA checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlora_core.plugin_api.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_backends(register: Register) -> None:
    from mlora_llama.backend import LlamaBackend

    register("llama", LlamaBackend)


@hookimpl
def mlora_detect_backend(path: Path, config: Mapping[str, Any] | None) -> str | None:
    """``llama`` for a config.json with ``model_type: llama``, or a single ``.gguf`` file."""
    if config is not None:
        return "llama" if config.get("model_type") == "llama" else None
    return "llama" if path.is_file() and path.suffix == ".gguf" else None
