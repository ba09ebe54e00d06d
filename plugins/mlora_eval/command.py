"""``mlora eval cfg.yaml``: held-out loss and exact-match accuracy of each job's saved adapter.

The base model loads once. Every job is first measured on the bare base (what training
started from), then each saved adapter (``<output_dir>/<job>``) is attached and measured,
all jobs together in shared batches. Results go to ``<output_dir>/eval.json``, into
``summary.json`` (key ``evaluation``) when the run wrote one, and to the config's monitors
as evaluation events (``mlora_on_evaluation``: the base as ``before`` at step 0, each saved
adapter as ``after`` at the job's last step), which the TensorBoard and JSON-lines monitors
add to the run's files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from mlora_core.cli.core_commands import add_config_arguments, load_config_arguments
from mlora_core.config.schema import MloraConfig
from mlora_core.config.validation import validate_config
from mlora_core.errors import MloraError
from mlora_core.evaluation.metrics import held_out_metrics
from mlora_core.events import RunEvents
from mlora_core.models.loading import load_base_model
from mlora_core.models.saved_adapters import load_adapter
from mlora_core.plugin_api.conventions import pad_token_id
from mlora_core.plugin_api.host import PluginHost
from mlora_core.plugin_api.protocols import LoadedModel, Sample
from mlora_core.plugin_api.routing import RowRouter
from mlora_core.training.summary import fmt_number, fmt_percent, write_json_atomic

HeldOut = dict[str, tuple[Sample, ...]]


class EvalCommand:
    help = "held-out loss and exact-match accuracy of each job's saved adapter, and of the base"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser)

    def run(self, args: argparse.Namespace, host: PluginHost) -> int:
        config = load_config_arguments(args)
        result = evaluate_saved(config, host)
        print(format_result(result))
        print(f"written to {Path(config.output_dir) / 'eval.json'}", file=sys.stderr)
        return 1 if any(v["adapter_error"] for v in result["jobs"].values()) else 0


def evaluate_saved(config: MloraConfig, host: PluginHost) -> dict[str, Any]:
    """Measure every job's base and saved adapter; returns what eval.json holds."""
    validate_config(config, host)
    out = Path(config.output_dir)
    missing = [j.name for j in config.jobs if not (out / j.name / "adapter_config.json").is_file()]
    if len(missing) == len(config.jobs):
        raise MloraError(f"no saved adapter in {out} for any job ({', '.join(missing)}); train first with mlora run")
    loaded = load_base_model(host, config.base_model)
    held_out = _held_out(config, host, loaded)
    router = RowRouter()
    base = _measure(config, loaded, router, held_out, list(held_out))  # no adapter attached yet: the bare base
    saved, unreadable = [], {}
    for name in (n for n in held_out if n not in missing):
        try:  # one adapter that cannot be loaded must not stop the others being measured
            load_adapter(host, loaded.model, name, out / name, router)
            saved.append(name)
        except MloraError as exc:
            unreadable[name] = str(exc)
    after = _measure(config, loaded, router, held_out, saved)
    jobs = {
        name: {
            "held_out_samples": len(held_out[name]),
            "adapter_dir": None if name in missing else str(out / name),
            "adapter_error": unreadable.get(name),
            "eval_loss_base": base[name]["eval_loss"],
            "accuracy_base": base[name]["accuracy"],
            "eval_loss": after.get(name, {}).get("eval_loss"),
            "accuracy": after.get(name, {}).get("accuracy"),
        }
        for name in held_out
    }
    result = {"evaluated_at": datetime.datetime.now().isoformat(timespec="seconds"), "jobs": jobs}
    steps = _write(out, result)
    _report(config, host, result, steps)
    return result


def _held_out(config: MloraConfig, host: PluginHost, loaded: LoadedModel) -> HeldOut:
    """Each job's held-out samples, split exactly as training split them."""
    found = {}
    for jc in config.jobs:
        data = host.data_loaders.create(jc.data.type).load(jc.data, loaded.tokenizer, jc.train.seed)
        found[jc.name] = tuple(data.eval)
    return found


def _measure(
    config: MloraConfig, loaded: LoadedModel, router: RowRouter, held_out: HeldOut, names: list[str]
) -> dict[str, dict[str, float | None]]:
    by_name = {j.name: j for j in config.jobs}
    pad_id = pad_token_id(loaded.tokenizer)
    sets = [(n, held_out[n], by_name[n].train.micro_batch_size, by_name[n].data.exact_match) for n in names]
    return held_out_metrics(loaded, router, sets, pad_id, config.base_model.device)


def _write(out: Path, result: dict[str, Any]) -> dict[str, int]:
    """eval.json, and summary.json's ``evaluation``; returns each job's optimizer steps from summary.json."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "eval.json", result)
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        return {}
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    summary["evaluation"] = result
    write_json_atomic(summary_path, summary)
    return {j["name"]: j["steps"] for j in summary.get("jobs", [])}


def _report(config: MloraConfig, host: PluginHost, result: dict[str, Any], steps: dict[str, int]) -> None:
    """The results as evaluation events to the config's monitors: the base at step 0, each
    saved adapter at its job's last step."""
    events = RunEvents(host, config, resume=True)
    try:
        jobs = result["jobs"]
        base = {n: (0, {"eval_loss": v["eval_loss_base"], "accuracy": v["accuracy_base"]}) for n, v in jobs.items()}
        events.evaluation(0, "before", base)
        saved = {
            n: (steps.get(n, 0), {"eval_loss": v["eval_loss"], "accuracy": v["accuracy"]})
            for n, v in jobs.items()
            if v["adapter_dir"] and not v["adapter_error"]
        }
        events.evaluation(0, "after", saved)
    finally:
        events.close()


def format_result(result: dict[str, Any]) -> str:
    """A table: per job, held-out loss and accuracy on the base and with the saved adapter."""
    header = f"{'job':<16} {'held_out':>8} {'loss_base':>10} {'loss':>8} {'acc_base':>9} {'acc':>7}"
    rows = [header, "-" * len(header)]
    for name, v in result["jobs"].items():
        rows.append(
            f"{name:<16} {v['held_out_samples']:>8} {fmt_number(v['eval_loss_base']):>10} "
            f"{fmt_number(v['eval_loss']):>8} {fmt_percent(v['accuracy_base']):>9} {fmt_percent(v['accuracy']):>7}"
        )
        if v["adapter_dir"] is None:
            rows[-1] += "  (no saved adapter)"
        elif v["adapter_error"]:
            rows[-1] += f"  (adapter not loaded: {v['adapter_error']})"
    return "\n".join(rows)
