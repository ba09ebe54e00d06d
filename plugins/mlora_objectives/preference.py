"""Preference objectives over (chosen, rejected) pairs: DPO, CPO and ORPO.

Each pair's log-probabilities are sums over the completion's learned tokens (ORPO averages
them per token). Metric names and their meaning follow TRL's trainers (``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
``logps/rejected``), each the mean over the optimizer batch's pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mlora_core.config.schema import ObjectiveConfig
from mlora_core.errors import ConfigError
from mlora_core.plugin_api.data import learned_tokens
from mlora_core.plugin_api.protocols import Sample, SequenceLogps

REWARD_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class PreferenceObjective:
    """What DPO, CPO and ORPO share: pairs, settings checks, reward metrics."""

    sequences_per_sample = 2
    needs_reference = False
    metric_names: tuple[str, ...] = REWARD_METRICS
    name = "preference"

    def __init__(self, config: ObjectiveConfig) -> None:
        self.config = config
        problems = self.problems(config)
        if problems:
            raise ConfigError(problems)
        self.beta = config.beta
        self.label_smoothing = config.label_smoothing

    def problems(self, config: ObjectiveConfig) -> list[str]:
        problems = []
        if not config.beta > 0:
            problems.append(f"beta: must be positive, got {config.beta}")
        if not 0 <= config.label_smoothing < 0.5:
            problems.append(f"label_smoothing: must be in [0, 0.5), got {config.label_smoothing}")
        if config.options:
            problems.append(f"options: the {self.name} objective takes no options, got {sorted(config.options)}")
        return problems

    def units(self, samples: Sequence[Sample]) -> dict[str, int]:
        chosen = sum(learned_tokens(s.sequences()[0]) for s in samples)
        return {"pairs": len(samples), "chosen_tokens": chosen}

    def smoothed_sigmoid_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """(P,) ``-(1-ls) log sigmoid(beta x) - ls log sigmoid(-beta x)`` per pair."""
        scaled = self.beta * logits
        return -F.logsigmoid(scaled) * (1 - self.label_smoothing) - F.logsigmoid(-scaled) * self.label_smoothing

    @staticmethod
    def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor, logps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sums over the pairs of TRL's reward metrics, from per-pair rewards (P,) and the
        log-probabilities (P, 2) the objective compares."""
        logps = logps.detach()
        return {
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "rewards/accuracies": (chosen > rejected).float().sum(),
            "rewards/margins": (chosen - rejected).sum(),
            "logps/chosen": logps[:, 0].sum(),
            "logps/rejected": logps[:, 1].sum(),
        }


class DPOObjective(PreferenceObjective):
    """Direct Preference Optimization (Rafailov et al., 2023, arXiv:2305.18290), sigmoid loss.

    ``loss = -log sigmoid(beta ((pc - pr) - (rc - rr)))`` per pair, ``p`` the policy's and
    ``r`` the reference's summed log-probabilities of the chosen (c) and rejected (r)
    completions; with ``label_smoothing`` ``ls`` the conservative form (Mitchell, 2023)
    ``(1 - ls) * that + ls * -log sigmoid(-beta (...))``. Rewards: ``beta (p - r)``.
    The reference (``objective.reference``) is the frozen base (``base``) or a saved adapter
    over it; its log-probabilities are computed once before training.
    """

    needs_reference = True
    name = "dpo"

    def loss(self, out: SequenceLogps, units: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert out.reference_logps is not None
        policy, reference = out.logps, out.reference_logps
        logits = (policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1])
        losses = self.smoothed_sigmoid_loss(logits)
        chosen = self.beta * (policy[:, 0] - reference[:, 0]).detach()
        rejected = self.beta * (policy[:, 1] - reference[:, 1]).detach()
        return losses.sum() / max(units["pairs"], 1), self.reward_metrics(chosen, rejected, policy)


class CPOObjective(PreferenceObjective):
    """Contrastive Preference Optimization (Xu et al., 2024, arXiv:2401.08417), sigmoid loss.

    DPO without a reference model plus a behaviour-cloning term: per pair
    ``-log sigmoid(beta (pc - pr))`` (label-smoothed as DPO), averaged over the pairs, plus
    ``alpha`` times the token-mean negative log-likelihood of the chosen completions.
    Rewards: ``beta p``.
    """

    name = "cpo"

    def problems(self, config: ObjectiveConfig) -> list[str]:
        problems = super().problems(config)
        if config.alpha < 0:
            problems.append(f"alpha: must be at least 0, got {config.alpha}")
        return problems

    def loss(self, out: SequenceLogps, units: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen_logps, rejected_logps = out.logps[:, 0], out.logps[:, 1]
        preference = self.smoothed_sigmoid_loss(chosen_logps - rejected_logps).sum() / max(units["pairs"], 1)
        nll = -chosen_logps.sum() / max(units["chosen_tokens"], 1)
        metrics = self.reward_metrics(self.beta * chosen_logps.detach(), self.beta * rejected_logps.detach(), out.logps)
        return preference + self.config.alpha * nll, metrics


class ORPOObjective(PreferenceObjective):
    """Odds Ratio Preference Optimization (Hong et al., 2024, arXiv:2403.07691).

    With ``a`` the per-token mean log-probability of a completion, ``odds = a - log(1 - e^a)``;
    ``loss = NLL(chosen) - beta * log sigmoid(odds_c - odds_r)``: the token-mean negative
    log-likelihood of the chosen completions plus ``beta`` (the paper's lambda) times the
    pairs' mean log-odds-ratio term. Rewards: ``beta a``; ``logps/*`` are the per-token means
    ``a``, as TRL reports them. The NLL covers the chosen completions' tokens, as every other
    loss here; TRL's ORPO (and the authors' code) also counts the prompt's tokens.
    """

    name = "orpo"
    metric_names = (*REWARD_METRICS, "log_odds_ratio")

    def loss(self, out: SequenceLogps, units: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mean_logps = out.logps / out.tokens.clamp(min=1)  # (P, 2)
        log_odds = mean_logps - torch.log1p(-torch.exp(mean_logps))
        ratio = F.logsigmoid(log_odds[:, 0] - log_odds[:, 1])  # (P,)
        preference = -self.beta * ratio.sum() / max(units["pairs"], 1)
        nll = -out.logps[:, 0].sum() / max(units["chosen_tokens"], 1)
        rewards = self.beta * mean_logps.detach()
        metrics = self.reward_metrics(rewards[:, 0], rewards[:, 1], mean_logps)
        metrics["log_odds_ratio"] = ratio.detach().sum()
        return nll + preference, metrics
