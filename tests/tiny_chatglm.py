"""A tiny random ChatGLM2/3 checkpoint in THUDM's layout, and its conversion to transformers' GLM.

Shared by the chatglm plugin's tests and the generation tests; the fixtures ``sp_model`` and
``tiny_chatglm_dir`` are in tests/conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from conftest import alpaca_records
from safetensors.torch import save_file

from mlora_chatglm.backend import ChatGLMBackend
from mlora_core.config.schema import BaseModelConfig

#: THUDM's config.json keys, at a tiny size. The name says ChatGLM3-6B-32k, whose code
#: multiplies the rotary base by ``rope_ratio`` (ChatGLM2-6B-32k's divides the positions).
TINY = {
    "_name_or_path": "THUDM/chatglm3-6b-32k",
    "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    },
    "model_type": "chatglm",
    "num_layers": 2,
    "hidden_size": 64,
    "ffn_hidden_size": 96,
    "kv_channels": 16,
    "num_attention_heads": 4,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "padded_vocab_size": 512,
    "layernorm_epsilon": 1e-5,
    "rmsnorm": True,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_residual_connection_post_layernorm": False,
    "fp32_residual_connection": False,
    "apply_query_key_layer_scaling": True,
    "attention_softmax_in_fp32": True,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
    "rope_ratio": 2.0,
    "original_rope": True,
    "seq_length": 512,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "quantization_bit": 0,
    "pre_seq_len": None,
    "torch_dtype": "float32",
}
#: ChatGLM-6B (the first version)'s config.json, as THUDM publish it.
CHATGLM_6B_V1 = {
    "architectures": ["ChatGLMModel"],
    "model_type": "chatglm",
    "vocab_size": 130528,
    "hidden_size": 4096,
    "num_layers": 28,
    "num_attention_heads": 32,
    "inner_hidden_size": 16384,
    "max_sequence_length": 2048,
    "position_encoding_2d": True,
    "layernorm_epsilon": 1e-05,
    "bos_token_id": 130004,
    "eos_token_id": 130005,
    "mask_token_id": 130000,
    "gmask_token_id": 130001,
    "pad_token_id": 3,
    "quantization_bit": 0,
    "pre_seq_len": None,
    "prefix_projection": False,
    "torch_dtype": "float16",
}
SP_VOCAB = 480
#: Files THUDM ship as remote code; importing any of them would leave a marker file.
REMOTE_CODE = "from pathlib import Path\nPath(__file__).with_suffix('.ran').write_text('ran')\n"


def chatglm_weights(cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under THUDM's names and shapes (written out here, not taken from our model)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    h, f, v = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    n, g, d = cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"]
    w = {"transformer.embedding.word_embeddings.weight": rand(v, h, scale=1.0)}
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + rand(h)
        w[p + "self_attention.query_key_value.weight"] = rand((n + 2 * g) * d, h, scale=0.15)
        w[p + "self_attention.query_key_value.bias"] = rand((n + 2 * g) * d)
        w[p + "self_attention.dense.weight"] = rand(h, n * d)
        w[p + "post_attention_layernorm.weight"] = 1 + rand(h)
        w[p + "mlp.dense_h_to_4h.weight"] = rand(2 * f, h)
        w[p + "mlp.dense_4h_to_h.weight"] = rand(h, f)
    w["transformer.encoder.final_layernorm.weight"] = 1 + rand(h)
    w["transformer.output_layer.weight"] = rand(v, h)
    rot = d // 2  # THUDM's checkpoints carry this buffer; their forward does not read it
    w["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    return w


def train_sentencepiece(out: Path, vocab_size: int = SP_VOCAB) -> Path:
    """A tiny BPE sentencepiece model with byte fallback, trained like ChatGLM's (no normalisation)."""
    import sentencepiece as spm

    from mlora_data.templates import ALPACA

    records = alpaca_records(200, 0) + alpaca_records(200, 1, "repeat")
    corpus = [ALPACA.prompt(r["instruction"], r["input"]) + r["output"] for r in records]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus + ["你好，世界。 [Round 1]\n\n问：答："]),
        model_prefix=str(out / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink()
    return out / "tokenizer.model"


def write_checkpoint(out: Path, weights: dict[str, torch.Tensor], fmt: str, shards: int = 2, **cfg: Any) -> Path:
    """A THUDM-layout directory: config.json, weight shards (+ index), remote-code files."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**TINY, **cfg}, indent=2))
    for name in ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py"):
        (out / name).write_text(REMOTE_CODE)
    keys = sorted(weights)
    parts = [keys[i::shards] for i in range(shards)]
    if fmt == "safetensors":
        names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
        index = "model.safetensors.index.json"
    else:
        names = [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)]
        index = "pytorch_model.bin.index.json"
    if shards == 1:
        names = ["model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"]
    weight_map = {}
    for name, part in zip(names, parts, strict=True):
        tensors = {k: weights[k].contiguous() for k in part}
        if fmt == "safetensors":
            save_file(tensors, str(out / name))
        else:
            torch.save(tensors, out / name)
        weight_map.update(dict.fromkeys(part, name))
    if shards > 1:
        (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def load(path: Path, dtype: str = "fp32") -> Any:
    return ChatGLMBackend().load(BaseModelConfig(backend="chatglm", path=str(path), dtype=dtype))


def to_glm(
    weights: dict[str, torch.Tensor], cfg: dict[str, Any], interpolate: bool = False
) -> tuple[Any, dict[str, torch.Tensor]]:
    """transformers' GlmConfig and the same weights under GlmForCausalLM's names (FACTS.md).

    ``rope_ratio`` becomes ``rope_theta = 10000 * rope_ratio`` (ChatGLM3-6B-32k, GLM-4), or with
    ``interpolate`` transformers' linear RoPE scaling with ``factor = rope_ratio``, which divides
    the positions by it with the base left at 10000 (ChatGLM2-6B-32k).
    """
    from transformers import GlmConfig

    n, g, d = cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"]
    ratio = float(cfg.get("rope_ratio", 1.0))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0 * ratio, "partial_rotary_factor": 0.5}
    if interpolate:
        rope = {"rope_type": "linear", "factor": ratio, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    config = GlmConfig(
        vocab_size=cfg["padded_vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=n,
        num_key_value_heads=g,
        head_dim=d,
        rms_norm_eps=cfg["layernorm_epsilon"],  # GlmConfig's default differs
        rope_parameters=rope,
        attention_bias=True,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=2,
    )
    out = {
        "model.embed_tokens.weight": weights["transformer.embedding.word_embeddings.weight"],
        "model.norm.weight": weights["transformer.encoder.final_layernorm.weight"],
        "lm_head.weight": weights["transformer.output_layer.weight"],
    }
    renames = {
        "input_layernorm": "input_layernorm",
        "post_attention_layernorm": "post_attention_layernorm",
        "self_attention.dense": "self_attn.o_proj",
        "mlp.dense_h_to_4h": "mlp.gate_up_proj",
        "mlp.dense_4h_to_h": "mlp.down_proj",
    }
    for i in range(cfg["num_layers"]):
        src, dst = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        for old, new in renames.items():
            out[f"{dst}{new}.weight"] = weights[f"{src}{old}.weight"]
        for kind in ("weight", "bias"):
            q, k, v = weights[f"{src}self_attention.query_key_value.{kind}"].split([n * d, g * d, g * d])
            out[f"{dst}self_attn.q_proj.{kind}"], out[f"{dst}self_attn.k_proj.{kind}"] = q, k
            out[f"{dst}self_attn.v_proj.{kind}"] = v
    return config, out


def max_relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())
