"""Preference objectives (DPO, CPO, ORPO) against TRL, and beside SFT jobs in one run.

mlora's side runs the real path of a training step: the pairs in a multi-job batch (padded
or packed), the shared forward with the adapter routed, per-sequence log-probabilities, the
objective's loss and one backward. TRL's side (tests/trl_reference.py) runs its trainers'
own loss code on the same token ids from the same adapter weights.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from conftest import job

from mlora_core.config.schema import AdapterConfig, BaseModelConfig, ObjectiveConfig, load_config
from mlora_core.models.loading import load_base_model
from mlora_core.plugin_api.conventions import IGNORE_INDEX
from mlora_core.plugin_api.protocols import Sample, SequenceLogps
from mlora_core.plugin_api.routing import RowRouter
from mlora_core.training.batch import build_batch, build_packed_batch
from mlora_core.training.engine import Engine
from mlora_core.training.loss import learned_token_losses, per_job_sequence_logps
from mlora_core.training.reference import with_reference_logps

pytest.importorskip("trl", reason="TRL is the test-only reference (pip install -e '.[test]')")

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
EXAMPLE_DATA = Path(__file__).parents[2] / "examples" / "data" / "arith_preference.jsonl"


def pairs(tokenizer, prompt_tokens: int | None) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids of a few arithmetic pairs; ``prompt_tokens`` cuts the prompt."""
    out = []
    for a, b, wrong in ((12, 30, 3), (7, 25, -2), (40, 48, 10), (3, 9, 1), (21, 21, -10)):
        prompt = tokenizer(f"What is {a} + {b}?", add_special_tokens=False)["input_ids"][:prompt_tokens]
        eos = [tokenizer.eos_token_id]
        chosen = tokenizer(f" {a + b}", add_special_tokens=False)["input_ids"] + eos
        rejected = tokenizer(f" {a + b + wrong}", add_special_tokens=False)["input_ids"] + eos
        out.append((prompt, chosen, rejected))
    return out


def as_sample(prompt: list[int], chosen: list[int], rejected: list[int]) -> Sample:
    """A pair as the preference loader makes it: prompt not learned, completions learned."""
    first, second = prompt + chosen, prompt + rejected
    labels = [IGNORE_INDEX] * len(prompt) + chosen + [IGNORE_INDEX] * len(prompt) + rejected
    return Sample(tuple(first + second), tuple(labels), starts=(len(first),))


