"""The ``chatglm`` backend: ChatGLM2/3 checkpoints in THUDM's layout, loaded without their code.

A checkpoint directory holds ``config.json`` (THUDM's keys), weights as safetensors
(``model.safetensors`` or ``model-*.safetensors`` shards) or pickled shards
(``pytorch_model.bin`` or ``pytorch_model-*.bin``), and ``tokenizer.model``
(or ``tokenizer.json``). THUDM's ``*.py`` files are ignored: the model is
:class:`mlora_chatglm.model.ChatGLMForCausalLM` and the tokenizer
:class:`mlora_chatglm.tokenizer.ChatGLMTokenizer` (see :mod:`mlora_chatglm.checkpoint`
for how files are read).
"""

from __future__ import annotations

from mlora_chatglm.checkpoint import checkpoint_dir, load_weights, tokenizer_file, weight_files
from mlora_chatglm.config import ChatGLMConfig, read_config_json
from mlora_core.config.schema import BaseModelConfig, torch_dtype
from mlora_core.errors import MloraError
from mlora_core.plugin_api.protocols import LoadedModel


class ChatGLMBackend:
    """Loads a ChatGLM2/3 checkpoint into the native model, frozen, with its tokenizer."""

    #: The module names ChatGLM users target with PEFT.
    target_modules = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    #: PEFT's default for ChatGLM (the fused query/key/value projection).
    default_target_modules = ("query_key_value",)
    model_types = ("chatglm",)
    #: Packed rows (``scheduler.packing``): the model takes per-sample position ids.
    supports_packing = True

    def validate(self, config: BaseModelConfig) -> list[str]:
        """Checks config.json, weight and tokenizer files without loading."""
        try:
            path = checkpoint_dir(config.path)
            ChatGLMConfig.from_dict(read_config_json(path))
            weight_files(path)
            tokenizer_file(path)
        except MloraError as exc:
            return [f"path: {exc}"]
        return []

    def load(self, config: BaseModelConfig) -> LoadedModel:
        """Build the model on the meta device, fill it from the shards, cast, freeze, move."""
        import torch

        from mlora_chatglm.model import ChatGLMForCausalLM
        from mlora_chatglm.tokenizer import load_tokenizer

        path = checkpoint_dir(config.path)
        raw = read_config_json(path)
        model_config = ChatGLMConfig.from_dict(raw)
        with torch.device("meta"):
            model = ChatGLMForCausalLM(model_config)
        load_weights(model, weight_files(path), torch_dtype(config.dtype))
        model.requires_grad_(False)
        model.to(config.device)
        tokenizer = load_tokenizer(path, raw)
        if len(tokenizer) > model_config.padded_vocab_size:
            raise MloraError(
                f"{path}: the tokenizer has {len(tokenizer)} tokens, more than padded_vocab_size "
                f"{model_config.padded_vocab_size}"
            )
        return LoadedModel(
            model=model,
            tokenizer=tokenizer,
            name_or_path=str(path),
            info={"dtype": config.dtype, "source": str(path), "architecture": "chatglm2/3"},
            hidden_states=model.transformer.hidden_states,
            lm_head=model.transformer.output_layer,
            blocks=list(model.transformer.encoder.layers),
        )
