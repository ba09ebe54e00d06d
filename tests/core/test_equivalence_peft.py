"""Concurrent training equals each adapter trained alone with PEFT.

Three jobs with different ranks, target modules, learning rates, batch sizes and dataset
sizes train together in one mlora run with gradient accumulation (micro-batches smaller
than the batch). Each job is then trained alone by an independent reference: transformers'
LlamaForCausalLM with a PEFT LoRA adapter, fed the job's *whole* optimizer batch at once,
with transformers' own token-mean loss, torch AdamW and transformers' linear warmup
schedule. mlora's accumulated micro-batches must reproduce the full-batch step.

The same holds over a quantized shared base (nf4, fp4, int8): mlora quantizes the base
itself; the reference base is quantized by transformers' own bitsandbytes path and trained
with PEFT's QLoRA layers.

Tolerance (fp32 compute): max |mlora - peft| <= 1e-6 on every adapter weight after training
(measured on this machine: 7e-9 unquantized, 3e-8 nf4, 1.5e-8 fp4 and int8).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAMILY_SETTINGS, family_targets, job
from peft_reference import reference_base, train_alone_with_peft
from safetensors.torch import load_file

from mlora_core.config.schema import load_config
from mlora_core.training.engine import Engine

ATOL = 1e-6
#: Quantized families: ||mlora - peft|| / ||peft|| per weight matrix.
QUANTIZED_RTOL = 1e-5


def reference_train(
    model_dir: Path, jc, init_state: dict, samples: list, pad_id: int, quantize: str | None = None
) -> dict[str, torch.Tensor]:
    """Train one adapter alone with PEFT on full (unsplit) batches; returns PEFT's adapter state."""
    return train_alone_with_peft(reference_base(model_dir, quantize), jc, init_state, samples, pad_id)


def three_jobs(data_dir: Path) -> list[dict]:
    """Three jobs that differ in rank, targets, learning rate, batch and micro-batch sizes and steps."""
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
    return jobs


@pytest.mark.parametrize(
    ("quantize", "checkpointing", "packing"),
    [
        (None, False, False),
        ("nf4", False, False),
        ("fp4", False, False),
        ("int8", False, False),
        (None, True, False),
        ("nf4", True, False),
        (None, False, True),
        (None, True, True),
    ],
)
def test_concurrent_training_matches_peft_alone(
    make_config, data_dir, tiny_llama_dir, wide_llama_dir, host, quantize, checkpointing, packing
):
    """Also with activation checkpointing (the recomputed blocks must route the same rows) and
    packed steps (several jobs' samples share rows; on the wider model, whose rows then hold
    several samples). Packed steps over quantized bases are compared with padded ones in
    test_packing.py: on the wider model even padded quantized training differs from PEFT by
    up to 1.02e-6 (nf4) and 6.7e-6 (int8), beyond ATOL, the same with and without packing."""
    jobs = three_jobs(data_dir)
    for j in jobs:
        if quantize:
            j["adapter"]["type"] = "qlora"
    model_dir = wide_llama_dir if packing else tiny_llama_dir
    overrides = [
        f"base_model.quantize={quantize or 'null'}",
        f"base_model.activation_checkpointing={checkpointing}",
        f"base_model.path={model_dir}",
        f"scheduler.packing={packing}",
    ]
    config = load_config(make_config(jobs), overrides)
    engine = Engine(config, host)
    engine.setup()
    init = {j.name: j.adapter.state_dict() for j in engine.jobs}
    samples = {j.name: list(j.data.train) for j in engine.jobs}
    summary = engine.train()
    assert [j["status"] for j in summary["jobs"]] == ["completed"] * 3
    assert [j["steps"] for j in summary["jobs"]] == [5, 4, 3]

    for jc in config.jobs:
        ours = load_file(str(Path(config.output_dir) / jc.name / "adapter_model.safetensors"))
        theirs = reference_train(model_dir, jc, init[jc.name], samples[jc.name], engine.pad_id, quantize)
        assert set(ours) == set(theirs)
        for key in ours:
            assert not torch.equal(ours[key], init[jc.name][key]), f"{jc.name}: {key} did not train"
            where = f"{jc.name} {key}"
            torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=lambda m, w=where: f"{w}: {m}")


