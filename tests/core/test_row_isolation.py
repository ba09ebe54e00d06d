"""Row isolation: one job's rows never change another job's loss or gradients.

Both layouts: padded (one sample a row) and packed (samples of several jobs share rows).
"""

from __future__ import annotations

import pytest
import torch

from mlora_core.config.schema import AdapterConfig, BaseModelConfig
from mlora_core.plugin_api.protocols import Sample
from mlora_core.plugin_api.routing import RowRouter
from mlora_core.training.batch import build_batch, build_packed_batch
from mlora_core.training.loss import learned_token_losses, per_job_loss_sums


def _setup(host, tiny_llama_dir):
    loaded = host.backends.create("llama").load(BaseModelConfig(path=str(tiny_llama_dir)))
    router = RowRouter()
    lora = host.adapters.create("lora")
    adapters = {}
    for i, (name, targets) in enumerate(
        [("a", ["q_proj", "v_proj"]), ("b", ["q_proj", "down_proj"]), ("c", ["v_proj"])]
    ):
        torch.manual_seed(i)
        adapters[name] = lora.attach(
            loaded.model, name, AdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=targets), router
        )
        with torch.no_grad():  # B starts at zero; make every adapter active
            for p in adapters[name].parameters():
                p.normal_(0, 0.1)
    return loaded, router, adapters


def _rows(seed: int, n: int, length: int, vocab: int) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append(Sample(tuple(ids), tuple([-100] * 3 + ids[3:])))
    return out


def _losses_and_grads(loaded, router, adapters, parts, packed=False):
    for adapter in adapters.values():
        for p in adapter.parameters():
            p.grad = None
    batch = build_packed_batch(parts, pad_id=0) if packed else build_batch(parts, pad_id=0)
    with router.route(batch.segments, by_tokens=batch.packed):
        losses = learned_token_losses(loaded, batch)
    sums = per_job_loss_sums(batch, losses)
    torch.stack([s / n for s, n in sums.values()]).sum().backward()
    losses = {k: (s / n).item() for k, (s, n) in sums.items()}
    grads = {
        k: [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in a.parameters()]
        for k, a in adapters.items()
    }
    return losses, grads


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_changing_one_jobs_rows_changes_no_other_job(host, tiny_llama_dir, packed):
    loaded, router, adapters = _setup(host, tiny_llama_dir)
    vocab = loaded.model.config.vocab_size
    a, c = _rows(1, 2, 12, vocab), _rows(3, 3, 9, vocab)
    base_parts = [("a", a), ("b", _rows(2, 2, 10, vocab)), ("c", c)]
    losses1, grads1 = _losses_and_grads(loaded, router, adapters, base_parts, packed)
    # Different tokens for b, and longer rows, which also widens the padded batch.
    changed = [("a", a), ("b", _rows(99, 4, 20, vocab)), ("c", c)]
    losses2, grads2 = _losses_and_grads(loaded, router, adapters, changed, packed)

    assert losses1["b"] != losses2["b"]
    assert any(not torch.allclose(g1, g2) for g1, g2 in zip(grads1["b"], grads2["b"], strict=True))
    for name in ("a", "c"):
        assert abs(losses1[name] - losses2[name]) <= 1e-6
        for g1, g2 in zip(grads1[name], grads2[name], strict=True):
            torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_rows_of_a_job_equal_a_batch_of_their_own(host, tiny_llama_dir, packed):
    """Job a's loss and gradient in a mixed batch equal those of a padded batch holding only a's rows."""
    loaded, router, adapters = _setup(host, tiny_llama_dir)
    vocab = loaded.model.config.vocab_size
    a = _rows(1, 2, 12, vocab)
    parts = [("b", _rows(2, 3, 16, vocab)), ("a", a)]
    mixed, mixed_grads = _losses_and_grads(loaded, router, adapters, parts, packed)
    alone, alone_grads = _losses_and_grads(loaded, router, adapters, [("a", a)])
    assert abs(mixed["a"] - alone["a"]) <= 1e-6
    for g1, g2 in zip(mixed_grads["a"], alone_grads["a"], strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)
    assert all(torch.count_nonzero(g) == 0 for g in alone_grads["b"])  # b's grads stay zero when b has no rows
