"""``mlora sweep`` against the same trials run one after another to completion.

1. The sweep: ``--config`` (default examples/sweep.yaml: 12 trials of lr x r on SmolLM2,
   4 at a time, successive halving) run by :func:`mlora_sweep.command.run_sweep`, wall time
   from start to leaderboard, the base loaded once.
2. The baseline a shell loop gives: each of the sweep's trials (the same parameters, read
   from its study) trained alone by its own engine, to completion, one after another, each
   loading the base again, as ``for t in ...; do mlora run ...; done`` does (without the
   process start-up, which favours the baseline).

Printed as one JSON object: both wall times and their ratio, optimizer steps trained in each,
and each side's best trial by the held-out loss after training (does the sweep find the
trial the exhaustive baseline finds best?).

    python benchmarks/sweep.py --out /tmp/sweep-bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(Path(__file__).parents[1] / "examples" / "sweep.yaml"))
    p.add_argument("--out", default="/tmp/sweep-bench")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override sweep-file keys")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from mlora_core.config.schema import job_config_from_dict
    from mlora_core.plugin_api.host import create_plugin_manager
    from mlora_core.training.engine import Engine
    from mlora_sweep.command import run_sweep
    from mlora_sweep.config import load_sweep
    from mlora_sweep.space import encode, trial_job

    host = create_plugin_manager(autoload=False)
    quiet = ["monitor.console=null", "monitor.tensorboard=null", "monitor.jsonl=null"]
    sweep = load_sweep(args.config, [f"output_dir={args.out}/sweep", *quiet, *args.overrides], host)
    started = time.perf_counter()
    run_sweep(sweep, host, overwrite=True)
    sweep_s = time.perf_counter() - started
    board = json.loads((Path(args.out) / "sweep" / "leaderboard.json").read_text())

    alone: dict[str, float] = {}
    alone_steps = 0
    started = time.perf_counter()
    for row in sorted(board, key=lambda r: r["number"]):
        params = {k: encode(v) for k, v in row["params"].items()}
        job = job_config_from_dict(trial_job(sweep.template, sweep.space, params, row["name"]), row["name"])
        config = dataclasses.replace(sweep.run, jobs=[job], output_dir=f"{args.out}/alone-{row['name']}")
        summary = Engine(config, host, overwrite=True).run()
        entry = summary["jobs"][0]
        alone[row["name"]] = entry["eval_loss_after"]
        alone_steps += entry["steps"]
    sequential_s = time.perf_counter() - started

    completed = [r for r in board if r["status"] == "completed"]
    best_alone = min(alone, key=lambda name: alone[name])
    result = {
        "trials": len(board),
        "completed": len(completed),
        "pruned": sum(r["status"] == "pruned" for r in board),
        "sweep_s": round(sweep_s, 1),
        "sequential_s": round(sequential_s, 1),
        "ratio": round(sweep_s / sequential_s, 3),
        "sweep_optimizer_steps": sum(r["steps"] for r in board),
        "sequential_optimizer_steps": alone_steps,
        "sweep_best": completed[0]["name"] if completed else None,
        "sweep_best_eval_loss": completed[0]["value"] if completed else None,
        "sequential_best": best_alone,
        "sequential_best_eval_loss": alone[best_alone],
        "same_best": bool(completed) and completed[0]["name"] == best_alone,
        "leaderboard": [
            {k: r[k] for k in ("name", "params", "value", "steps", "status")} | {"alone_eval_loss": alone[r["name"]]}
            for r in board
        ],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
