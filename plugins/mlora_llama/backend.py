"""LLaMA-family base models: a Hugging Face checkpoint directory or a single ``.gguf`` file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlora_core.config.schema import BaseModelConfig, torch_dtype
from mlora_core.errors import MloraError
from mlora_core.models.paths import resolve_model_path
from mlora_core.models.transformers_split import decoder_blocks, split_causal_lm
from mlora_core.plugin_api.protocols import LoadedModel


class LlamaBackend:
    """Loads ``LlamaForCausalLM`` through transformers, frozen, with its tokenizer."""

    target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    #: Packed rows (``scheduler.packing``): transformers builds the block-diagonal causal mask
    #: from position ids that restart with each sample.
    supports_packing = True

    def validate(self, config: BaseModelConfig) -> list[str]:
        try:
            path = resolve_model_path(config.path)
        except MloraError as exc:
            return [f"path: {exc}"]
        if path.is_dir():
            if not (path / "config.json").is_file():
                return [f"path: {path} has no config.json (expected a Hugging Face checkpoint directory)"]
            model_type = _model_type(path / "config.json")
            if model_type != "llama":
                return [f"path: {path} holds a {model_type!r} model, not a LLaMA one (model_type 'llama')"]
        elif not path.is_file():
            return [f"path: {path} does not exist"]
        elif path.suffix != ".gguf":
            return [f"path: {path} is a file but not a .gguf file"]
        return []

    def load(self, config: BaseModelConfig) -> LoadedModel:
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM

        path = resolve_model_path(config.path)
        dtype = torch_dtype(config.dtype)
        kwargs: dict[str, Any] = {"dtype": dtype}
        source = path
        if path.is_file():
            # A .gguf file: transformers dequantizes it to fp32 (its fast path), then we cast;
            # the weights equal a direct bf16 load.
            source, kwargs = path.parent, {"gguf_file": path.name, "dtype": torch.float32}
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=kwargs.get("gguf_file"))
        model = LlamaForCausalLM.from_pretrained(source, **kwargs).to(dtype)
        if model.config.model_type != "llama":
            raise MloraError(f"{path}: model_type is {model.config.model_type!r}, not 'llama'")
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
            info={"dtype": config.dtype, "source": str(path)},
            hidden_states=hidden_states,
            lm_head=lm_head,
            blocks=decoder_blocks(model),
        )


def _model_type(config_json: Path) -> str | None:
    try:
        value = json.loads(config_json.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
