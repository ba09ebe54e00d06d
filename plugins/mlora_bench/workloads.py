"""The rows ``mlora bench`` trains: one synthetic alpaca file per job.

- ``uniform`` (the default): every job's rows are roughly seq_len/2 to seq_len tokens long;
- ``skewed``: the four response-length distributions of ``benchmarks/schedulers.py``, one per
  job (short, medium, long, mixed; job 5 is short again, and so on), so the jobs' rows differ
  in length and a step that mixes them pads the short rows to the long ones' width.

Every record is "Repeat the words in capitals.", some words as input, the same words in
capitals as output. Seeds are fixed: job ``j`` draws from ``random.Random(j)``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = "apple river planet garden window silver orange rocket pencil basket candle forest guitar island".split()
WORKLOADS = ("uniform", "skewed")
#: ``--workload skewed``: words per response, as in benchmarks/schedulers.py (which imports it).
SKEWED_WORDS = {"short": (1, 3), "medium": (8, 16), "long": (30, 50), "mixed": (1, 50)}


def job_lengths(workload: str, job: int, seq_len: int) -> tuple[str, int, int]:
    """The distribution job ``job`` draws from: its name and its fewest and most words.

    Args:
        workload: ``uniform`` or ``skewed``.
        job: the job's index, from 0.
        seq_len: the cutoff length; ``uniform`` rows are about seq_len/2 to seq_len tokens.

    Raises:
        ValueError: for an unknown workload.
    """
    if workload == "uniform":
        # about 30 tokens of prompt, then input and output at about 3.5 tokens per word together
        return "uniform", max(1, int((seq_len / 2 - 30) / 3.5)), max(2, int((seq_len - 30) / 3.5))
    if workload == "skewed":
        name = list(SKEWED_WORDS)[job % len(SKEWED_WORDS)]
        return name, *SKEWED_WORDS[name]
    raise ValueError(f"unknown workload {workload!r}: use one of {', '.join(WORKLOADS)}")


def distributions(workload: str, jobs: int, seq_len: int) -> list[str]:
    """Each job's distribution name, in job order (for the result's settings)."""
    return [job_lengths(workload, j, seq_len)[0] for j in range(jobs)]


def write_datasets(out: Path, jobs: int, rows: int, seq_len: int, workload: str = "uniform") -> list[Path]:
    """One alpaca file per job, ``out/job{j}.jsonl``, of ``rows`` records (fixed seeds)."""
    paths = []
    for j in range(jobs):
        _, lo, hi = job_lengths(workload, j, seq_len)
        rng = random.Random(j)
        path = out / f"job{j}.jsonl"
        with open(path, "w") as f:
            for _ in range(rows):
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
                record = {"instruction": "Repeat the words in capitals.", "input": words, "output": words.upper()}
                f.write(json.dumps(record) + "\n")
        paths.append(path)
    return paths


def write_floor_data(out: Path, paths: list[Path], micro: int) -> Path:
    """All jobs' rows in one file, ordered so each micro-batch of N*micro rows is one mlora step's rows."""
    records = [p.read_text().splitlines() for p in paths]
    lines = []
    for start in range(0, len(records[0]), micro):
        for job in records:
            lines.extend(job[start : start + micro])
    path = out / "floor.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
