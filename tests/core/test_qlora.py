"""QLoRA: training over a bitsandbytes-quantized shared base, and the CPU repacking trap (FACTS.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, job
from peft_reference import reference_base
from safetensors.torch import load_file

from mlora_core.config.schema import AdapterConfig, BaseModelConfig, load_config
from mlora_core.config.validation import validate_config
from mlora_core.errors import ConfigError
from mlora_core.models.loading import load_base_model
from mlora_core.plugin_api.routing import RowRouter
from mlora_core.training.engine import Engine


@pytest.fixture(scope="module")
def odd_llama_dir(tmp_path_factory) -> Path:
    """Widths that are not multiples of 32 (the repacked CPU layout needs them to be)."""
    out = tmp_path_factory.mktemp("odd-llama")
    return build_tiny_llama(out, hidden_size=40, intermediate_size=72, num_attention_heads=4)


def _packed_base(model) -> dict[str, torch.Tensor]:
    """Every quantized weight as stored (packed bytes), plus the 4-bit scales."""
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is not None and weight.dtype in (torch.uint8, torch.int8):
            out[name] = weight.data.clone()
            if getattr(weight, "quant_state", None) is not None:
                out[name + ".absmax"] = weight.quant_state.absmax.clone()
    return out


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_eval_before_training_leaves_base_intact_and_adapters_learning(
    quantize, make_config, data_dir, odd_llama_dir, host
):
    jobs = [job(n, data_dir / f"{n}.jsonl", max_steps=4, lr=1e-2) for n in ("a", "b", "c")]
    for j in jobs:
        j["adapter"].update(type="qlora", target_modules=["q_proj", "v_proj", "down_proj"])
    config = load_config(make_config(jobs), [f"base_model.path={odd_llama_dir}", f"base_model.quantize={quantize}"])
    engine = Engine(config, host)
    engine.setup()
    packed = _packed_base(engine.model)
    assert len(packed) >= 14  # every linear but the head is quantized
    init = {j.name: j.adapter.state_dict() for j in engine.jobs}
    summary = engine.train()  # evaluates held-out loss (eval mode, no grad) before training

    for entry in summary["jobs"]:
        assert entry["status"] == "completed"
        assert entry["eval_loss_after"] < entry["eval_loss_before"]
        trained = load_file(str(Path(entry["adapter_dir"]) / "adapter_model.safetensors"))
        changed = [not torch.equal(trained[k], init[entry["name"]][k]) for k in trained]
        assert all(changed), f"{entry['name']}: some adapter weights got no gradient"
    after = _packed_base(engine.model)
    assert after.keys() == packed.keys()
    assert all(torch.equal(after[k], packed[k]) for k in packed), "the base's quantized weights changed"
    assert summary["base_model"]["quantize"] == quantize
    assert summary["base_model"]["resident_bytes"] > 0


def test_saved_qlora_adapter_loads_with_peft_on_the_quantized_base(make_config, data_dir, odd_llama_dir, host):
    from peft import PeftModel

    jobs = [job("a", data_dir / "a.jsonl", max_steps=3, lr=1e-2)]
    jobs[0]["adapter"].update(type="qlora", target_modules=["q_proj", "k_proj", "o_proj", "up_proj"])
    config = load_config(make_config(jobs), [f"base_model.path={odd_llama_dir}", "base_model.quantize=nf4"])
    summary = Engine(config, host).run()
    adapter_dir = summary["jobs"][0]["adapter_dir"]

    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    peft_model = PeftModel.from_pretrained(reference_base(odd_llama_dir, "nf4"), adapter_dir)
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits

    loaded = load_base_model(host, config.base_model)
    router = RowRouter()
    ours = host.adapters.create("lora").attach(loaded.model, "a", AdapterConfig(**_adapter_kwargs(config)), router)
    ours.load_state_dict(load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))
    loaded.model.eval()
    with torch.no_grad(), router.single("a", rows=2):
        mine = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def _adapter_kwargs(config) -> dict:
    a = config.jobs[0].adapter
    return {"r": a.r, "alpha": a.alpha, "dropout": a.dropout, "target_modules": list(a.target_modules)}


def test_repacking_is_off_so_training_after_an_eval_forward_still_gets_gradients(host, odd_llama_dir):
    loaded = load_base_model(host, BaseModelConfig(path=str(odd_llama_dir), quantize="nf4"))
    layers = [m for m in loaded.model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    router = RowRouter()
    config = AdapterConfig(r=2, target_modules=["q_proj"])
    adapter = host.adapters.create("lora").attach(loaded.model, "a", config, router)
    ids = torch.randint(3, 300, (2, 6))
    loaded.model.eval()
    with torch.no_grad(), router.single("a", rows=2):
        loaded.model(input_ids=ids)  # the kind of call that used to repack
    loaded.model.train()
    with router.single("a", rows=2):
        loaded.model(input_ids=ids).logits.sum().backward()
    # B starts at zero, so on this first backward only B gets a non-zero gradient.
    b_weights = [layer.lora_b("a").weight for layer in adapter.layers.values()]
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in b_weights)


def test_summary_reports_quantization_and_nf4_is_much_smaller(host, tiny_llama_dir):
    full = load_base_model(host, BaseModelConfig(path=str(tiny_llama_dir), dtype="bf16"))
    nf4 = load_base_model(host, BaseModelConfig(path=str(tiny_llama_dir), dtype="bf16", quantize="nf4"))
    assert full.info["quantize"] is None and nf4.info["quantize"] == "nf4"
    assert nf4.info["unquantized_layers"] == [] and nf4.info["quantized_layers"] == 14
    assert nf4.info["resident_bytes"] < full.info["resident_bytes"]


def test_qlora_job_over_an_unquantized_base_is_rejected(make_config, data_dir, host):
    jobs = [job("a", data_dir / "a.jsonl")]
    jobs[0]["adapter"]["type"] = "qlora"
    config = load_config(make_config(jobs))
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.adapter\.type: 'qlora' trains over a quantized base"):
        validate_config(config, host)
    with pytest.raises(ConfigError, match=r"base_model.quantize: 'int4' is not one of nf4, fp4, int8"):
        validate_config(load_config(make_config(jobs), ["base_model.quantize=int4"]), host)
