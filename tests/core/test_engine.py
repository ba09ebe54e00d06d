"""The engine: schedules, job lifecycles, failure isolation and the concurrent-equals-alone invariant."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import job
from safetensors.torch import load_file

from mlora_core.config.schema import TrainConfig, load_config
from mlora_core.training.data_order import lr_multiplier, optimizer_batches
from mlora_core.training.engine import Engine, run


def test_plan_visits_every_sample_once_per_epoch_in_a_seeded_order():
    t = TrainConfig(epochs=2, batch_size=4, micro_batch_size=2, seed=7)
    lengths = list(range(10, 20))
    batches = optimizer_batches(lengths, t)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(batches[:3], [])) == list(range(10)) == sorted(sum(batches[3:], []))
    assert sum(batches[:3], []) != sum(batches[3:], [])  # each epoch reshuffled
    assert optimizer_batches(lengths, t) == batches
    assert len(optimizer_batches(lengths, TrainConfig(epochs=2, batch_size=4, max_steps=4))) == 4


def test_group_by_length_makes_batches_of_similar_lengths():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(10, 200) for _ in range(64)]
    plain = optimizer_batches(lengths, TrainConfig(batch_size=8, seed=1))
    grouped = optimizer_batches(lengths, TrainConfig(batch_size=8, seed=1, group_by_length=True))
    assert sorted(sum(grouped, [])) == list(range(64))

    def spread(batches):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)

    assert spread(grouped) < 0.3 * spread(plain)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_lr_schedules_match_transformers(kind):
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_scheduler(
        kind if kind != "constant" else "constant_with_warmup", opt, num_warmup_steps=3, num_training_steps=11
    )
    ours = lr_multiplier(kind, 3, 11)
    for step in range(11):
        assert math.isclose(ours(step), reference.get_last_lr()[0], abs_tol=1e-12), (kind, step)
        opt.step()
        reference.step()


def _weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / name / "adapter_model.safetensors"))


def test_adapter_trained_with_others_equals_trained_alone(make_config, data_dir, host, tmp_path):
    """mlora vs mlora: shuffled data, different sizes, jobs ending at different steps."""
    jobs = [
        job("a", data_dir / "a.jsonl", epochs=2, max_steps=None, batch_size=8, micro_batch_size=4),
        job(
            "b",
            data_dir / "b.jsonl",
            max_steps=3,
            lr=5e-3,
            adapter={"type": "lora", "r": 8, "alpha": 8, "dropout": 0.0, "target_modules": ["k_proj", "up_proj"]},
        ),
        job("c", data_dir / "c.jsonl", max_steps=2, batch_size=2, micro_batch_size=1),
    ]
    together = run(load_config(make_config(jobs), [f"output_dir={tmp_path / 'together'}"]), host)
    assert [j["steps"] for j in together["jobs"]] == [10, 3, 2]
    for spec in jobs:
        alone_dir = tmp_path / f"alone-{spec['name']}"
        run(load_config(make_config([spec]), [f"output_dir={alone_dir}"]), host)
        ours, theirs = _weights(tmp_path / "together", spec["name"]), _weights(alone_dir, spec["name"])
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0)


def test_diverging_job_fails_alone_and_others_finish(make_config, data_dir, host, tmp_path):
    good = [job("good", data_dir / "a.jsonl", max_steps=4), job("also_good", data_dir / "c.jsonl", max_steps=4)]
    jobs = [good[0], job("bad", data_dir / "b.jsonl", max_steps=4, lr=1e30), good[1]]
    for j in jobs:
        j["train"]["max_grad_norm"] = None
    config = load_config(make_config(jobs, monitor={"tensorboard": {}}))
    summary = run(config, host)
    status = {j["name"]: j for j in summary["jobs"]}
    bad = status["bad"]
    assert bad["status"] == "failed" and ("loss became" in bad["error"] or "gradient norm" in bad["error"])
    kept = _weights(Path(config.output_dir), "bad")  # its last good adapter is kept
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(config.output_dir) / "tensorboard" / "bad"), size_guidance={"tensors": 0})
    events.Reload()
    assert "status/text_summary" in events.Tags()["tensors"]  # the bad job's run says why it failed
    assert all(torch.isfinite(w).all() for w in kept.values())
    without = run(load_config(make_config(good), [f"output_dir={tmp_path / 'without'}"]), host)
    assert all(j["status"] == "completed" for j in without["jobs"])
    for name in ("good", "also_good"):
        assert status[name]["status"] == "completed" and status[name]["steps"] == 4
        assert status[name]["eval_loss_after"] < status[name]["eval_loss_before"]
        ours, alone = _weights(Path(config.output_dir), name), _weights(tmp_path / "without", name)
        for key in ours:
            torch.testing.assert_close(ours[key], alone[key], atol=1e-6, rtol=0)


def test_finished_job_stops_taking_rows_and_frees_its_state(make_config, data_dir, host):
    jobs = [job("short", data_dir / "a.jsonl", max_steps=1), job("long", data_dir / "b.jsonl", max_steps=3)]
    engine = Engine(load_config(make_config(jobs)), host)
    engine.setup()
    short = engine.jobs[0]
    seen: list[list[str]] = []
    original = engine.scheduler.plan
    engine.scheduler.plan = lambda live, budget: seen.append([j.name for j in live]) or original(live, budget)
    summary = engine.train()
    assert seen == [["short", "long"]] * 2 + [["long"]] * 4
    assert short.optimizer is None and short.params == [] and short.adapter.layers == {}
    lora_names = {n for m in engine.model.modules() if hasattr(m, "lora_A") for n in m.lora_A}
    assert lora_names == set()  # both adapters removed from the base after saving
    assert summary["jobs"][0]["latency_s"] < summary["jobs"][1]["latency_s"]


def test_summary_has_the_documented_fields(make_config, data_dir, host):
    import json

    config = load_config(make_config([job("a", data_dir / "a.jsonl", max_steps=2)]))
    run(config, host)
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    assert {"wall_s", "tokens_per_s", "train_tokens", "jobs", "scheduler", "base_model"} <= set(summary)
    entry = summary["jobs"][0]
    for key in (
        "name",
        "status",
        "steps",
        "train_tokens",
        "eval_loss_before",
        "eval_loss_after",
        "final_train_loss",
        "latency_s",
        "adapter_dir",
    ):
        assert entry[key] is not None, key
    assert entry["train_tokens"] > 0 and summary["tokens_per_s"] > 0


def test_a_crash_mid_run_still_writes_the_summary(make_config, data_dir, host):
    import json

    jobs = [job("short", data_dir / "a.jsonl", max_steps=1), job("long", data_dir / "b.jsonl", max_steps=5)]
    config = load_config(make_config(jobs))
    engine = Engine(config, host)
    engine.setup()
    original, calls = engine.scheduler.plan, []

    def plan(live, budget):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("scheduler exploded")
        return original(live, budget)

    engine.scheduler.plan = plan
    with pytest.raises(RuntimeError, match="scheduler exploded"):
        engine.train()
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    status = {j["name"]: j for j in summary["jobs"]}
    assert status["short"]["status"] == "completed" and status["short"]["adapter_dir"]
    assert status["long"]["status"] == "failed" and "scheduler exploded" in status["long"]["error"]


def test_jobs_named_like_module_attributes_train(make_config, data_dir, host):
    """Job names become keys of torch module dicts; names such as ``train`` or ``to`` must still work."""
    import json

    names = ["train", "to", "double"]
    jobs = [job(name, data_dir / "a.jsonl", max_steps=2) for name in names]
    config = load_config(make_config(jobs))
    summary = run(config, host)
    assert [(j["name"], j["status"]) for j in summary["jobs"]] == [(n, "completed") for n in names]
    for name in names:
        saved = load_file(str(Path(config.output_dir) / name / "adapter_model.safetensors"))
        assert any(key.endswith("lora_B.weight") and value.abs().sum() > 0 for key, value in saved.items())
    events = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [e["job"] for e in events if e["event"] == "job_end"] == names  # the user's names in every file


def test_a_job_whose_adapter_cannot_be_saved_fails_alone(make_config, data_dir, tmp_path):
    """An error while finishing a job (here: saving) fails that job, with its error; the run ends normally."""
    from mlora_core.plugin_api.hookspecs import hookimpl
    from mlora_core.plugin_api.host import create_plugin_manager
    from mlora_lora.adapter import LoraAdapter, LoraAdapterType

    class FullDiskAdapter(LoraAdapter):
        def save(self, directory: str, base_model_name_or_path: str) -> None:
            Path(directory).mkdir(parents=True)
            (Path(directory) / "adapter_config.json").write_text("{")  # half written, then the disk is full
            raise OSError(28, "No space left on device")

    class FullDiskType(LoraAdapterType):
        def make_adapter(self, name, config, layers):
            return FullDiskAdapter(name, config, layers)

    class FullDiskPlugin:
        __name__ = "full_disk"

        @hookimpl
        def mlora_register_adapters(self, register):
            register("full_disk", FullDiskType)

    host = create_plugin_manager(autoload=False, extra=[FullDiskPlugin()])
    adapter = {"type": "full_disk", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]}
    jobs = [job("bad", data_dir / "a.jsonl", adapter=adapter), job("good", data_dir / "b.jsonl", max_steps=4)]
    config = load_config(make_config(jobs))
    summary = run(config, host)
    result = {j["name"]: j for j in summary["jobs"]}
    assert result["bad"]["status"] == "failed" and result["bad"]["adapter_dir"] is None
    assert "saving the adapter failed" in result["bad"]["error"] and "No space left" in result["bad"]["error"]
    assert result["bad"]["steps"] == 3  # it trained to the end; only saving failed
    assert result["good"]["status"] == "completed" and result["good"]["eval_loss_after"] is not None
    out = Path(config.output_dir)
    assert not (out / "bad").exists() and not list(out.glob(".bad*"))  # nothing half-written left
    assert (out / "good" / "adapter_model.safetensors").is_file()


def test_a_job_whose_evaluation_before_training_fails_fails_alone(make_config, data_dir, tmp_path):
    """A data loader whose held-out samples have no answer breaks exact-match accuracy; only its job fails."""
    from mlora_core.plugin_api.hookspecs import hookimpl
    from mlora_core.plugin_api.host import create_plugin_manager
    from mlora_core.plugin_api.protocols import Sample, SplitDataset
    from mlora_data.alpaca import AlpacaLoader

    class NoAnswers(AlpacaLoader):
        def load(self, config, tokenizer, seed):
            data = super().load(config, tokenizer, seed)
            unlearned = [Sample(s.input_ids, (-100,) * len(s)) for s in data.eval]
            return SplitDataset(data.train, unlearned)

    class Plugin:
        __name__ = "no_answers"

        @hookimpl
        def mlora_register_datasets(self, register):
            register("no_answers", NoAnswers)

    host = create_plugin_manager(autoload=False, extra=[Plugin()])
    exact = {"exact_match": True}
    jobs = [
        job("bad", data_dir / "a.jsonl", data_opts={**exact, "type": "no_answers"}),
        job("good", data_dir / "b.jsonl", data_opts=exact),
    ]
    summary = run(load_config(make_config(jobs)), host)
    result = {j["name"]: j for j in summary["jobs"]}
    assert result["bad"]["status"] == "failed" and result["bad"]["steps"] == 0
    assert "held-out evaluation before training failed" in result["bad"]["error"]
    assert result["good"]["status"] == "completed" and result["good"]["accuracy_before"] is not None
