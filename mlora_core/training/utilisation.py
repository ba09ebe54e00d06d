"""How busy the device was during a step: the GPU through NVML, or this process's CPU share.

GPU utilisation needs ``nvidia-ml-py`` (``pip install "mlora-trainer[gpu]"``); NVML reports
the percentage of time over its last sample period (1/6 s to 1 s, by GPU) during which a
kernel ran. Without a GPU, or without NVML, the step reports CPU utilisation instead:
process CPU time / wall time / cores.
"""

from __future__ import annotations

import os
import time
from typing import Any


class UtilisationMeter:
    """``start()`` before a step, ``read(seconds)`` after it -> {metric name: fraction in [0, 1]}."""

    def __init__(self, device: str) -> None:
        self._nvml_handle = _nvml_handle(device)
        self._cpu0 = 0.0

    @property
    def metric(self) -> str:
        """``gpu_utilisation`` or ``cpu_utilisation``."""
        return "gpu_utilisation" if self._nvml_handle is not None else "cpu_utilisation"

    def start(self) -> None:
        self._cpu0 = time.process_time()

    def read(self, seconds: float) -> dict[str, float]:
        if self._nvml_handle is not None:
            import pynvml

            return {"gpu_utilisation": pynvml.nvmlDeviceGetUtilizationRates(self._nvml_handle).gpu / 100}
        busy = (time.process_time() - self._cpu0) / max(seconds, 1e-9)
        return {"cpu_utilisation": busy / (os.cpu_count() or 1)}


def _nvml_handle(device: str) -> Any:
    """The NVML handle of a CUDA device, or None (CPU, no GPU, or no nvidia-ml-py)."""
    if not device.startswith("cuda"):
        return None
    try:
        import pynvml
        import torch

        if not torch.cuda.is_available():
            return None
        pynvml.nvmlInit()
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # ImportError, or an NVML error (driver without NVML, containers)
        return None
