"""``mlora plan``: memory predicted from probes, and the largest shapes that fit."""

from __future__ import annotations

from conftest import job

from mlora_core.cli.main import main
from mlora_core.config.schema import load_config
from mlora_core.training.memory import MemoryModel
from mlora_core.training.memory_plan import _job_fit, plan_memory


def test_plan_prints_predictions(make_config, data_dir, tmp_path, capsys):
    path = make_config([job("a", data_dir / "a.jsonl"), job("b", data_dir / "b.jsonl")])
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "memory limit:" in out and "predicted" in out
    rows = [line.split()[0] for line in out.splitlines()[3:]]
    assert rows == ["a", "b"]
    assert not (tmp_path / "out").exists()  # nothing written


def test_plan_fits_the_memory_model_to_probes(make_config, data_dir, host):
    config = load_config(make_config([job("a", data_dir / "a.jsonl")]), ["scheduler.memory_limit=123456789012"])
    result = plan_memory(config, host)
    assert result["memory_limit_bytes"] == 123456789012
    b0, _, _ = result["coefficients"]
    assert b0 > 0
    assert len(result["observations"]) >= 3
    refit = MemoryModel(limit=None)
    for rows, length, peak in result["observations"]:
        refit.observe(rows, length, peak)
    assert result["coefficients"][1:] == refit.coef[1:]  # the slopes are the fit's; b0 adds optimizer state
    for rows, length, peak in result["observations"]:  # and the fit reproduces the probes it was fitted to
        assert abs(refit.predict(rows, length) - peak) <= 0.05 * peak, (rows, length, peak)
    assert result["trivial_step"]["predicted_bytes"] >= b0


def test_largest_shapes_are_the_largest_that_fit():
    model = MemoryModel(limit=10**6 + 100 * 256 * 4 + 256 * 256 * 4 + 1)
    model.coef = (1e6, 100.0, 1.0)  # room for exactly 4 rows of 256 tokens
    fit = _job_fit(model, "a", 2, 256)
    assert fit.max_micro_batch_size == 4
    assert model.fits(2, fit.max_cutoff_len) and not model.fits(2, fit.max_cutoff_len + 1)
    assert fit.max_cutoff_len > 256
    assert _job_fit(MemoryModel(limit=10**5), "a", 2, 256).max_micro_batch_size > 10**5  # no data: no limit known
