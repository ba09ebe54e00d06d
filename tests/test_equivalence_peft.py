"""Concurrent training equals each adapter trained alone with PEFT.

Three jobs with different ranks, target modules, learning rates, batch sizes and dataset
sizes train together in one mlora run with gradient accumulation (micro-batches smaller
than the batch). Each job is then trained alone by an independent reference: transformers'
LlamaForCausalLM with a PEFT LoRA adapter, fed the job's *whole* optimizer batch at once,
with transformers' own token-mean loss, torch AdamW and transformers' linear warmup
schedule. mlora's accumulated micro-batches must reproduce the full-batch step.

Tolerance (fp32): max |mlora - peft| <= 1e-6 on every adapter weight after training (measured:
about 1e-8 on this machine, from summation order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import job
from mlora_core.batch import IGNORE_INDEX
from mlora_core.config import load_config
from mlora_core.engine import Engine

ATOL = 1e-6


def reference_train(model_dir: Path, jc, init_state: dict, samples: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Train one adapter alone with PEFT on full (unsplit) batches; returns PEFT's adapter state."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import LlamaForCausalLM, get_linear_schedule_with_warmup

    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    a = jc.adapter
    model = get_peft_model(
        base, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=list(a.target_modules))
    )
    result = set_peft_model_state_dict(model, init_state)
    assert not result.unexpected_keys
    t = jc.train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay)
    batches = [samples[i : i + t.batch_size] for i in range(0, len(samples), t.batch_size)][: t.max_steps]
    sched = get_linear_schedule_with_warmup(opt, t.warmup_steps, len(batches))
    model.train()
    for rows in batches:
        width = max(len(s) for s in rows)
        ids = torch.tensor([list(s.input_ids) + [pad_id] * (width - len(s)) for s in rows])
        labels = torch.tensor([list(s.labels) + [IGNORE_INDEX] * (width - len(s)) for s in rows])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # token mean over the batch
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
    return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}


def test_concurrent_training_matches_peft_alone(make_config, data_dir, tiny_llama_dir, host):
    jobs = [
        job(
            "a",
            data_dir / "a.jsonl",
            batch_size=6,
            micro_batch_size=2,
            lr=2e-3,
            warmup_steps=2,
            max_steps=5,
            adapter={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        ),
        job(
            "b",
            data_dir / "b.jsonl",
            batch_size=4,
            micro_batch_size=1,
            lr=5e-3,
            warmup_steps=0,
            max_steps=4,
            adapter={
                "type": "lora",
                "r": 8,
                "alpha": 32,
                "dropout": 0.0,
                "target_modules": ["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"],
            },
        ),
        job(
            "c",
            data_dir / "c.jsonl",
            batch_size=4,
            micro_batch_size=4,
            lr=1e-3,
            warmup_steps=1,
            max_steps=3,
            adapter={"type": "lora", "r": 2, "alpha": 2, "dropout": 0.0, "target_modules": ["up_proj", "v_proj"]},
        ),
    ]
    for j in jobs:
        j["train"].update(shuffle=False, weight_decay=0.01, max_grad_norm=1.0)
    config = load_config(make_config(jobs))
    engine = Engine(config, host)
    engine.setup()
    init = {j.name: j.adapter.state_dict() for j in engine.jobs}
    samples = {j.name: list(j.data.train) for j in engine.jobs}
    summary = engine.train()
    assert [j["status"] for j in summary["jobs"]] == ["completed"] * 3
    assert [j["steps"] for j in summary["jobs"]] == [5, 4, 3]

    for jc in config.jobs:
        ours = load_file(str(Path(config.output_dir) / jc.name / "adapter_model.safetensors"))
        theirs = reference_train(tiny_llama_dir, jc, init[jc.name], samples[jc.name], engine.pad_id)
        assert set(ours) == set(theirs)
        for key in ours:
            assert not torch.equal(ours[key], init[jc.name][key]), f"{jc.name}: {key} did not train"
            where = f"{jc.name} {key}"
            torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=lambda m, w=where: f"{w}: {m}")


@pytest.mark.parametrize("dtype", ["bf16"])
def test_bf16_base_keeps_fp32_adapters_and_optimizer(make_config, data_dir, host, dtype):
    config = load_config(make_config([job("a", data_dir / "a.jsonl", max_steps=2)]), [f"base_model.dtype={dtype}"])
    engine = Engine(config, host)
    engine.setup()
    params = engine.jobs[0].params
    assert all(p.dtype == torch.float32 for p in params)
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    opt = engine.jobs[0].optimizer
    summary = engine.train()
    assert summary["jobs"][0]["status"] == "completed"
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
