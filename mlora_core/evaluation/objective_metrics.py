"""Held-out metrics of a job whose objective is not plain next-token loss (``dpo``, ``cpo``, ...).

``eval_loss`` is the objective's own loss over all held-out samples (as if they were one
optimizer batch). For preference pairs, ``preference_accuracy`` is the share of pairs whose
chosen completion the adapter prefers to the rejected one by more than the reference does:
``(pc - pr) - (rc - rr) > PREFERENCE_MARGIN``, with the reference's log-probabilities computed
before training (the bare base, or the job's ``objective.reference``). The margin keeps float
rounding from counting: before training the adapter is the reference (LoRA's B starts at 0),
but batches of other shapes round its log-probabilities differently, by about 1e-5.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlora_core.plugin_api.protocols import LoadedModel, Objective, Sample, SequenceLogps
from mlora_core.plugin_api.routing import RowRouter
from mlora_core.training.batch import reference_tensor
from mlora_core.training.reference import sequence_logps

#: Nats by which the adapter's preference must exceed the reference's to count.
PREFERENCE_MARGIN = 1e-3


def objective_held_out(
    loaded: LoadedModel,
    router: RowRouter,
    name: str,
    samples: Sequence[Sample],
    rows: int,
    objective: Objective,
    pad_id: int,
    device: str,
) -> dict[str, float | None]:
    """``eval_loss`` and, for pairs with reference log-probabilities, ``preference_accuracy``
    of adapter ``name`` on its held-out ``samples`` (None when there are none)."""
    if not samples:
        return {"eval_loss": None, "preference_accuracy": None}
    logps, tokens = sequence_logps(loaded, router, samples, name, rows, pad_id, device)
    out = SequenceLogps(logps, tokens, reference_tensor(samples))
    loss, _ = objective.loss(out, objective.units(samples))
    accuracy = None
    if out.reference_logps is not None and out.logps.shape[1] == 2:
        policy, reference = out.logps, out.reference_logps
        prefers = (policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1]) > PREFERENCE_MARGIN
        accuracy = float(prefers.float().mean())
    return {"eval_loss": float(loss), "preference_accuracy": accuracy}
