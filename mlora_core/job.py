"""One fine-tuning job at run time: its adapter, data order, optimizer and progress.

A job's data is cut into optimizer batches of ``batch_size`` samples (per epoch, in a
seeded order). The scheduler decides how many rows of the current optimizer batch go into
each engine step (usually ``micro_batch_size``). The loss of those rows is the sum of their
token losses divided by the number of learned tokens of the whole optimizer batch, so
however the batch is split, the accumulated gradient is exactly the token-mean gradient
of the full batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from mlora_core.batch import learned_tokens
from mlora_core.config import JobConfig, TrainConfig
from mlora_core.errors import MloraError
from mlora_core.protocols import Adapter, Sample, SplitDataset

RUNNING, COMPLETED, FAILED, INTERRUPTED = "running", "completed", "failed", "interrupted"

#: Plain counters a checkpoint carries as they are.
_COUNTERS = (
    "step",
    "pos",
    "waited",
    "status",
    "error",
    "train_tokens",
    "batch_loss",
    "batch_tokens",
    "batch_seconds",
    "final_train_loss",
    "peak_memory_bytes",
    "best_eval_loss",
    "best_step",
    "last_eval_step",
    "evals_since_best",
    "stopped_early",
)

#: group_by_length sorts samples by length within windows of this many batches.
LENGTH_GROUP_BATCHES = 8


def plan_batches(lengths: list[int], train: TrainConfig) -> list[list[int]]:
    """Sample indices of every optimizer batch, in training order.

    Each epoch visits the samples once, shuffled with seed ``train.seed + epoch`` (or in
    file order when ``shuffle`` is off); the last batch of an epoch may be smaller. With
    ``group_by_length``, samples are sorted by length inside windows of
    ``LENGTH_GROUP_BATCHES`` batches, so a batch's rows have similar lengths, and the
    batches of a window are then shuffled with the same seed.
    """
    n_samples = len(lengths)
    batches = []
    for epoch in range(train.epochs):
        generator = torch.Generator().manual_seed(train.seed + epoch)
        order = torch.randperm(n_samples, generator=generator).tolist() if train.shuffle else list(range(n_samples))
        if train.group_by_length:
            epoch_batches = _group_by_length(order, lengths, train.batch_size, generator, train.shuffle)
        else:
            epoch_batches = [order[i : i + train.batch_size] for i in range(0, n_samples, train.batch_size)]
        batches += epoch_batches
    return batches[: train.max_steps] if train.max_steps else batches


def _group_by_length(
    order: list[int], lengths: list[int], batch_size: int, generator: torch.Generator, shuffle: bool
) -> list[list[int]]:
    window = batch_size * LENGTH_GROUP_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        group = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        if shuffle:
            group = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        batches += group
    return batches


def lr_multiplier(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """LR factor at optimizer step ``s``: linear warmup to 1, then linear/cosine decay to 0, or constant."""

    def factor(s: int) -> float:
        if s < warmup:
            return s / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


class Job:
    """A live job. The engine feeds it row losses; it steps its own optimizer."""

    def __init__(self, order: int, config: JobConfig, adapter: Adapter, data: SplitDataset) -> None:
        self.name = config.name
        self.order = order
        self.priority = config.priority
        self.start_step = config.start_step
        self.config = config
        self.adapter = adapter
        self.data = data
        t = config.train
        self.micro_batch_size = t.micro_batch_size
        self.params = adapter.parameters()
        self.optimizer: torch.optim.Optimizer | None = torch.optim.AdamW(
            self.params, lr=t.lr, betas=(t.adam_betas[0], t.adam_betas[1]), eps=t.adam_eps, weight_decay=t.weight_decay
        )
        self.batches = plan_batches([len(s) for s in data.train], t)
        self.total_steps = len(self.batches)
        self._batch_lengths = [sum(len(data.train[i]) for i in b) for b in self.batches]
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_multiplier(t.lr_scheduler, t.warmup_steps, self.total_steps)
        )
        self.step = 0  # optimizer steps done
        self.pos = 0  # rows of the current optimizer batch already trained on
        self.waited = 0  # engine steps in a row admitted but not scheduled
        self.status = RUNNING
        self.error: str | None = None
        self.train_tokens = 0  # non-pad tokens trained on
        self.batch_loss = 0.0  # running token-mean loss of the current optimizer batch
        self.batch_tokens = 0  # non-pad tokens of the current optimizer batch so far
        self.batch_seconds = 0.0  # wall time of the engine steps this batch took part in
        self.final_train_loss: float | None = None
        self.peak_memory_bytes = 0  # highest peak of the engine steps this job took part in
        self.best_eval_loss: float | None = None  # lowest held-out loss seen, at optimizer step best_step
        self.best_step: int | None = None
        self.last_eval_step: int | None = None
        self.evals_since_best = 0
        self.stopped_early = False
        self._best: list[torch.Tensor] | None = None  # early_stop: the weights of best_eval_loss
        self.started = time.perf_counter()
        self.ended: float | None = None
        self.denominator = self._batch_denominator()
        self._last_good = [p.detach().clone() for p in self.params]  # weights before the latest step

    # --- what the scheduler sees --------------------------------------------------------

    def next_lengths(self) -> list[int]:
        return [len(self.data.train[i]) for i in self.batches[self.step][self.pos :]]

    @property
    def remaining_tokens(self) -> int:
        if self.status != RUNNING:
            return 0
        done = sum(len(self.data.train[i]) for i in self.batches[self.step][: self.pos])
        return sum(self._batch_lengths[self.step :]) - done

    def take(self, rows: int) -> list[Sample]:
        """The next ``rows`` rows of the current optimizer batch (marked as taken)."""
        batch = self.batches[self.step]
        if not 1 <= rows <= len(batch) - self.pos:
            raise ValueError(f"job {self.name!r}: cannot take {rows} rows, {len(batch) - self.pos} left in its batch")
        self.pos += rows
        return [self.data.train[i] for i in batch[self.pos - rows : self.pos]]

    # --- training -----------------------------------------------------------------------

    def _batch_denominator(self) -> int:
        if self.step >= self.total_steps:
            return 1
        return sum(learned_tokens(self.data.train[i]) for i in self.batches[self.step])

    def scale_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """These rows' share of the optimizer batch's token-mean loss."""
        return loss_sum / self.denominator

    def after_backward(self, scaled_loss: float, tokens: int, seconds: float) -> dict[str, float] | None:
        """Record the rows of a step; at the end of an optimizer batch, step and return its metrics.

        Args:
            scaled_loss: the rows' loss from :meth:`scale_loss`.
            tokens: non-pad tokens of the job's rows in the step.
            seconds: wall time of the engine step.
        """
        self.batch_loss += scaled_loss
        self.batch_tokens += tokens
        self.batch_seconds += seconds
        self.train_tokens += tokens
        if self.pos < len(self.batches[self.step]):
            return None
        return self._optimizer_step()

    def rewind_batch(self) -> None:
        """Forget the current optimizer batch's progress (after a step failed half-way)."""
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        self.train_tokens -= self.batch_tokens
        self.pos, self.batch_loss, self.batch_tokens = 0, 0.0, 0

    def _optimizer_step(self) -> dict[str, float]:
        assert self.optimizer is not None
        max_norm = self.config.train.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm else float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"gradient norm is {float(grad_norm)}")
        self._last_good = [p.detach().clone() for p in self.params]
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss, self.batch_loss = self.batch_loss, 0.0
        tokens_per_s = self.batch_tokens / max(self.batch_seconds, 1e-9)
        self.batch_tokens, self.batch_seconds = 0, 0.0
        self.final_train_loss = loss
        self.step += 1
        self.pos = 0
        self.denominator = self._batch_denominator()
        if self.step >= self.total_steps:
            self.status = COMPLETED
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens_per_s,
            "tokens_seen": self.train_tokens,
        }

    # --- held-out evaluation and early stopping ------------------------------------------

    def eval_due(self) -> bool:
        """Whether ``eval_every`` asks for a held-out loss now (just after an optimizer step)."""
        every = self.config.train.eval_every
        return bool(every and self.status == RUNNING and self.data.eval and self.step % every == 0 and self.pos == 0)

    def record_eval(self, loss: float) -> None:
        """Note the held-out loss of the current weights; with ``early_stop``, keep the best
        weights and end the job once ``patience`` evaluations in a row did not improve."""
        stop = self.config.train.early_stop
        self.last_eval_step = self.step
        margin = stop.min_delta if stop is not None else 0.0
        if self.best_eval_loss is None or loss < self.best_eval_loss - margin:
            self.best_eval_loss, self.best_step, self.evals_since_best = loss, self.step, 0
            if stop is not None:
                self._best = [p.detach().clone() for p in self.params]
            return
        self.evals_since_best += 1
        if stop is not None and self.evals_since_best >= stop.patience and self.status == RUNNING:
            self.status, self.stopped_early = COMPLETED, True

    def use_best(self) -> None:
        """Put the best weights (``early_stop``) back into the adapter, if it kept any."""
        if self._best is None:
            return
        with torch.no_grad():
            for param, best in zip(self.params, self._best, strict=True):
                param.copy_(best)

    def fail(self, reason: str, revert: bool = False) -> None:
        """Mark the job failed; ``revert``: its latest optimizer step made the weights unusable,
        so go back to the weights before it (the last ones that gave a finite loss)."""
        self.status = FAILED
        self.error = reason
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if revert:
            with torch.no_grad():
                for param, good in zip(self.params, self._last_good, strict=True):
                    param.copy_(good)

    # --- checkpoints ----------------------------------------------------------------------

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able state) that :meth:`restore` turns back into this exact job."""
        assert self.optimizer is not None
        tensors: dict[str, torch.Tensor] = {}
        for i, param in enumerate(self.params):
            tensors[f"param.{i}"] = param.detach().cpu().clone()
            tensors[f"last_good.{i}"] = self._last_good[i].cpu()
            if param.grad is not None:
                tensors[f"grad.{i}"] = param.grad.detach().cpu().clone()
            if self._best is not None:
                tensors[f"best.{i}"] = self._best[i].cpu()
        optimizer = self.optimizer.state_dict()
        for i, slots in optimizer["state"].items():
            for key, value in slots.items():
                tensors[f"optim.{i}.{key}"] = torch.as_tensor(value).detach().cpu().clone()
        schedule = {k: v for k, v in self.lr_schedule.state_dict().items() if k != "lr_lambdas"}
        state = {
            "name": self.name,
            "batches": self.batches,
            "param_groups": optimizer["param_groups"],
            "lr_schedule": schedule,
            **{key: getattr(self, key) for key in _COUNTERS},
        }
        return tensors, state

    def restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Continue from :meth:`checkpoint_state`'s output (same config and data)."""
        assert self.optimizer is not None
        if state["batches"] != self.batches:
            raise MloraError(f"job {self.name!r}: its data or training settings changed since the checkpoint")
        with torch.no_grad():
            for i, param in enumerate(self.params):
                param.copy_(tensors[f"param.{i}"])
                self._last_good[i] = tensors[f"last_good.{i}"].to(param.device)
                grad = tensors.get(f"grad.{i}")
                param.grad = None if grad is None else grad.to(param.device)
        if "best.0" in tensors:
            self._best = [tensors[f"best.{i}"].to(p.device) for i, p in enumerate(self.params)]
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, slot = key.split(".", 2)
                slots.setdefault(int(index), {})[slot] = value
        self.optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
        self.lr_schedule.load_state_dict({**state["lr_schedule"], "lr_lambdas": [None]})
        for key in _COUNTERS:
            setattr(self, key, state[key])
        self.denominator = self._batch_denominator()

    def release(self) -> None:
        """Free the optimizer state and the adapter's weights (after saving)."""
        self.optimizer = None
        self.lr_schedule = None  # type: ignore[assignment]
        self.adapter.detach()
        self.params = []
        self._best = None
        self.ended = self.ended or time.perf_counter()

    @property
    def latency_s(self) -> float:
        return (self.ended or time.perf_counter()) - self.started
