"""ChatGLM2/3 ``config.json``: read THUDM's keys, recognise the family, reject what is not supported."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mlora_core.errors import MloraError

#: Keys only ChatGLM-6B (the first version) has: 2-D positions, GLM blocks, GeLU.
V1_KEYS = ("position_encoding_2d", "inner_hidden_size", "gmask_token_id")
#: Architecture switches THUDM's code has, with the value every released ChatGLM2/3 model uses.
FIXED_SWITCHES = {
    "rmsnorm": True,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
    "fp32_residual_connection": False,
}


class ChatGLMConfigError(MloraError):
    """config.json is not a ChatGLM2/3 config this backend can load."""


@dataclass(frozen=True)
class ChatGLMConfig:
    """The ChatGLM2/3 architecture, under the names THUDM's config.json uses."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    padded_vocab_size: int
    kv_channels: int
    multi_query_attention: bool = False
    multi_query_group_num: int = 1
    layernorm_epsilon: float = 1e-5
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    #: Scales the rotary base: ``10000 * rope_ratio`` (absent in ChatGLM2/3-6B: 1).
    rope_ratio: float = 1.0
    model_type: str = "chatglm"

    @property
    def groups(self) -> int:
        """Key/value groups: ``multi_query_group_num``, or one per head without multi-query attention."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def rope_base(self) -> float:
        return 10000.0 * self.rope_ratio

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ChatGLMConfig:
        """Parse a config.json mapping; raises :class:`ChatGLMConfigError` naming what is wrong."""
        check_supported(raw)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        if "kv_channels" not in values and raw.get("hidden_size") and raw.get("num_attention_heads"):
            values["kv_channels"] = raw["hidden_size"] // raw["num_attention_heads"]
        try:
            config = cls(**values)
        except TypeError as exc:
            raise ChatGLMConfigError(f"config.json lacks a ChatGLM2/3 key: {exc}") from None
        if config.num_attention_heads % config.groups:
            raise ChatGLMConfigError(
                f"num_attention_heads {config.num_attention_heads} is not a multiple of "
                f"multi_query_group_num {config.groups}"
            )
        return config


def is_chatglm(raw: Mapping[str, Any]) -> bool:
    """Whether a config.json mapping is in THUDM's ChatGLM layout (any version)."""
    architectures = raw.get("architectures") or []
    return (
        raw.get("model_type") == "chatglm"
        or "padded_vocab_size" in raw
        or any(str(a).startswith("ChatGLM") for a in architectures)
    )


def check_supported(raw: Mapping[str, Any]) -> None:
    """Raise :class:`ChatGLMConfigError` unless ``raw`` is a ChatGLM2/3 model this backend runs exactly."""
    if not is_chatglm(raw):
        raise ChatGLMConfigError(
            f"config.json is not a ChatGLM checkpoint in THUDM's layout (model_type {raw.get('model_type')!r}); "
            "leave base_model.backend out to choose the backend from the checkpoint"
        )
    if any(k in raw for k in V1_KEYS) or "padded_vocab_size" not in raw:
        raise ChatGLMConfigError(
            "this is a ChatGLM-6B (first version) checkpoint, which is not supported: it is a different "
            "architecture (GLM blocks, 2-D positions, GeLU). Use ChatGLM2-6B or ChatGLM3-6B."
        )
    for key, value in FIXED_SWITCHES.items():
        if key in raw and bool(raw[key]) != value:
            raise ChatGLMConfigError(f"config.json sets {key}={raw[key]!r}; only {value} is supported")
    if raw.get("quantization_bit"):
        raise ChatGLMConfigError(
            f"quantization_bit={raw['quantization_bit']}: THUDM's pre-quantized checkpoints are not supported; "
            "load the full-precision checkpoint and set base_model.quantize instead"
        )
    if raw.get("pre_seq_len"):
        raise ChatGLMConfigError("pre_seq_len is set (a P-tuning v2 prefix encoder), which is not supported")


def read_config_json(path: Path) -> dict[str, Any]:
    """The parsed ``path/config.json``; raises :class:`ChatGLMConfigError` when missing or malformed."""
    file = path / "config.json"
    if not file.is_file():
        raise ChatGLMConfigError(f"{path} has no config.json (expected a ChatGLM2/3 checkpoint directory)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ChatGLMConfigError(f"{file}: not readable JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ChatGLMConfigError(f"{file}: expected a JSON object")
    return raw
