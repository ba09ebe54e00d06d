"""Saved adapters load with PEFT and give the same logits as mlora's own forward."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import job
from safetensors.torch import load_file

from mlora_core.config.schema import AdapterConfig, BaseModelConfig, load_config
from mlora_core.plugin_api.routing import RowRouter
from mlora_core.training.engine import run

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_saved_adapter_loads_in_peft_with_equal_logits(make_config, data_dir, tiny_llama_dir, host):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    adapter = {"type": "lora", "r": 4, "alpha": 16, "dropout": 0.1, "target_modules": TARGETS}
    config = load_config(make_config([job("a", data_dir / "a.jsonl", max_steps=3, lr=1e-2, adapter=adapter)]))
    summary = run(config, host)
    adapter_dir = Path(summary["jobs"][0]["adapter_dir"])
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 16 and sorted(saved["target_modules"]) == sorted(TARGETS)

    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama_dir), adapter_dir).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
        bare = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base_logits = bare(input_ids=ids).logits

    loaded = host.backends.create("llama").load(BaseModelConfig(path=str(tiny_llama_dir)))
    router = RowRouter()
    ours_adapter = host.adapters.create("lora").attach(
        loaded.model, "a", AdapterConfig(r=4, alpha=16, dropout=0.1, target_modules=TARGETS), router
    )
    ours_adapter.load_state_dict(load_file(str(adapter_dir / "adapter_model.safetensors")))
    loaded.model.eval()
    with torch.no_grad(), router.single("a", rows=2):
        ours = loaded.model(input_ids=ids).logits

    assert not torch.allclose(theirs, base_logits, atol=1e-4)  # the adapter really changes the output
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
