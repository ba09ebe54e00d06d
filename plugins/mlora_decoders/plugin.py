"""Registers one backend per decoder family (``llama``, ``qwen2``, ...) and recognises their checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from mlora_core.errors import MloraError
from mlora_core.plugin_api.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_backends(register: Register) -> None:
    from mlora_decoders.backend import DecoderBackend
    from mlora_decoders.families import FAMILIES

    for name in FAMILIES:
        register(name, partial(DecoderBackend, name))


@hookimpl
def mlora_detect_backend(path: Path, config: Mapping[str, Any] | None) -> str | None:
    """The family of config.json's ``model_type``, or of a ``.gguf`` file's architecture."""
    from mlora_decoders.families import family_of_gguf_architecture, family_of_model_type
    from mlora_decoders.gguf_metadata import gguf_architecture

    if config is not None:
        family = family_of_model_type(config.get("model_type"))
    elif path.is_file() and path.suffix == ".gguf":
        try:
            family = family_of_gguf_architecture(gguf_architecture(path))
        except MloraError:
            return None
    else:
        return None
    return family.backend if family is not None else None
