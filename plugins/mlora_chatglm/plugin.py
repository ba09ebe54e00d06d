"""Registers the ``chatglm`` and ``glm`` backends and recognises their checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlora_core.plugin_api.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_backends(register: Register) -> None:
    from mlora_chatglm.backend import ChatGLMBackend
    from mlora_chatglm.glm import GlmBackend

    register("chatglm", ChatGLMBackend)
    register("glm", GlmBackend)


@hookimpl
def mlora_detect_backend(path: Path, config: Mapping[str, Any] | None) -> str | None:
    """``chatglm`` for any config.json in THUDM's ChatGLM layout, ``glm`` for GLM-4 in transformers' format.

    ChatGLM-6B (the first version) is claimed too, so that the ``chatglm`` backend's
    validation can say plainly that it is not supported.
    """
    from mlora_chatglm.config import is_chatglm
    from mlora_chatglm.glm import GLM_CLASSES

    if config is None:
        return None
    if is_chatglm(config):
        return "chatglm"
    if config.get("model_type") in GLM_CLASSES:
        return "glm"
    return None
