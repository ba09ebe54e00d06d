"""``mlora eval``: the saved adapters, measured again from disk, give the numbers training reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ALL_PROJECTIONS, job, write_jsonl, yes_no_records

from mlora_core.cli.main import main
from mlora_core.config.schema import load_config
from mlora_core.training.engine import run


def test_eval_reads_saved_adapters_and_matches_training(make_config, host, tmp_path, confident_llama, data_dir, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = write_jsonl(tmp_path / "qa.jsonl", yes_no_records(40))
    adapter = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ALL_PROJECTIONS}
    qa = job("qa", path, epochs=4, max_steps=30, lr=5e-2, adapter=adapter, data_opts={"exact_match": True})
    plain = job("plain", data_dir / "a.jsonl", max_steps=3)
    config_path = make_config(
        [qa, plain], base_model={"path": str(confident_llama)}, monitor={"tensorboard": {"log_dir": None}}
    )
    trained = {j["name"]: j for j in run(load_config(config_path), host)["jobs"]}

    assert main(["eval", str(config_path)]) == 0
    table = capsys.readouterr().out
    assert "qa" in table and "plain" in table
    out = Path(load_config(config_path).output_dir)
    result = json.loads((out / "eval.json").read_text())
    assert json.loads((out / "summary.json").read_text())["evaluation"] == result
    for name, measured in result["jobs"].items():
        assert measured["eval_loss_base"] == pytest.approx(trained[name]["eval_loss_before"], abs=1e-5)
        assert measured["eval_loss"] == pytest.approx(trained[name]["eval_loss_after"], abs=1e-5)
    assert result["jobs"]["qa"]["accuracy"] == trained["qa"]["accuracy_after"] > result["jobs"]["qa"]["accuracy_base"]
    assert result["jobs"]["plain"]["accuracy"] is None  # not exact_match data

    acc = EventAccumulator(str(out / "tensorboard" / "qa"))  # the job's run: training's file and eval's
    acc.Reload()
    points = [(e.step, round(e.value, 6)) for e in acc.Scalars("eval/accuracy")]
    before = (0, round(trained["qa"]["accuracy_before"], 6))
    after = (trained["qa"]["steps"], round(trained["qa"]["accuracy_after"], 6))
    assert sorted(points) == sorted([before, after, before, after])  # training's points, then eval's again
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["phase"] for e in events if e["event"] == "evaluation"][-2:] == ["before", "after"]  # eval appended

    # an adapter that cannot be loaded is reported as such; the others are still measured
    config_file = out / "plain" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_dora": True}))
    assert main(["eval", str(config_path)]) == 1
    assert "adapter not loaded" in capsys.readouterr().out
    again = json.loads((out / "eval.json").read_text())["jobs"]
    assert "use_dora=True" in again["plain"]["adapter_error"] and again["plain"]["eval_loss"] is None
    assert again["qa"]["adapter_error"] is None and again["qa"]["accuracy"] == result["jobs"]["qa"]["accuracy"]


def test_eval_without_saved_adapters_says_what_to_do(make_config, data_dir, capsys):
    config_path = make_config([job("a", data_dir / "a.jsonl")])
    assert main(["eval", str(config_path)]) == 2
    assert "no saved adapter" in capsys.readouterr().err
