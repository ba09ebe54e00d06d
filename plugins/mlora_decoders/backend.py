"""Decoder-only causal LMs through transformers' own classes: a checkpoint directory or a ``.gguf`` file.

One backend class serves every family of :mod:`mlora_decoders.families`; each family is
registered under its own name (``llama``, ``qwen2``, ...), so the names adapters may target
are known before any checkpoint is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlora_core.config.schema import BaseModelConfig, torch_dtype
from mlora_core.errors import MloraError
from mlora_core.models.paths import resolve_model_path
from mlora_core.models.transformers_split import decoder_blocks, split_causal_lm
from mlora_core.plugin_api.protocols import LoadedModel
from mlora_decoders.families import FAMILIES, Family, family_of_gguf_architecture, family_of_model_type
from mlora_decoders.gguf_metadata import gguf_architecture


class DecoderBackend:
    """Loads one family's ``*ForCausalLM`` through transformers, frozen, with its tokenizer."""

    #: Packed rows (``scheduler.packing``): transformers builds the block-diagonal causal mask
    #: (sliding windows included) from position ids that restart with each sample.
    supports_packing = True

    def __init__(self, family: str = "llama") -> None:
        self.family: Family = FAMILIES[family]

    @property
    def target_modules(self) -> tuple[str, ...]:
        return self.family.target_modules

    @property
    def default_target_modules(self) -> tuple[str, ...]:
        return self.family.default_targets

    @property
    def model_types(self) -> tuple[str, ...]:
        return self.family.model_types

    def validate(self, config: BaseModelConfig) -> list[str]:
        try:
            path = resolve_model_path(config.path)
        except MloraError as exc:
            return [f"path: {exc}"]
        if path.is_dir():
            if not (path / "config.json").is_file():
                return [f"path: {path} has no config.json (expected a Hugging Face checkpoint directory)"]
            return self._family_problems(path, model_type(path / "config.json"), "model_type", family_of_model_type)
        if not path.is_file():
            return [f"path: {path} does not exist"]
        if path.suffix != ".gguf":
            return [f"path: {path} is a file but not a .gguf file"]
        try:
            architecture = gguf_architecture(path)
        except MloraError as exc:
            return [f"path: {exc}"]
        return self._family_problems(path, architecture, "GGUF architecture", family_of_gguf_architecture)

    def _family_problems(self, path: Path, found: str | None, what: str, lookup: Any) -> list[str]:
        """Empty when ``found`` belongs to this backend's family; else one line naming the right backend."""
        own = lookup(found)
        if own is self.family:
            return []
        hint = f"use backend {own.backend!r} or leave base_model.backend out" if own else "no built-in backend loads it"
        return [f"path: {path} holds a {found!r} model ({what}), not a {self.family.backend} one ({hint})"]

    def load(self, config: BaseModelConfig) -> LoadedModel:
        import torch
        import transformers
        from transformers import AutoTokenizer

        path = resolve_model_path(config.path)
        dtype = torch_dtype(config.dtype)
        kwargs: dict[str, Any] = {"dtype": dtype}
        source = path
        if path.is_file():
            # A .gguf file: transformers dequantizes it to fp32 (its fast path), then we cast;
            # the weights equal a direct bf16 load.
            source, kwargs = path.parent, {"gguf_file": path.name, "dtype": torch.float32}
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=kwargs.get("gguf_file"))
        model_class = getattr(transformers, self.family.model_class)
        model = model_class.from_pretrained(source, **kwargs).to(dtype)
        if model.config.model_type not in self.family.model_types:
            raise MloraError(
                f"{path}: transformers loaded a {model.config.model_type!r} model, not one of "
                f"{', '.join(self.family.model_types)} (backend {self.family.backend!r})"
            )
        model.requires_grad_(False)
        model.config.use_cache = False
        model.to(config.device)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        hidden_states, lm_head = split_causal_lm(model)
        return LoadedModel(
            model=model,
            tokenizer=tokenizer,
            name_or_path=str(path),
            info={"dtype": config.dtype, "source": str(path), "architecture": model.config.model_type},
            hidden_states=hidden_states,
            lm_head=lm_head,
            blocks=decoder_blocks(model),
        )


def model_type(config_json: Path) -> str | None:
    """config.json's ``model_type``, or None when it is unreadable or has none."""
    try:
        value = json.loads(config_json.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
