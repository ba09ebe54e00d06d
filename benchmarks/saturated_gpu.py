"""GPU: mlora against PEFT where one job's step saturates the device, with MFU and a measured memory cap.

    python benchmarks/saturated_gpu.py --tokenizer DIR --out gpu-results   # one H200, under 8 minutes
    python benchmarks/saturated_gpu.py --smoke --out /tmp/smoke            # CPU, tiny shapes: the plumbing

It drives ``mlora bench`` (:func:`mlora_bench.bench.collect`) through four parts, in this order;
a part is skipped when the time left (``--budget-s``, default 450 s) is below its estimate,
and a part that fails is recorded and the next one runs:

1. ``saturated_4``: a random-weight LLaMA of Llama-3-8B's shape (hidden 4096, intermediate
   14336, 32 layers, 32 heads, 8 KV heads; bf16; built once on the GPU), rows of 256-512
   tokens (cutoff 512), micro-batch 8, batch 16, 2 steps, 4 jobs: baseline_seq,
   baseline_parallel, mlora, mlora_packed.
2. ``saturated_16``: the same with 16 jobs: mlora and mlora_packed. Not run, and said so:
   baseline_parallel (16 processes x 16 GB of weights do not fit in 141 GB, nor their loading
   in the host's RAM) and baseline_seq (one job at a time: its throughput is saturated_4's).
3. ``memory_cap``: SmolLM2-135M under one budget (``--cap-gib``, default 4), 1, 2, 4, 8, 16
   jobs (:func:`mlora_bench.bench.measure_cap`): the most jobs each method completes, and
   its throughput at each count.
4. ``small``: SmolLM2-135M, 4 jobs, as the ``mlora bench`` GPU table: every method but the floor.

MFU (model FLOPs utilisation) = non-pad tokens/s x FLOPs per token / 989e12 (H200 SXM, dense
bf16). FLOPs per token, for a frozen base with LoRA (see :func:`flops_per_token`):
4N for the base's matmuls (forward 2N, backward through the frozen weights 2N, no weight
gradients; N counts every projection and the LM head, not the embedding lookup), plus
attention 12·layers·seq·hidden (forward 4·layers·seq·hidden for QK^T and AV, no causal
halving, backward twice that; seq is the cutoff, an upper bound), plus the adapters
6·r·(in+out) per adapted layer (q_proj, v_proj). Writes ``saturated_gpu.json`` and
``saturated_gpu.md`` under ``--out`` after every part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from mlora_bench.bench import SMOLLM2, add_arguments, collect, measure_cap, random_llama
from mlora_bench.report import markdown

PEAK_FLOPS = 989e12  # H200 SXM, dense bf16 (NVIDIA's datasheet figure without sparsity)
LLAMA_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
#: SmolLM2-135M's shape (its config.json), for the FLOPs of the small parts.
SMOLLM2_SHAPE = {**TINY, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30}
SMOLLM2_SHAPE |= {"num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152}
#: Seconds each part is expected to take on one H200 (guesses until the first run: loading a
#: 16 GB model takes about 15 s per process; building it about a minute, before the parts).
ESTIMATE_S = {"saturated_4": 150, "saturated_16": 100, "memory_cap": 100, "small": 70}


def flops_per_token(shape: dict[str, int], seq_len: int, r: int = 8) -> dict[str, float]:
    """Training FLOPs per token of a frozen LLaMA base with LoRA r on q_proj and v_proj.

    Args:
        shape: LlamaConfig fields (hidden_size, intermediate_size, num_hidden_layers,
            num_attention_heads, num_key_value_heads, vocab_size).
        seq_len: the row length attention runs over (the cutoff: an upper bound).
        r: the LoRA rank.

    Returns:
        ``params`` (N), ``base`` (4N), ``attention``, ``adapters`` and their ``total``.
    """
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    n = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * shape["vocab_size"]  # q,o + k,v + MLP; LM head
    terms = {
        "params": float(n),
        "base": 4.0 * n,  # forward 2N + backward to the inputs 2N
        "attention": 3.0 * 4 * layers * seq_len * h,  # forward QK^T + AV, backward 2x; no causal halving
        "adapters": 6.0 * r * layers * ((h + h) + (h + kv)),  # q_proj h->h, v_proj h->kv
    }
    terms["total"] = terms["base"] + terms["attention"] + terms["adapters"]
    return terms


def utilisation(result: dict[str, Any], shape: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per method: non-pad tokens/s, peak GiB, padding and MFU (null for a method that did not complete)."""
    per_token = flops_per_token(shape, result["settings"]["seq_len"])["total"]
    rows = {}
    for name, row in result["methods"].items():
        if not row.get("completed", True):
            rows[name] = {"completed": False, "reason": row["reason"]}
            continue
        speed = row["tokens_per_s"]["median"]
        rows[name] = {
            "tokens_per_s": speed,
            "peak_gib": row["peak_memory_bytes"]["median"] / 2**30,
            "padding_fraction": (row.get("padding_fraction") or {}).get("median"),
            "mfu": speed * per_token / PEAK_FLOPS,
        }
    return rows


