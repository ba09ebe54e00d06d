"""Checkpoints: what it takes to continue a run exactly, as safetensors + JSON, written atomically.

Layout under ``<output_dir>/checkpoints/``::

    latest.json                 {"dir": "step-00000042"}: the newest complete checkpoint
    step-00000042/
      engine.json               engine counters, finished jobs' results, memory observations
      engine.safetensors        torch's RNG state (dropout masks)
      <job>.json                step, position in the current optimizer batch, data order,
                                LR schedule, optimizer hyper-parameters, running totals
      <job>.safetensors         adapter weights, their accumulated gradients, AdamW moments

A checkpoint is written into ``step-N.tmp/``, every file flushed to disk, the directory
renamed to ``step-N/`` and only then ``latest.json`` replaced (itself through a temporary
file), so a crash at any moment leaves the previous checkpoint intact and named. Nothing
is ever read with pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mlora_core.errors import MloraError
from mlora_core.summary import write_json_atomic

CHECKPOINTS = "checkpoints"


def save_checkpoint(out: Path, step: int, engine_state: dict[str, Any], jobs: list[Any]) -> Path:
    """Write a checkpoint of ``jobs`` (the unfinished ones) and the engine; returns its directory."""
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({"rng": torch.get_rng_state()}, str(tmp / "engine.safetensors"))
    _write_json(tmp / "engine.json", engine_state)
    for job in jobs:
        tensors, state = job.checkpoint_state()
        save_file(tensors, str(tmp / f"{job.name}.safetensors"))
        _write_json(tmp / f"{job.name}.json", state)
    for path in tmp.iterdir():
        _fsync(path)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(root)
    write_json_atomic(root / "latest.json", {"dir": final.name, "step": step})
    for old in root.glob("step-*"):
        if old.is_dir() and old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    pointer = out / CHECKPOINTS / "latest.json"
    if not pointer.is_file():
        return None
    directory = out / CHECKPOINTS / str(json.loads(pointer.read_text())["dir"])
    if not directory.is_dir():
        raise MloraError(f"{pointer} names {directory.name}, which is missing")
    return directory


def load_engine_state(directory: Path) -> dict[str, Any]:
    """The engine's JSON state; also restores torch's RNG state."""
    torch.set_rng_state(load_file(str(directory / "engine.safetensors"))["rng"])
    state: dict[str, Any] = json.loads((directory / "engine.json").read_text())
    return state


def load_job_state(directory: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON state) of job ``name``."""
    tensors = load_file(str(directory / f"{name}.safetensors"))
    return tensors, json.loads((directory / f"{name}.json").read_text())


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
