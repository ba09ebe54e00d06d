"""One fine-tuning job at run time: its adapter, optimizer, and where it is in its data.

A job's data is cut into optimizer batches of ``batch_size`` samples (per epoch, in a
seeded order: :mod:`mlora_core.training.data_order`). The scheduler decides how many rows
of the current optimizer batch go into each engine step (usually ``micro_batch_size``). The
job's objective turns those rows' log-probabilities into their share of the optimizer batch's
loss: sums divided by counts over the whole optimizer batch (learned tokens for ``sft``, pairs
for the preference objectives; :meth:`Objective.units`), so however the batch is split, the
accumulated gradient is exactly the full batch's.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from mlora_core.config.schema import JobConfig
from mlora_core.errors import MloraError
from mlora_core.plugin_api.protocols import Adapter, Objective, Sample, SequenceLogps, SplitDataset
from mlora_core.training.data_order import lr_multiplier, optimizer_batches
from mlora_core.training.early_stopping import EarlyStopping, EvalHistory

RUNNING, COMPLETED, FAILED, INTERRUPTED = "running", "completed", "failed", "interrupted"


@dataclass
class JobProgress:
    """A job's counters (checkpointed as they are)."""

    #: Optimizer steps done.
    step: int = 0
    #: Rows of the current optimizer batch already trained on.
    pos: int = 0
    #: Engine steps in a row the job was admitted but given no rows.
    waited: int = 0
    status: str = RUNNING
    error: str | None = None
    #: Non-pad tokens trained on.
    train_tokens: int = 0
    #: The current optimizer batch so far: its share of the token-mean loss, its non-pad
    #: tokens, and the wall time of the engine steps it took part in.
    batch_loss: float = 0.0
    batch_tokens: int = 0
    batch_seconds: float = 0.0
    #: The current optimizer batch so far: per objective metric, its sum over the samples.
    batch_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    final_train_loss: float | None = None
    #: Highest peak memory of the engine steps this job took part in.
    peak_memory_bytes: int = 0


