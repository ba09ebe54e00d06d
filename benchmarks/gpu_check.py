"""CUDA check of training, run metrics, evaluation and early stopping (run where a GPU is lent).

1. Two LoRA jobs trained together on the GPU equal each job trained alone (fp32), with logits
   only at learned positions; the run metrics carry ``gpu_utilisation`` (NVML) and the
   summary's peak is the CUDA allocator's.
2. A job with ``eval_every`` + ``early_stop`` and an ``exact_match`` job run on the GPU.

    python benchmarks/gpu_check.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path[:0] = ["tests"]
from conftest import ALL_PROJECTIONS, alpaca_records, build_tiny_llama, job, write_jsonl, yes_no_records  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mlora_core.config.schema import load_config  # noqa: E402
from mlora_core.plugin_api.host import create_plugin_manager  # noqa: E402
from mlora_core.training.engine import run  # noqa: E402


def config(root: Path, model: Path, jobs: list[dict], name: str, device: str) -> Path:
    cfg = {
        "base_model": {"backend": "llama", "path": str(model), "dtype": "fp32", "device": device},
        "scheduler": {"type": "trivial"},
        "monitor": {"console": None},
        "output_dir": str(root / name),
        "jobs": jobs,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    device = parser.parse_args().device
    print("device", device, torch.__version__, torch.cuda.get_device_name() if device == "cuda" else "")
    root = Path(tempfile.mkdtemp())
    model = build_tiny_llama(root / "m")
    write_jsonl(root / "a.jsonl", alpaca_records(40, 1))
    write_jsonl(root / "b.jsonl", alpaca_records(30, 2, "repeat"))
    host = create_plugin_manager(autoload=False)
    a, b = job("a", root / "a.jsonl", max_steps=4), job("b", root / "b.jsonl", max_steps=3)
    both = run(load_config(config(root, model, [a, b], "both", device)), host)
    worst = 0.0
    for spec in (a, b):
        run(load_config(config(root, model, [spec], f"alone-{spec['name']}", device)), host)
        mine = load_file(str(root / "both" / spec["name"] / "adapter_model.safetensors"))
        alone = load_file(str(root / f"alone-{spec['name']}" / spec["name"] / "adapter_model.safetensors"))
        worst = max(worst, max(float((mine[k] - alone[k]).abs().max()) for k in alone))
    verdict = "OK" if worst <= 1e-5 else "FAIL"
    print(f"1. together vs alone on {device}: max |diff| {worst:.2e} (tolerance 1e-5): {verdict}")
    steps = [json.loads(line) for line in (root / "both" / "metrics.jsonl").read_text().splitlines()]
    run_keys = sorted({k for r in steps if r["event"] == "step" for k in r.get("run", {})})
    util = [r["run"].get("gpu_utilisation") for r in steps if r["event"] == "step" and r.get("run")]
    print("   run metric keys:", run_keys)
    print("   gpu_utilisation per step:", util)
    per_job = [j["peak_memory_bytes"] for j in both["jobs"]]
    print("   peak:", both["peak_memory_bytes"], both["peak_memory_kind"], per_job)

    sharp = build_tiny_llama(root / "sharp", initializer_range=0.5)
    write_jsonl(root / "qa.jsonl", yes_no_records(40))
    adapter = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ALL_PROJECTIONS}
    noisy = {"lr": 0.3, "lr_scheduler": "constant", "batch_size": 2, "micro_batch_size": 2, "epochs": 3}
    stopping = {"eval_every": 2, "early_stop": {"patience": 2}, "max_steps": 40}
    stopper = job("stop", root / "a.jsonl", adapter=adapter, **stopping, **noisy)
    qa = job("qa", root / "qa.jsonl", epochs=4, max_steps=30, lr=5e-2, adapter=adapter, data_opts={"exact_match": True})
    summary = run(load_config(config(root, sharp, [stopper, qa], "eval", device)), host)
    for entry in summary["jobs"]:
        keys = ("status", "steps", "best_step", "stopped_early", "eval_loss_before", "eval_loss_after")
        print("2.", entry["name"], {k: entry[k] for k in keys + ("accuracy_before", "accuracy_after")})


if __name__ == "__main__":
    main()
