"""Training over ChatGLM-family bases: concurrent equals alone (PEFT), PEFT adapter keys, GLM-4, QLoRA.

The equivalence test follows tests/test_equivalence_peft.py: three jobs (one with a LoRA on
the fused ``query_key_value``) train together in one mlora run with gradient accumulation;
each is then trained alone by PEFT over a fresh load of the same checkpoint, from the same
initial adapter weights, on full batches with torch AdamW and transformers' linear warmup
schedule. Tolerance (fp32): max |mlora - peft| <= 1e-6 on every adapter weight.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import job
from peft_reference import train_alone_with_peft
from safetensors.torch import load_file
from test_chatglm import write_config
from tiny_chatglm import TINY, chatglm_weights, train_sentencepiece, write_checkpoint

from mlora_chatglm.backend import ChatGLMBackend
from mlora_core.config.schema import BaseModelConfig, load_config
from mlora_core.plugin_api.conventions import IGNORE_INDEX
from mlora_core.training.engine import Engine

ATOL = 1e-6


@pytest.fixture(scope="module")
def chatglm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = write_checkpoint(tmp_path_factory.mktemp("chatglm-train"), chatglm_weights(TINY, seed=1), "bin")
    train_sentencepiece(out)
    return out


def lora(r: int, alpha: float, *targets: str) -> dict[str, Any]:
    return {"type": "lora", "r": r, "alpha": alpha, "dropout": 0.0, "target_modules": list(targets)}


def _chatglm_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean next-token loss over the batch (the native model takes no labels)."""
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def peft_reference(model_dir: Path, jc: Any, init_state: dict, samples: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Train one adapter alone with PEFT over a fresh load, on full batches; returns PEFT's state."""
    base = ChatGLMBackend().load(BaseModelConfig(backend="chatglm", path=str(model_dir))).model
    return train_alone_with_peft(base, jc, init_state, samples, pad_id, _chatglm_loss)


@pytest.mark.parametrize(("checkpointing", "packing"), [(False, False), (True, False), (False, True)])
def test_concurrent_training_matches_peft_alone(host, tmp_path, data_dir, chatglm_dir, checkpointing, packing):
    """Also with activation checkpointing of the native model's blocks, and with packed steps
    (rows as long as the tokens allow: the test counts attention as free, so rows hold several
    samples even on this narrow model)."""
    jobs = [
        job("qkv", data_dir / "a.jsonl", batch_size=6, micro_batch_size=2, lr=2e-3, warmup_steps=2, max_steps=4,
            adapter=lora(4, 8, "query_key_value")),
        job("all", data_dir / "b.jsonl", batch_size=4, micro_batch_size=1, lr=5e-3, max_steps=3,
            adapter=lora(8, 32, "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
        job("mlp", data_dir / "c.jsonl", batch_size=4, micro_batch_size=4, lr=1e-3, warmup_steps=1, max_steps=3,
            adapter=lora(2, 2, "dense_4h_to_h", "dense")),
    ]  # fmt: skip
    for j in jobs:
        j["train"].update(shuffle=False, weight_decay=0.01, max_grad_norm=1.0)
    base = {"path": str(chatglm_dir), "activation_checkpointing": checkpointing}
    config = load_config(write_config(tmp_path, base, jobs), [f"scheduler.packing={packing}"])  # backend detected
    engine = Engine(config, host)
    assert config.base_model.backend == "chatglm"
    engine.setup()
    engine.budget = dataclasses.replace(engine.budget, attention_parity=None)
    init = {j.name: j.adapter.state_dict() for j in engine.jobs}
    samples = {j.name: list(j.data.train) for j in engine.jobs}
    summary = engine.train()
    assert [j["status"] for j in summary["jobs"]] == ["completed"] * 3
    assert [j["steps"] for j in summary["jobs"]] == [4, 3, 3]
    if packing:
        assert summary["padding_fraction"] < 0.05

    for jc in config.jobs:
        out = Path(config.output_dir) / jc.name
        ours = load_file(str(out / "adapter_model.safetensors"))
        theirs = peft_reference(chatglm_dir, jc, init[jc.name], samples[jc.name], engine.pad_id)
        assert set(ours) == set(theirs)  # the keys PEFT produces for this model
        for key in ours:
            assert not torch.equal(ours[key], init[jc.name][key]), f"{jc.name}: {key} did not train"
            torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
        assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == sorted(
            jc.adapter.target_modules
        )
    qkv = load_file(str(Path(config.output_dir) / "qkv" / "adapter_model.safetensors"))
    assert "base_model.model.transformer.encoder.layers.1.self_attention.query_key_value.lora_B.weight" in qkv
    assert qkv["base_model.model.transformer.encoder.layers.1.self_attention.query_key_value.lora_B.weight"].shape == (
        (TINY["num_attention_heads"] + 2 * TINY["multi_query_group_num"]) * TINY["kv_channels"],
        4,
    )


@pytest.mark.parametrize("model_type", ["glm", "glm4"])
def test_glm4_transformers_checkpoint_trains(host, tmp_path, data_dir, tiny_llama_dir, model_type):
    import transformers

    from mlora_chatglm.glm import GLM_CLASSES

    out = tmp_path / model_type
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, out)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(out))
    config_class = transformers.GlmConfig if model_type == "glm" else transformers.Glm4Config
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    getattr(transformers, GLM_CLASSES[model_type])(config).save_pretrained(out)
    jobs = [
        job("attn", data_dir / "a.jsonl", max_steps=2, adapter=lora(4, 8, "q_proj", "v_proj")),
        job("mlp", data_dir / "b.jsonl", max_steps=2, adapter=lora(2, 4, "gate_up_proj", "down_proj")),
    ]
    saved = {}
    for packing in (False, True):  # packed rows (attention counted free, so rows hold several samples)
        overrides = [f"scheduler.packing={packing}", f"output_dir={tmp_path / f'out-{packing}'}"]
        run = load_config(write_config(tmp_path, {"path": str(out)}, jobs), overrides)
        engine = Engine(run, host)
        engine.setup()
        engine.budget = dataclasses.replace(engine.budget, attention_parity=None)
        summary = engine.train()
        assert run.base_model.backend == "glm"
        assert [j["status"] for j in summary["jobs"]] == ["completed", "completed"]
        assert (summary["padding_fraction"] < 0.05) == packing
        saved[packing] = load_file(str(Path(run.output_dir) / "attn" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in saved[False]
    for key, value in saved[False].items():
        assert ((saved[True][key] - value).norm() / value.norm()).item() <= 1e-5, key


def test_lora_and_qlora_jobs_over_a_quantized_chatglm(host, tmp_path, data_dir, chatglm_dir):
    pytest.importorskip("bitsandbytes")
    jobs = [
        job("lora", data_dir / "a.jsonl", max_steps=2, adapter=lora(4, 8, "query_key_value")),
        job("qlora", data_dir / "b.jsonl", max_steps=2, adapter={**lora(2, 4, "dense_h_to_4h"), "type": "qlora"}),
    ]
    run = load_config(write_config(tmp_path, {"path": str(chatglm_dir), "quantize": "nf4"}, jobs))
    engine = Engine(run, host)
    engine.setup()
    init = {j.name: j.adapter.state_dict() for j in engine.jobs}
    import bitsandbytes as bnb

    quantized = [name for name, m in engine.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 4 * TINY["num_layers"]  # every projection, not the output layer
    assert type(engine.model.get_output_embeddings()) is torch.nn.Linear
    summary = engine.train()
    assert [j["status"] for j in summary["jobs"]] == ["completed", "completed"]
    for name, state in init.items():
        saved = load_file(str(Path(run.output_dir) / name / "adapter_model.safetensors"))
        assert set(saved) == set(state) and any(not torch.equal(saved[k], state[k]) for k in saved)


def test_generated_ids_the_tokenizer_cannot_decode_are_wrong_answers(host, tmp_path, data_dir):
    """ChatGLM pads its vocabulary past its tokenizer's; a greedy answer of such ids decodes as
    nothing, a wrong answer, not a crash of the run (it used to take every job down at evaluation)."""
    weights = chatglm_weights(TINY, seed=1)
    head = weights["transformer.output_layer.weight"]  # (padded vocab, hidden)
    direction = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0))
    head.zero_()
    head[500], head[501] = direction, -direction  # every greedy token is 500 or 501, past the tokenizer
    out = write_checkpoint(tmp_path / "padded", weights, "safetensors")
    train_sentencepiece(out)
    from mlora_chatglm.tokenizer import load_tokenizer

    assert len(load_tokenizer(out, json.loads((out / "config.json").read_text()))) < 500
    jobs = [
        job(name, data_dir / "a.jsonl", max_steps=2, data_opts={"exact_match": True}, adapter=lora(2, 4, "dense"))
        for name in ("one", "two")
    ]
    summary = Engine(load_config(write_config(tmp_path, {"path": str(out)}, jobs)), host).run()
    for entry in summary["jobs"]:
        assert entry["status"] == "completed", entry
        assert entry["accuracy_before"] == 0.0 and entry["accuracy_after"] == 0.0