@pytest.mark.parametrize(
    ("quantize", "packing", "checkpointing"),
    [(None, False, False), (None, True, False), (None, False, True), ("nf4", False, False)],
    ids=["padded", "packed", "recompute", "nf4"],
)
@pytest.mark.parametrize("model_type", [t for t in FAMILY_SETTINGS if t != "llama"])
def test_every_decoder_family_trains_like_peft_alone(
    make_config, data_dir, tiny_decoder, host, model_type, quantize, packing, checkpointing
):
    """Two concurrent jobs over each family's tiny checkpoint, its backend detected from
    config.json: job a with the family's default targets (none named), job b with attention
    and MLP layers under the family's own names. Each adapter equals PEFT training it alone
    over transformers' own class for the family, and PEFT loads the saved adapter unchanged.
    Packed: on the family's wider checkpoint, whose packed rows hold several samples.
    Recompute: with activation checkpointing of the family's decoder blocks. nf4:
    mlora's quantization against transformers' bitsandbytes path (QLoRA).

    Unquantized runs are made in float64 on both sides: in fp32 single elements of some
    families' adapters end 1-2e-6 apart (Adam turns the rounding of near-zero gradients into
    steps of about lr), so float64 is what shows both compute the same thing. nf4 runs stay
    fp32 (bitsandbytes computes in it) and are compared per weight matrix, relative to its norm;
    so is Gemma 2, whose eager attention in transformers gives NaN on padded float64 rows.
    """
    from peft import PeftModel, get_peft_model_state_dict

    from mlora_decoders.families import family_of_model_type

    family = family_of_model_type(model_type)
    assert family is not None
    model_dir = tiny_decoder(model_type, wide=packing)
    jobs = three_jobs(data_dir)[:2]
    del jobs[0]["adapter"]["target_modules"]
    jobs[1]["adapter"]["target_modules"] = family_targets(model_type, jobs[1]["adapter"]["target_modules"])
    for j in jobs:
        j["adapter"]["type"] = "qlora" if quantize else "lora"
    base = {"backend": None, "path": str(model_dir), "quantize": quantize, "activation_checkpointing": checkpointing}
    config = load_config(make_config(jobs, base_model=base, scheduler={"packing": packing}))
    engine = Engine(config, host)
    engine.setup()
    assert config.base_model.backend == family.backend
    assert config.jobs[0].adapter.target_modules == list(family.default_targets)
    float64 = quantize is None and model_type != "gemma2"
    if float64:  # base and adapters (the same Parameter objects the optimizers hold)
        engine.model.double()
    init = {j.name: j.adapter.state_dict() for j in engine.jobs}
    samples = {j.name: list(j.data.train) for j in engine.jobs}
    summary = engine.train()
    assert [j["status"] for j in summary["jobs"]] == ["completed"] * 2, summary["jobs"]
    if packing:
        assert summary["padding_fraction"] < 0.2

    for jc in config.jobs:
        saved = Path(config.output_dir) / jc.name
        ours = load_file(str(saved / "adapter_model.safetensors"))
        reference = reference_base(model_dir, quantize)
        reference = reference.double() if float64 else reference
        theirs = train_alone_with_peft(reference, jc, init[jc.name], samples[jc.name], engine.pad_id)
        assert set(ours) == set(theirs)
        for key in ours:
            assert not torch.equal(ours[key], init[jc.name][key].float()), f"{jc.name}: {key} did not train"
            relative = ((ours[key] - theirs[key].float()).norm() / theirs[key].norm()).item()
            assert relative <= (1e-7 if float64 else QUANTIZED_RTOL), (
                f"{jc.name} {key}: relative difference {relative:.2e}"
            )
        loaded = get_peft_model_state_dict(PeftModel.from_pretrained(reference_base(model_dir, None), str(saved)))
        assert set(loaded) == set(ours) and all(torch.equal(loaded[k], ours[k]) for k in ours)


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


@pytest.mark.gpu
def test_concurrent_training_on_cuda_matches_peft_alone_on_cuda(make_config, data_dir, tiny_llama_dir, host):
    """The same invariant on a GPU: mlora on CUDA against PEFT on CUDA (fp32, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    config = load_config(make_config(three_jobs(data_dir)), ["base_model.device=cuda"])
    engine = Engine(config, host)
    engine.setup()
    init = {j.name: j.adapter.state_dict() for j in engine.jobs}
    samples = {j.name: list(j.data.train) for j in engine.jobs}
    summary = engine.train()
    assert [j["status"] for j in summary["jobs"]] == ["completed"] * 3
    for jc in config.jobs:
        ours = load_file(str(Path(config.output_dir) / jc.name / "adapter_model.safetensors"))
        base = reference_base(tiny_llama_dir, None).to("cuda")
        theirs = train_alone_with_peft(base, jc, init[jc.name], samples[jc.name], engine.pad_id)
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