def bench_args(options: list[str], deadline: float) -> argparse.Namespace:
    """``mlora bench`` options parsed as the command parses them, with the run's deadline."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(options)
    args.deadline = deadline
    return args


def packing_available() -> bool:
    """Whether this mlora has ``scheduler.packing`` (so mlora_packed can run)."""
    from mlora_core.config.schema import SchedulerConfig

    return any(f.name == "packing" for f in dataclasses.fields(SchedulerConfig))


def plan(cli: argparse.Namespace, model_8b: str, methods: list[str]) -> dict[str, list[str]]:
    """Each bench part's ``mlora bench`` options (tiny shapes on CPU with ``--smoke``)."""
    small_model = model_8b if cli.smoke else SMOLLM2
    device = ["--device", "cpu", "--dtype", "fp32"] if cli.smoke else ["--device", "cuda", "--dtype", "bf16"]
    shape = ["--seq-len", "64", "--micro-batch-size", "2", "--steps", "1"] if cli.smoke else []
    big = shape or ["--seq-len", "512", "--micro-batch-size", "8", "--batch-size", "16", "--steps", "2"]
    small = shape or ["--seq-len", "128", "--micro-batch-size", "4", "--steps", "2"]
    jobs = ("2", "4") if cli.smoke else ("4", "16")
    mlora = [m for m in methods if m.startswith("mlora")]
    return {
        "saturated_4": [*device, *big, "--model", model_8b, "--jobs", jobs[0], "--methods", ",".join(methods)],
        "saturated_16": [*device, *big, "--model", model_8b, "--jobs", jobs[1], "--methods", ",".join(mlora)],
        "memory_cap": [*device, *small, "--model", small_model, "--methods", ",".join(methods)],
        "small": [*device, *small, "--model", small_model, "--jobs", "4", "--methods", ",".join(methods)],
    }


NOT_RUN_16 = {
    "baseline_parallel": "not run: 16 processes x 16 GB of bf16 weights (257 GB) exceed the H200's 141 GB, "
    "and loading them at once exceeds the host's RAM",
    "baseline_seq": "not run: one job at a time, so its throughput is saturated_4's (the jobs are alike); "
    "16 more model loads would not fit the time budget",
}


def run_bench_part(name: str, options: list[str], shape: dict[str, int], deadline: float) -> dict[str, Any]:
    """One ``mlora bench`` run (1 round): its result, the per-method MFU, its Markdown."""
    args = bench_args([*options, "--rounds", "1"], deadline)
    result = collect(args, ["bench", *options, "--rounds", "1"])
    part = {"options": options, "result": result, "utilisation": utilisation(result, shape)}
    if name == "saturated_16":
        part["not_run"] = NOT_RUN_16
    return part


def run_cap_part(cli: argparse.Namespace, options: list[str], deadline: float) -> dict[str, Any]:
    """The memory-cap sweep: every method at 1, 2, 4, 8, 16 jobs under ``--cap-gib`` (enforced on CUDA)."""
    counts = "1,2" if cli.smoke else "1,2,4,8,16"
    args = bench_args([*options, "--memory-cap-gib", str(cli.cap_gib), "--memory-cap-jobs", counts], deadline)
    with tempfile.TemporaryDirectory(prefix="mlora-cap-") as tmp:
        cap = measure_cap(args, Path(tmp), args.model, cli.cap_gib * 2**30, enforced=not cli.smoke)
    return {"options": options, "memory_cap": cap}


def part_markdown(name: str, part: dict[str, Any]) -> str:
    """One part's section of saturated_gpu.md."""
    from mlora_bench import capacity

    lines = [
        f"## {name}",
        "",
        f"`mlora bench {' '.join(part.get('options', []))}` ({part.get('seconds', 0):.0f} s)",
        "",
    ]
    if "skipped" in part or "error" in part:
        return "\n".join([*lines, f"**{part.get('skipped') or 'failed: ' + part['error']}**", ""])
    if "memory_cap" in part:
        return "\n".join([*lines, capacity.markdown(part["memory_cap"]), ""])
    lines += [
        markdown(part["result"]),
        "",
        "| method | tokens/s non-pad | peak GiB | padding | MFU |",
        "|---|---|---|---|---|",
    ]
    for method, u in part["utilisation"].items():
        if not u.get("completed", True):
            lines.append(f"| {method} | did not complete ({u['reason']}) | - | - | - |")
            continue
        padding = "-" if u["padding_fraction"] is None else f"{u['padding_fraction']:.3f}"
        lines.append(f"| {method} | {u['tokens_per_s']:.0f} | {u['peak_gib']:.1f} | {padding} | {u['mfu']:.1%} |")
    lines += [f"| {method} | {why} | - | - | - |" for method, why in part.get("not_run", {}).items()]
    return "\n".join([*lines, ""])


