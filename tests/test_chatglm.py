"""The ``chatglm`` backend: exact forward, loading, no remote code, tokenizer, backend detection.

A tiny random ChatGLM2/3 checkpoint is written here in THUDM's layout and naming (several
query groups, QKV bias, partial interleaved rotary, ``rope_ratio`` 2). The reference for the
forward is transformers' ``GlmForCausalLM`` loaded with the same weights converted to its
names (FACTS.md, "GLM / ChatGLM"): an implementation independent of ours.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import yaml
from conftest import alpaca_records, job
from mlora_chatglm.backend import ChatGLMBackend
from mlora_chatglm.tokenizer import SPECIAL_TOKENS, ChatGLMTokenizer, chatglm2_prompt, load_tokenizer
from mlora_core.config import BaseModelConfig, load_config
from mlora_core.validation import validate_config
from mlora_core.errors import ConfigError, MloraError
from mlora_core.hookspecs import hookimpl
from mlora_core.plugins import create_plugin_manager

#: THUDM's config.json keys, at a tiny size.
TINY = {
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


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="session")
def tiny_chatglm_dir(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    """A tiny ChatGLM2/3 checkpoint: safetensors in two shards, sentencepiece tokenizer."""
    out = write_checkpoint(tmp_path_factory.mktemp("tiny-chatglm"), chatglm_weights(TINY), "safetensors")
    shutil.copy(sp_model, out / "tokenizer.model")
    return out


def load(path: Path, dtype: str = "fp32") -> Any:
    return ChatGLMBackend().load(BaseModelConfig(backend="chatglm", path=str(path), dtype=dtype))


def to_glm(weights: dict[str, torch.Tensor], cfg: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    """transformers' GlmConfig and the same weights under GlmForCausalLM's names (FACTS.md)."""
    from transformers import GlmConfig

    n, g, d = cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"]
    config = GlmConfig(
        vocab_size=cfg["padded_vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=n,
        num_key_value_heads=g,
        head_dim=d,
        rms_norm_eps=cfg["layernorm_epsilon"],  # GlmConfig's default differs
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * cfg["rope_ratio"],
            "partial_rotary_factor": 0.5,
        },
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


# --- the forward ---------------------------------------------------------------------


def test_forward_matches_transformers_glm(tiny_chatglm_dir):
    from transformers import GlmForCausalLM

    config, glm_weights = to_glm(chatglm_weights(TINY), TINY)
    reference = GlmForCausalLM(config).eval()
    reference.load_state_dict(glm_weights, strict=True)
    model = load(tiny_chatglm_dir).model.eval()

    torch.manual_seed(0)
    ids = torch.randint(3, 400, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # right padding, as the engine builds batches
    mask[2, 5:] = 0
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        ours_unmasked = model(input_ids=ids).logits
        ref = reference(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == (3, 17, TINY["padded_vocab_size"])
    real = mask.bool()
    assert max_relative_error(ours[real], ref[real]) < 1e-5
    assert max_relative_error(ours_unmasked[0], ref[0]) < 1e-5
    # the rotary base matters: rope_ratio 1 would give different logits
    assert max_relative_error(ours[0], reference_with_rope_ratio_1(ids[:1])[0]) > 1e-3


def reference_with_rope_ratio_1(ids: torch.Tensor) -> torch.Tensor:
    from transformers import GlmForCausalLM

    config, weights = to_glm(chatglm_weights(TINY), {**TINY, "rope_ratio": 1.0})
    model = GlmForCausalLM(config).eval()
    model.load_state_dict(weights)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_model_is_frozen_with_plain_linears(tiny_chatglm_dir):
    loaded = load(tiny_chatglm_dir)
    model = loaded.model
    assert not any(p.requires_grad for p in model.parameters())
    assert model.get_output_embeddings() is model.transformer.output_layer
    linears = {name for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert "transformer.encoder.layers.1.self_attention.query_key_value" in linears
    assert {n.rsplit(".", 1)[-1] for n in linears} == {*ChatGLMBackend.target_modules, "output_layer"}
    assert set(model.state_dict()) == set(chatglm_weights(TINY)) - {"transformer.rotary_pos_emb.inv_freq"}


# --- loading ----------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "shards"), [("bin", 2), ("bin", 1), ("safetensors", 1)])
def test_bin_and_safetensors_load_the_same_weights(tmp_path, tiny_chatglm_dir, sp_model, monkeypatch, fmt, shards):
    weights = chatglm_weights(TINY)
    out = write_checkpoint(tmp_path / "ckpt", weights, fmt, shards=shards)
    shutil.copy(sp_model, out / "tokenizer.model")
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    state = load(out).model.state_dict()
    reference = load(tiny_chatglm_dir).model.state_dict()
    assert set(state) == set(reference)
    assert all(torch.equal(state[k], reference[k]) for k in state)
    assert all(state[k].equal(weights[k]) for k in state)
    if fmt == "bin":
        assert len(calls) == shards and all(kw.get("weights_only") is True for kw in calls)
    else:
        assert calls == []


def test_bf16_load_casts_every_weight(tiny_chatglm_dir):
    model = load(tiny_chatglm_dir, dtype="bf16").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


class NotATensor:
    """Pickled into a .bin, this can only load if arbitrary objects are unpickled."""


def test_no_remote_code_runs(tmp_path, tiny_chatglm_dir):
    load(tiny_chatglm_dir)
    assert not list(tiny_chatglm_dir.glob("*.ran")), "a checkpoint .py file was executed"
    plugin_dir = Path(__file__).parent.parent / "plugins" / "mlora_chatglm"
    sources = "".join(p.read_text() for p in plugin_dir.glob("*.py"))
    assert "trust_remote_code" not in sources and "auto_map" not in sources
    # a .bin shard holding anything but tensors is refused (weights_only=True)
    out = write_checkpoint(tmp_path / "evil", chatglm_weights(TINY), "bin", shards=1)
    torch.save({"transformer.output_layer.weight": NotATensor()}, out / "pytorch_model.bin")
    shutil.copy(tiny_chatglm_dir / "tokenizer.model", out)
    with pytest.raises(MloraError, match="weights_only=True"):
        load(out)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_layers": 3}, "weights missing"),
        ({"kv_channels": 8}, "do not fit config.json"),
        ({"rmsnorm": False}, "rmsnorm=False"),
        ({"quantization_bit": 4}, "pre-quantized"),
    ],
)
def test_bad_checkpoints_fail_clearly(tmp_path, tiny_chatglm_dir, change, message):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_chatglm_dir, out)
    (out / "config.json").write_text(json.dumps({**TINY, **change}))
    with pytest.raises(MloraError, match=message):
        load(out)


def test_validation_checks_files_without_loading(tmp_path, tiny_chatglm_dir):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_chatglm_dir, out)
    backend = ChatGLMBackend()
    assert backend.validate(BaseModelConfig(backend="chatglm", path=str(out))) == []
    (out / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # a tiktoken file, as GLM-4 ships under this name
    [problem] = backend.validate(BaseModelConfig(backend="chatglm", path=str(out)))
    assert problem.startswith("path: ") and "is not a sentencepiece model" in problem
    for shard in out.glob("model-*.safetensors"):
        shard.unlink()
    [problem] = backend.validate(BaseModelConfig(backend="chatglm", path=str(out)))
    assert "names shards that are missing" in problem


# --- tokenizer --------------------------------------------------------------------------


def test_sentencepiece_tokenizer_matches_chatglm_rules(sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = ChatGLMTokenizer(str(sp_model))
    text = "Reverse the words.\n\n### Input:\napple river  你好"
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert plain == sp.encode(text)
    gmask, sop = tok.convert_tokens_to_ids(["[gMASK]", "sop"])
    assert (gmask, sop) == (SP_VOCAB + 1, SP_VOCAB + 3)
    assert [tok.get_command(t) for t in SPECIAL_TOKENS] == list(range(SP_VOCAB, SP_VOCAB + 9))
    assert tok(text)["input_ids"] == [gmask, sop, *plain]
    assert tok("apple", "river")["input_ids"] == [gmask, sop, *sp.encode("apple"), *sp.encode("river"), 2]
    assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (2, 0, SP_VOCAB + 9)
    assert tok.decode(tok(text)["input_ids"]) == "[gMASK]sop" + text
    # role markers written in text stay text unless asked for (THUDM's encode_special_tokens)
    user = tok.get_command("<|user|>")
    assert user not in tok("<|user|>\nhi", add_special_tokens=False)["input_ids"]
    marked = ChatGLMTokenizer(str(sp_model), encode_special_tokens=True)
    assert marked("<|user|>\nhi", add_special_tokens=False)["input_ids"] == [user, *sp.encode("\nhi")]


def test_chat_prompt_formats(sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = ChatGLMTokenizer(str(sp_model))
    cmd = tok.get_command
    history = [{"role": "system", "content": "Be brief."}]
    ids = tok.build_chat_input("apple?", history=history)
    expected = [cmd("[gMASK]"), cmd("sop"), cmd("<|system|>"), *sp.encode("\n"), *sp.encode("Be brief.")]
    expected += [cmd("<|user|>"), *sp.encode("\n"), *sp.encode("apple?"), cmd("<|assistant|>")]
    assert ids == expected
    assert chatglm2_prompt("b?", [("a?", "A")]) == "[Round 1]\n\n问：a?\n\n答：A\n\n[Round 2]\n\n问：b?\n\n答："


def test_tokenizer_json_is_preferred(tmp_path, tiny_chatglm_dir, tiny_llama_dir):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_chatglm_dir, out)
    shutil.copy(tiny_llama_dir / "tokenizer.json", out)
    # THUDM's tokenizer_config.json names their remote class; it must not matter
    config = {
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(out, TINY)
    assert tok.is_fast and tok.eos_token_id == 2 and tok.pad_token_id == 0
    assert not list(out.glob("*.ran"))


# --- backend detection ------------------------------------------------------------------


def detect(host, path: Path) -> str | None:
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
    return host.detect_backend(path, config)


class ClaimsLlamaDirs:
    """A third-party plugin that claims LLaMA checkpoints for another backend."""

    @staticmethod
    @hookimpl
    def mlora_detect_backend(config):
        return "my_llama" if config and config.get("model_type") == "llama" else None


def test_third_party_detection_is_asked_first(tiny_llama_dir, tiny_chatglm_dir):
    host = create_plugin_manager(autoload=False, extra=[ClaimsLlamaDirs])
    assert detect(host, tiny_llama_dir) == "my_llama"
    assert detect(host, tiny_chatglm_dir) == "chatglm"  # None from the plugin: the built-ins answer


def test_detection_of_each_family(host, tmp_path, tiny_llama_dir, tiny_chatglm_dir):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    glm = tmp_path / "glm"
    glm.mkdir()
    (glm / "config.json").write_text(json.dumps({"model_type": "glm4"}))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert detect(host, tiny_llama_dir) == "llama"
    assert detect(host, gguf) == "llama"
    assert detect(host, tiny_chatglm_dir) == "chatglm"
    assert detect(host, glm) == "glm"
    assert detect(host, other) is None
    assert detect(host, tmp_path) is None


def write_config(tmp_path: Path, base_model: dict[str, Any], jobs: list[dict[str, Any]]) -> Path:
    """A YAML run config over ``base_model`` (no monitors)."""
    cfg = {"base_model": base_model, "monitor": {"console": None}, "output_dir": str(tmp_path / "out"), "jobs": jobs}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def qkv_job(data_dir: Path, **train: Any) -> dict[str, Any]:
    return job(
        "a", data_dir / "a.jsonl", adapter={"type": "lora", "r": 2, "target_modules": ["query_key_value"]}, **train
    )


def test_validation_resolves_the_backend(host, tmp_path, data_dir, tiny_chatglm_dir, tiny_llama_dir):
    cfg = load_config(write_config(tmp_path, {"path": str(tiny_chatglm_dir)}, [qkv_job(data_dir)]))
    assert cfg.base_model.backend is None
    validate_config(cfg, host)
    assert cfg.base_model.backend == "chatglm"
    llama = job("b", data_dir / "b.jsonl")  # targets q_proj, v_proj
    cfg = load_config(write_config(tmp_path, {"path": str(tiny_llama_dir)}, [llama]))
    validate_config(cfg, host)
    assert cfg.base_model.backend == "llama"
    # chatglm's target names are checked against the detected backend, before loading
    cfg = load_config(write_config(tmp_path, {"path": str(tiny_chatglm_dir)}, [llama]))
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.adapter\.target_modules: unknown \['q_proj', 'v_proj'\]"):
        validate_config(cfg, host)


def test_unrecognised_checkpoint_lists_the_backends(host, tmp_path, data_dir):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    cfg = load_config(write_config(tmp_path, {"path": str(other)}, [qkv_job(data_dir)]))
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, host)
    assert "base_model.backend: not set, and no plugin recognises" in str(err.value)
    assert "model_type 'gpt2'" in str(err.value) and "chatglm, glm, llama" in str(err.value)


def test_chatglm_v1_is_rejected_clearly(host, tmp_path, data_dir, tiny_chatglm_dir):
    v1 = tmp_path / "chatglm-6b"
    shutil.copytree(tiny_chatglm_dir, v1)
    (v1 / "config.json").write_text(json.dumps(CHATGLM_6B_V1))
    for backend in (None, "chatglm"):
        cfg = load_config(write_config(tmp_path, {"path": str(v1), "backend": backend}, [qkv_job(data_dir)]))
        with pytest.raises(ConfigError, match=r"ChatGLM-6B \(first version\) checkpoint, which is not supported"):
            validate_config(cfg, host)
    with pytest.raises(MloraError, match="not supported"):
        load(v1)
