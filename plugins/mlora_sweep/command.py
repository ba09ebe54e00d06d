"""``mlora sweep sweep.yaml``: a hyper-parameter search run as concurrent jobs over one base.

Each trial of an Optuna study becomes a job of one running engine; a trial the pruner
stops frees its room at the next step boundary for a new trial while the others train on.
The study lives in ``<output_dir>/study.db``, so ``--resume`` continues it after a crash or
Ctrl-C (running trials from the engine's checkpoint). See docs/sweep.md.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from mlora_core.cli.core_commands import add_config_arguments, add_output_dir_arguments, stop_on_signals
from mlora_core.errors import MloraError
from mlora_core.plugin_api.host import PluginHost
from mlora_sweep.config import SweepConfig, load_sweep


class SweepCommand:
    help = "search hyper-parameters: trials train as concurrent jobs over one base, losers stopped early"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser)
        add_output_dir_arguments(parser, "sweep")
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="print the trials and the predicted memory of a step, then stop (loads the base, trains nothing)",
        )

    def run(self, args: argparse.Namespace, host: PluginHost) -> int:
        sweep = load_sweep(args.config, args.overrides, host)
        if args.dry_run:
            print(dry_run(sweep, host))
            return 0
        return run_sweep(sweep, host, resume=args.resume, overwrite=args.overwrite)


def run_sweep(sweep: SweepConfig, host: PluginHost, *, resume: bool = False, overwrite: bool = False) -> int:
    """Run (or continue) the sweep; writes leaderboard.json and best/ and prints the table.

    Returns 0 when every trial completed or was pruned, 1 otherwise.
    """
    import shutil

    from mlora_core.training.engine import Engine
    from mlora_sweep.controller import SweepController
    from mlora_sweep.leaderboard import format_table, write_results
    from mlora_sweep.study import open_study, study_path

    path = study_path(sweep)
    if resume and not path.is_file():
        raise MloraError(f"--resume: {path} does not exist; there is no sweep to continue")
    if path.is_file() and not resume:
        if not overwrite:
            raise MloraError(
                f"output_dir {path.parent} already holds a sweep; pass --resume to continue it, "
                "--overwrite to start again, or choose another output_dir"
            )
        path.unlink()
        shutil.rmtree(path.parent / "tensorboard", ignore_errors=True)
    study = open_study(sweep, resume=resume)
    controller = SweepController(sweep, study)
    engine = Engine(sweep.run, host, resume=resume, overwrite=overwrite, between_steps=controller)
    engine.accuracy_during = sweep.settings.metric == "accuracy"
    stop_on_signals(engine)
    host.add_listener(controller, "sweep:controller")
    try:
        engine.run()
    finally:
        host.remove_listener(controller)
        controller.settle()
        rows = write_results(study, sweep)
        print(format_table(rows, sweep), flush=True)
    best = next((r for r in rows if r["status"] == "completed"), None)
    if best is not None:
        print(f"mlora sweep: best trial {best['name']} ({sweep.settings.metric} {best['value']:.4g}) copied to best/")
    return 0 if all(r["status"] in ("completed", "pruned") for r in rows) else 1


def dry_run(sweep: SweepConfig, host: PluginHost) -> str:
    """The trials the space expands to, and ``mlora plan``'s prediction for a step of
    ``max_concurrent`` of them (ranges at their upper end)."""
    from mlora_core.config.schema import job_config_from_dict
    from mlora_core.training.memory_plan import format_plan, plan_memory
    from mlora_sweep.space import encode, trial_job

    lines = [f"{sweep.trials} trial(s), {min(sweep.trials, sweep.settings.max_concurrent)} at a time:"]
    for number in range(sweep.trials):
        point = sweep.space.grid_point(number)
        values = [f"{a.key}={point[a.key]}" for a in sweep.space.grid]
        values += [f"{a.key}~{a.describe()}" for a in sweep.space.sampled]
        lines.append(f"  {sweep.trial_name(number)}  {'  '.join(values)}")
    jobs = []
    for number in range(min(sweep.trials, sweep.settings.max_concurrent)):
        params: dict[str, Any] = dict(sweep.space.grid_point(number))
        for axis in sweep.space.sampled:
            params[axis.key] = encode(axis.values[-1] if axis.kind == "choice" else axis.values[1])
        name = sweep.trial_name(number)
        jobs.append(job_config_from_dict(trial_job(sweep.template, sweep.space, params, name), name))
    lines += ["", "predicted memory (sampled ranges at their upper end):"]
    lines.append(format_plan(plan_memory(dataclasses.replace(sweep.run, jobs=jobs), host)))
    return "\n".join(lines)
