"""ChatGLM2/3 ``config.json``: read THUDM's keys, recognise the family, reject what is not supported.

``rope_ratio`` means two different things in THUDM's code (see :func:`rope_ratio_scales`):
ChatGLM2-6B-32k divides the positions by it (position interpolation), ChatGLM3-6B-32k and
GLM-4 multiply the rotary base by it. The config says which model it is only through the
name THUDM wrote into it, so the meaning is taken from that name, or from an explicit
``rope_ratio_scales`` key, and a config with ``rope_ratio`` != 1 that says neither is refused.
"""

from __future__ import annotations

import json
import re
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
#: The config.json key (mlora's, not THUDM's) that says what ``rope_ratio`` scales, when the
#: model's name does not: ``"positions"`` (ChatGLM2-6B-32k) or ``"base"`` (ChatGLM3-6B-32k, GLM-4).
ROPE_RATIO_SCALES_KEY = "rope_ratio_scales"
ROPE_RATIO_SCALES = ("positions", "base")
#: What ``rope_ratio`` scales in each family's modeling code.
FAMILY_ROPE_RATIO_SCALES = {"chatglm2": "positions", "chatglm3": "base", "glm4": "base"}
#: Family names as they appear in ``_name_or_path`` (``THUDM/chatglm2-6b-32k``, ``/models/glm-4-9b``).
FAMILY_NAMES = {
    "chatglm2": re.compile(r"chatglm2"),
    "chatglm3": re.compile(r"chatglm3"),
    "glm4": re.compile(r"(?<![a-z])glm-?4"),
}
#: GLM-4's padded vocabulary (ChatGLM2/3 have 65024).
GLM4_PADDED_VOCAB = 151552


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
    #: Absent (1) in ChatGLM2/3-6B; what it scales is ``rope_ratio_scales``.
    rope_ratio: float = 1.0
    #: ``"base"``: rotary base ``10000 * rope_ratio`` (ChatGLM3-6B-32k, GLM-4); ``"positions"``:
    #: positions divided by ``rope_ratio`` (ChatGLM2-6B-32k). Set by :meth:`from_dict`.
    rope_ratio_scales: str = "base"
    model_type: str = "chatglm"

    @property
    def groups(self) -> int:
        """Key/value groups: ``multi_query_group_num``, or one per head without multi-query attention."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def rope_base(self) -> float:
        """The rotary base: ``10000 * rope_ratio`` when ``rope_ratio`` scales the base, else 10000."""
        return 10000.0 * self.rope_ratio if self.rope_ratio_scales == "base" else 10000.0

    @property
    def rope_position_divisor(self) -> float:
        """What positions are divided by before the rotary angles: ``rope_ratio`` or 1."""
        return self.rope_ratio if self.rope_ratio_scales == "positions" else 1.0

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
        values["rope_ratio_scales"] = rope_ratio_scales(raw)
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


def model_family(raw: Mapping[str, Any]) -> str | None:
    """``chatglm2``, ``chatglm3`` or ``glm4`` as the config names it; None when it does not say, or says two.

    The evidence: the family named in ``_name_or_path`` (THUDM write their hub id there, e.g.
    ``THUDM/chatglm2-6b-32k``; a model saved by transformers keeps the hub id or the local path
    it was loaded from), and ``padded_vocab_size`` 151552, which only GLM-4 has.
    """
    name = str(raw.get("_name_or_path") or "").lower()
    families = {family for family, pattern in FAMILY_NAMES.items() if pattern.search(name)}
    if raw.get("padded_vocab_size") == GLM4_PADDED_VOCAB:
        families.add("glm4")
    return families.pop() if len(families) == 1 else None


def rope_ratio_scales(raw: Mapping[str, Any]) -> str:
    """What config.json's ``rope_ratio`` scales: ``"positions"`` or ``"base"``.

    THUDM's ChatGLM2-6B-32k code computes the angles ``(t / rope_ratio) * 10000 ** (-2i / n)``
    (position interpolation); ChatGLM3-6B-32k and GLM-4 compute
    ``t * (10000 * rope_ratio) ** (-2i / n)``. The rule, in order: an explicit
    ``rope_ratio_scales`` key; the family from :func:`model_family`; with ``rope_ratio`` 1 (or
    absent) the two agree and ``"base"`` is returned.

    Raises:
        ChatGLMConfigError: ``rope_ratio`` is not 1 and the config says neither, or the key has
            another value.
    """
    ratio = raw.get("rope_ratio")
    if ratio is None:
        ratio = 1.0
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or ratio <= 0:
        raise ChatGLMConfigError(f"config.json sets rope_ratio={ratio!r}; expected a positive number")
    explicit = raw.get(ROPE_RATIO_SCALES_KEY)
    if explicit is not None:
        if explicit not in ROPE_RATIO_SCALES:
            raise ChatGLMConfigError(
                f"config.json sets {ROPE_RATIO_SCALES_KEY}={explicit!r}; expected 'positions' or 'base'"
            )
        return str(explicit)
    family = model_family(raw)
    if family is not None:
        return FAMILY_ROPE_RATIO_SCALES[family]
    if ratio == 1:
        return "base"
    raise ChatGLMConfigError(
        f"config.json has rope_ratio {ratio} but does not say whether it is ChatGLM2 (rope_ratio divides the "
        "positions) or ChatGLM3/GLM-4 (rope_ratio multiplies the rotary base): add "
        f'"{ROPE_RATIO_SCALES_KEY}": "positions" (ChatGLM2-6B-32k) or "{ROPE_RATIO_SCALES_KEY}": "base" '
        "(ChatGLM3-6B-32k, GLM-4) to config.json"
    )


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
