"""Writes per-job scalars to TensorBoard event files.

Tags are ``<job>/<metric>`` (``sql/train_loss``, ``sql/lr``, ``sql/eval_loss``, ...), with
the job's optimizer step as the x axis, so each job has its own curves; the run's per-step
numbers are ``run/<metric>`` (``run/step_time_s``, ``run/padding_fraction``, ...) over the
engine step. TensorBoard reads every event file of the log dir, so a resumed run (and
``mlora eval``) adds a file next to the earlier ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlora_core.plugin_api.hookspecs import JobMetrics, hookimpl

#: Metric name in the step and evaluation events -> TensorBoard tag suffix.
SCALARS = {
    "loss": "train_loss",
    "lr": "lr",
    "grad_norm": "grad_norm",
    "tokens_per_s": "tokens_per_s",
    "eval_loss": "eval_loss",
    "eval_accuracy": "eval_accuracy",
    "tokens_seen": "tokens_seen",
}


class TensorBoardMonitor:
    def __init__(self, output_dir: str, resume: bool = False, log_dir: str | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir) if log_dir else Path(output_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    @hookimpl
    def mlora_on_train_start(self, run: Mapping[str, Any]) -> None:
        self.writer.add_text("config", f"```\n{run['config']}\n```")

    @hookimpl
    def mlora_on_step_end(self, step: int, metrics: JobMetrics, run_metrics: Mapping[str, float]) -> None:
        for key, value in run_metrics.items():
            self.writer.add_scalar(f"run/{key}", value, step)
        self._job_scalars(metrics)

    @hookimpl
    def mlora_on_evaluation(self, results: JobMetrics) -> None:
        self._job_scalars(results)
        self.writer.flush()

    def _job_scalars(self, metrics: JobMetrics) -> None:
        for job, values in metrics.items():
            x = int(values["step"])
            for key, tag in SCALARS.items():
                if key in values:
                    self.writer.add_scalar(f"{job}/{tag}", values[key], x)

    @hookimpl
    def mlora_on_job_end(self, job: str, result: Mapping[str, Any]) -> None:
        status = result["status"] + (f": {result['error']}" if result.get("error") else "")
        self.writer.add_text(f"{job}/status", status, int(result["steps"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
