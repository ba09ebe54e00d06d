"""The HTTP JSON API of ``mlora serve`` (FastAPI; its OpenAPI page is ``/docs``).

Every request needs ``Authorization: Bearer <token>`` (compared in constant time); every
error is a 4xx with ``{"detail": "<one line>"}`` and changes nothing. Request bodies are read
up to a limit (413 beyond it). A job's name is checked against the job-name rule before it
becomes a path, uploads are stored under ``<output_dir>/uploads/`` under a name of the
server's choosing, and a job's data path must lie under one of the allowed roots.
"""

from __future__ import annotations

import dataclasses
import hmac
import io
import json
import re
import secrets
import tarfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from mlora_core.config.schema import MloraConfig, job_config_from_dict, to_dict
from mlora_core.config.validation import validate_config
from mlora_core.errors import ConfigError
from mlora_core.plugin_api.conventions import JOB_NAME, JOB_NAME_RULE
from mlora_core.plugin_api.host import PluginHost
from mlora_serve.service import Service
from mlora_serve.store import QUEUED, RUNNING, TERMINAL, JobStore, NameTaken

UPLOAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class Limits:
    #: Largest JSON request body, in bytes.
    max_body: int = 1 << 20
    #: Largest uploaded data file, in bytes.
    max_upload: int = 64 << 20


@dataclass
class ServeContext:
    """What the API needs: the service's config (base model, output dir), the plugin host,
    the store, the engine-side service, the token and the limits."""

    config: MloraConfig
    host: PluginHost
    store: JobStore
    service: Service
    token: str
    data_roots: list[Path]
    limits: Limits = dataclasses.field(default_factory=Limits)

    @property
    def uploads(self) -> Path:
        return Path(self.config.output_dir) / "uploads"


