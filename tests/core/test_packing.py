"""Packed steps (``scheduler.packing``): samples of several jobs share rows, padding-free.

Proven here: the layout (every sample once, each job one contiguous token range, rows within
their length), the batch (positions restart per sample, no target across samples), the LoRA
layer's default path against its reference loop (by rows and by token ranges, with the bare
base between adapters), one dropout draw per layer with each adapter's rate, and whole
training runs: packed equals padded (adapters within 1e-5 relative) with far less padding.
Packed training against PEFT alone is in test_equivalence_peft.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import job
from safetensors.torch import load_file
from test_equivalence_peft import three_jobs

from mlora_core.config.schema import load_config
from mlora_core.config.validation import validate_config
from mlora_core.errors import ConfigError
from mlora_core.plugin_api.conventions import IGNORE_INDEX
from mlora_core.plugin_api.packing import pack_rows, packed_shape, row_length
from mlora_core.plugin_api.protocols import Sample
from mlora_core.plugin_api.routing import RowRouter, Segment
from mlora_core.training.batch import build_batch, build_packed_batch
from mlora_core.training.engine import Engine
from mlora_lora.layer import LoraLinear


def test_pack_rows_places_every_sample_once_with_each_job_contiguous():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [[rng.randint(1, 40) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(1, 5))]
        width = max(n for job_lengths in lengths for n in job_lengths) + rng.choice([0, 0, 17])
        rows = pack_rows(lengths, width)
        placed = [item for row in rows for item in row]
        assert sorted(placed) == [(j, i) for j, job_lengths in enumerate(lengths) for i in range(len(job_lengths))]
        assert all(sum(lengths[j][i] for j, i in row) <= width for row in rows)
        order = [j for j, _ in placed]  # jobs in flattened (row-major) order
        assert order == sorted(order), "a job's tokens must be one contiguous range"
        shape_rows, shape_width = packed_shape(lengths, width)  # width as the cap
        assert shape_width <= width and shape_rows == len(pack_rows(lengths, shape_width))
        # Never worse than one sample a row, and every row but a job's last is worth keeping.
        assert len(rows) <= len(placed)


def test_pack_rows_fills_rows_first_fit_longest_first():
    # One job: 9 + 1 and 6 + 4 fill two rows of 10 exactly; in arrival order (9, 6, 4, 1) too.
    assert len(pack_rows([[9, 6, 4, 1]], 10)) == 2
    # A second job continues the first one's last row, not an earlier one.
    rows = pack_rows([[10, 3], [5]], 10)
    assert rows == [[(0, 0)], [(0, 1), (1, 0)]]


def test_automatic_row_length_weighs_padding_against_attention():
    lengths = [[60, 58, 41], [40, 40, 40, 40]]  # every sample longer than half the longest
    assert row_length(lengths, None, attention_parity=None) > 60  # attention free: longer rows pay
    assert row_length(lengths, None, attention_parity=10) == 60  # attention dear: one sample a row
    assert row_length(lengths, 100, attention_parity=None) <= 100  # pack_length caps it
    assert row_length(lengths, 30, attention_parity=None) == 60  # but never below the longest sample
    assert row_length(lengths, None, attention_parity=None) <= sum(map(sum, lengths))
    rows, width = packed_shape(lengths, None, attention_parity=6 * 576)  # SmolLM2's hidden size
    assert rows * width < 7 * 60  # less than one padded row a sample


def _sample(ids: list[int], prompt: int) -> Sample:
    return Sample(tuple(ids), tuple([IGNORE_INDEX] * prompt + ids[prompt:]))


def test_packed_batch_positions_restart_and_no_target_crosses_a_sample():
    a = [_sample([5, 6, 7, 8], 1), _sample([9, 10], 0)]
    b = [_sample([11, 12, 13], 0)]
    batch = build_packed_batch([("a", a), ("b", b)], pad_id=0, pack_length=4)
    # width 4 (the longest sample): row 0 = a0; row 1 = a1 + b0? 2 + 3 > 4, so b0 opens row 2.
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0], [11, 12, 13, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 2, 0]]
    assert batch.segments == (Segment("a", 0, 8), Segment("b", 8, 12))
    assert batch.segment_tokens == (6, 3) and batch.samples == 3
    # Learned positions: a0 learns 6, 7, 8; a1 learns 10 (not 9: the first token of a sample
    # is never a target); b0 learns 12, 13.
    assert batch.segment_learned == (4, 2)
    assert (batch.labels[:, 1:] != IGNORE_INDEX).sum().item() == 6
    assert batch.labels[1, 0] == IGNORE_INDEX and batch.labels[2, 0] == IGNORE_INDEX

    wide = build_packed_batch([("a", a), ("b", b)], pad_id=0, pack_length=9)
    assert wide.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert wide.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    assert wide.labels[0, 4] == IGNORE_INDEX and wide.labels[0, 6] == IGNORE_INDEX
    assert wide.padding_fraction == 0.0
    assert build_batch([("a", a), ("b", b)], pad_id=0).padding_fraction == pytest.approx(0.25)


def _layer_with_adapters(router: RowRouter, dropout: float = 0.0) -> LoraLinear:
    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(12, 10), router)
    for name, r in (("a", 2), ("b", 4), ("c", 3)):
        layer.add_adapter(name, r, alpha=2 * r, dropout=dropout)
    with torch.no_grad():
        for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]:
            p.normal_(0, 0.3)
    return layer


@pytest.mark.parametrize("by_tokens", [False, True], ids=["rows", "tokens"])
def test_default_lora_path_equals_the_reference_loop(by_tokens):
    """Output and every gradient, with the bare base (None, an adapter the layer lacks) between adapters."""
    router = RowRouter()
    layer = _layer_with_adapters(router)
    x0 = torch.randn(6, 5, 12)
    if by_tokens:
        segments = [Segment("b", 0, 7), Segment(None, 7, 9), Segment("a", 9, 20), Segment("zz", 20, 22)]
        segments += [Segment("c", 22, 30)]
    else:
        segments = [Segment("a", 0, 2), Segment(None, 2, 3), Segment("c", 3, 5), Segment("b", 5, 6)]
    results = []
    for reference in (False, True):
        layer.reference = reference
        layer.zero_grad()
        x = x0.clone().requires_grad_()
        with router.route(segments, by_tokens=by_tokens):
            out = layer(x)
        out.pow(2).sum().backward()
        grads = [x.grad] + [p.grad.clone() for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]]
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    for ours, reference in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)


def test_one_dropout_draw_keeps_each_adapters_rate():
    """Tokens of an adapter with dropout p lose about p of their inputs (scaled by 1/(1-p));
    tokens of an adapter without dropout lose none. Checked on the input A sees."""
    router = RowRouter()
    layer = _layer_with_adapters(router)
    layer.add_adapter("d", 2, alpha=4, dropout=0.5)
    layer.add_adapter("e", 2, alpha=4, dropout=0.1)
    seen: dict[str, torch.Tensor] = {}
    for name in ("a", "d", "e"):
        layer.lora_a(name).register_forward_hook(lambda m, args, out, n=name: seen.__setitem__(n, args[0]))
    x = torch.ones(3, 2000, 12)
    with router.route([Segment("a", 0, 1), Segment("d", 1, 2), Segment("e", 2, 3)]):
        layer(x)
    assert torch.equal(seen["a"], torch.ones_like(seen["a"]))
    for name, p in (("d", 0.5), ("e", 0.1)):
        values = seen[name]
        kept = values != 0
        assert torch.allclose(values[kept], torch.full_like(values[kept], 1 / (1 - p)))
        assert abs(1 - kept.float().mean().item() - p) < 0.02
    layer.eval()  # no dropout in eval mode
    with router.route([Segment("d", 0, 3)]):
        layer(x)
    assert torch.equal(seen["d"], torch.ones_like(seen["d"]))


def _packing_config(make_config, data_dir, model_dir, packing: bool, base: dict, out: Path, **scheduler):
    jobs = three_jobs(data_dir)
    jobs[1]["data"]["cutoff_len"] = 40  # b's samples much shorter than a's and c's
    for j in jobs:
        j["adapter"]["type"] = "qlora" if base.get("quantize") else "lora"
    top = {"scheduler": {"packing": packing, **scheduler}, "monitor": {"jsonl": {}}}
    return load_config(make_config(jobs, base_model={"path": str(model_dir), **base}, output_dir=str(out), **top))


def _train(config, host, float64: bool):
    engine = Engine(config, host)
    engine.setup()
    if float64:  # base and adapters (the same Parameter objects the optimizers hold)
        engine.model.double()
    summary = engine.train()
    assert [j["status"] for j in summary["jobs"]] == ["completed"] * 3
    adapters = {
        jc.name: load_file(str(Path(config.output_dir) / jc.name / "adapter_model.safetensors")) for jc in config.jobs
    }
    return summary, adapters


@pytest.mark.parametrize(
    ("scheduler", "pack_length", "quantize", "float64"),
    [("trivial", None, None, False), ("optimal_fit", 160, None, True), ("trivial", None, "nf4", True)],
    ids=["trivial-fp32", "optimal_fit-fp64", "trivial-nf4-fp64"],
)
def test_packed_training_equals_padded_training(
    make_config, data_dir, wide_llama_dir, host, tmp_path, scheduler, pack_length, quantize, float64
):
    """Dropout 0, three jobs of different lengths, ranks and targets: the same adapters, with a
    small fraction of the padding. Also over an nf4 base (QLoRA).

    fp32: every weight matrix within 1e-5 relative (||packed - padded|| / ||padded||). That
    holds for the trivial schedule; in others job b (lr 5e-3, scale 4) ends up to 5e-5 apart,
    because Adam's first steps move each weight by about lr whatever its gradient's size, so
    the rounding of two equally exact attention kernels on near-zero gradients shows. Those
    runs are made in float64, where the rounding is gone: packed and padded then agree to
    the precision of the saved (fp32) adapters.
    """
    base = {"quantize": quantize}
    padded_cfg = _packing_config(
        make_config, data_dir, wide_llama_dir, False, base, tmp_path / "padded", type=scheduler
    )
    padded, padded_adapters = _train(padded_cfg, host, float64)
    packed_cfg = _packing_config(
        make_config, data_dir, wide_llama_dir, True, base, tmp_path / "packed", type=scheduler, pack_length=pack_length
    )
    packed, packed_adapters = _train(packed_cfg, host, float64)

    tolerance = 1e-7 if float64 else 1e-5
    for name, state in padded_adapters.items():
        for key, value in state.items():
            relative = ((packed_adapters[name][key] - value).norm() / value.norm()).item()
            assert relative <= tolerance, f"{name} {key}: relative difference {relative:.2e}"
    assert [j["steps"] for j in packed["jobs"]] == [j["steps"] for j in padded["jobs"]]
    assert packed["padding_fraction"] < padded["padding_fraction"]
    metrics = [json.loads(line) for line in (Path(packed_cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    fractions = [m["run"]["padding_fraction"] for m in metrics if "run" in m]
    assert fractions and sum(fractions) / len(fractions) < 0.1


def test_validation_refuses_packing_settings_that_cannot_work(make_config, data_dir, host):
    scheduler = {"packing": False, "pack_length": 0}
    config = load_config(make_config([job("a", data_dir / "a.jsonl")], scheduler=scheduler))
    with pytest.raises(ConfigError) as err:
        validate_config(config, host)
    assert "scheduler.pack_length: must be at least 1 or null" in str(err.value)
    assert "scheduler.pack_length: only applies when steps are packed (packing: true)" in str(err.value)


def test_packing_is_on_by_default_where_the_backend_supports_it(make_config, data_dir, host):
    config = load_config(make_config([job("a", data_dir / "a.jsonl")]))
    assert config.scheduler.packing is None  # null: decided by validation
    validate_config(config, host)
    assert config.scheduler.packing is True  # llama supports it
    explicit = load_config(make_config([job("a", data_dir / "a.jsonl")], scheduler={"packing": False}))
    validate_config(explicit, host)
    assert explicit.scheduler.packing is False


def test_packing_is_refused_for_a_backend_without_it(make_config, data_dir, host):
    """A backend that does not declare ``supports_packing`` trains padded by default and
    refuses an explicit ``packing: true`` with a one-line reason."""
    llama = host.backends.create("llama")

    class PaddedOnly:  # the llama backend without the declaration
        target_modules = llama.target_modules
        validate = llama.validate
        load = llama.load

    host.backends.register("padded_only", PaddedOnly, plugin="test")
    base = {"backend": "padded_only"}
    config = load_config(make_config([job("a", data_dir / "a.jsonl")], base_model=base))
    validate_config(config, host)
    assert config.scheduler.packing is False
    forced = load_config(make_config([job("a", data_dir / "a.jsonl")], base_model=base, scheduler={"packing": True}))
    with pytest.raises(ConfigError, match="packing: backend 'padded_only' cannot run packed rows"):
        validate_config(forced, host)
