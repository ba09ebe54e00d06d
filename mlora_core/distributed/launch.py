"""``mlora run CONFIG --nproc N``: N local worker processes through PyTorch's elastic launcher.

The same launcher ``torchrun`` uses (c10d rendezvous on this host, no restarts): each
worker is ``python -m mlora_core.cli.main run CONFIG ...`` with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous in its environment. When a worker dies the launcher stops
the others; this module turns its report into one line naming the rank. A SIGINT or
SIGTERM to this process reaches every worker (the launcher passes it on), and each stops
at the same step boundary after a checkpoint, as a single-process run does.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

#: Exit codes a worker uses on purpose: some job failed (1), bad input (2), stopped by a signal.
DELIBERATE_EXITS = {1: "a job failed", 2: "error", 130: "SIGINT", 143: "SIGTERM"}


def launch(nproc: int, worker_args: Sequence[str]) -> int:
    """Run ``mlora run`` with ``worker_args`` in ``nproc`` workers; returns the exit code.

    Each worker gets ``cores / nproc`` threads unless ``OMP_NUM_THREADS`` is set. The
    launcher's own log lines are left out: a worker that fails says why, and so does this
    function.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for name in list(logging.root.manager.loggerDict):  # each sets its own level (LOGLEVEL)
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"mlora-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "mlora_core.cli.main", "run", *worker_args)
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        if codes <= DELIBERATE_EXITS.keys():  # every rank stopped on purpose: it said why
            return max(codes)
        rank, failure = died_first(exc.failures)
        print(
            f"mlora: error: rank {rank} {describe_exit(failure.exitcode)}; the run stopped "
            "(the last checkpoint, if any, continues with --resume)",
            file=sys.stderr,
        )
        return 1
    except SignalException as exc:  # the workers got the same signal: they checkpointed and said so
        return 143 if exc.sigval == signal.SIGTERM else 130
    return 0


def died_first(failures: Mapping[int, ProcessFailure]) -> tuple[int, ProcessFailure]:
    """(global rank, failure) that stopped the run: a rank killed by a signal or crashed,
    before ranks that merely lost contact with it (those exit with a deliberate code)."""
    return min(failures.items(), key=lambda item: (item[1].exitcode in DELIBERATE_EXITS, item[1].timestamp))


def describe_exit(code: int) -> str:
    """``died (SIGKILL)`` for a signal, ``exited with code N`` otherwise."""
    if code < 0:
        try:
            return f"died ({signal.Signals(-code).name})"
        except ValueError:
            return f"died (signal {-code})"
    return f"exited with code {code}"
