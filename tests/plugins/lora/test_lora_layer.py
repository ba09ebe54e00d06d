"""The LoRA layer and adapter type, checked against plain tensor maths and PEFT's key layout."""

from __future__ import annotations

import torch
from torch import nn

from mlora_core.config.schema import AdapterConfig, BaseModelConfig
from mlora_core.plugin_api.routing import RowRouter, Segment
from mlora_lora.layer import LoraLinear


def test_each_segment_gets_its_own_update():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    router = RowRouter()
    layer = LoraLinear(base, router)
    layer.add_adapter("a", r=2, alpha=4, dropout=0.0)
    layer.add_adapter("b", r=3, alpha=3, dropout=0.0)
    for p in list(layer.lora_B.parameters()):
        nn.init.normal_(p)
    x = torch.randn(5, 4, 6)
    with router.route([Segment("a", 0, 2), Segment(None, 2, 3), Segment("b", 3, 5)]):
        y = layer(x)

    def expect(name, rows):
        a, b = layer.lora_a(name).weight, layer.lora_b(name).weight
        return base(x[rows]) + (x[rows] @ a.T @ b.T) * layer.scaling[name]

    torch.testing.assert_close(y[0:2], expect("a", slice(0, 2)))
    torch.testing.assert_close(y[2:3], base(x[2:3]))
    torch.testing.assert_close(y[3:5], expect("b", slice(3, 5)))
    assert layer.scaling == {"a": 2.0, "b": 1.0}


def test_new_adapter_is_identity_and_only_adapters_train(host, tiny_llama_dir):
    loaded = host.backends.create("llama").load(BaseModelConfig(path=str(tiny_llama_dir)))
    model = loaded.model
    ids = torch.randint(3, 300, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    router = RowRouter()
    adapter = host.adapters.create("lora").attach(
        model, "a", AdapterConfig(r=4, target_modules=["q_proj", "down_proj"]), router
    )
    model.eval()
    with torch.no_grad(), router.single("a", rows=2):
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter.parameters()}
    assert len(adapter.parameters()) == 2 * 2 * model.config.num_hidden_layers
    keys = adapter.state_dict()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, 4)
    adapter.detach()
    assert not any(p.requires_grad for p in model.parameters())
