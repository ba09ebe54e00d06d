"""Memory: measuring a run's and a step's peak, and predicting a step's peak from its shape.

Measured: the CUDA allocator's peak on GPUs, the process's peak resident set size on CPU.
Predicted (after the m-LoRA paper): ``mem = b0 + b1 * B * L + b2 * B * L**2`` for a step of
``B`` rows padded to ``L`` tokens; ``b0`` is what stays resident (weights, optimizer state),
``b1`` covers activations that grow with tokens, ``b2`` attention scores. The fit is redone
by least squares after every observed step.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass, field

import torch


def peak_memory(device: str) -> tuple[int, str]:
    """(peak bytes, what was measured: ``cuda_allocated`` or ``process_rss``)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device)), "cuda_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_rss"  # Linux reports KiB


#: Observations needed before the fit is trusted; until then every step is allowed.
MIN_OBSERVATIONS = 3


@dataclass
class MemoryModel:
    """Online fit of peak memory per step; ``limit`` in bytes (None: never refuse)."""

    limit: int | None
    observations: list[tuple[int, int, int]] = field(default_factory=list)  # (rows, length, bytes)
    coef: tuple[float, float, float] | None = None
    #: Smallest rows x length that ran out of memory; steps this large are refused.
    oom_tokens: int | None = None

    def observe(self, rows: int, length: int, peak_bytes: int) -> None:
        self.observations.append((rows, length, peak_bytes))
        shapes = {(r, n) for r, n, _ in self.observations}
        if len(self.observations) >= MIN_OBSERVATIONS and len(shapes) >= 2:
            self.coef = _fit(self.observations)

    def predict(self, rows: int, length: int) -> float | None:
        """Predicted peak bytes, or None while there is too little data."""
        if self.coef is None:
            return None
        b0, b1, b2 = self.coef
        tokens = rows * length
        return b0 + b1 * tokens + b2 * tokens * length

    def fits(self, rows: int, length: int) -> bool:
        """Whether a step of ``rows`` rows padded to ``length`` is expected to fit the limit."""
        if self.oom_tokens is not None and rows * length >= self.oom_tokens:
            return False
        if self.limit is None:
            return True
        predicted = self.predict(rows, length)
        return predicted is None or predicted <= self.limit

    def record_oom(self, rows: int, length: int) -> None:
        tokens = rows * length
        self.oom_tokens = tokens if self.oom_tokens is None else min(self.oom_tokens, tokens)


def _fit(observations: list[tuple[int, int, int]]) -> tuple[float, float, float]:
    """Least squares with non-negative slopes (a negative slope would promise free tokens)."""
    x = torch.tensor([[1.0, r * n, r * n * n] for r, n, _ in observations], dtype=torch.float64)
    y = torch.tensor([float(m) for _, _, m in observations], dtype=torch.float64)
    scale = x.abs().amax(dim=0).clamp(min=1.0)
    sol = torch.linalg.lstsq(x / scale, y.unsqueeze(1)).solution.squeeze(1) / scale
    b0, b1, b2 = (float(v) for v in sol)
    if b1 < 0 or b2 < 0:  # refit the linear part only
        sol1 = torch.linalg.lstsq(x[:, :2] / scale[:2], y.unsqueeze(1)).solution.squeeze(1) / scale[:2]
        b0, b1, b2 = float(sol1[0]), max(float(sol1[1]), 0.0), 0.0
    return b0, b1, b2


def device_memory_limit(device: str, margin: float = 0.1) -> int | None:
    """Default limit: the device's memory less ``margin`` (CUDA), or available RAM (CPU)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        return int(total * (1 - margin))
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return int((info["MemAvailable"] + current_rss()) * (1 - margin))
    except (OSError, KeyError):
        return None


def current_rss() -> int:
    """The process's resident set size now, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def reset_step_peak(device: str) -> None:
    """Start measuring a step's peak: the CUDA allocator's, or the process's peak RSS (Linux)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak RSS
    except OSError:
        pass


def step_peak(device: str) -> int:
    """Peak bytes since :func:`reset_step_peak`."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return current_rss()
