"""A run's output directory: claiming it, adapters, summary.json, and checkpoints.

:class:`RunDirectory` refuses to mix two runs in one directory, writes each finished job's
adapter (through a temporary directory, so a crash never leaves half an adapter under the
job's name), summary.json, and the checkpoints that let a run continue exactly.

Checkpoints are safetensors + JSON, written atomically, and do not depend on how many
processes wrote them: a job's accumulated gradients are stored summed over the ranks. Layout under
``<output_dir>/checkpoints/``::

    latest.json                 {"dir": "step-00000042"}: the newest complete checkpoint
    step-00000042/
      engine.json               engine counters, finished jobs' results, memory observations
      engine.safetensors        torch's RNG state (dropout masks)
      <job>.json                step, position in the current optimizer batch, data order,
                                LR schedule, optimizer hyper-parameters, running totals
      <job>.safetensors         adapter weights, their accumulated gradients, AdamW moments

A checkpoint is written into ``step-N.tmp/`` (each job's files by the rank that owns the
job), every file flushed to disk, the directory renamed to ``step-N/`` and only then
``latest.json`` replaced (itself through a temporary
file), so a crash at any moment leaves the previous checkpoint intact and named. Nothing
is ever read with pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from mlora_core.errors import MloraError
from mlora_core.plugin_api.protocols import Adapter
from mlora_core.training.summary import write_json_atomic

if TYPE_CHECKING:
    from mlora_core.training.job import Job

CHECKPOINTS = "checkpoints"
SUMMARY = "summary.json"


class RunDirectory:
    """The output directory of one run (``output_dir``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def claim(self, *, resume: bool, overwrite: bool) -> Path | None:
        """Refuse to mix two runs in one directory; returns the checkpoint to resume from, if any.

        ``overwrite`` removes the earlier run's summary and checkpoints (its adapters are
        replaced as jobs finish; monitors replace their own files).

        Raises:
            MloraError: the directory holds a run and neither flag says what to do with it.
        """
        summary, checkpoints = self.path / SUMMARY, self.path / CHECKPOINTS
        if resume:
            return latest_checkpoint(self.path)
        if summary.exists() or checkpoints.exists():
            if not overwrite:
                raise MloraError(
                    f"output_dir {self.path} already holds a run; pass --resume to continue it, "
                    "--overwrite to start again, or choose another output_dir"
                )
            summary.unlink(missing_ok=True)
            shutil.rmtree(checkpoints, ignore_errors=True)
        return None

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def save_adapter(self, name: str, adapter: Adapter, base_model_name_or_path: str) -> str:
        """Write job ``name``'s adapter to ``<output_dir>/<name>``; returns that directory.

        The adapter is written to a temporary directory first and renamed into place, so a
        failed save leaves no directory that looks like a saved adapter.
        """
        final = self.path / name
        tmp = self.path / f".{name}.saving"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            adapter.save(str(tmp), base_model_name_or_path)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return str(final)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / SUMMARY, summary)

    # --- checkpoints, in three phases (several ranks write one checkpoint) -----------------

    def begin_checkpoint(self, step: int) -> Path:
        """An empty ``step-N.tmp/`` for a checkpoint at engine step ``step`` (one rank calls this)."""
        tmp = self.path / CHECKPOINTS / f"step-{step:08d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def write_job(self, tmp: Path, job: Job, grads: list[torch.Tensor | None]) -> None:
        """Write an unfinished job's state into ``tmp``, with ``grads`` as its accumulated gradients."""
        tensors, state = job.checkpoint_state(grads)
        save_file(tensors, str(tmp / f"{job.name}.safetensors"))
        _write_json(tmp / f"{job.name}.json", state)
        _fsync(tmp / f"{job.name}.safetensors")
        _fsync(tmp / f"{job.name}.json")

    def commit_checkpoint(self, tmp: Path, engine_state: dict[str, Any]) -> Path:
        """Add the engine's state to ``tmp`` and make it the newest checkpoint; returns its directory.

        Every job's files must be in ``tmp`` already (written by whichever ranks own them).
        """
        root = tmp.parent
        final = root / tmp.name.removesuffix(".tmp")
        save_file({"rng": torch.get_rng_state()}, str(tmp / "engine.safetensors"))
        _write_json(tmp / "engine.json", engine_state)
        for path in (tmp / "engine.safetensors", tmp / "engine.json", tmp):
            _fsync(path)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(root)
        write_json_atomic(root / "latest.json", {"dir": final.name, "step": int(final.name.split("-")[1])})
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
