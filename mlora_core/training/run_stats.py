"""The run's running totals: tokens, padding, peak memory, out-of-memory retries, time spent."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mlora_core.training.batch import MultiJobBatch
from mlora_core.training.memory import peak_memory


@dataclass
class RunStats:
    """Totals over the engine steps so far (checkpointed as they are)."""

    #: Rows x padded length, and non-pad tokens, of every step.
    padded_tokens: int = 0
    real_tokens: int = 0
    oom_retries: int = 0
    #: Highest peak of a single step (the per-step resets hide it from ``peak_memory()``).
    peak_bytes: int = 0
    #: Seconds of the held-out evaluation before training (all evaluations: the engine's
    #: HeldOutEvaluator counts them).
    eval_before_s: float = 0.0
    #: Seconds of training before a resume.
    train_elapsed: float = 0.0

    def record_step(self, metrics: Mapping[str, float]) -> None:
        """Add a step's tokens and peak (its run metrics, from every rank: :func:`merge_ranks`)."""
        self.padded_tokens += int(metrics["tokens"])
        self.real_tokens += int(metrics["real_tokens"])
        self.peak_bytes = max(self.peak_bytes, int(metrics["peak_memory_bytes"]))

    def totals(
        self, device: str, wall_s: float, loop_s: float, eval_s: float, train_tokens: int, steps: int
    ) -> dict[str, Any]:
        """summary.json's run totals; ``loop_s`` is the training loop's wall time (its evaluations
        included), ``eval_s`` the time of every held-out evaluation."""
        train_s = loop_s - (eval_s - self.eval_before_s)  # held-out evaluation is not training
        peak_bytes, peak_kind = peak_memory(device)
        return {
            "wall_s": round(wall_s, 3),
            "train_s": round(train_s, 3),
            "eval_s": round(eval_s, 3),
            "engine_steps": steps,
            "train_tokens": train_tokens,
            "tokens_per_s": train_tokens / train_s if train_s > 0 else 0.0,
            "padding_fraction": 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0,
            "oom_retries": self.oom_retries,
            "peak_memory_bytes": max(peak_bytes, self.peak_bytes),
            "peak_memory_kind": peak_kind,
        }

    def state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunStats:
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state})


def step_metrics(batch: MultiJobBatch, peak: int, seconds: float) -> dict[str, float]:
    """One process's run metrics of a step (utilisation not included)."""
    rows, width = batch.input_ids.shape
    real = int(batch.attention_mask.sum())
    return {
        "step_time_s": seconds,
        "rows": rows,
        "tokens": rows * width,
        "real_tokens": real,
        "padding_fraction": 1 - real / (rows * width),
        "peak_memory_bytes": peak,
    }


def merge_ranks(per_rank: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """A step's run metrics over the ranks that ran it: tokens and rows add up, the step takes
    as long as its slowest rank, peaks are the highest, utilisation the mean."""
    if len(per_rank) == 1:
        return dict(per_rank[0])
    merged = {
        "step_time_s": max(m["step_time_s"] for m in per_rank),
        "rows": sum(m["rows"] for m in per_rank),
        "tokens": sum(m["tokens"] for m in per_rank),
        "real_tokens": sum(m["real_tokens"] for m in per_rank),
        "peak_memory_bytes": max(m["peak_memory_bytes"] for m in per_rank),
    }
    merged["padding_fraction"] = 1 - merged["real_tokens"] / merged["tokens"]
    for key in {k for m in per_rank for k in m if k.endswith("_utilisation")}:
        values = [m[key] for m in per_rank if key in m]
        merged[key] = sum(values) / len(values)
    return merged
