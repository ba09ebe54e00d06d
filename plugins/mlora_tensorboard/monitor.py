"""Writes each job as its own TensorBoard run, with the Hugging Face Trainer's tag names.

Layout under the log dir (default ``<output_dir>/tensorboard``)::

    <job>/   one run per job: train/loss, train/learning_rate, train/grad_norm, ...,
             eval/loss, eval/accuracy, ... over the job's optimizer step; its
             hyper-parameters and status for the HParams dashboard; text: config, status
    _run/    the run as a whole: run/step_time_s, run/padding_fraction, ... over the
             engine step; text: config (a job name cannot start with ``_``)

Every job has the same tag names, so TensorBoard draws one chart per tag with a line per job,
and its run selector picks jobs. A job's run is opened on the job's first event, so jobs
added to a running engine get theirs too. A fresh run replaces the event files of the
directories it writes; a resumed run (and ``mlora eval``) adds a file beside them, which
TensorBoard reads as one run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlora_core.plugin_api.hookspecs import JobMetrics, hookimpl
from mlora_tensorboard.hparams import job_hparams, session_end, session_start

if TYPE_CHECKING:
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

#: The run-wide run's directory. Job names start with a letter or digit, so none takes it.
RUN_DIR = "_run"
#: Step metrics that are the x axis, not a curve.
NOT_CURVES = {"step", "total_steps"}
#: Step metric -> tag, where the Trainer's name differs from ours (otherwise ``train/<name>``).
TRAIN_TAGS = {"lr": "train/learning_rate"}
EVENT_FILES = "events.out.tfevents.*"


def train_tag(name: str) -> str:
    """A step metric's tag: ``loss`` -> ``train/loss``, ``rewards/chosen`` -> ``train/rewards/chosen``."""
    return TRAIN_TAGS.get(name, f"train/{name}")


def eval_tag(name: str) -> str:
    """A held-out metric's tag: ``eval_loss`` -> ``eval/loss``, ``preference_accuracy`` ->
    ``eval/preference_accuracy``."""
    return f"eval/{name.removeprefix('eval_')}"


class TensorBoardMonitor:
    def __init__(self, output_dir: str, resume: bool = False, log_dir: str | None = None) -> None:
        self.log_dir = Path(log_dir) if log_dir else Path(output_dir) / "tensorboard"
        self.resume = resume
        self.writers: dict[str, SummaryWriter] = {}
        #: Directories this monitor has written to (a fresh run clears each once).
        self.opened: set[str] = set()

    @hookimpl
    def mlora_on_train_start(self, run: Mapping[str, Any]) -> None:
        self._writer(RUN_DIR).add_text("config", _code(run["config"]))

    @hookimpl
    def mlora_on_step_end(
        self, run: Mapping[str, Any], step: int, metrics: JobMetrics, run_metrics: Mapping[str, float]
    ) -> None:
        if run_metrics:
            writer = self._writer(RUN_DIR)
            for key, value in run_metrics.items():
                writer.add_scalar(f"run/{key}", value, step)
        for job, values in metrics.items():
            writer, x = self._job(run, job), int(values["step"])
            for key, value in values.items():
                if key not in NOT_CURVES:
                    writer.add_scalar(train_tag(key), value, x)

    @hookimpl
    def mlora_on_evaluation(self, run: Mapping[str, Any], results: JobMetrics) -> None:
        for job, values in results.items():
            writer, x = self._job(run, job), int(values["step"])
            for key, value in values.items():
                if key != "step":
                    writer.add_scalar(eval_tag(key), value, x)
            writer.flush()

    @hookimpl
    def mlora_on_job_end(self, run: Mapping[str, Any], job: str, result: Mapping[str, Any]) -> None:
        writer = self._job(run, job)
        status = result["status"] + (f": {result['error']}" if result.get("error") else "")
        writer.add_text("status", status, int(result["steps"]))
        end = session_end(result["status"])
        if end is not None:
            _add_summary(writer, end, int(result["steps"]))
        writer.close()  # a sweep's finished trials hold no open files; a later event reopens
        del self.writers[job]

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers = {}

    def _job(self, run: Mapping[str, Any], job: str) -> SummaryWriter:
        """The job's writer; opening the job's run writes its session start (hyper-parameters)
        unless an earlier run or process already did."""
        if job in self.writers:
            return self.writers[job]
        had_events = job in self.opened or (self.resume and any((self.log_dir / job).glob(EVENT_FILES)))
        writer = self._writer(job)
        if not had_events:
            config = next((j for j in run["config"]["jobs"] if j["name"] == job), {"name": job})
            _add_summary(writer, session_start(job_hparams(config)), 0)
            writer.add_text("config", _code(config))
            writer.flush()  # the job shows in the HParams dashboard while it trains
        return writer

    def _writer(self, name: str) -> SummaryWriter:
        """The writer of ``<log_dir>/<name>/``; a fresh run first removes that directory's
        earlier event files (``--overwrite``), a resumed one keeps them."""
        if name in self.writers:
            return self.writers[name]
        from torch.utils.tensorboard import SummaryWriter

        directory = self.log_dir / name
        if not self.resume and name not in self.opened:
            for old in directory.glob(EVENT_FILES):
                old.unlink()
        self.opened.add(name)
        self.writers[name] = writer = SummaryWriter(log_dir=str(directory))
        return writer


def _add_summary(writer: SummaryWriter, summary: Summary, step: int) -> None:
    """Write a ready-made summary proto, as ``SummaryWriter.add_hparams`` does."""
    assert writer.file_writer is not None  # SummaryWriter opens it; a closed writer is dropped
    writer.file_writer.add_summary(summary, step)


def _code(value: Any) -> str:
    """A config as a Markdown code block, for TensorBoard's text dashboard."""
    return f"```\n{json.dumps(value, indent=2, default=str)}\n```"
