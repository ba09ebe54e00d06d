"""Memory-aware admission: refused steps are split, out-of-memory steps are retried smaller,
and in both cases every adapter ends up exactly as in an unconstrained run."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import job
from safetensors.torch import load_file

from mlora_core.config.schema import load_config
from mlora_core.plugin_api.hookspecs import hookimpl
from mlora_core.plugin_api.host import create_plugin_manager
from mlora_core.plugin_api.scheduling import StepBudget
from mlora_core.training.engine import Engine
from mlora_core.training.memory import MemoryModel

MAX_ROWS = 3  # the pretend device fits at most this many rows per step


def _jobs(data_dir: Path) -> list[dict]:
    jobs = [
        job("a", data_dir / "a.jsonl", batch_size=8, micro_batch_size=4, max_steps=2),
        job("b", data_dir / "b.jsonl", batch_size=4, micro_batch_size=4, max_steps=3),
    ]
    for j in jobs:
        j["train"]["shuffle"] = False
    return jobs


def _adapters(out: str) -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_file(str(Path(out) / n / "adapter_model.safetensors")) for n in ("a", "b")}


def _assert_same(ours, reference):
    for name in reference:
        for key in reference[name]:
            torch.testing.assert_close(ours[name][key], reference[name][key], atol=1e-6, rtol=0)


def _reference(make_config, data_dir, host, tmp_path):
    config = load_config(make_config(_jobs(data_dir)), [f"output_dir={tmp_path / 'reference'}"])
    Engine(config, host).run()
    return _adapters(config.output_dir)


def test_steps_refused_by_the_memory_predictor_are_split(make_config, data_dir, host, tmp_path):
    reference = _reference(make_config, data_dir, host, tmp_path)
    config = load_config(make_config(_jobs(data_dir)))
    engine = Engine(config, host)
    engine.budget = StepBudget(fits=lambda rows, length: rows <= MAX_ROWS)  # a stand-in predictor
    rows_per_step: list[int] = []
    plan = engine.scheduler.plan
    engine.scheduler.plan = lambda jobs, budget: (
        rows_per_step.append(sum(r for _, r in plan(jobs, budget))) or plan(jobs, budget)
    )
    summary = engine.run()
    assert [j["status"] for j in summary["jobs"]] == ["completed", "completed"]
    assert max(rows_per_step) == MAX_ROWS
    _assert_same(_adapters(config.output_dir), reference)


class SmallDevice:
    """A backend plugin whose model raises out-of-memory on steps over MAX_ROWS rows."""

    __name__ = "small_device"

    @hookimpl
    def mlora_register_backends(self, register):
        from mlora_decoders.backend import DecoderBackend

        class SmallDeviceLlama(DecoderBackend):
            def load(self, config):
                loaded = super().load(config)
                hidden_states = loaded.hidden_states  # what training and evaluation call

                def limited(input_ids, attention_mask, **packed):  # packed rows: position_ids too
                    if input_ids.shape[0] > MAX_ROWS:
                        raise torch.OutOfMemoryError(f"pretend device: {input_ids.shape[0]} rows")
                    return hidden_states(input_ids, attention_mask, **packed)

                loaded.hidden_states = limited
                return loaded

        register("small_device", SmallDeviceLlama)


def test_out_of_memory_step_is_retried_smaller_without_losing_state(make_config, data_dir, host, tmp_path):
    reference = _reference(make_config, data_dir, host, tmp_path)
    small = create_plugin_manager(autoload=False, extra=[SmallDevice()])
    config = load_config(make_config(_jobs(data_dir)), ["base_model.backend=small_device"])
    summary = Engine(config, small).run()
    assert [j["status"] for j in summary["jobs"]] == ["completed", "completed"]
    assert summary["oom_retries"] >= 1
    _assert_same(_adapters(config.output_dir), reference)


def test_memory_model_fits_the_quadratic_and_refuses_what_exceeds_the_limit():
    model = MemoryModel(limit=10_000)
    for rows, length in [(1, 10), (2, 10), (2, 20), (4, 30)]:
        model.observe(rows, length, 1000 + 3 * rows * length + 0.5 * rows * length * length)
    assert abs(model.predict(3, 40) - (1000 + 3 * 120 + 0.5 * 120 * 40)) < 1.0
    assert model.fits(8, 40) and not model.fits(16, 40)  # predicted 8,360 and 15,720 bytes
    model.record_oom(3, 10)
    assert not model.fits(1, 30) and model.fits(1, 20)
