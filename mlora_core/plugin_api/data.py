"""What every data loader shares (public API for data-loader plugins): checks of the common
``DataConfig`` fields, and the held-out split.

Format-specific parsing, templates and tokenization stay in the loader plugins.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sized
from pathlib import Path

from mlora_core.config.schema import DataConfig
from mlora_core.errors import DataError
from mlora_core.plugin_api.conventions import IGNORE_INDEX
from mlora_core.plugin_api.protocols import Sample, SplitDataset

#: Fewest records a job must keep for training after the held-out split.
MIN_TRAIN_RECORDS = 2


def common_data_problems(config: DataConfig, read: Callable[[Path], Sized]) -> list[str]:
    """Problems with ``path`` (missing, or ``read`` raises DataError), ``cutoff_len`` and
    ``val_set_size`` (out of range, or holding out so much that almost nothing is left to
    train on). ``read`` parses the file into its records."""
    problems = []
    v = config.val_set_size
    if v < 0 or (v >= 1 and v != int(v)):
        problems.append("val_set_size: a fraction in [0, 1) or a whole count")
    if not Path(config.path).is_file():
        problems.append(f"path: data file not found: {config.path}")
    else:
        try:
            records = len(read(Path(config.path)))
        except DataError as exc:
            problems.append(f"path: {exc}")
        else:
            if not problems:
                problems += _split_problems(records, v)
    if config.cutoff_len < 2:
        problems.append("cutoff_len: must be at least 2")
    return problems


def _split_problems(records: int, val_set_size: float) -> list[str]:
    held_out = held_out_count(records, val_set_size)
    if val_set_size > 0 and records - held_out < MIN_TRAIN_RECORDS:
        wanted = int(val_set_size) if val_set_size >= 1 else held_out
        return [
            f"val_set_size: {val_set_size:g} holds out {wanted} of the file's {records} records, leaving "
            f"{max(records - wanted, 0)} to train on (at least {MIN_TRAIN_RECORDS} needed); "
            "lower val_set_size or add data"
        ]
    return []


def held_out_count(records: int, val_set_size: float) -> int:
    """How many of ``records`` records :func:`split_held_out` holds out: ``val_set_size`` as
    a fraction (< 1, at least one record when positive) or a count, always leaving one."""
    n_val = int(val_set_size) if val_set_size >= 1 else round(val_set_size * records)
    if val_set_size > 0 and records > 1:
        n_val = max(1, n_val)
    return max(0, min(n_val, records - 1))


def split_held_out(samples: list[Sample], val_set_size: float, seed: int) -> SplitDataset:
    """Hold out ``val_set_size`` samples (a fraction or a count) chosen with ``seed``.

    Training samples keep their file order; the engine shuffles per epoch.
    """
    n = len(samples)
    held_out = set(random.Random(seed).sample(range(n), held_out_count(n, val_set_size)))
    return SplitDataset(
        train=[s for i, s in enumerate(samples) if i not in held_out],
        eval=[s for i, s in enumerate(samples) if i in held_out],
    )


def learned_tokens(sample: Sample) -> int:
    """Positions of ``sample`` that count in the loss: learned labels after the shift, the
    first token of each of its sequences never (nothing in the sequence precedes it)."""
    return sum(sum(1 for label in seq.labels[1:] if label != IGNORE_INDEX) for seq in sample.sequences())
