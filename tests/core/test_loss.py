"""Logits only at learned positions: same loss and gradients as full logits, fewer head rows."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mlora_core.config.schema import AdapterConfig, BaseModelConfig
from mlora_core.models.loading import load_base_model
from mlora_core.models.transformers_split import LogitsHead
from mlora_core.plugin_api.protocols import Sample
from mlora_core.plugin_api.routing import RowRouter
from mlora_core.training.batch import build_batch
from mlora_core.training.loss import ChunkedLinearCrossEntropy, learned_token_losses, per_job_loss_sums


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
        losses = learned_token_losses(loaded, batch)
    (loss_sum, n) = per_job_loss_sums(batch, losses)["a"]
    loss_sum.backward()
    return loss_sum.item(), n, [p.grad.clone() for p in adapter.parameters()], losses.shape[0]


def _model_with_active_adapter(host, model_dir):
    """The model, its router and LoRA adapter ``a`` on q_proj and v_proj with random (non-zero) weights."""
    loaded = load_base_model(host, BaseModelConfig(path=str(model_dir)))  # the backend detected
    router = RowRouter()
    torch.manual_seed(0)
    adapter = host.adapters.create("lora").attach(
        loaded.model, "a", AdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), router
    )
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.1)
    return loaded, router, adapter


def test_split_head_equals_full_logits_and_runs_on_learned_positions_only(host, tiny_llama_dir):
    loaded, router, adapter = _model_with_active_adapter(host, tiny_llama_dir)
    assert loaded.hidden_states is not None and loaded.lm_head is not None
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    ("divisor", "softcap"),
    [(1.0, None), (1.0, 3.0), (4.0, None), (2.0, 5.0)],
    ids=["plain", "gemma", "granite", "both"],
)
def test_chunked_head_equals_materialised_logits(dtype, bias, divisor, softcap):
    """Losses and the gradient reaching the hidden states equal cross_entropy over full logits,
    also through a :class:`LogitsHead`'s scaling and soft-capping (autograd's chain rule)."""
    g = torch.Generator().manual_seed(0)
    n, hidden, vocab = 300, 48, 9000  # 300 positions: two full chunks of 128 and a partial one
    head = torch.nn.Linear(hidden, vocab, bias=bias).to(dtype).requires_grad_(False)
    h0 = torch.randn(n, hidden, generator=g).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    upstream = torch.rand(n, generator=g)  # per-position weights, as a per-job loss scale gives

    transformed = LogitsHead(head, divisor, softcap)
    h_ref = h0.clone().requires_grad_()
    ref = F.cross_entropy(transformed(h_ref).float(), targets, reduction="none")
    (ref * upstream).sum().backward()
    h = h0.clone().requires_grad_()
    transform = None if divisor == 1.0 and softcap is None else transformed
    ours = ChunkedLinearCrossEntropy.apply(h, head.weight, head.bias, targets, 128, transform)
    (ours * upstream).sum().backward()

    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    assert ours.dtype == torch.float32 and ours.shape == (n,)
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(h.grad, h_ref.grad, **tol)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "granite"])
def test_large_vocabulary_head_runs_chunked_in_training(host, tmp_path, model_type):
    """A frozen head over >= CHUNKED_MIN_VOCAB tokens is never called on the whole step (no (N, V)
    logits), and the loss and adapter gradients equal the materialised path's (transformers'
    own forward). Gemma 2 soft-caps its logits and Granite scales them: the chunks do too."""
    from conftest import build_tiny_decoder

    from mlora_core.training import loss as loss_module

    model_dir = build_tiny_decoder(tmp_path / "big-vocab", model_type, vocab_size=loss_module.CHUNKED_MIN_VOCAB)
    loaded, router, adapter = _model_with_active_adapter(host, model_dir)
    samples = _samples(0, 400) * 12  # 132 learned positions: more than one chunk
    batch = build_batch([("a", samples)], pad_id=0)
    calls = []
    hook = loaded.lm_head.register_forward_hook(lambda m, args, out: calls.append(1))
    chunked = _loss_and_grads(loaded, router, adapter, batch)
    hook.remove()
    full = _loss_and_grads(dataclasses.replace(loaded, hidden_states=None, lm_head=None), router, adapter, batch)
    assert calls == []  # the head module never ran: its weight was used chunk by chunk
    assert chunked[1] == full[1] == 132
    assert abs(chunked[0] - full[0]) < 1e-4 * abs(full[0])
    for g_chunked, g_full in zip(chunked[2], full[2], strict=True):
        torch.testing.assert_close(g_chunked, g_full, atol=1e-6, rtol=1e-5)