def mlora_loss_and_grads(host, model_dir: Path, config: ObjectiveConfig, pair_ids, packed: bool):
    """mlora's loss, metrics (means over the pairs) and LoRA gradients for ``pair_ids`` as one batch."""
    loaded = load_base_model(host, BaseModelConfig(path=str(model_dir)))
    router = RowRouter()
    adapter_config = AdapterConfig(
        r=LORA["r"], alpha=LORA["lora_alpha"], dropout=0.0, target_modules=LORA["target_modules"]
    )
    adapter = host.adapters.create("lora").attach(loaded.model, "a", adapter_config, router)
    torch.manual_seed(3)
    with torch.no_grad():  # non-zero B: the policy differs from the reference from the start
        for param in adapter.parameters():
            param.normal_(0.0, 0.3)
    init = adapter.state_dict()
    objective = host.objectives.create(config.type, config=config)
    samples = [as_sample(*p) for p in pair_ids]
    if objective.needs_reference:
        samples = with_reference_logps(loaded, router, samples, 0, "cpu")
    build = build_packed_batch if packed else build_batch
    batch = build([("a", samples)], 0)
    with router.route(batch.segments, by_tokens=batch.packed):
        token_losses = learned_token_losses(loaded, batch)
    logps, tokens = per_job_sequence_logps(batch, token_losses)["a"]
    loss, metrics = objective.loss(SequenceLogps(logps, tokens, batch.reference_logps[0]), objective.units(samples))
    loss.backward()
    grads = {}
    for path, layer in adapter.layers.items():
        grads[f"base_model.model.{path}.lora_A.weight"] = layer.lora_a("a").weight.grad
        grads[f"base_model.model.{path}.lora_B.weight"] = layer.lora_b("a").weight.grad
    return float(loss), {k: float(v) / len(samples) for k, v in metrics.items()}, grads, init


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize(
    ("kind", "settings", "prompt_tokens"),
    [
        ("dpo", {"beta": 0.1}, None),
        ("dpo", {"beta": 0.5, "label_smoothing": 0.2}, None),
        ("cpo", {"beta": 0.2, "alpha": 1.0}, None),
        ("cpo", {"beta": 0.1, "alpha": 0.5, "label_smoothing": 0.1}, None),
        # ORPO's NLL here covers the completion; TRL's also the prompt (docs/objectives.md): a
        # one-token prompt, never a target, makes the two the same.
        ("orpo", {"beta": 0.1}, 1),
        ("orpo", {"beta": 0.5}, 1),
    ],
)
def test_preference_losses_and_gradients_equal_trl(host, tiny_llama_dir, kind, settings, prompt_tokens, packed):
    from transformers import AutoTokenizer
    from trl_reference import trl_loss_and_grads

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    pair_ids = pairs(tokenizer, prompt_tokens)
    config = ObjectiveConfig(type=kind, **settings)
    ours, our_metrics, our_grads, init = mlora_loss_and_grads(host, tiny_llama_dir, config, pair_ids, packed)
    theirs, their_metrics, their_grads = trl_loss_and_grads(
        tiny_llama_dir,
        kind,
        pair_ids,
        LORA,
        init,
        beta=config.beta,
        label_smoothing=config.label_smoothing if kind != "orpo" else 0.0,
        cpo_alpha=config.alpha,
    )
    assert ours == pytest.approx(theirs, abs=1e-5)
    for name in our_metrics:
        assert our_metrics[name] == pytest.approx(their_metrics[name], abs=1e-5, rel=1e-5), name
    assert set(our_grads) == set(their_grads)
    for key, grad in our_grads.items():
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(grad, their_grads[key], atol=1e-5, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def preference_job(name: str, objective: dict, **train) -> dict:
    spec = job(name, EXAMPLE_DATA, **train)
    spec["data"].update(type="preference", val_set_size=8, cutoff_len=64)
    spec["objective"] = objective
    return spec


@pytest.mark.parametrize("scheduler", ["trivial", "optimal_fit", "fast_fit"])
def test_dpo_beside_sft_ends_as_trained_alone(make_config, data_dir, host, tmp_path, scheduler):
    """A DPO job and an SFT job in one run: the DPO adapter equals the same job trained alone,
    and its metrics, held-out preference accuracy and summary fields are there."""
    dpo = preference_job("dpo", {"type": "dpo", "beta": 0.5}, max_steps=4, lr=5e-3)
    sft = job("sft", data_dir / "a.jsonl", max_steps=4)
    together = load_config(
        make_config(
            [dpo, sft], output_dir=str(tmp_path / "together"), monitor={"jsonl": {}}, scheduler={"type": scheduler}
        )
    )
    summary = Engine(together, host).run()
    alone = load_config(make_config([dpo], output_dir=str(tmp_path / "alone")))
    Engine(alone, host).run()

    from safetensors.torch import load_file

    ours = load_file(str(tmp_path / "together" / "dpo" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "alone" / "dpo" / "adapter_model.safetensors"))
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], atol=1e-6, rtol=0)
    entry = next(j for j in summary["jobs"] if j["name"] == "dpo")
    assert entry["status"] == "completed" and entry["steps"] == 4
    assert entry["preference_accuracy_before"] == 0  # the untrained adapter is the reference: no pair preferred more
    assert 0 <= entry["preference_accuracy_after"] <= 1
    sft_entry = next(j for j in summary["jobs"] if j["name"] == "sft")
    assert sft_entry["preference_accuracy_after"] is None
    steps = [json.loads(line) for line in (tmp_path / "together" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["jobs"]["dpo"] for r in steps if r.get("event") == "step" and "dpo" in r.get("jobs", {})]
    assert logged and all(
        name in logged[0]
        for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen")
    )
    assert logged[0]["loss"] == pytest.approx(0.6931, abs=2e-3)  # policy = reference at the start: ln 2


def test_bare_base_reference_equals_a_frozen_copy_and_holds_no_second_model(host, tiny_llama_dir):
    """The reference log-probabilities (the base with no adapter routed, adapters attached)
    equal an explicit frozen copy of the base run through transformers' own forward; and
    computing them creates no second model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    samples = [as_sample(*p) for p in pairs(tokenizer, None)]
    loaded = load_base_model(host, BaseModelConfig(path=str(tiny_llama_dir)))
    router = RowRouter()
    adapter_config = AdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    adapter = host.adapters.create("lora").attach(loaded.model, "a", adapter_config, router)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0.0, 0.3)  # an adapter that would change the outputs if it were applied
    models_before = sum(isinstance(o, torch.nn.Module) and hasattr(o, "lm_head") for o in gc.get_objects())
    filled = with_reference_logps(loaded, router, samples, 0, "cpu")
    models_after = sum(isinstance(o, torch.nn.Module) and hasattr(o, "lm_head") for o in gc.get_objects())
    assert models_after == models_before

    copy = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for sample in filled:
        expected = []
        for seq in sample.sequences():
            ids = torch.tensor([seq.input_ids])
            with torch.no_grad():
                logits = copy(input_ids=ids).logits[0, :-1].log_softmax(-1)
            targets = torch.tensor(seq.labels[1:])
            learned = targets != IGNORE_INDEX
            expected.append(float(logits[learned].gather(1, targets[learned][:, None]).sum()))
        assert sample.reference_logps == pytest.approx(expected, abs=1e-5)


def test_objective_and_data_must_fit(make_config, data_dir, host):
    from mlora_core.config.validation import validate_config
    from mlora_core.errors import ConfigError

    jobs = [
        preference_job("pairs_for_sft", {"type": "sft"}),
        {**job("sft_data_for_dpo", data_dir / "a.jsonl"), "objective": {"type": "dpo"}},
        preference_job("bad_beta", {"type": "dpo", "beta": 0}),
        preference_job("unknown", {"type": "kto"}),
    ]
    with pytest.raises(ConfigError) as err:
        validate_config(load_config(make_config(jobs)), host)
    text = str(err.value)
    assert "jobs[0].objective.type: 'sft' trains on one sequence per sample, but data.type 'preference'" in text
    assert "jobs[1].objective.type: 'dpo' trains on preference pairs, but data.type 'alpaca'" in text
    assert "(use data.type: preference)" in text
    assert "jobs[2].objective.beta: must be positive" in text
    assert "jobs[3].objective.type: unknown objective 'kto'; known: cpo, dpo, orpo, sft" in text


def test_preference_jobs_resume_from_a_checkpoint_as_if_uninterrupted(
    make_config, data_dir, host, tmp_path, monkeypatch
):
    """DPO and ORPO jobs beside an SFT job, checkpointed every 2 steps; the run crashes while
    writing its second checkpoint and resumes from the first: the same adapters."""
    from safetensors.torch import load_file

    import mlora_core.training.run_directory as checkpoint

    jobs = [
        preference_job("dpo", {"type": "dpo", "beta": 0.5}, max_steps=5, lr=5e-3),
        preference_job("orpo", {"type": "orpo", "beta": 0.2}, max_steps=4, lr=5e-3),
        job("sft", data_dir / "a.jsonl", max_steps=5),
    ]
    names = ("dpo", "orpo", "sft")
    uninterrupted = load_config(make_config(jobs, output_dir=str(tmp_path / "reference"), checkpoint_every=2))
    Engine(uninterrupted, host).run()
    config = load_config(make_config(jobs, checkpoint_every=2))
    engine = Engine(config, host)
    engine.setup()
    real_save, calls = checkpoint.save_file, []

    def crash_in_the_second_checkpoint(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == len(names) + 1:
            raise OSError("disk vanished")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", crash_in_the_second_checkpoint)
    with pytest.raises(OSError, match="disk vanished"):
        engine.train()
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    summary = Engine(config, host, resume=True).run()
    assert [j["status"] for j in summary["jobs"]] == ["completed"] * 3
    for name in names:
        ours = load_file(str(Path(config.output_dir) / name / "adapter_model.safetensors"))
        theirs = load_file(str(tmp_path / "reference" / name / "adapter_model.safetensors"))
        for key, value in ours.items():
            torch.testing.assert_close(value, theirs[key], atol=1e-6, rtol=0)


def test_a_saved_adapter_as_dpo_reference(make_config, host, tmp_path, tiny_llama_dir):
    """``objective.reference: DIR``: the reference log-probabilities are those of the base with
    that saved adapter, as PEFT computes them; the adapter is detached again after."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlora_core.plugin_api.routing import RowRouter as Router

    loaded = load_base_model(host, BaseModelConfig(path=str(tiny_llama_dir)))
    config = AdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    saved = host.adapters.create("lora").attach(loaded.model, "ref", config, Router())
    with torch.no_grad():
        for param in saved.parameters():
            param.normal_(0.0, 0.3)
    saved.save(str(tmp_path / "ref"), str(tiny_llama_dir))

    spec = preference_job("dpo", {"type": "dpo", "reference": str(tmp_path / "ref")}, max_steps=1)
    engine = Engine(load_config(make_config([spec])), host)
    engine.setup()
    (dpo,) = engine.jobs
    layers = [m for m in engine.model.modules() if hasattr(m, "remove_adapter")]
    assert layers and not any("reference" in key for m in layers for key in m.lora_A.keys())  # detached

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(tmp_path / "ref")).eval()
    used = [s for s in dpo.data.train if s.reference_logps is not None]  # those max_steps lets train
    assert len(used) == 4 and all(s.reference_logps is not None for s in dpo.data.eval)
    for sample in used:
        expected = []
        for seq in sample.sequences():
            with torch.no_grad():
                logits = peft(input_ids=torch.tensor([seq.input_ids])).logits[0, :-1].log_softmax(-1)
            targets = torch.tensor(seq.labels[1:])
            learned = targets != IGNORE_INDEX
            expected.append(float(logits[learned].gather(1, targets[learned][:, None]).sum()))
        assert sample.reference_logps == pytest.approx(expected, abs=1e-4)
