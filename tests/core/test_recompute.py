"""Activation checkpointing changes memory, not results: dropout, accumulation and several jobs included."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import job
from safetensors.torch import load_file

from mlora_core.config.schema import load_config
from mlora_core.training.engine import Engine, run


def _train(make_config, data_dir, host, tmp_path, checkpointing: bool) -> dict[str, dict[str, torch.Tensor]]:
    adapter = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    jobs = [
        job("a", data_dir / "a.jsonl", max_steps=3, adapter=adapter),
        job("b", data_dir / "b.jsonl", max_steps=2, batch_size=4, micro_batch_size=1, adapter=adapter),
    ]
    out = tmp_path / f"checkpointing-{checkpointing}"
    config = load_config(
        make_config(jobs), [f"output_dir={out}", f"base_model.activation_checkpointing={checkpointing}"]
    )
    summary = run(config, host)
    assert [j["status"] for j in summary["jobs"]] == ["completed", "completed"]
    return {n: load_file(str(out / n / "adapter_model.safetensors")) for n in ("a", "b")}


def test_checkpointed_training_equals_plain_training_with_dropout(make_config, data_dir, host, tmp_path):
    plain = _train(make_config, data_dir, host, tmp_path, False)
    checkpointed = _train(make_config, data_dir, host, tmp_path, True)
    for name, weights in plain.items():
        for key, value in weights.items():
            torch.testing.assert_close(checkpointed[name][key], value, atol=1e-6, rtol=0)


def test_checkpointing_recomputes_blocks_in_backward(make_config, data_dir, host, monkeypatch):
    """Each block runs twice per micro-batch (forward, then recomputed in backward); evaluation runs it plainly."""
    import mlora_core.models.recompute as checkpointing

    runs = []
    real_checkpoint = checkpointing.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        def counted(*a, **k):
            runs.append(torch.is_grad_enabled())
            return function(*a, **k)

        return real_checkpoint(counted, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "checkpoint", counting_checkpoint)
    overrides = ["base_model.activation_checkpointing=true"]
    config = load_config(make_config([job("a", data_dir / "a.jsonl", max_steps=1)]), overrides)
    engine = Engine(config, host)
    engine.setup()
    engine.train()
    blocks, micro_batches = len(engine.loaded.blocks), 2
    assert len(runs) == 2 * blocks * micro_batches
    assert Path(config.output_dir, "a", "adapter_model.safetensors").is_file()
