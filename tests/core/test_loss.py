"""Logits only at learned positions: same loss and gradients as full logits, fewer head rows."""

from __future__ import annotations

import dataclasses

import torch

from mlora_core.config.schema import AdapterConfig, BaseModelConfig
from mlora_core.plugin_api.protocols import Sample
from mlora_core.plugin_api.routing import RowRouter
from mlora_core.training.batch import build_batch
from mlora_core.training.loss import learned_logits, per_job_loss_sums


def _samples(seed: int, vocab: int) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for length, prompt in ((14, 9), (9, 3), (5, 5)):  # the last row learns nothing
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append(Sample(tuple(ids), tuple([-100] * prompt + ids[prompt:])))
    return out


def _loss_and_grads(loaded, router, adapter, batch):
    for p in adapter.parameters():
        p.grad = None
    with router.route(batch.segments):
        logits = learned_logits(loaded, batch)
    (loss_sum, n) = per_job_loss_sums(batch, logits)["a"]
    loss_sum.backward()
    return loss_sum.item(), n, [p.grad.clone() for p in adapter.parameters()], logits.shape[0]


def test_split_head_equals_full_logits_and_runs_on_learned_positions_only(host, tiny_llama_dir):
    loaded = host.backends.create("llama").load(BaseModelConfig(path=str(tiny_llama_dir)))
    assert loaded.hidden_states is not None and loaded.lm_head is not None
    router = RowRouter()
    torch.manual_seed(0)
    adapter = host.adapters.create("lora").attach(
        loaded.model, "a", AdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), router
    )
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.1)
    batch = build_batch([("a", _samples(0, loaded.model.config.vocab_size))], pad_id=0)

    head_rows = []
    hook = loaded.lm_head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[:-1].numel()))
    split = _loss_and_grads(loaded, router, adapter, batch)
    full = _loss_and_grads(dataclasses.replace(loaded, hidden_states=None, lm_head=None), router, adapter, batch)
    hook.remove()

    learned = (14 - 9) + (9 - 3)
    assert split[1] == full[1] == learned
    assert head_rows[0] == learned  # the split path: the head saw the learned positions only
    assert head_rows[1] == batch.input_ids.numel()  # the full path: every position
    # Independent reference: transformers' own loss over the same rows (token mean).
    with router.route(batch.segments):
        reference = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    assert abs(split[0] / learned - reference.loss.item()) < 1e-5
    assert abs(split[0] - full[0]) < 1e-5
    for g_split, g_full in zip(split[2], full[2], strict=True):
        torch.testing.assert_close(g_split, g_full, atol=1e-6, rtol=1e-5)
