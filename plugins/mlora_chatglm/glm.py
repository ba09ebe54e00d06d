"""The ``glm`` backend: GLM-4 checkpoints in transformers' format (``GlmForCausalLM``, ``Glm4ForCausalLM``).

These checkpoints (``model_type`` ``glm`` or ``glm4``) split ChatGLM's fused projections,
so adapters target transformers' names. It is a backend of its own, not a mode of
``chatglm``, because the names adapters may target are a property of the backend and
config validation checks them before any checkpoint is read.
"""

from __future__ import annotations

from mlora_chatglm.checkpoint import checkpoint_dir
from mlora_chatglm.config import read_config_json
from mlora_core.config.schema import BaseModelConfig, torch_dtype
from mlora_core.errors import MloraError
from mlora_core.models.transformers_split import decoder_blocks, split_causal_lm
from mlora_core.plugin_api.protocols import LoadedModel

#: model_type -> the transformers class that loads it.
GLM_CLASSES = {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM"}


class GlmBackend:
    """Loads a transformers-format GLM-4 checkpoint, frozen, with its ``tokenizer.json``."""

    target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
    default_target_modules = ("q_proj", "v_proj")
    model_types = tuple(GLM_CLASSES)
    #: Packed rows (``scheduler.packing``): the model takes per-sample position ids.
    supports_packing = True

    def validate(self, config: BaseModelConfig) -> list[str]:
        try:
            path = checkpoint_dir(config.path)
            glm_class_name(read_config_json(path))
        except MloraError as exc:
            return [f"path: {exc}"]
        if not (path / "tokenizer.json").is_file():
            return [f"path: {path} has no tokenizer.json"]
        return []

    def load(self, config: BaseModelConfig) -> LoadedModel:
        import transformers

        from mlora_chatglm.tokenizer import load_fast_tokenizer

        path = checkpoint_dir(config.path)
        raw = read_config_json(path)
        model_class = getattr(transformers, glm_class_name(raw))
        model = model_class.from_pretrained(path, dtype=torch_dtype(config.dtype))
        model.requires_grad_(False)
        model.config.use_cache = False
        model.to(config.device)
        hidden_states, lm_head = split_causal_lm(model)
        return LoadedModel(
            model=model,
            tokenizer=load_fast_tokenizer(path, raw),
            name_or_path=str(path),
            info={"dtype": config.dtype, "source": str(path), "architecture": raw["model_type"]},
            hidden_states=hidden_states,
            lm_head=lm_head,
            blocks=decoder_blocks(model),
        )


def glm_class_name(raw: dict[str, object]) -> str:
    """The transformers class for a config.json mapping; raises for other model types."""
    model_type = raw.get("model_type")
    if model_type not in GLM_CLASSES:
        hint = " (a ChatGLM checkpoint in THUDM's layout: use backend 'chatglm')" if model_type == "chatglm" else ""
        raise MloraError(f"config.json model_type is {model_type!r}, not one of {', '.join(GLM_CLASSES)}{hint}")
    return GLM_CLASSES[str(model_type)]
