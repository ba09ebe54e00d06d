"""A job's held-out history and early stopping: the best loss, its step, and its weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlora_core.config.schema import EarlyStopConfig


@dataclass
class EvalHistory:
    """What a job's held-out evaluations so far have shown (checkpointed as it is)."""

    #: Lowest held-out loss seen, at the job's optimizer step ``best_step``.
    best_eval_loss: float | None = None
    best_step: int | None = None
    #: The job's optimizer step of the latest evaluation.
    last_eval_step: int | None = None
    #: Evaluations in a row that did not improve on the best.
    evals_since_best: int = 0
    #: ``early_stop`` ended the job.
    stopped_early: bool = False


class EarlyStopping:
    """Records held-out losses; with ``early_stop`` configured, keeps the best weights and
    says when ``patience`` evaluations in a row did not improve."""

    def __init__(self, config: EarlyStopConfig | None) -> None:
        self.config = config
        self.history = EvalHistory()
        #: The adapter weights of ``best_eval_loss`` (``early_stop`` only).
        self.best_weights: list[torch.Tensor] | None = None

    def record(self, loss: float, step: int, params: list[torch.nn.Parameter]) -> bool:
        """Note the held-out ``loss`` of ``params`` at optimizer step ``step``; returns whether to stop."""
        h = self.history
        h.last_eval_step = step
        margin = self.config.min_delta if self.config is not None else 0.0
        if h.best_eval_loss is None or loss < h.best_eval_loss - margin:
            h.best_eval_loss, h.best_step, h.evals_since_best = loss, step, 0
            if self.config is not None:
                self.best_weights = [p.detach().clone() for p in params]
            return False
        h.evals_since_best += 1
        return self.config is not None and h.evals_since_best >= self.config.patience

    def restore_best(self, params: list[torch.nn.Parameter]) -> None:
        """Put the best weights back into ``params``, if any were kept."""
        if self.best_weights is None:
            return
        with torch.no_grad():
            for param, best in zip(params, self.best_weights, strict=True):
                param.copy_(best)
