"""``sft``: supervised fine-tuning, the mean next-token cross-entropy of the learned tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mlora_core.config.schema import ObjectiveConfig
from mlora_core.errors import ConfigError
from mlora_core.plugin_api.data import learned_tokens
from mlora_core.plugin_api.protocols import Sample, SequenceLogps


class SupervisedObjective:
    """The token-mean negative log-likelihood over the optimizer batch (every job's default)."""

    sequences_per_sample = 1
    needs_reference = False
    metric_names: tuple[str, ...] = ()

    def __init__(self, config: ObjectiveConfig) -> None:
        if config.options:
            raise ConfigError([f"options: the sft objective takes no options, got {sorted(config.options)}"])

    def units(self, samples: Sequence[Sample]) -> dict[str, int]:
        return {"tokens": sum(learned_tokens(s) for s in samples)}

    def loss(self, out: SequenceLogps, units: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return -out.logps.sum() / max(units["tokens"], 1), {}
