"""``mlora serve``: a real server process on 127.0.0.1 with a tiny model, driven over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import job
from safetensors.torch import load_file

from mlora_core.config.schema import load_config
from mlora_core.training.engine import run

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A ``mlora serve`` process and an HTTP client for it."""

    def __init__(self, config: Path, out: Path) -> None:
        self.config, self.out = config, out
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Server:
        exe = shutil.which("mlora") or str(Path(sys.executable).parent / "mlora")
        env = {**os.environ, "MLORA_DISABLE_PLUGIN_AUTOLOAD": "1"}
        log = open(self.out.parent / f"serve-{self.port}.log", "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [exe, "serve", str(self.config), "--port", str(self.port), "--data-root", str(self.out.parent / "data")],
            stdout=log,
            stderr=log,
            text=True,
            env=env,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.out.parent / f"serve-{self.port}.log").read_text()
            try:
                if self.call("GET", "/health")[1]["status"] == "ok":
                    return self
            except (OSError, FileNotFoundError):
                pass
            time.sleep(0.2)
        raise AssertionError("the server did not come up")

    @property
    def token(self) -> str:
        return (self.out / "serve.token").read_text().strip()

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token if token is None else token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def call_raw(self, path: str) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path)
        request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()

    def submit(self, job_config: dict[str, Any]) -> dict[str, Any]:
        status, body = self.call("POST", "/jobs", {"job": job_config})
        assert status == 201, body
        return body

    def job(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/jobs/{name}")[1]

    def wait(self, name: str, done: Any, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.job(name)
            if done(record):
                return record
            assert self.proc is not None and self.proc.poll() is None, "the server died"
            time.sleep(0.1)
        raise AssertionError(f"{name}: {self.job(name)}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)


@pytest.fixture
def serve(tmp_path: Path, tiny_llama_dir: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def start(**top: Any) -> Server:
        cfg: dict[str, Any] = {
            "base_model": {"backend": "llama", "path": str(tiny_llama_dir), "dtype": "fp32"},
            "scheduler": {"type": "optimal_fit"},
            "monitor": {"console": None, "jsonl": {}},
            "output_dir": str(tmp_path / "served"),
            "checkpoint_every": 2,
            **top,
        }
        path = tmp_path / "serve.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        server = Server(path, tmp_path / "served").start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(signal.SIGKILL)


def weights(directory: Path) -> dict[str, Any]:
    return load_file(str(directory / "adapter_model.safetensors"))


def assert_same_adapter(ours: Path, theirs: Path) -> None:
    a, b = weights(ours), weights(theirs)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].allclose(b[key], rtol=1e-4, atol=1e-6), key


def finished(record: dict[str, Any]) -> bool:
    return record["status"] in ("completed", "failed", "cancelled")


def test_jobs_submitted_while_one_trains_complete_as_mlora_run_trains_them(
    serve, data_dir, make_config, host, tmp_path
):
    first = job("first", data_dir / "a.jsonl", max_steps=8)
    server = serve(jobs=[first])
    server.wait("first", lambda r: r["status"] == "running" and r["step"] >= 1)
    later = [job("second", data_dir / "b.jsonl", max_steps=3), job("third", data_dir / "c.jsonl", max_steps=2)]
    for j in later:
        assert server.submit(j)["status"] in ("queued", "running")
    assert server.job("first")["status"] == "running"  # still training while they join
    for name in ("first", "second", "third"):
        record = server.wait(name, finished)
        assert record["status"] == "completed", record
        assert record["step"] == record["total_steps"]
    listed = [r["name"] for r in server.call("GET", "/jobs")[1]["jobs"]]
    assert listed == ["first", "second", "third"]
    server.stop()
    assert server.proc is not None and server.proc.returncode == 0

    run(load_config(make_config([first, *later], output_dir=str(tmp_path / "alone"))), host)
    for name in ("first", "second", "third"):
        assert_same_adapter(tmp_path / "served" / name, tmp_path / "alone" / name)


def test_bad_requests_get_a_clear_4xx_and_change_nothing(serve, data_dir, tmp_path):
    server = serve()
    server.submit(job("ok", data_dir / "a.jsonl", max_steps=1))
    before = server.call("GET", "/jobs")[1]

    assert server.call("GET", "/jobs", token="") == (401, {"detail": "missing or wrong bearer token"})
    status, body = server.call("POST", "/jobs", {"job": job("sneaky", data_dir / "a.jsonl")}, token="wrong")
    assert status == 401
    bad_key = job("bad", data_dir / "a.jsonl")
    bad_key["train"]["learning_rate"] = 1e-3
    status, body = server.call("POST", "/jobs", {"job": bad_key})
    assert status == 400 and "job.train.learning_rate" in body["detail"]
    bad_value = job("bad", data_dir / "a.jsonl")
    bad_value["adapter"]["r"] = 0
    status, body = server.call("POST", "/jobs", {"job": bad_value})
    assert status == 400 and "job.adapter.r" in body["detail"]
    status, body = server.call("POST", "/jobs", {"job": job("../escape", data_dir / "a.jsonl")})
    assert status == 400 and "job.name" in body["detail"]
    (tmp_path / "elsewhere").mkdir()
    outside = tmp_path / "elsewhere" / "a.jsonl"
    outside.write_text((data_dir / "a.jsonl").read_text())
    status, body = server.call("POST", "/jobs", {"job": job("far", outside)})
    assert status == 400 and "outside the allowed data roots" in body["detail"]
    status, body = server.call("POST", "/jobs", {"job": job("ok", data_dir / "a.jsonl")})
    assert status == 409 and "taken" in body["detail"]
    assert server.call("GET", "/jobs/nope")[0] == 404
    status, body = server.call("POST", "/jobs", {"jobs": []})
    assert status == 400

    assert server.call("GET", "/jobs")[1]["jobs"][0]["name"] == before["jobs"][0]["name"]
    assert [r["name"] for r in server.call("GET", "/jobs")[1]["jobs"]] == ["ok"]
    assert server.wait("ok", finished)["status"] == "completed"
    assert server.proc is not None and server.proc.poll() is None  # unaffected


def mlora_client(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("mlora") or str(Path(sys.executable).parent / "mlora")
    env = {**os.environ, "MLORA_DISABLE_PLUGIN_AUTOLOAD": "1", "MLORA_TOKEN": server.token}
    return subprocess.run([exe, *args, "--server", server.url], capture_output=True, text=True, env=env, timeout=120)


def test_cancel_stops_the_job_at_the_next_step_and_frees_its_rows(serve, data_dir, tmp_path):
    """Then the client commands: submit (with an upload), status, logs, fetch, cancel."""
    server = serve()
    server.submit(job("long", data_dir / "a.jsonl", max_steps=None, epochs=30))  # 270 steps
    server.wait("long", lambda r: r["step"] >= 2)
    status, requested = server.call("POST", "/jobs/long/cancel")
    assert status == 202 and requested["cancel_requested"]
    record = server.wait("long", finished, timeout=60)
    assert record["status"] == "cancelled" and record["step"] <= requested["step"] + 1 < 270
    assert (tmp_path / "served" / "long" / "adapter_model.safetensors").is_file()  # keeps its adapter

    short = tmp_path / "short.yaml"
    short.write_text(yaml.safe_dump(job("short", data_dir / "b.jsonl", max_steps=4)))
    submitted = mlora_client(server, "submit", str(short), "--upload")
    assert submitted.returncode == 0 and "submitted short" in submitted.stdout, submitted.stderr
    assert server.wait("short", finished)["status"] == "completed"
    events = [json.loads(line) for line in (tmp_path / "served" / "metrics.jsonl").read_text().splitlines()]
    ended = next(i for i, e in enumerate(events) if e["event"] == "job_end" and e["job"] == "long")
    later_steps = [e for e in events[ended:] if e["event"] == "step"]
    assert later_steps and all("long" not in e["jobs"] for e in later_steps)

    status = mlora_client(server, "status", "--json")
    records = {r["name"]: r for r in map(json.loads, status.stdout.splitlines())}
    assert {r["status"] for r in records.values()} == {"cancelled", "completed"}
    logs = mlora_client(server, "logs", "short")
    assert "[short] step 4/4" in logs.stdout and "completed" in logs.stdout, logs.stdout
    fetched = mlora_client(server, "fetch", "short", str(tmp_path / "fetched"))
    assert fetched.returncode == 0, fetched.stderr
    assert_same_adapter(tmp_path / "fetched", tmp_path / "served" / "short")
    again = mlora_client(server, "cancel", "short")
    assert again.returncode == 2 and "has already ended (completed)" in again.stderr


def test_killed_server_restarts_with_every_job_and_resumes_the_running_one(
    serve, data_dir, make_config, host, tmp_path
):
    server = serve(scheduler={"type": "optimal_fit", "max_concurrent_jobs": 1})
    done = job("done", data_dir / "c.jsonl", max_steps=2)
    long = job("long", data_dir / "a.jsonl", max_steps=14, epochs=2)
    server.submit(done)
    server.wait("done", finished)
    server.submit(long)
    server.submit(job("waiting", data_dir / "b.jsonl", max_steps=2))
    server.wait("long", lambda r: r["step"] >= 6)
    assert server.job("waiting")["status"] == "queued"  # max_concurrent_jobs: 1
    server.stop(signal.SIGKILL)

    again = serve(scheduler={"type": "optimal_fit", "max_concurrent_jobs": 1})
    assert again.job("done")["status"] == "completed"
    assert again.job("waiting")["status"] == "queued"
    lines = again.call("GET", "/jobs/long/metrics")[1]["lines"]
    steps = [line["step"] for line in lines if line["event"] == "step"]
    assert steps[0] == 1
    for name in ("long", "waiting"):
        assert again.wait(name, finished)["status"] == "completed"
    lines = again.call("GET", "/jobs/long/metrics")[1]["lines"]
    steps = [line["step"] for line in lines if line["event"] == "step"]
    assert max(steps) == 14 and steps.count(1) == 1  # resumed from a checkpoint, not from the start
    status, archive = again.call_raw("/jobs/done/adapter")
    assert status == 200 and archive[:2] == b"\x1f\x8b"

    run(load_config(make_config([long], output_dir=str(tmp_path / "alone"))), host)
    assert_same_adapter(tmp_path / "served" / "long", tmp_path / "alone" / "long")