class Job:
    """A live job: it hands out rows to the engine and steps its own optimizer.

    What a scheduler may read (:class:`~mlora_core.plugin_api.scheduling.JobView`):
    ``name``, ``order``, ``priority``, ``micro_batch_size``, ``waited``,
    ``remaining_tokens`` and ``next_lengths()``.
    """

    def __init__(
        self, order: int, config: JobConfig, adapter: Adapter, data: SplitDataset, objective: Objective
    ) -> None:
        self.name = config.name
        self.order = order
        self.priority = config.priority
        self.start_step = config.start_step
        self.micro_batch_size = config.train.micro_batch_size
        self.config = config
        self.adapter = adapter
        self.data = data
        self.objective = objective
        self.progress = JobProgress()
        self.early_stopping = EarlyStopping(config.train.early_stop)
        t = config.train
        self.params = adapter.parameters()
        # fused: one kernel over the adapter's many small tensors (the default on CPU is a
        # Python loop over them; 120 tensors of SmolLM2's q/v adapter: 19 ms single-tensor,
        # 14 ms foreach, 6 ms fused per step, clipping included).
        self.optimizer: torch.optim.Optimizer | None = torch.optim.AdamW(
            self.params,
            lr=t.lr,
            betas=(t.adam_betas[0], t.adam_betas[1]),
            eps=t.adam_eps,
            weight_decay=t.weight_decay,
            fused=True,
        )
        self.batches = optimizer_batches([len(s) for s in data.train], t)
        self.total_steps = len(self.batches)
        self._batch_lengths = [sum(len(data.train[i]) for i in b) for b in self.batches]
        self.lr_schedule: torch.optim.lr_scheduler.LambdaLR | None = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_multiplier(t.lr_scheduler, t.warmup_steps, self.total_steps)
        )
        self.started = time.perf_counter()
        self.ended: float | None = None
        self.units = self._batch_units()
        self._last_good = [p.detach().clone() for p in self.params]  # weights before the latest step

    @property
    def status(self) -> str:
        return self.progress.status

    @property
    def history(self) -> EvalHistory:
        return self.early_stopping.history

    # --- what the scheduler sees --------------------------------------------------------

    @property
    def waited(self) -> int:
        return self.progress.waited

    def next_lengths(self) -> list[int]:
        p = self.progress
        return [len(self.data.train[i]) for i in self.batches[p.step][p.pos :]]

    @property
    def remaining_tokens(self) -> int:
        p = self.progress
        if p.status != RUNNING:
            return 0
        done = sum(len(self.data.train[i]) for i in self.batches[p.step][: p.pos])
        return sum(self._batch_lengths[p.step :]) - done

    def take(self, rows: int) -> list[Sample]:
        """The next ``rows`` rows of the current optimizer batch (marked as taken)."""
        p = self.progress
        batch = self.batches[p.step]
        if not 1 <= rows <= len(batch) - p.pos:
            raise ValueError(f"job {self.name!r}: cannot take {rows} rows, {len(batch) - p.pos} left in its batch")
        p.pos += rows
        return [self.data.train[i] for i in batch[p.pos - rows : p.pos]]

    # --- training -----------------------------------------------------------------------

    def _batch_units(self) -> dict[str, int]:
        """What the current optimizer batch's loss is averaged over (:meth:`Objective.units`)."""
        if self.progress.step >= self.total_steps:
            return {}
        return self.objective.units([self.data.train[i] for i in self.batches[self.progress.step]])

    def loss(self, out: SequenceLogps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(these rows' share of the optimizer batch's loss, the objective's metric sums over them)."""
        return self.objective.loss(out, self.units)

    def record_rows(self, scaled_loss: float, tokens: int, seconds: float, metrics: dict[str, float]) -> None:
        """Account for the rows this job had in an engine step, after the backward.

        Args:
            scaled_loss: the rows' loss from :meth:`loss`.
            tokens: non-pad tokens of the job's rows in the step.
            seconds: wall time of the engine step.
            metrics: the objective's metric sums over the rows.
        """
        p = self.progress
        p.batch_loss += scaled_loss
        p.batch_tokens += tokens
        p.batch_seconds += seconds
        p.train_tokens += tokens
        for name, value in metrics.items():
            p.batch_metrics[name] = p.batch_metrics.get(name, 0.0) + value

    @property
    def batch_complete(self) -> bool:
        """Whether every row of the current optimizer batch has been backpropagated."""
        return self.progress.pos >= len(self.batches[self.progress.step])

    def optimizer_step(self) -> dict[str, float]:
        """Clip, step AdamW and the LR schedule, zero the gradients; returns the step's metrics.

        Raises:
            FloatingPointError: the gradient norm is not finite (nothing was stepped).
        """
        assert self.optimizer is not None and self.lr_schedule is not None
        p = self.progress
        max_norm = self.config.train.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm else float("inf"), foreach=True)
        lr = self.optimizer.param_groups[0]["lr"]
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"gradient norm is {float(grad_norm)}")
        torch._foreach_copy_(self._last_good, [param.detach() for param in self.params])  # no new tensors
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {
            "step": p.step + 1,
            "total_steps": self.total_steps,
            "loss": p.batch_loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": p.batch_tokens / max(p.batch_seconds, 1e-9),
            "tokens_seen": p.train_tokens,
        }
        samples = len(self.batches[p.step])
        metrics |= {name: value / samples for name, value in p.batch_metrics.items()}
        p.final_train_loss = p.batch_loss
        p.batch_loss, p.batch_tokens, p.batch_seconds, p.batch_metrics = 0.0, 0, 0.0, {}
        p.step += 1
        p.pos = 0
        self.units = self._batch_units()
        if p.step >= self.total_steps:
            p.status = COMPLETED
        return metrics

    def rewind_batch(self) -> None:
        """Forget the current optimizer batch's progress (after a step failed half-way)."""
        assert self.optimizer is not None
        p = self.progress
        self.optimizer.zero_grad(set_to_none=True)
        p.train_tokens -= p.batch_tokens
        p.pos, p.batch_loss, p.batch_tokens, p.batch_metrics = 0, 0.0, 0, {}

    def fail(self, reason: str, revert: bool = False) -> None:
        """Mark the job failed; ``revert``: its latest optimizer step made the weights unusable,
        so go back to the weights before it (the last ones that gave a finite loss)."""
        self.progress.status = FAILED
        self.progress.error = reason
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if revert:
            with torch.no_grad():
                for param, good in zip(self.params, self._last_good, strict=True):
                    param.copy_(good)

    # --- held-out evaluation -------------------------------------------------------------

    def eval_due(self) -> bool:
        """Whether ``eval_every`` asks for a held-out loss now (just after an optimizer step)."""
        every, p = self.config.train.eval_every, self.progress
        return bool(every and p.status == RUNNING and self.data.eval and p.step % every == 0 and p.pos == 0)

    def record_eval(self, loss: float) -> None:
        """Note the held-out loss of the current weights; early stopping may complete the job."""
        stop = self.early_stopping.record(loss, self.progress.step, self.params)
        if stop and self.progress.status == RUNNING:
            self.progress.status = COMPLETED
            self.history.stopped_early = True

    def use_best(self) -> None:
        """Put the best weights (``early_stop``) back into the adapter, if it kept any."""
        self.early_stopping.restore_best(self.params)

    # --- checkpoints ----------------------------------------------------------------------

    def checkpoint_state(
        self, grads: list[torch.Tensor | None] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able state) that :meth:`restore` turns back into this exact job.

        ``grads``: the accumulated gradients to store (default: the parameters' own).
        """
        assert self.optimizer is not None and self.lr_schedule is not None
        best = self.early_stopping.best_weights
        grads = [p.grad for p in self.params] if grads is None else grads
        tensors: dict[str, torch.Tensor] = {}
        for i, param in enumerate(self.params):
            tensors[f"param.{i}"] = param.detach().cpu().clone()
            tensors[f"last_good.{i}"] = self._last_good[i].cpu().clone()  # updated in place later
            if grads[i] is not None:
                tensors[f"grad.{i}"] = grads[i].detach().cpu().clone()  # type: ignore[union-attr]
            if best is not None:
                tensors[f"best.{i}"] = best[i].cpu()
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
            **dataclasses.asdict(self.progress),
            **dataclasses.asdict(self.history),
        }
        return tensors, state

    def restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any], gradients: bool = True) -> None:
        """Continue from :meth:`checkpoint_state`'s output (same config and data).

        ``gradients``: take the stored accumulated gradients (false: start them at zero, on
        every rank but one of those sharing the job's rows).
        """
        assert self.optimizer is not None and self.lr_schedule is not None
        if state["batches"] != self.batches:
            raise MloraError(f"job {self.name!r}: its data or training settings changed since the checkpoint")
        with torch.no_grad():
            for i, param in enumerate(self.params):
                param.copy_(tensors[f"param.{i}"])
                self._last_good[i] = tensors[f"last_good.{i}"].to(param.device)
                grad = tensors.get(f"grad.{i}") if gradients else None
                param.grad = None if grad is None else grad.to(param.device)
        if "best.0" in tensors:
            self.early_stopping.best_weights = [tensors[f"best.{i}"].to(p.device) for i, p in enumerate(self.params)]
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, slot = key.split(".", 2)
                slots.setdefault(int(index), {})[slot] = value
        self.optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
        self.lr_schedule.load_state_dict({**state["lr_schedule"], "lr_lambdas": [None]})
        # fields added since a checkpoint was written keep their defaults (batch_metrics)
        self.progress = JobProgress(
            **{f.name: state[f.name] for f in dataclasses.fields(JobProgress) if f.name in state}
        )
        self.early_stopping.history = EvalHistory(**{f.name: state[f.name] for f in dataclasses.fields(EvalHistory)})
        self.units = self._batch_units()

    def release(self) -> None:
        """Free the optimizer state and the adapter's weights (after saving)."""
        self.optimizer = None
        self.lr_schedule = None
        self.adapter.detach()
        self.params = []
        self.early_stopping.best_weights = None
        self.ended = self.ended or time.perf_counter()

    @property
    def latency_s(self) -> float:
        return (self.ended or time.perf_counter()) - self.started
