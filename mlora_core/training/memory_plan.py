"""``mlora plan``: predict a config's peak memory and the batch shapes that fit the limit.

Loads the base model and the jobs' adapters, runs a few forward+backward probes of
synthetic rows at several shapes, fits :class:`mlora_core.training.memory.MemoryModel` to their
measured peaks and reads the answers off the fit. Nothing is trained or written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mlora_core.config.schema import MloraConfig
from mlora_core.config.validation import validate_config
from mlora_core.models.loading import load_base_model
from mlora_core.plugin_api.host import PluginHost
from mlora_core.plugin_api.routing import RowRouter, Segment
from mlora_core.training.memory import MemoryModel, device_memory_limit, reset_step_peak, step_peak


@dataclass
class JobFit:
    name: str
    micro_batch_size: int
    cutoff_len: int
    predicted_bytes: float
    max_micro_batch_size: int
    max_cutoff_len: int


def plan_memory(config: MloraConfig, host: PluginHost) -> dict[str, Any]:
    """Fit the memory model for ``config`` and report what fits (see module doc)."""
    validate_config(config, host)
    device = config.base_model.device
    loaded = load_base_model(host, config.base_model)
    router = RowRouter()
    adapters = [
        host.adapters.create(j.adapter.type).attach(loaded.model, j.name, j.adapter, router) for j in config.jobs
    ]
    limit = config.scheduler.memory_limit
    model = MemoryModel(limit=device_memory_limit(device) if limit is None else (limit or None))
    rows = sum(j.train.micro_batch_size for j in config.jobs)
    length = max(j.data.cutoff_len for j in config.jobs)
    for probe_rows, probe_len in _probe_shapes(rows, length):
        model.observe(probe_rows, probe_len, _probe(loaded.model, router, config, probe_rows, probe_len))
    optimizer_bytes = sum(2 * p.numel() * 4 for a in adapters for p in a.parameters())  # AdamW moments, fp32
    model.coef = (model.coef[0] + optimizer_bytes, *model.coef[1:]) if model.coef else None
    jobs = [_job_fit(model, j.name, j.train.micro_batch_size, j.data.cutoff_len) for j in config.jobs]
    return {
        "memory_limit_bytes": model.limit,
        "coefficients": model.coef,
        "observations": model.observations,
        "trivial_step": {"rows": rows, "length": length, "predicted_bytes": model.predict(rows, length)},
        "jobs": [vars(j) for j in jobs],
    }


def _probe_shapes(rows: int, length: int) -> list[tuple[int, int]]:
    """A few shapes up to the config's largest step, enough to fit three coefficients."""
    shapes = {
        (1, max(8, length // 4)),
        (max(1, rows // 2), max(8, length // 2)),
        (rows, max(8, length // 2)),
        (rows, length),
    }
    return sorted(shapes)


def _probe(model: torch.nn.Module, router: RowRouter, config: MloraConfig, rows: int, length: int) -> int:
    """Peak bytes of one forward+backward over ``rows`` random rows of ``length`` tokens."""
    device = config.base_model.device
    vocab = model.get_input_embeddings().weight.shape[0]  # type: ignore[operator]
    ids = torch.randint(0, vocab, (rows, length), device=device)
    model.train()
    reset_step_peak(device)
    name = config.jobs[0].name
    with router.route([Segment(name, 0, rows)]):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    logits.float().logsumexp(-1).mean().backward()
    peak = step_peak(device)
    model.zero_grad(set_to_none=True)
    return peak


def _job_fit(model: MemoryModel, name: str, micro: int, cutoff: int) -> JobFit:
    predicted = model.predict(micro, cutoff) or 0.0
    return JobFit(
        name,
        micro,
        cutoff,
        predicted,
        _largest(lambda b: model.fits(b, cutoff)),
        _largest(lambda n: model.fits(micro, n)),
    )


def _largest(fits: Any, ceiling: int = 1 << 20) -> int:
    """The largest n in [0, ceiling] with fits(n) (fits is monotone), by doubling then bisection."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= ceiling and fits(high):
        low, high = high, high * 2
    high = min(high, ceiling + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def format_plan(result: dict[str, Any]) -> str:
    gib = 2**30
    limit = result["memory_limit_bytes"]
    step = result["trivial_step"]
    lines = [
        f"memory limit: {limit / gib:.2f} GiB" if limit else "memory limit: none",
        f"a step with every job's micro-batch ({step['rows']} rows x {step['length']} tokens): "
        f"{(step['predicted_bytes'] or 0) / gib:.2f} GiB predicted",
        f"{'job':<16} {'micro_batch':>11} {'cutoff_len':>10} {'predicted GiB':>13} "
        f"{'max micro_batch':>15} {'max cutoff_len':>14}",
    ]
    for j in result["jobs"]:
        lines.append(
            f"{j['name']:<16} {j['micro_batch_size']:>11} {j['cutoff_len']:>10} {j['predicted_bytes'] / gib:>13.2f} "
            f"{j['max_micro_batch_size']:>15} {j['max_cutoff_len']:>14}"
        )
    return "\n".join(lines)
