"""``mlora eval cfg.yaml``: held-out loss and exact-match accuracy of each job's saved adapter.

The base model loads once. Every job is first measured on the bare base (what training
started from), then each saved adapter (``<output_dir>/<job>``) is attached and measured,
all jobs together in shared batches. Results go to ``<output_dir>/eval.json``, into
``summary.json`` (key ``evaluation``) when the run wrote one, and to TensorBoard when the
config has a ``tensorboard`` monitor.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any

from mlora_core.adapter_io import load_adapter
from mlora_core.base_model import load_base_model
from mlora_core.config import MloraConfig
from mlora_core.errors import MloraError
from mlora_core.evaluate import held_out_metrics
from mlora_core.protocols import LoadedModel, Sample
from mlora_core.routing import RowRouter
from mlora_core.summary import fmt_number, fmt_percent, write_json_atomic
from mlora_core.validation import validate_config

HeldOut = dict[str, tuple[Sample, ...]]


def evaluate_saved(config: MloraConfig, host: Any) -> dict[str, Any]:
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
    saved = [name for name in held_out if name not in missing]
    for name in saved:
        load_adapter(host, loaded.model, name, out / name, router)
    after = _measure(config, loaded, router, held_out, saved)
    jobs = {
        name: {
            "held_out_samples": len(held_out[name]),
            "adapter_dir": None if name in missing else str(out / name),
            "eval_loss_base": base[name]["eval_loss"],
            "accuracy_base": base[name]["accuracy"],
            "eval_loss": after.get(name, {}).get("eval_loss"),
            "accuracy": after.get(name, {}).get("accuracy"),
        }
        for name in held_out
    }
    result = {"evaluated_at": datetime.datetime.now().isoformat(timespec="seconds"), "jobs": jobs}
    _write(config, out, result)
    return result


def _held_out(config: MloraConfig, host: Any, loaded: LoadedModel) -> HeldOut:
    """Each job's held-out samples, split exactly as training split them."""
    found = {}
    for jc in config.jobs:
        data = host.datasets.create(jc.data.type).load(jc.data, loaded.tokenizer, jc.train.seed)
        found[jc.name] = tuple(data.eval)
    return found


def _measure(
    config: MloraConfig, loaded: LoadedModel, router: RowRouter, held_out: HeldOut, names: list[str]
) -> dict[str, dict[str, float | None]]:
    by_name = {j.name: j for j in config.jobs}
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    sets = [(n, held_out[n], by_name[n].train.micro_batch_size, by_name[n].data.exact_match) for n in names]
    return held_out_metrics(loaded, router, sets, pad_id, config.base_model.device)


def _write(config: MloraConfig, out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "eval.json", result)
    summary_path = out / "summary.json"
    steps: dict[str, int] = {}
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        summary["evaluation"] = result
        write_json_atomic(summary_path, summary)
        steps = {j["name"]: j["steps"] for j in summary.get("jobs", [])}
    options = config.monitor.get("tensorboard")
    if options is not None:
        _to_tensorboard(out, options, result, steps)


def _to_tensorboard(out: Path, options: dict[str, Any], result: dict[str, Any], steps: dict[str, int]) -> None:
    """``<job>/eval_loss`` and ``<job>/eval_accuracy`` at the job's last step (0 for the base)."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = options.get("log_dir") or str(out / "tensorboard")
    with SummaryWriter(log_dir=log_dir) as writer:
        for name, values in result["jobs"].items():
            points = [(0, values["eval_loss_base"], values["accuracy_base"])]
            if values["adapter_dir"]:
                points.append((steps.get(name, 0), values["eval_loss"], values["accuracy"]))
            for step, loss, accuracy in points:
                if loss is not None:
                    writer.add_scalar(f"{name}/eval_loss", loss, step)
                if accuracy is not None:
                    writer.add_scalar(f"{name}/eval_accuracy", accuracy, step)


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
    return "\n".join(rows)


def main(config: MloraConfig, host: Any) -> int:
    result = evaluate_saved(config, host)
    print(format_result(result))
    print(f"written to {Path(config.output_dir) / 'eval.json'}", file=sys.stderr)
    return 0
