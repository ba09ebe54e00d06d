"""The processes of a run: this rank, how many there are, and the collectives the engine uses.

A run is distributed when it was started by PyTorch's elastic launcher (``mlora run
--nproc N`` or ``torchrun``), which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous variables in each worker's environment. Otherwise the run is one process and
every collective here is a no-op, so the engine has one code path.

Two process groups: the default one (gloo on CPU, NCCL on CUDA) carries adapter gradients
and loss sums as tensors; a gloo group carries the small Python objects of the engine's
per-step control exchange (NCCL cannot move CPU objects without a device copy).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mlora_core.config.schema import DistributedConfig
from mlora_core.errors import MloraError

T = TypeVar("T")


class RankLost(MloraError):
    """A collective failed: another rank died, or did not answer within ``timeout_s``."""


@dataclass
class World:
    """This process's place among the run's processes."""

    rank: int = 0
    size: int = 1
    #: Rank of this process on its node (selects its CUDA device), and processes on its node.
    local_rank: int = 0
    local_size: int = 1
    backend: str | None = None
    _control: Any = None
    #: Seconds this rank spent in collectives (waiting for slower ranks included).
    collective_s: float = 0.0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: writes summary.json and the engine's checkpoint files, runs the monitors."""
        return self.rank == 0

    def device(self, configured: str) -> str:
        """The device this rank uses: ``cuda`` becomes this rank's ``cuda:LOCAL_RANK``.

        Raises:
            MloraError: ``cuda:N`` with several processes (they would all use GPU N).
        """
        if not self.distributed or not configured.startswith("cuda"):
            return configured
        if configured != "cuda":
            raise MloraError(
                f"base_model.device: {configured!r} with several processes; use 'cuda' "
                "(each rank takes its own GPU, cuda:LOCAL_RANK)"
            )
        return f"cuda:{self.local_rank}"

    def memory_share(self, limit: int | None, device: str) -> int | None:
        """This rank's share of a memory limit: on CPU the node's RAM is shared by its ranks."""
        if limit is None or device.startswith("cuda"):
            return limit
        return limit // self.local_size

    # --- collectives (no-ops in a single process) ---------------------------------------

    def all_gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (any picklable object), in rank order."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.size
        self._call(dist.all_gather_object, out, value, group=self._control)
        return out

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        if not self.distributed:
            return tensor
        if self.backend == "nccl" and not tensor.is_cuda:  # NCCL reduces device tensors only
            on_device = tensor.to(f"cuda:{self.local_rank}")
            self._call(dist.all_reduce, on_device, op=dist.ReduceOp.SUM)
            return tensor.copy_(on_device)
        self._call(dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            self._call(dist.barrier, group=self._control)

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and give its result (or its error) to every rank."""
        result: tuple[T | None, str | None] = (None, None)
        if self.is_main:
            try:
                result = (fn(), None)
            except MloraError as exc:
                result = (None, str(exc))
        result = self.all_gather(result)[0]
        if result[1] is not None:
            raise MloraError(result[1])
        return result[0]  # type: ignore[return-value]

    def _call(self, collective: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        try:
            collective(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise self.lost(exc) from exc
        finally:
            self.collective_s += time.perf_counter() - started

    def lost(self, exc: BaseException) -> RankLost:
        """The one-line error for a collective that failed with ``exc``."""
        return RankLost(
            f"lost contact with the other ranks ({_first_line(exc)}); "
            "another rank died or did not answer within distributed.timeout_s"
        )

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def launched_world_size() -> int:
    """Processes the launcher started (1 when not started by torchrun / ``--nproc``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_world(config: DistributedConfig, device: str) -> World:
    """Join the process group the launcher set up, or a single-process world when there is none."""
    size = launched_world_size()
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    timeout = timedelta(seconds=config.timeout_s)
    dist.init_process_group(backend=backend, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return World(rank=rank, size=size, local_rank=local_rank, local_size=local_size, backend=backend, _control=control)


def raised_by_collective(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside torch.distributed (a collective that failed, for
    example one FSDP2 runs inside the model's forward)."""
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return last is not None and f"torch{os.sep}distributed{os.sep}" in last


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
