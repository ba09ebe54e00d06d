"""The client commands of ``mlora serve`` against a small fake server in a thread: the token,
errors, uploads, the status table, following logs and fetching adapters safely."""

from __future__ import annotations

import argparse
import io
import json
import socket
import tarfile
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlora_core.errors import ConfigError, MloraError
from mlora_serve import client_commands
from mlora_serve.client import NO_TOKEN, ServiceClient, token_from
from mlora_serve.client_commands import (
    CancelCommand,
    FetchCommand,
    LogsCommand,
    StatusCommand,
    SubmitCommand,
    fmt_eta,
    format_line,
    format_status,
)

TOKEN = "s3cret"
COMMANDS = {
    "submit": SubmitCommand,
    "status": StatusCommand,
    "cancel": CancelCommand,
    "logs": LogsCommand,
    "fetch": FetchCommand,
}


def record(name: str, status: str = "queued", **extra: Any) -> dict[str, Any]:
    base = {
        "name": name,
        "status": status,
        "step": 0,
        "total_steps": None,
        "loss": None,
        "eta_s": None,
        "submitted_at": 1.0,
        "started_at": None,
        "ended_at": None,
        "error": None,
        "adapter_dir": None,
        "priority": 0,
        "cancel_requested": False,
    }
    return {**base, **extra}