def create_app(ctx: ServeContext) -> FastAPI:
    """The API over ``ctx`` (see the module doc)."""
    app = FastAPI(title="mlora serve", description="Fine-tuning jobs over one shared base model.")

    @app.middleware("http")
    async def require_token(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        given = request.headers.get("authorization", "")
        expected = f"Bearer {ctx.token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401)
        return await call_next(request)

    @app.get("/health")
    def health() -> dict[str, Any]:
        counts: dict[str, int] = {}
        for record in ctx.store.all():
            counts[record["status"]] = counts.get(record["status"], 0) + 1
        return {
            "status": "ok" if ctx.service.ready else "loading",
            "engine_step": ctx.service.engine_step,
            "jobs": counts,
        }

    @app.post("/jobs", status_code=201)
    async def submit(request: Request) -> dict[str, Any]:
        body = await _read_json(request, ctx.limits.max_body)
        job = body.get("job") if isinstance(body, dict) else None
        if not isinstance(job, dict):
            raise HTTPException(400, 'expected a JSON object {"job": {...}} holding one job of a run config')
        checked = _check_job(ctx, job)
        try:
            ctx.store.add(checked["name"], checked)
        except NameTaken:
            raise HTTPException(409, f"job name {checked['name']!r} is taken; choose another") from None
        ctx.service.notify()
        return _view(ctx, checked["name"])

    @app.get("/jobs")
    def jobs() -> dict[str, Any]:
        return {"jobs": [_view(ctx, r["name"]) for r in ctx.store.all()]}

    @app.get("/jobs/{name}")
    def job(name: str) -> dict[str, Any]:
        return _view(ctx, name)

    @app.get("/jobs/{name}/metrics")
    def metrics(name: str, after: int = 0) -> dict[str, Any]:
        record = _record(ctx, name)
        return {"status": record["status"], "lines": ctx.store.lines(name, after)}

    @app.post("/jobs/{name}/cancel", status_code=202)
    def cancel(name: str) -> dict[str, Any]:
        record = _record(ctx, name)
        if record["status"] in TERMINAL:
            raise HTTPException(409, f"job {name!r} has already ended ({record['status']})")
        if record["status"] == QUEUED:
            ctx.store.update(name, status="cancelled", error="cancelled by request", ended_at=time.time())
        else:
            ctx.store.update(name, cancel_requested=1)
        ctx.service.notify()
        return _view(ctx, name)

    @app.get("/jobs/{name}/adapter")
    def adapter(name: str) -> Response:
        record = _record(ctx, name)
        directory = Path(ctx.config.output_dir) / name
        if record["status"] not in TERMINAL or not (directory / "adapter_config.json").is_file():
            raise HTTPException(409, f"job {name!r} has no saved adapter yet (status {record['status']})")
        return Response(_archive(directory, name), media_type="application/gzip")

    @app.put("/uploads/{filename}", status_code=201)
    async def upload(filename: str, request: Request) -> dict[str, str]:
        if not UPLOAD_NAME.match(filename):
            raise HTTPException(400, f"upload name {filename!r}: use letters, digits, '.', '_' and '-' only")
        data = await _read_body(request, ctx.limits.max_upload)
        ctx.uploads.mkdir(parents=True, exist_ok=True)
        path = ctx.uploads / f"{secrets.token_hex(4)}-{filename}"
        path.write_bytes(data)
        return {"path": str(path.resolve())}

    return app


def _check_job(ctx: ServeContext, job: dict[str, Any]) -> dict[str, Any]:
    """The job as plain data with defaults, validated as ``mlora run`` validates a job (400 with
    the first problem otherwise), its data under an allowed root."""
    name = job.get("name")
    if not isinstance(name, str) or not JOB_NAME.match(name):
        raise HTTPException(400, f"job.name: {name!r} must be {JOB_NAME_RULE}")
    try:
        config = job_config_from_dict(job, "job")
        validate_config(dataclasses.replace(ctx.config, jobs=[config]), ctx.host)
    except ConfigError as exc:
        problems = [p.replace("jobs[0]", "job", 1) for p in exc.problems]
        raise HTTPException(400, "; ".join(problems)) from None
    _check_path(ctx, "job.data.path", config.data.path)
    if config.objective.reference != "base":
        _check_path(ctx, "job.objective.reference", config.objective.reference)
    return to_dict(config)


def _check_path(ctx: ServeContext, key: str, path: str) -> None:
    resolved = Path(path).resolve()
    roots = [*ctx.data_roots, ctx.uploads.resolve()]
    if not any(resolved.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise HTTPException(
            400, f"{key}: {path} is outside the allowed data roots ({allowed}); upload the file instead"
        )


def _record(ctx: ServeContext, name: str) -> dict[str, Any]:
    record = ctx.store.get(name) if JOB_NAME.match(name) else None
    if record is None:
        raise HTTPException(404, f"no job named {name!r}")
    return record


def _view(ctx: ServeContext, name: str) -> dict[str, Any]:
    """A job as the API shows it: its state, progress and result."""
    record = _record(ctx, name)
    progress = ctx.service.progress.get(name, {})
    result = record["result"] or {}
    step = result.get("steps", progress.get("step", 0))
    total = result.get("total_steps", progress.get("total_steps"))
    eta = None
    if record["status"] == RUNNING and record["started_at"] and step and total:
        eta = round((time.time() - record["started_at"]) / step * (total - step), 1)
    status = record["status"]
    if status == RUNNING and not progress.get("trained"):  # in the engine, waiting for room
        status = QUEUED
    return {
        "name": name,
        "status": status,
        "step": step,
        "total_steps": total,
        "loss": progress.get("loss", result.get("final_train_loss")),
        "eta_s": eta,
        "submitted_at": record["submitted_at"],
        "started_at": record["started_at"],
        "ended_at": record["ended_at"],
        "error": record["error"],
        "adapter_dir": result.get("adapter_dir"),
        "priority": record["priority"],
        "cancel_requested": record["cancel_requested"],
        "eval_loss_before": result.get("eval_loss_before"),
        "eval_loss_after": result.get("eval_loss_after"),
    }


def _archive(directory: Path, name: str) -> bytes:
    """``directory``'s files as a tar.gz under ``<name>/``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(directory.iterdir()):
            if path.is_file():
                tar.add(path, arcname=f"{name}/{path.name}")
    return buffer.getvalue()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 beyond ``limit`` bytes (read no further)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_json(request: Request, limit: int) -> Any:
    try:
        return json.loads(await _read_body(request, limit))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"the request body is not JSON: {exc}") from None
