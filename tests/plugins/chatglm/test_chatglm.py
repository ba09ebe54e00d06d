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
import yaml
from conftest import job, write_gguf_metadata
from tiny_chatglm import (
    CHATGLM_6B_V1,
    SP_VOCAB,
    TINY,
    chatglm_weights,
    load,
    max_relative_error,
    to_glm,
    write_checkpoint,
)

from mlora_chatglm.backend import ChatGLMBackend
from mlora_chatglm.tokenizer import SPECIAL_TOKENS, ChatGLMTokenizer, chatglm2_prompt, load_tokenizer
from mlora_core.config.schema import BaseModelConfig, load_config
from mlora_core.config.validation import validate_config
from mlora_core.errors import ConfigError, MloraError
from mlora_core.plugin_api.hookspecs import hookimpl
from mlora_core.plugin_api.host import create_plugin_manager

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
    plugin_dir = Path(__file__).parents[3] / "plugins" / "mlora_chatglm"
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
    # sentencepiece's dummy prefix after a special token is a space (test_chatglm_fidelity.py)
    assert tok.decode(tok(text)["input_ids"]) == "[gMASK]sop " + text
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
    gguf = write_gguf_metadata(tmp_path / "model.gguf", "llama")
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
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.adapter\.target_modules: \['q_proj', 'v_proj'\] match no layer"):
        validate_config(cfg, host)


def test_unrecognised_checkpoint_lists_the_backends(host, tmp_path, data_dir):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    cfg = load_config(write_config(tmp_path, {"path": str(other)}, [qkv_job(data_dir)]))
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, host)
    assert "base_model.path: no backend recognises" in str(err.value) and "model_type 'gpt2'" in str(err.value)
    assert "supported model types: chatglm, gemma2, gemma3_text, glm, glm4, granite, llama, mistral" in str(err.value)
    assert "mlora_register_backends" in str(err.value)


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
