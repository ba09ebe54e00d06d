"""Progress in the terminal: a line per job every ``every`` optimizer steps, a table at the end."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO


class ConsoleMonitor:
    def __init__(self, output_dir: str, every: int = 1, stream: TextIO | None = None) -> None:
        self.every = max(1, every)
        self.stream = stream or sys.stdout

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_train_start(self, run: Mapping[str, Any]) -> None:
        self._print(f"mlora: training {len(run['jobs'])} job(s): {', '.join(run['jobs'])}")

    def on_step_end(self, step: int, metrics: Mapping[str, Mapping[str, float]]) -> None:
        for job, m in metrics.items():
            if "loss" in m and (m["step"] % self.every == 0 or m["step"] == m["total_steps"]):
                self._print(
                    f"[{job}] step {int(m['step'])}/{int(m['total_steps'])}  loss {m['loss']:.4f}  "
                    f"lr {m['lr']:.2e}  tok/s {m['tokens_per_s']:.0f}"
                )
            elif "eval_loss" in m:
                self._print(f"[{job}] held-out loss {m['eval_loss']:.4f} at step {int(m['step'])}")

    def on_job_end(self, job: str, result: Mapping[str, Any]) -> None:
        detail = f"error: {result['error']}" if result.get("error") else f"adapter: {result['adapter_dir']}"
        self._print(f"[{job}] {result['status']} after {result['steps']} steps, {result['latency_s']:.1f}s; {detail}")

    def on_train_end(self, summary: Mapping[str, Any]) -> None:
        self._print(format_table(summary))


def format_table(summary: Mapping[str, Any]) -> str:
    """The end-of-run table: one row per job."""
    header = (
        f"{'job':<16} {'status':<10} {'steps':>5} {'tokens':>8} {'latency_s':>9} "
        f"{'train_loss':>10} {'eval_before':>11} {'eval_after':>10}"
    )
    rows = [header, "-" * len(header)]
    for job in summary["jobs"]:
        rows.append(
            f"{job['name']:<16} {job['status']:<10} {job['steps']:>5} {job['train_tokens']:>8} "
            f"{job['latency_s']:>9.1f} {_num(job['final_train_loss']):>10} "
            f"{_num(job['eval_loss_before']):>11} {_num(job['eval_loss_after']):>10}"
        )
    totals = f"wall {summary['wall_s']:.1f}s, {summary['tokens_per_s']:.0f} tokens/s"
    rows.append(f"{totals}; summary: {summary['output_dir']}/summary.json")
    return "\n".join(rows)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
