"""Progress in the terminal, and a summary table at the end.

On a terminal (``live``, the default when the stream is a TTY) one line per job is redrawn
in place: progress, loss, tokens/s and ETA. Elsewhere (logs, CI) a line per job is printed
every ``every`` optimizer steps.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from mlora_core.plugin_api.hookspecs import JobMetrics, hookimpl
from mlora_core.training.summary import fmt_number, fmt_percent

REDRAW_EVERY_S = 0.5


@dataclass
class _JobLine:
    step: int = 0
    total: int = 0
    loss: float | None = None
    tokens_per_s: float = 0.0
    state: str = "waiting"

    def text(self, name: str, elapsed: float) -> str:
        if self.state != "running":
            return f"{name:<16} {self.state}"
        eta = elapsed / self.step * (self.total - self.step) if self.step else float("nan")
        loss = "-" if self.loss is None else f"{self.loss:.4f}"
        return (
            f"{name:<16} {_bar(self.step, self.total)} {self.step:>5}/{self.total:<5} loss {loss:>8}  "
            f"{self.tokens_per_s:>6.0f} tok/s  ETA {_duration(eta)}"
        )


class ConsoleMonitor:
    def __init__(
        self,
        output_dir: str,
        resume: bool = False,
        every: int = 1,
        live: bool | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.every = max(1, every)
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.lines: dict[str, _JobLine] = {}
        self.started = time.perf_counter()
        self._drawn = 0
        self._last_draw = 0.0

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    @hookimpl
    def mlora_on_train_start(self, run: Mapping[str, Any]) -> None:
        self._print(f"mlora: training {len(run['jobs'])} job(s): {', '.join(run['jobs'])}")
        self.lines = {name: _JobLine() for name in run["jobs"]}
        self.started = time.perf_counter()

    @hookimpl
    def mlora_on_step_end(self, metrics: JobMetrics) -> None:
        for job, m in metrics.items():
            line = self.lines.setdefault(job, _JobLine())
            line.step, line.total, line.loss = int(m["step"]), int(m["total_steps"]), m["loss"]
            line.tokens_per_s, line.state = m["tokens_per_s"], "running"
            if not self.live and (line.step % self.every == 0 or line.step == line.total):
                self._print(
                    f"[{job}] step {line.step}/{line.total}  loss {m['loss']:.4f}  "
                    f"lr {m['lr']:.2e}  tok/s {m['tokens_per_s']:.0f}"
                )
        if self.live:
            self._redraw()

    @hookimpl
    def mlora_on_evaluation(self, phase: str, results: JobMetrics) -> None:
        if phase == "before":  # the held-out results before training: the ETA clock starts after them
            self.started = time.perf_counter()
        if self.live:
            return
        for job, m in results.items():
            found = [f"loss {m['eval_loss']:.4f}"] if "eval_loss" in m else []
            found += [f"accuracy {m['eval_accuracy']:.1%}"] if "eval_accuracy" in m else []
            self._print(f"[{job}] held-out {', '.join(found)} at step {int(m['step'])}")

    def _redraw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_draw < REDRAW_EVERY_S:
            return
        elapsed = now - self.started
        out = f"\x1b[{self._drawn}F" if self._drawn else ""
        out += "".join(f"\x1b[2K{line.text(name, elapsed)}\n" for name, line in self.lines.items())
        self.stream.write(out)
        self.stream.flush()
        self._drawn, self._last_draw = len(self.lines), now

    @hookimpl
    def mlora_on_job_end(self, job: str, result: Mapping[str, Any]) -> None:
        detail = f"error: {result['error']}" if result.get("error") else f"adapter: {result['adapter_dir']}"
        text = f"{result['status']} after {result['steps']} steps, {result['latency_s']:.1f}s; {detail}"
        if self.live:
            self.lines.setdefault(job, _JobLine()).state = text
            self._redraw(force=True)
        else:
            self._print(f"[{job}] {text}")

    @hookimpl
    def mlora_on_train_end(self, summary: Mapping[str, Any]) -> None:
        self._print(format_table(summary))

    def close(self) -> None:
        """Nothing to close: the stream belongs to the caller."""


def format_table(summary: Mapping[str, Any]) -> str:
    """The end-of-run table: one row per job, then the run's totals."""
    header = (
        f"{'job':<16} {'status':<11} {'steps':>5} {'tokens':>8} {'latency_s':>9} {'tok/s':>7} "
        f"{'train_loss':>10} {'eval_before':>11} {'eval_after':>10} {'acc_before':>10} {'acc_after':>9} "
        f"{'peak_GiB':>8}"
    )
    rows = [header, "-" * len(header)]
    for job in summary["jobs"]:
        speed = job["train_tokens"] / job["latency_s"] if job["latency_s"] else 0.0
        rows.append(
            f"{job['name']:<16} {job['status']:<11} {job['steps']:>5} {job['train_tokens']:>8} "
            f"{job['latency_s']:>9.1f} {speed:>7.0f} {fmt_number(job['final_train_loss']):>10} "
            f"{fmt_number(job['eval_loss_before']):>11} {fmt_number(job['eval_loss_after']):>10} "
            f"{fmt_percent(job.get('accuracy_before')):>10} {fmt_percent(job.get('accuracy_after')):>9} "
            f"{job.get('peak_memory_bytes', 0) / 2**30:>8.2f}"
        )
    totals = (
        f"wall {summary['wall_s']:.1f}s, {summary['tokens_per_s']:.0f} tokens/s, "
        f"padding {summary['padding_fraction']:.1%}, peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB"
    )
    rows.append(f"{totals}; summary: {summary['output_dir']}/summary.json")
    return "\n".join(rows)


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / total) if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan: no step yet
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"