def archive(members: dict[str, bytes | str]) -> bytes:
    """A tar.gz: a ``str`` value makes a symlink to it, ``bytes`` a file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, value in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(value, str):
                info.type, info.linkname = tarfile.SYMTYPE, value
                tar.addfile(info)
            else:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    return buffer.getvalue()


@dataclass
class FakeService:
    """What the fake server holds and what it was asked."""

    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending_lines: list[dict[str, Any]] = field(default_factory=list)  # one is released per metrics request
    lines: list[dict[str, Any]] = field(default_factory=list)
    archive: bytes = b""
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    uploads: dict[str, bytes] = field(default_factory=dict)


class Handler(BaseHTTPRequestHandler):
    service: FakeService

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _reply(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.service.requests.append((method, self.path, dict(self.headers), body))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._reply(401, {"detail": "wrong or missing token"})
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        reply = self._route(method, parts, urllib.parse.parse_qs(url.query), body)
        self._reply(*reply)

    def _route(self, method: str, parts: list[str], query: dict[str, list[str]], body: bytes) -> tuple[Any, ...]:
        s = self.service
        if (method, parts) == ("GET", ["health"]):
            return 200, {"status": "ok", "engine_step": 3, "jobs": {"queued": len(s.jobs)}}
        if (method, parts) == ("GET", ["jobs"]):
            return 200, {"jobs": list(s.jobs.values())}
        if (method, parts) == ("POST", ["jobs"]):
            job = json.loads(body)["job"]
            if "name" not in job:
                return 400, {"detail": "job.name: missing"}
            s.jobs[job["name"]] = record(job["name"], submitted=job)
            return 201, s.jobs[job["name"]]
        if method == "PUT" and parts[0] == "uploads":
            s.uploads[parts[1]] = body
            return 201, {"path": f"/srv/uploads/{parts[1]}"}
        if parts[0] != "jobs" or parts[1] not in s.jobs:
            return 404, b"not json", "text/plain"
        job = s.jobs[parts[1]]
        if (method, parts[2:]) == ("GET", []):
            return 200, job
        if (method, parts[2:]) == ("POST", ["cancel"]):
            job.update(status="cancelled") if job["status"] == "queued" else job.update(cancel_requested=True)
            return 202, job
        if (method, parts[2:]) == ("GET", ["metrics"]):
            if s.pending_lines:
                s.lines.append(s.pending_lines.pop(0))
            if not s.pending_lines:
                job["status"] = "completed"
            after = int(query.get("after", ["0"])[0])
            return 200, {"status": job["status"], "lines": [x for x in s.lines if x["seq"] > after]}
        if (method, parts[2:]) == ("GET", ["adapter"]):
            return 200, s.archive, "application/gzip"
        return 404, {"detail": "no such endpoint"}

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, FakeService]]:
    """A fake server on a free port; ``MLORA_TOKEN`` holds its token."""
    state = FakeService()
    handler = type("BoundHandler", (Handler,), {"service": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    monkeypatch.setenv("MLORA_TOKEN", TOKEN)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def cli(*argv: str) -> int:
    """Run one client command as ``mlora`` would, from its own parser."""
    command = COMMANDS[argv[0]]()
    parser = argparse.ArgumentParser(prog=f"mlora {argv[0]}")
    command.add_arguments(parser)
    return command.run(parser.parse_intermixed_args(list(argv[1:])), host=None)


# ---------------------------------------------------------------------------------- token


def test_token_from_file_wins_over_env_and_is_stripped(tmp_path, monkeypatch):
    monkeypatch.setenv("MLORA_TOKEN", " from-env\n")
    token_file = tmp_path / "serve.token"
    token_file.write_text("  from-file \n")
    assert token_from(str(token_file)) == "from-file"
    assert token_from(None) == "from-env"


def test_no_token_says_where_to_find_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MLORA_TOKEN", raising=False)
    with pytest.raises(MloraError) as exc:
        token_from(None)
    assert str(exc.value) == NO_TOKEN
    monkeypatch.setenv("MLORA_TOKEN", "  ")
    with pytest.raises(MloraError, match="no token"):
        token_from(None)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(MloraError, match="is empty"):
        token_from(str(tmp_path / "empty"))
    with pytest.raises(MloraError, match="cannot read"):
        token_from(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------- requests and errors


def test_requests_carry_the_bearer_token_and_quote_names(service):
    url, state = service
    state.jobs["a b/c"] = record("a b/c")
    client = ServiceClient(url + "/", TOKEN)
    assert client.health()["status"] == "ok"
    assert client.job("a b/c")["name"] == "a b/c"
    assert [r[1] for r in state.requests] == ["/health", "/jobs/a%20b%2Fc"]
    assert all(r[2]["Authorization"] == f"Bearer {TOKEN}" for r in state.requests)


def test_error_status_becomes_mlora_error_with_the_servers_detail(service, tmp_path):
    url, _ = service
    with pytest.raises(MloraError, match=r"^server: job.name: missing$"):
        ServiceClient(url, TOKEN).submit({"adapter": {"type": "lora"}})
    with pytest.raises(MloraError, match=r"^server: wrong or missing token$"):
        ServiceClient(url, "wrong").jobs()
    with pytest.raises(MloraError, match=r"^server: 404 Not Found$"):  # no JSON detail: the status line
        ServiceClient(url, TOKEN).job("nobody")
    token_file = tmp_path / "t"
    token_file.write_text("wrong")
    with pytest.raises(MloraError, match="wrong or missing token"):  # --token-file wins over MLORA_TOKEN
        cli("status", "--server", url, "--token-file", str(token_file))


def test_connection_refused_says_to_start_the_server():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(MloraError) as exc:
        ServiceClient(url, TOKEN).health()
    assert str(exc.value).startswith(f"cannot reach the server at {url}: ")
    assert str(exc.value).endswith("; is `mlora serve` running?")
    with pytest.raises(MloraError, match="expected a URL"):
        ServiceClient("localhost:8800", TOKEN)


# ---------------------------------------------------------------------------------- submit


def test_submit_upload_sends_the_data_and_rewrites_its_path(service, tmp_path, monkeypatch, capsys):
    url, state = service
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_bytes(b'{"instruction": "hi", "output": "there"}\n')
    job = {"name": "a", "adapter": {"type": "lora", "r": 8}, "data": {"path": "data/train.jsonl"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))

    assert cli("submit", "job.yaml", "--server", url, "--upload", "adapter.r=4", "priority=2") == 0
    assert capsys.readouterr().out == "submitted a: queued\n"
    assert state.uploads == {"train.jsonl": (tmp_path / "data" / "train.jsonl").read_bytes()}
    upload = next(r for r in state.requests if r[0] == "PUT")
    assert upload[2]["Content-Type"] == "application/octet-stream"
    submitted = state.jobs["a"]["submitted"]
    assert submitted == {
        "name": "a",
        "adapter": {"type": "lora", "r": 4},
        "data": {"path": "/srv/uploads/train.jsonl"},
        "priority": 2,
    }


def test_submit_refuses_a_run_config_a_missing_upload_and_bad_overrides(service, tmp_path, monkeypatch):
    url, state = service
    monkeypatch.chdir(tmp_path)
    Path("run.yaml").write_text(yaml.safe_dump({"jobs": [{"name": "a"}]}))
    with pytest.raises(MloraError, match="submit one job"):
        cli("submit", "run.yaml", "--server", url)
    Path("job.yaml").write_text(yaml.safe_dump({"name": "a", "data": {"path": "nowhere.jsonl"}}))
    with pytest.raises(MloraError, match="nowhere.jsonl is not a file"):
        cli("submit", "job.yaml", "--server", url, "--upload")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        cli("submit", "job.yaml", "--server", url, "oops")
    assert state.requests == []


# ---------------------------------------------------------------------------------- status, cancel


def test_status_json_prints_one_record_per_line(service, capsys):
    url, state = service
    state.jobs = {"a": record("a", "running", step=3, total_steps=10, loss=1.5), "b": record("b")}
    assert cli("status", "--server", url, "--json") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [state.jobs["a"], state.jobs["b"]]
    assert cli("status", "b", "--server", url, "--json") == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [state.jobs["b"]]


def test_status_table_shows_progress_and_errors():
    table = format_status(
        [
            record("a", "running", step=12, total_steps=30, loss=1.23456, eta_s=65),
            record("b"),
            record("c", "failed", step=2, total_steps=30, error="Traceback\nValueError: bad data"),
        ]
    ).splitlines()
    assert table[0].split() == ["job", "status", "step", "loss", "eta"]
    assert table[1].split() == ["a", "running", "12/30", "1.2346", "1m05s"]
    assert table[2].split() == ["b", "queued", "-", "-", "-"]
    assert table[3].endswith("error: ValueError: bad data")
    assert [fmt_eta(s) for s in (None, 7, 65, 3725)] == ["-", "7s", "1m05s", "1h02m"]


def test_cancel_reports_a_request_or_a_cancelled_job(service, capsys):
    url, state = service
    state.jobs = {"a": record("a", "running"), "b": record("b")}
    assert cli("cancel", "a", "--server", url) == 0
    assert cli("cancel", "b", "--server", url) == 0
    assert capsys.readouterr().out == "cancel requested for a\nb cancelled\n"


# ---------------------------------------------------------------------------------- logs


def test_logs_follow_prints_new_lines_until_the_job_ends(service, capsys, monkeypatch):
    url, state = service
    monkeypatch.setattr(client_commands, "POLL_INTERVAL_S", 0.0)
    state.jobs = {"a": record("a", "running")}
    state.pending_lines = [
        {"seq": 1, "event": "step", "step": 1, "total_steps": 2, "loss": 1.23456, "lr": 0.001},
        {"seq": 2, "event": "evaluation", "phase": "during", "step": 1, "eval_loss": 1.1},
        {"seq": 3, "event": "step", "step": 2, "total_steps": 2, "loss": 0.5, "lr": 0.0005},
        {"seq": 4, "event": "job_end", "result": {"status": "completed", "steps": 2, "error": None}},
    ]
    assert cli("logs", "a", "--follow", "--server", url) == 0
    assert capsys.readouterr().out.splitlines() == [
        "[a] step 1/2 loss 1.2346 lr 1.00e-03",
        "[a] eval (during) step 1: eval_loss 1.1000",
        "[a] step 2/2 loss 0.5000 lr 5.00e-04",
        "[a] completed after 2 steps",
    ]
    afters = [urllib.parse.parse_qs(urllib.parse.urlsplit(r[1]).query)["after"][0] for r in state.requests]
    assert afters == ["0", "1", "2", "3", "4"]  # the last poll finds the job ended and nothing new


def test_logs_without_follow_prints_what_there_is_once(service, capsys):
    url, state = service
    state.jobs = {"a": record("a", "running")}
    state.lines = [{"seq": 1, "event": "step", "step": 1, "total_steps": None, "loss": None}]
    state.pending_lines = [{"seq": 2, "event": "step", "step": 2, "total_steps": None, "loss": 2.0}] * 2
    assert cli("logs", "a", "--server", url) == 0
    assert capsys.readouterr().out.splitlines() == ["[a] step 1 loss -", "[a] step 2 loss 2.0000"]
    failed = {"event": "job_end", "result": {"status": "failed", "steps": 1, "error": "boom"}}
    assert format_line("x", failed) == "[x] failed after 1 steps: boom"


# ---------------------------------------------------------------------------------- fetch


def test_fetch_extracts_the_adapter_into_dir(service, tmp_path, capsys):
    url, state = service
    state.jobs = {"a": record("a", "completed")}
    state.archive = archive({"a/adapter_config.json": b"{}", "a/adapter_model.safetensors": b"weights"})
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine
    assert cli("fetch", "a", str(out), "--server", url) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").read_bytes() == b"weights"
    assert capsys.readouterr().out == f"a: adapter written to {out}\n"

    requests = len(state.requests)
    with pytest.raises(MloraError, match="not an empty directory"):
        cli("fetch", "a", str(out), "--server", url)
    assert len(state.requests) == requests  # refused before downloading


@pytest.mark.parametrize(
    "member",
    [{"../evil": b"x"}, {"/tmp/evil": b"x"}, {"a/../../evil": b"x"}, {"b/evil": b"x"}, {"a/link": "/etc/passwd"}],
    ids=["parent", "absolute", "dotdot-inside", "other-top", "symlink"],
)
def test_fetch_refuses_a_member_outside_the_jobs_directory(service, tmp_path, member):
    url, state = service
    state.jobs = {"a": record("a", "completed")}
    state.archive = archive({"a/adapter_config.json": b"{}", **member})
    out = tmp_path / "deep" / "out"
    with pytest.raises(MloraError, match="refused"):
        cli("fetch", "a", str(out), "--server", url)
    assert not out.exists() and not (tmp_path / "deep" / "evil").exists()


# ---------------------------------------------------------------------------------- through mlora's main


def test_commands_run_through_mlora_main(service, capsys):
    from mlora_core.cli.main import main
    from mlora_core.plugin_api.host import create_plugin_manager

    if not set(COMMANDS) <= set(create_plugin_manager().commands.entries):
        pytest.skip("the serve plugin does not register the client commands yet")
    url, state = service
    state.jobs = {"a": record("a")}
    assert main(["status", "--server", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == state.jobs["a"]
    assert main(["cancel", "nobody", "--server", url]) == 2
    assert capsys.readouterr().err == "mlora: error: server: 404 Not Found\n"
