"""The service's jobs, their states and their metric lines, in SQLite in the output dir.

Written by the engine's thread (states, lines) and the HTTP server's (submissions, cancel
requests); one connection in autocommit mode behind a lock, the database in WAL mode, so
every change is on disk when the call returns and survives a crash or SIGKILL.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED, INTERRUPTED = (
    "queued",
    "running",
    "completed",
    "failed",
    "cancelled",
    "interrupted",
)
#: States a job never leaves.
TERMINAL = (COMPLETED, FAILED, CANCELLED)
STORE_FILE = "serve.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT UNIQUE NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    submitted_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    error TEXT,
    result TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS lines (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    line TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS lines_by_job ON lines (job, seq);
"""


class NameTaken(Exception):
    """A job of that name was submitted before."""


class JobStore:
    """Jobs by name: config (plain data), status, times, error, result (summary entry)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(_SCHEMA)

    def add(self, name: str, config: dict[str, Any], status: str = QUEUED) -> dict[str, Any]:
        """Record a new job; raises :class:`NameTaken` when the name was used before."""
        try:
            with self.lock:
                self.db.execute(
                    "INSERT INTO jobs (name, config, status, priority, submitted_at) VALUES (?, ?, ?, ?, ?)",
                    (name, json.dumps(config), status, int(config.get("priority", 0)), time.time()),
                )
        except sqlite3.IntegrityError:
            raise NameTaken(name) from None
        job = self.get(name)
        assert job is not None
        return job

    def get(self, name: str) -> dict[str, Any] | None:
        with self.lock:
            row = self.db.execute("SELECT * FROM jobs WHERE name = ?", (name,)).fetchone()
        return None if row is None else _record(row)

    def all(self) -> list[dict[str, Any]]:
        """Every job, in submission order."""
        with self.lock:
            rows = self.db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        return [_record(r) for r in rows]

    def with_status(self, *statuses: str) -> list[dict[str, Any]]:
        """Jobs in these states, highest priority first, then in submission order."""
        marks = ", ".join("?" for _ in statuses)
        with self.lock:
            rows = self.db.execute(
                f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY priority DESC, seq", statuses
            ).fetchall()
        return [_record(r) for r in rows]

    def update(self, name: str, **fields: Any) -> None:
        """Set columns of a job (``result`` as data, stored as JSON)."""
        if "result" in fields:
            fields["result"] = json.dumps(fields["result"])
        columns = ", ".join(f"{key} = ?" for key in fields)
        with self.lock:
            self.db.execute(f"UPDATE jobs SET {columns} WHERE name = ?", (*fields.values(), name))

    def add_line(self, job: str, line: dict[str, Any]) -> None:
        with self.lock:
            self.db.execute("INSERT INTO lines (job, line) VALUES (?, ?)", (job, json.dumps(line)))

    def lines(self, job: str, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """The job's metric lines with ``seq`` above ``after``, oldest first."""
        with self.lock:
            rows = self.db.execute(
                "SELECT seq, line FROM lines WHERE job = ? AND seq > ? ORDER BY seq LIMIT ?", (job, after, limit)
            ).fetchall()
        return [{"seq": row["seq"], **json.loads(row["line"])} for row in rows]

    def close(self) -> None:
        with self.lock:
            self.db.close()


def _record(row: sqlite3.Row) -> dict[str, Any]:
    record = dict(row)
    record["config"] = json.loads(record["config"])
    record["result"] = json.loads(record["result"]) if record["result"] else None
    record["cancel_requested"] = bool(record["cancel_requested"])
    return record
