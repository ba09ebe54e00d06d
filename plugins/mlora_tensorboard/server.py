"""A real ``tensorboard`` process on loopback, and what its HTTP API serves.

Used by the monitor's test and by ``scripts/tensorboard_browser_check.py``, to check the event
files the way a user sees them: through TensorBoard's own data loading (the Rust data server
when installed) and its HParams plugin, not through a reader of our own.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Every session status, so that no job is filtered out.
ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def tensorboard(log_dir: Path, timeout_s: float = 60.0) -> Iterator[str]:
    """Run ``tensorboard --logdir log_dir`` on 127.0.0.1 until the block ends; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir), "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*command, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                get(url, "/data/runs")
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"tensorboard did not start: {proc.communicate()[0][-2000:]}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def get(url: str, path: str) -> Any:
    with urllib.request.urlopen(url + path, timeout=30) as response:
        return json.loads(response.read())


def post(url: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def hparams_experiment(url: str) -> Any:
    """``/data/plugin/hparams/experiment``: ``hparamInfos`` and ``metricInfos``."""
    return post(url, "/data/plugin/hparams/experiment", {"experimentName": ""})


def hparams_sessions(url: str) -> dict[str, dict[str, Any]]:
    """``/data/plugin/hparams/session_groups``, as session name -> ``{"hparams", "metrics",
    "status"}`` (metrics: tag -> last value; status without its ``STATUS_`` prefix)."""
    body = {"experimentName": "", "allowedStatuses": ALL_STATUSES, "colParams": [], "startIndex": 0, "sliceSize": 1000}
    groups = post(url, "/data/plugin/hparams/session_groups", body).get("sessionGroups", [])
    return {
        session["name"]: {
            "hparams": group.get("hparams", {}),
            "metrics": {m["name"]["tag"]: m["value"] for m in session.get("metricValues", [])},
            "status": session.get("status", "STATUS_UNKNOWN").removeprefix("STATUS_"),
        }
        for group in groups
        for session in group["sessions"]
    }


def wait_for(check: Any, timeout_s: float = 30.0) -> Any:
    """Call ``check()`` until it returns something truthy (TensorBoard loads event files in the
    background), and return that; raise with the last value after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"TensorBoard did not serve the expected data in {timeout_s:.0f} s (last: {value!r})")
        time.sleep(0.2)
    return value
