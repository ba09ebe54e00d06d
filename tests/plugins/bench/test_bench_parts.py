"""``mlora bench``'s pure parts, without training: workloads, memory-cap figures, the report, FLOPs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from mlora_bench import capacity, report
from mlora_bench.baselines import _is_out_of_memory
from mlora_bench.bench import add_arguments, check_args
from mlora_bench.runner import Bench, ChildFailed, _failure
from mlora_bench.workloads import SKEWED_WORDS, distributions, job_lengths, write_datasets

ROOT = Path(__file__).resolve().parents[3]


def load_script(name: str) -> ModuleType:
    """A script of benchmarks/ as a module."""
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_args(*options: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(options))


def stat(value: float) -> dict[str, float]:
    return {"median": value, "min": value, "max": value}


# --- workloads ---------------------------------------------------------------------------------


def test_skewed_cycles_the_four_distributions() -> None:
    assert distributions("skewed", 6, 128) == ["short", "medium", "long", "mixed", "short", "medium"]
    assert distributions("uniform", 2, 128) == ["uniform", "uniform"]
    with pytest.raises(ValueError, match="skewed"):
        job_lengths("zipf", 0, 128)


def test_skewed_rows_have_each_jobs_word_counts(tmp_path: Path) -> None:
    paths = write_datasets(tmp_path, 5, 40, 128, "skewed")
    for j, path in enumerate(paths):
        lo, hi = list(SKEWED_WORDS.values())[j % 4]
        counts = [len(json.loads(line)["input"].split()) for line in path.read_text().splitlines()]
        assert len(counts) == 40 and lo <= min(counts) and max(counts) <= hi, j
    assert paths[0].read_text() != paths[4].read_text()  # the same distribution, another seed


def test_skewed_rows_are_the_scheduler_benchmarks(tmp_path: Path) -> None:
    ours = write_datasets(tmp_path, 4, 30, 128, "skewed")
    (tmp_path / "sched").mkdir()
    theirs = load_script("schedulers").write_datasets(tmp_path / "sched", 30)
    assert [p.read_text() for p in ours] == [p.read_text() for p in theirs.values()]


# --- memory cap --------------------------------------------------------------------------------


def test_extrapolated_figures_say_so() -> None:
    rows = {
        "baseline_seq": {"peak_memory_bytes": stat(2.0)},
        "baseline_parallel": {"peak_memory_bytes": stat(8.0), "single_process_peak_bytes": stat(2.0)},
        "mlora": {"peak_memory_bytes": stat(5.0)},
        "mlora_one": {"peak_memory_bytes": stat(2.0)},
    }
    cap = capacity.extrapolate(rows, jobs=4, cap=11.0)
    assert cap["basis"] == "extrapolated"
    assert {k: v["max_jobs"] for k, v in cap["methods"].items()} == {
        "baseline_seq": 1,
        "baseline_parallel": 5,
        "mlora": 10,  # 2 bytes for one job, 1 more per job
    }
    assert all(v["basis"] == "extrapolated" for v in cap["methods"].values())
    assert "(extrapolated)" in capacity.markdown(cap)


def fake_point(limits: dict[str, int]) -> Any:
    """A run_point that completes up to ``limits[method]`` jobs and runs out of memory above."""
    calls: list[tuple[str, int]] = []

    def run_point(method: str, count: int) -> dict[str, Any]:
        calls.append((method, count))
        if count > limits[method]:
            raise capacity.PointFailed("out of memory")
        return {"tokens_per_s": 100.0 * count, "peak_memory_bytes": 2**20 * count, "padding_fraction": 0.1}

    run_point.calls = calls  # type: ignore[attr-defined]
    return run_point


def test_measured_sweep_stops_at_the_first_failure() -> None:
    run_point = fake_point({"baseline_seq": 99, "baseline_parallel": 2, "mlora": 16, "mlora_one": 0})
    cap = capacity.sweep(run_point, ["baseline_seq", "baseline_parallel", "mlora", "mlora_one"], cap=8.0 * 2**30)
    assert cap["basis"] == "measured" and set(cap["methods"]) == {"baseline_seq", "baseline_parallel", "mlora"}
    parallel = cap["methods"]["baseline_parallel"]
    assert parallel["max_jobs"] == 2 and parallel["basis"] == "measured"
    assert [(p["jobs"], p["completed"]) for p in parallel["points"]] == [(1, True), (2, True), (4, False)]
    assert ("baseline_parallel", 8) not in run_point.calls
    assert cap["methods"]["mlora"]["max_jobs"] == 16
    assert cap["methods"]["mlora"]["points"][-1]["tokens_per_s"] == 1600.0
    text = capacity.markdown(cap)
    assert "Most concurrent jobs under 8.0 GiB (measured)" in text
    assert "did not complete (out of memory)" in text and "| 8 |" in text and "not run" in text


def test_sequential_baseline_runs_only_its_counts() -> None:
    run_point = fake_point({"baseline_seq": 99})
    cap = capacity.sweep(run_point, ["baseline_seq"], seq_counts=[1], enforced=False)
    seq = cap["methods"]["baseline_seq"]
    assert run_point.calls == [("baseline_seq", 1)]
    assert seq["max_jobs"] == 16 and seq["basis"].startswith("not enforced with 1 job(s)")
    assert [p["jobs"] for p in seq["points"]] == [1, 2, 4, 8, 16]


# --- report ------------------------------------------------------------------------------------


def method_row(tokens_per_s: float, padding: float) -> dict[str, Any]:
    keys = ("latency_s", "padded_tokens_per_s", "peak_memory_bytes", "utilisation", "load_peak_bytes")
    return {"completed": True, "tokens_per_s": stat(tokens_per_s), "padding_fraction": stat(padding)} | {
        k: stat(1.0) for k in keys
    }


def test_markdown_shows_padding_packed_ratios_and_failures() -> None:
    rows = {
        "baseline_seq": method_row(100.0, 0.2),
        "mlora": method_row(120.0, 0.437),
        "mlora_packed": method_row(180.0, 0.012),
        "baseline_parallel": report.summarise([{"completed": False, "reason": "out of memory"}]),
    }
    result = {"methods": rows, "ratios": report.ratios(rows)}
    assert result["ratios"]["mlora_packed/mlora"]["tokens_per_s"] == 1.5
    assert "mlora/baseline_parallel" not in result["ratios"]
    text = report.markdown(result)
    assert "| padding |" in text and "0.437 (0.437-0.437)" in text and "0.012" in text
    assert "mlora_packed / method tokens/s: baseline_seq 1.80, mlora 1.50" in text
    assert "| baseline_parallel | did not complete (out of memory) |" in text
    assert all(line.count("|") == 11 for line in text.splitlines() if line.startswith("| "))


# --- runs --------------------------------------------------------------------------------------


def test_mlora_configs_pack_when_asked(tmp_path: Path) -> None:
    bench = Bench(
        bench_args("--jobs", "2", "--scheduler", "optimal_fit", "--packed-scheduler", "fast_fit"), tmp_path, "m"
    )
    scheduler = {m: yaml.safe_load(bench._mlora_config(m).read_text())["scheduler"] for m in ("mlora", "mlora_packed")}
    assert scheduler == {
        "mlora": {"type": "optimal_fit", "packing": False},  # explicit: the default packs
        "mlora_packed": {"type": "fast_fit", "packing": True},
    }
    (tmp_path / "c").mkdir()
    capped = Bench(bench_args("--jobs", "2", "--packing"), tmp_path / "c", "m", cap_bytes=2.0**30)
    assert capped._scheduler("mlora_seq") == {
        "type": "trivial",
        "packing": True,
        "max_concurrent_jobs": 1,
        "memory_limit": 2**30,
    }
    assert capped._peft_specs(1, 2)[0]["memory_cap_bytes"] == 2**29  # the parallel processes share it


def test_a_failing_child_stops_its_siblings(tmp_path: Path) -> None:
    bench = Bench(bench_args("--jobs", "1"), tmp_path, "m")
    (tmp_path / "result0.json").write_text(json.dumps({"completed": False, "out_of_memory": True, "reason": "oom"}))
    procs = [
        subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"]),
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]),
    ]
    procs[0].wait()
    with pytest.raises(ChildFailed) as caught:
        bench._poll("peft", tmp_path, procs)
    assert caught.value.out_of_memory and caught.value.reason == "oom" and procs[1].returncode is not None
    # one at a time: the child's own result file, not the first one's
    (tmp_path / "result2.json").write_text(json.dumps({"completed": False, "reason": "KeyError: 'packing'"}))
    late = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(1)"])
    late.wait()
    with pytest.raises(ChildFailed, match="packing") as caught:
        bench._poll("mlora", tmp_path, [late], first=2)
    assert not caught.value.out_of_memory
    assert _failure(tmp_path / "none.json", -9) == ("killed by SIGKILL (out of host memory?)", True)


def test_out_of_memory_is_recognised_through_causes() -> None:
    try:
        try:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except RuntimeError as inner:
            raise ValueError("loading failed") from inner
    except ValueError as exc:
        assert _is_out_of_memory(exc)
    assert not _is_out_of_memory(KeyError("packing"))


def test_options_are_checked() -> None:
    assert check_args(bench_args("--methods", "mlora,mlora_packed,mlora_seq")) is None
    assert check_args(bench_args("--memory-cap-jobs", "4,2")) is not None
    assert check_args(bench_args("--memory-cap-jobs", "1,x")) is not None


# --- the GPU script's FLOPs --------------------------------------------------------------------


def test_flops_per_token_of_the_8b_shape() -> None:
    script = load_script("saturated_gpu")
    flops = script.flops_per_token({**script.LLAMA_8B, "vocab_size": 128256}, 512)
    # Llama-3-8B: 8.03e9 parameters, of which 0.525e9 are the embedding (no FLOPs)
    assert flops["params"] == pytest.approx(7.505e9, rel=1e-3)
    assert flops["base"] == 4 * flops["params"]
    assert flops["attention"] == 12 * 32 * 512 * 4096
    assert flops["adapters"] == 6 * 8 * 32 * (2 * 4096 + 4096 + 1024)
    assert flops["total"] == flops["base"] + flops["attention"] + flops["adapters"]
