"""The HTTP client of ``mlora serve``'s API, over the standard library.

:class:`ServiceClient` has one method per endpoint; every request carries the bearer token,
and every failure becomes an :class:`~mlora_core.errors.MloraError` the user can act on:
``server: <detail>`` for an error status (the ``detail`` of the server's JSON body),
``cannot reach the server at URL`` when nothing answers. :func:`token_from` finds the token.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any

from mlora_core.errors import MloraError

#: Where ``mlora serve`` listens unless told otherwise.
DEFAULT_SERVER = "http://127.0.0.1:8800"
#: The environment variable that holds the token when no ``--token-file`` is given.
TOKEN_ENV = "MLORA_TOKEN"
NO_TOKEN = "no token: pass --token-file PATH or set MLORA_TOKEN (the server writes its token to OUTPUT_DIR/serve.token)"

#: A job record, as the server returns it (``name``, ``status``, ``step``, ...).
Record = dict[str, Any]


def token_from(args_token_file: str | None) -> str:
    """The token: the contents of ``--token-file`` if given, else ``$MLORA_TOKEN``, stripped.

    Raises:
        MloraError: the file cannot be read or is empty, or there is no token at all.
    """
    if args_token_file is not None:
        try:
            token = Path(args_token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise MloraError(f"--token-file {args_token_file}: cannot read it: {exc.strerror or exc}") from exc
        if not token:
            raise MloraError(f"--token-file {args_token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise MloraError(NO_TOKEN)
    return token


class ServiceClient:
    """One method per endpoint of the service's API; JSON in, JSON out."""

    def __init__(self, server: str, token: str, timeout: float = 30) -> None:
        parsed = urllib.parse.urlsplit(server)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise MloraError(f"--server {server!r}: expected a URL like {DEFAULT_SERVER}")
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout

    def health(self) -> dict[str, Any]:
        """``GET /health``: ``status``, ``engine_step`` and the count of jobs per status."""
        return self._json("GET", "/health")

    def submit(self, job: dict[str, Any]) -> Record:
        """``POST /jobs``: queue one job (a run config's ``jobs`` entry); returns its record."""
        return self._json("POST", "/jobs", {"job": job})

    def jobs(self) -> list[Record]:
        """``GET /jobs``: every job's record, in submission order."""
        jobs: list[Record] = self._json("GET", "/jobs")["jobs"]
        return jobs

    def job(self, name: str) -> Record:
        """``GET /jobs/{name}``: one job's record."""
        return self._json("GET", f"/jobs/{_quote(name)}")

    def metrics(self, name: str, after: int = 0) -> dict[str, Any]:
        """``GET /jobs/{name}/metrics``: the job's ``status`` and its metric ``lines`` with ``seq > after``."""
        return self._json("GET", f"/jobs/{_quote(name)}/metrics?after={int(after)}")

    def cancel(self, name: str) -> Record:
        """``POST /jobs/{name}/cancel``: stop the job at the next step boundary; returns its record."""
        return self._json("POST", f"/jobs/{_quote(name)}/cancel")

    def adapter_archive(self, name: str) -> bytes:
        """``GET /jobs/{name}/adapter``: the saved adapter as a tar.gz under one top directory ``<name>/``."""
        return self._request("GET", f"/jobs/{_quote(name)}/adapter")

    def upload(self, path: Path) -> str:
        """``PUT /uploads/{filename}``: send a local file's bytes; returns its path on the server."""
        with open(path, "rb") as body:
            size = os.fstat(body.fileno()).st_size
            raw = self._request("PUT", f"/uploads/{_quote(path.name)}", body, "application/octet-stream", size)
        server_path: str = _decode(raw)["path"]
        return server_path

    def _json(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        if payload is None:
            return _decode(self._request(method, path))
        body = json.dumps(payload).encode("utf-8")
        return _decode(self._request(method, path, body, "application/json"))

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | IO[bytes] | None = None,
        content_type: str | None = None,
        size: int | None = None,
    ) -> bytes:
        """The response body of one request; error statuses and unreachable servers raise MloraError."""
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if size is not None:  # a file body: urllib streams it, but cannot tell its length
            headers["Content-Length"] = str(size)
        request = urllib.request.Request(self.server + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as exc:
            raise MloraError(f"server: {_detail(exc)}") from exc
        except urllib.error.URLError as exc:
            raise self._unreachable(exc.reason) from exc
        except OSError as exc:  # timeouts, connections reset mid-response
            raise self._unreachable(exc) from exc

    def _unreachable(self, reason: object) -> MloraError:
        return MloraError(f"cannot reach the server at {self.server}: {reason}; is `mlora serve` running?")


def _quote(name: str) -> str:
    """A job or file name as one path segment (``/`` quoted too)."""
    return urllib.parse.quote(name, safe="")


def _decode(raw: bytes) -> dict[str, Any]:
    """A JSON object from a response body."""
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise MloraError(f"server: the response is not JSON: {raw[:80]!r}") from exc
    if not isinstance(value, dict):
        raise MloraError(f"server: expected a JSON object, got {type(value).__name__}")
    return value


def _detail(exc: urllib.error.HTTPError) -> str:
    """The ``detail`` of an error response's JSON body, else its status line."""
    try:
        detail = json.loads(exc.read()).get("detail")
    except (ValueError, AttributeError, OSError):
        detail = None
    return str(detail) if detail else f"{exc.code} {exc.reason}"
