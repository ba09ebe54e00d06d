"""What every data loader shares: checks of the common ``DataConfig`` fields, the held-out split.

Format-specific parsing, templates and tokenization stay in the loader plugins.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlora_core.config import DataConfig
from mlora_core.errors import DataError
from mlora_core.protocols import Sample, SplitDataset


def common_data_problems(config: DataConfig, read: Callable[[Path], Any]) -> list[str]:
    """Problems with ``path`` (missing, or ``read`` raises DataError), ``cutoff_len`` and ``val_set_size``."""
    problems = []
    if not Path(config.path).is_file():
        problems.append(f"path: data file not found: {config.path}")
    else:
        try:
            read(Path(config.path))
        except DataError as exc:
            problems.append(f"path: {exc}")
    if config.cutoff_len < 2:
        problems.append("cutoff_len: must be at least 2")
    v = config.val_set_size
    if v < 0 or (v >= 1 and v != int(v)):
        problems.append("val_set_size: a fraction in [0, 1) or a whole count")
    return problems


def split_held_out(samples: list[Sample], val_set_size: float, seed: int) -> SplitDataset:
    """Hold out ``val_set_size`` samples (a fraction or a count) chosen with ``seed``.

    Training samples keep their file order; the engine shuffles per epoch.
    """
    n = len(samples)
    n_val = int(val_set_size) if val_set_size >= 1 else round(val_set_size * n)
    if val_set_size > 0 and n > 1:
        n_val = max(1, n_val)
    n_val = min(n_val, n - 1)
    held_out = set(random.Random(seed).sample(range(n), n_val))
    return SplitDataset(
        train=[s for i, s in enumerate(samples) if i not in held_out],
        eval=[s for i, s in enumerate(samples) if i in held_out],
    )
