"""eval_every, early stopping (best adapter kept, other jobs unaffected) and exact-match accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ALL_PROJECTIONS as ALL
from conftest import job, write_jsonl, yes_no_records
from safetensors.torch import load_file

from mlora_core.config.schema import load_config
from mlora_core.config.validation import validate_config
from mlora_core.errors import ConfigError
from mlora_core.training.engine import run

# A constant, large learning rate on every projection: the tiny model's held-out loss
# improves for about 14 steps, then gets worse.
NOISY = {
    "lr": 0.3,
    "lr_scheduler": "constant",
    "batch_size": 2,
    "micro_batch_size": 2,
    "epochs": 3,
    "max_steps": 40,
    "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ALL},
}


def _adapter(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / name / "adapter_model.safetensors"))


def _evals(out: Path, name: str) -> list[tuple[int, float]]:
    """(job step, eval_loss) of every evaluation after training started, from metrics.jsonl."""
    found = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["event"] == "evaluation" and record["phase"] in ("during", "after"):
            values = record["jobs"].get(name, {})
            if "eval_loss" in values:
                found.append((int(values["step"]), values["eval_loss"]))
    return found


def test_early_stop_keeps_the_best_adapter_and_leaves_other_jobs_as_if_alone(make_config, data_dir, host, tmp_path):
    stopper = job("a", data_dir / "a.jsonl", eval_every=2, early_stop={"patience": 2}, **NOISY)
    other = job("b", data_dir / "b.jsonl", max_steps=12)
    config = load_config(make_config([stopper, other], output_dir=str(tmp_path / "both")))
    summary = {j["name"]: j for j in run(config, host)["jobs"]}
    a = summary["a"]

    # The rule, checked on the reported curve: stop at the first evaluation that is the
    # patience-th in a row not improving on the best so far.
    evals = _evals(tmp_path / "both", "a")
    best, since, stop_at = float("inf"), 0, None
    for step, loss in evals:
        best, since = (loss, 0) if loss < best else (best, since + 1)
        if since == 2:
            stop_at = step
            break
    assert a["stopped_early"] and stop_at == a["steps"] < 40
    assert a["status"] == "completed"
    assert a["best_eval_loss"] == pytest.approx(min(loss for _, loss in evals), abs=1e-9)
    assert a["eval_loss_after"] == pytest.approx(a["best_eval_loss"], abs=1e-6)

    # The saved adapter is the one at the best step: equal to the same run stopped there by
    # max_steps. (Same company, so the same padded batches: at this learning rate the float
    # noise of a different padding would grow over the steps.)
    at_best = job("a", data_dir / "a.jsonl", **{**NOISY, "max_steps": a["best_step"]})
    run(load_config(make_config([at_best, other], output_dir=str(tmp_path / "best"))), host)
    for key, value in _adapter(tmp_path / "best", "a").items():
        torch.testing.assert_close(_adapter(tmp_path / "both", "a")[key], value, atol=1e-6, rtol=0)

    # b trained beside a job that stopped early equals b trained alone.
    run(load_config(make_config([other], output_dir=str(tmp_path / "alone"))), host)
    for key, value in _adapter(tmp_path / "alone", "b").items():
        torch.testing.assert_close(_adapter(tmp_path / "both", "b")[key], value, atol=1e-6, rtol=0)
    assert not summary["b"]["stopped_early"] and summary["b"]["status"] == "completed"


def test_eval_every_reports_held_out_loss_without_changing_training(make_config, data_dir, host, tmp_path):
    plain = job("a", data_dir / "a.jsonl", max_steps=6)
    run(load_config(make_config([plain], output_dir=str(tmp_path / "plain"))), host)
    watched = job("a", data_dir / "a.jsonl", max_steps=6, eval_every=2)
    summary = run(load_config(make_config([watched], output_dir=str(tmp_path / "watched"))), host)
    assert [step for step, _ in _evals(tmp_path / "watched", "a")] == [2, 4, 6]
    assert summary["jobs"][0]["best_step"] in (2, 4, 6) and not summary["jobs"][0]["stopped_early"]
    for key, value in _adapter(tmp_path / "plain", "a").items():
        torch.testing.assert_close(_adapter(tmp_path / "watched", "a")[key], value, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("train", "data", "message"),
    [
        ({"early_stop": {"patience": 2}}, {}, "early_stop: needs train.eval_every"),
        ({"eval_every": 0}, {}, "eval_every: must be at least 1"),
        ({"eval_every": 2, "early_stop": {"patience": 0}}, {}, "patience: must be at least 1"),
        ({"eval_every": 2}, {"val_set_size": 0}, "need held-out examples"),
        ({}, {"exact_match": True, "train_on_inputs": True}, "exact_match: needs train_on_inputs false"),
    ],
)
def test_evaluation_settings_are_checked(make_config, data_dir, host, train, data, message):
    bad = job("a", data_dir / "a.jsonl", data_opts=data, **train)
    with pytest.raises(ConfigError, match=message):
        validate_config(load_config(make_config([bad])), host)


def test_exact_match_accuracy_equals_transformers_greedy_answers(make_config, host, tmp_path, confident_llama):
    """accuracy_after equals the share of held-out answers that PEFT + transformers' greedy
    generate reproduces with the saved adapter (an independent count), and training raises it."""
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mlora_core.config.schema import DataConfig
    from mlora_data.alpaca import AlpacaLoader

    path = write_jsonl(tmp_path / "qa.jsonl", yes_no_records(40))
    adapter = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ALL}
    data_opts = {"exact_match": True, "val_set_size": 8}
    spec = job("a", path, epochs=4, max_steps=30, lr=5e-2, adapter=adapter, data_opts=data_opts)
    config = make_config([spec], base_model={"path": str(confident_llama)})
    summary = run(load_config(config), host)["jobs"][0]
    assert summary["accuracy_before"] == 0.0 < summary["accuracy_after"]

    tokenizer = AutoTokenizer.from_pretrained(confident_llama)
    data = DataConfig(path=str(path), cutoff_len=256, val_set_size=8, exact_match=True)
    held_out = AlpacaLoader().load(data, tokenizer, seed=42).eval
    base = LlamaForCausalLM.from_pretrained(confident_llama)
    model = PeftModel.from_pretrained(base, summary["adapter_dir"]).eval()
    hits = 0
    for sample in held_out:
        start = next(i for i, label in enumerate(sample.labels) if i > 0 and label != -100)
        answer = tokenizer.decode(sample.input_ids[start:], skip_special_tokens=True).strip()
        prompt = torch.tensor([sample.input_ids[:start]])
        length = len(sample.input_ids) - start + 8
        out = model.generate(input_ids=prompt, max_new_tokens=length, do_sample=False, pad_token_id=0)
        said = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True).strip()
        hits += said == answer
    assert summary["accuracy_after"] == pytest.approx(hits / len(held_out))


def test_resume_keeps_early_stopping_state(make_config, data_dir, host, tmp_path):
    """Stopped by a signal half-way and resumed, an early-stopping job ends as the uninterrupted run."""
    from mlora_core.errors import Interrupted
    from mlora_core.training.engine import Engine

    stopper = job("a", data_dir / "a.jsonl", eval_every=2, early_stop={"patience": 2}, **NOISY)
    whole = run(load_config(make_config([stopper], output_dir=str(tmp_path / "whole"))), host)["jobs"][0]
    assert whole["stopped_early"]

    config = load_config(make_config([stopper], output_dir=str(tmp_path / "halves"), checkpoint_every=1))
    engine = Engine(config, host)
    engine.setup()
    take_step = engine._step

    def step_then_stop(live):
        ended = take_step(live)
        if engine.steps == whole["best_step"] + 1:  # after the best, before the stop
            engine.request_stop("SIGTERM")
        return ended

    engine._step = step_then_stop
    with pytest.raises(Interrupted):
        engine.train()
    resumed = Engine(config, host, resume=True).run()["jobs"][0]
    for key in ("steps", "best_step", "best_eval_loss", "stopped_early", "eval_loss_after"):
        assert resumed[key] == whole[key], key
    for key, value in _adapter(tmp_path / "whole", "a").items():
        torch.testing.assert_close(_adapter(tmp_path / "halves", "a")[key], value, atol=0, rtol=0)
