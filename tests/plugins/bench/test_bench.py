"""``mlora bench`` on the tiny model: every method runs, the JSON has the documented fields."""

from __future__ import annotations

import json
from pathlib import Path

from mlora_core.cli.main import main

FIELDS = ("latency_s", "tokens_per_s", "padded_tokens_per_s", "padding_fraction", "peak_memory_bytes", "utilisation")


def test_bench_tiny(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out, table = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = ["bench", "--model", str(tiny_llama_dir), "--jobs", "2", "--steps", "1", "--rounds", "1"]
    argv += ["--micro-batch-size", "2", "--dtype", "fp32", "--memory-cap-gib", "8"]
    assert main([*argv, "--out", str(out), "--markdown", str(table)]) == 0
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {"baseline_seq", "baseline_parallel", "mlora", "mlora_one", "floor"}
    for name, row in result["methods"].items():
        for field in FIELDS:
            stat = row[field]
            assert stat["min"] <= stat["median"] <= stat["max"], (name, field)
        assert row["real_tokens"] > 0 and row["padded_tokens"] >= row["real_tokens"]
    # the same rows are trained by every method but mlora_one, which trains the first job's
    rows = {name: row["real_tokens"] for name, row in result["methods"].items()}
    one = rows.pop("mlora_one")
    assert len(set(rows.values())) == 1 and 0 < one < rows["mlora"]
    assert all(row["load_peak_bytes"]["median"] > 0 for row in result["methods"].values())
    m = result["methods"]["mlora"]
    for other in ("baseline_seq", "baseline_parallel", "floor"):
        ratio = result["ratios"][f"mlora/{other}"]
        o = result["methods"][other]
        assert ratio["tokens_per_s"] == m["tokens_per_s"]["median"] / o["tokens_per_s"]["median"]
        assert ratio["latency_s"] == m["latency_s"]["median"] / o["latency_s"]["median"]
    cap = result["memory_cap"]
    fits = {name: entry["max_jobs"] for name, entry in cap["methods"].items()}
    assert cap["basis"] == "extrapolated" and all(e["basis"] == "extrapolated" for e in cap["methods"].values())
    assert fits["baseline_seq"] == 1 and fits["baseline_parallel"] >= 1 and fits["mlora"] >= 1
    assert "| mlora |" in table.read_text() and "(extrapolated)" in table.read_text()


def test_bench_rejects_unknown_method() -> None:
    assert main(["bench", "--methods", "mlora,nope"]) == 2