def write(out: Path, report: dict[str, Any]) -> None:
    """saturated_gpu.json and saturated_gpu.md, rewritten after every part."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "saturated_gpu.json").write_text(json.dumps(report, indent=2))
    head = [
        "# Saturated GPU benchmark",
        "",
        f"{report['date']}, {report['device']}; MFU against {PEAK_FLOPS / 1e12:.0f} TFLOP/s (dense bf16); "
        f"FLOPs per token: {report['flops_per_token']['8b']['total'] / 1e9:.2f} G (8B shape), "
        f"{report['flops_per_token']['small']['total'] / 1e9:.3f} G (small); mlora_packed "
        f"{'run' if report['packing'] else 'not run: this mlora has no scheduler.packing'}.",
        "",
    ]
    body = [part_markdown(name, part) for name, part in report["parts"].items()]
    (out / "saturated_gpu.md").write_text("\n".join(head + body))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="directory for saturated_gpu.json and .md")
    parser.add_argument("--tokenizer", help="tokenizer directory for the 8B shape (default: SmolLM2's, from its GGUF)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="seconds for the whole script (default 450)")
    parser.add_argument("--cap-gib", type=float, default=4.0, help="the memory-cap sweep's budget (default 4 GiB)")
    parser.add_argument("--parts", default="saturated_4,saturated_16,memory_cap,small", help="which parts, in order")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, budget not enforced: test the plumbing")
    return parser.parse_args(argv)


def build_8b(cli: argparse.Namespace, work: Path, parts: list[str]) -> tuple[str, dict[str, int]]:
    """The 8B shape's random model (tiny with ``--smoke``), built only when a part needs it, and its shape."""
    shape = TINY if cli.smoke else LLAMA_8B
    if not cli.smoke and not any(p.startswith("saturated") for p in parts):
        return "", {**shape, "vocab_size": SMOLLM2_SHAPE["vocab_size"]}
    model = random_llama(json.dumps(shape), work / "llama", cli.tokenizer, "cpu" if cli.smoke else "cuda")
    return str(model), {**shape, "vocab_size": json.loads((model / "config.json").read_text())["vocab_size"]}


def run_part(
    cli: argparse.Namespace, name: str, options: list[str], shape: dict[str, int], end: float
) -> dict[str, Any]:
    """One part, unless the time left is below its estimate; a failure is recorded, not raised."""
    t0 = time.monotonic()
    part: dict[str, Any] = {"options": options}
    needs = 0 if cli.smoke else ESTIMATE_S[name]
    if end - t0 < needs:
        part["skipped"] = f"skipped: {end - t0:.0f} s left, the part needs about {needs} s"
    else:
        try:
            part = (
                run_cap_part(cli, options, end) if name == "memory_cap" else run_bench_part(name, options, shape, end)
            )
        except Exception as exc:  # one part's failure is recorded; the next part runs
            part["error"], part["traceback"] = f"{type(exc).__name__}: {exc}", traceback.format_exc()
    part["seconds"] = time.monotonic() - t0
    return part


def main(argv: list[str] | None = None) -> None:
    """Build the 8B shape, run the parts within the budget, write the results after each."""
    cli = parse(argv)
    started = time.monotonic()
    end = started + cli.budget_s
    methods = ["baseline_seq", "baseline_parallel", "mlora"] + (["mlora_packed"] if packing_available() else [])
    parts = cli.parts.split(",")
    with tempfile.TemporaryDirectory(prefix="mlora-saturated-") as tmp:
        model_8b, shape_8b = build_8b(cli, Path(tmp), parts)
        shapes = {"8b": shape_8b, "small": shape_8b if cli.smoke else SMOLLM2_SHAPE}
        seq = {"8b": 64, "small": 64} if cli.smoke else {"8b": 512, "small": 128}
        report: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d"),
            "device": "cpu (smoke)" if cli.smoke else "cuda",
            "packing": "mlora_packed" in methods,
            "peak_flops": PEAK_FLOPS,
            "shapes": shapes,
            "flops_per_token": {k: flops_per_token(shapes[k], seq[k]) for k in shapes},
            "build_s": time.monotonic() - started,
            "parts": {},
        }
        options = plan(cli, model_8b, methods)
        for name in parts:
            shape = shapes["8b" if name.startswith("saturated") else "small"]
            report["parts"][name] = run_part(cli, name, options[name], shape, end)
            report["total_s"] = time.monotonic() - started
            write(cli.out, report)
            print(f"saturated_gpu: {name} done in {report['parts'][name]['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
