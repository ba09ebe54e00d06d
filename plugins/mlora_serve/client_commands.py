"""The client commands of ``mlora serve``: ``submit``, ``status``, ``cancel``, ``logs`` and ``fetch``.

Each talks to a running server (``--server URL``) with its token (``--token-file PATH`` or
``$MLORA_TOKEN``) through :class:`~mlora_serve.client.ServiceClient`.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from mlora_core.errors import ConfigError, MloraError
from mlora_serve.client import DEFAULT_SERVER, Record, ServiceClient, token_from

if TYPE_CHECKING:
    from mlora_core.plugin_api.host import PluginHost

#: Seconds between two polls of ``mlora logs --follow``.
POLL_INTERVAL_S = 1.0
#: Job statuses after which nothing more happens.
TERMINAL = frozenset({"completed", "failed", "cancelled"})


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """``--server URL`` and ``--token-file PATH``, which every client command takes."""
    parser.add_argument(
        "--server", default=DEFAULT_SERVER, metavar="URL", help=f"the server (default {DEFAULT_SERVER})"
    )
    parser.add_argument(
        "--token-file", default=None, metavar="PATH", help="file holding the server's token (default: $MLORA_TOKEN)"
    )


def client_from(args: argparse.Namespace) -> ServiceClient:
    """The client that :func:`add_client_arguments`' arguments describe."""
    return ServiceClient(args.server, token_from(args.token_file))


# ---------------------------------------------------------------------------------- submit


class SubmitCommand:
    help = "submit one fine-tuning job to a running `mlora serve`"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("job_file", metavar="JOB", help="YAML file of one job (one entry of a run config's jobs)")
        parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override keys of the job")
        parser.add_argument("--upload", action="store_true", help="send the local data.path file to the server")
        add_client_arguments(parser)

    def run(self, args: argparse.Namespace, host: PluginHost | None) -> int:
        job = read_job(args.job_file, args.overrides)
        client = client_from(args)
        if args.upload:
            upload_data(client, job)
        record = client.submit(job)
        print(f"submitted {record['name']}: {record['status']}")
        return 0


def read_job(path: str, overrides: list[str]) -> dict[str, Any]:
    """One job's mapping from a YAML file, ``key.path=value`` overrides applied.

    Raises:
        ConfigError: the file is missing or not a YAML mapping, or an override is malformed.
        MloraError: the file is a run config (it has a ``jobs`` list).
    """
    from omegaconf import OmegaConf

    from mlora_core.config.schema import read_config_file

    raw, problems = read_config_file(path, overrides)
    if problems:
        raise ConfigError(problems)
    if "jobs" in raw:
        raise MloraError(f"{path}: this is a run config with a jobs list; submit one job: a file holding one entry")
    try:
        job = OmegaConf.to_container(raw, resolve=True)
    except Exception as exc:  # an interpolation that does not resolve
        raise ConfigError([f"{path}: {exc}"]) from exc
    assert isinstance(job, dict)
    return {str(k): v for k, v in job.items()}


def upload_data(client: ServiceClient, job: dict[str, Any]) -> None:
    """Send the local file ``data.path`` (relative to the current directory) to the server and
    point ``data.path`` at the server's copy."""
    data = job.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("path"), str):
        raise MloraError("--upload: the job has no data.path to upload")
    local = Path(data["path"]).expanduser()
    if not local.is_file():
        raise MloraError(f"--upload: data.path {local} is not a file")
    data["path"] = client.upload(local)
    print(f"uploaded {local} -> {data['path']}", file=sys.stderr)


# ---------------------------------------------------------------------------------- status


class StatusCommand:
    help = "show the jobs of a running `mlora serve`: status, step, loss, time left"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("job", nargs="?", default=None, metavar="JOB", help="only this job")
        parser.add_argument("--json", action="store_true", help="one JSON record per line")
        add_client_arguments(parser)

    def run(self, args: argparse.Namespace, host: PluginHost | None) -> int:
        client = client_from(args)
        records = [client.job(args.job)] if args.job else client.jobs()
        if args.json:
            for record in records:
                print(json.dumps(record))
        else:
            print(format_status(records) if records else "no jobs")
        return 0


def format_status(records: list[Record]) -> str:
    """A table with a line per job: ``job  status  step  loss  eta``, a failed job's error after it."""
    rows = [("job", "status", "step", "loss", "eta")]
    rows += [(r["name"], _status_text(r), _steps(r), fmt_loss(r.get("loss")), fmt_eta(r.get("eta_s"))) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    for i, record in enumerate(records, start=1):
        if record.get("status") == "failed" and record.get("error"):
            lines[i] = f"{lines[i].ljust(len(lines[0]))}  error: {_one_line(record['error'])}"
    return "\n".join(lines)


def _status_text(record: Record) -> str:
    status = str(record["status"])
    return f"{status} (cancelling)" if status == "running" and record.get("cancel_requested") else status


def _steps(record: Record) -> str:
    total = record.get("total_steps")
    return "-" if total is None else f"{record.get('step', 0)}/{total}"


def fmt_loss(loss: float | None) -> str:
    """A loss with 4 decimals, ``-`` when there is none."""
    return "-" if loss is None else f"{loss:.4f}"


def fmt_eta(seconds: float | None) -> str:
    """Time left as ``42s``, ``1m05s`` or ``2h03m``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _one_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------- cancel


class CancelCommand:
    help = "cancel a job of a running `mlora serve` (a running job stops at its next step)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("job", metavar="JOB", help="the job to cancel")
        add_client_arguments(parser)

    def run(self, args: argparse.Namespace, host: PluginHost | None) -> int:
        record = client_from(args).cancel(args.job)
        name = record.get("name", args.job)
        print(f"{name} cancelled" if record.get("status") == "cancelled" else f"cancel requested for {name}")
        return 0


# ---------------------------------------------------------------------------------- logs


class LogsCommand:
    help = "print a job's metrics (steps, evaluations, its end) from a running `mlora serve`"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("job", metavar="JOB", help="the job")
        parser.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
        add_client_arguments(parser)

    def run(self, args: argparse.Namespace, host: PluginHost | None) -> int:
        client = client_from(args)
        try:
            follow_metrics(client, args.job, args.follow)
        except KeyboardInterrupt:  # Ctrl-C ends --follow; the job goes on
            pass
        return 0


def follow_metrics(client: ServiceClient, name: str, follow: bool) -> None:
    """Print the job's metric lines; with ``follow``, poll every :data:`POLL_INTERVAL_S` for
    new ones until the job has ended and none are left."""
    after = 0
    while True:
        reply = client.metrics(name, after)
        lines = reply.get("lines", [])
        for line in lines:
            print(format_line(name, line), flush=True)
            after = max(after, int(line.get("seq", after)))
        if not follow or (reply.get("status") in TERMINAL and not lines):
            return
        time.sleep(POLL_INTERVAL_S)


def format_line(name: str, line: dict[str, Any]) -> str:
    """One metrics line, readably: a step, an evaluation or the job's end."""
    event = line.get("event")
    if event == "step":
        return f"[{name}] {_step_text(line)}"
    if event == "evaluation":
        numbers = " ".join(f"{k} {_number(v)}" for k, v in line.items() if k.startswith("eval_") and v is not None)
        return f"[{name}] eval ({line.get('phase')}) step {line.get('step')}: {numbers}".rstrip()
    if event == "job_end":
        return f"[{name}] {_end_text(line.get('result') or {})}"
    rest = {k: v for k, v in line.items() if k not in ("seq", "event")}
    return f"[{name}] {event} {json.dumps(rest)}"


def _step_text(line: dict[str, Any]) -> str:
    total = line.get("total_steps")
    text = f"step {line.get('step')}" + (f"/{total}" if total is not None else "")
    text += f" loss {fmt_loss(line.get('loss'))}"
    return text + (f" lr {line['lr']:.2e}" if line.get("lr") is not None else "")


def _end_text(result: dict[str, Any]) -> str:
    text = f"{result.get('status', 'ended')} after {result.get('steps', 0)} steps"
    before, after = result.get("eval_loss_before"), result.get("eval_loss_after")
    if before is not None and after is not None:
        text += f" (eval_loss {before:.4f} -> {after:.4f})"
    return text + (f": {_one_line(result['error'])}" if result.get("error") else "")


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------- fetch


class FetchCommand:
    help = "download a job's saved adapter from a running `mlora serve` into a directory"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("job", metavar="JOB", help="the job")
        parser.add_argument("dir", metavar="DIR", help="where to write the adapter (new or empty)")
        add_client_arguments(parser)

    def run(self, args: argparse.Namespace, host: PluginHost | None) -> int:
        dest = Path(args.dir)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise MloraError(f"{dest} exists and is not an empty directory; name a new or empty one")
        client = client_from(args)
        extract_adapter(client.adapter_archive(args.job), args.job, dest)
        print(f"{args.job}: adapter written to {dest}")
        return 0


def extract_adapter(archive: bytes, name: str, dest: Path) -> None:
    """Write a tar.gz's files under ``<name>/`` directly into ``dest`` (created).

    Every member is checked before anything is written: only plain files and directories
    under ``<name>/`` are accepted (no links, absolute paths or ``..``).

    Raises:
        MloraError: the archive cannot be read, holds no file, or has a member outside ``<name>/``.
    """
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            members = [m for m in (_stripped(m, name) for m in tar.getmembers()) if m is not None]
            if not any(m.isfile() for m in members):
                raise MloraError(f"the server's archive of {name} holds no file")
            dest.mkdir(parents=True, exist_ok=True)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError) as exc:
        raise MloraError(f"the server's archive of {name} cannot be read: {exc}") from exc


def _stripped(member: tarfile.TarInfo, name: str) -> tarfile.TarInfo | None:
    """The member relative to the top ``<name>/`` directory (None for that directory itself).

    Raises:
        MloraError: a link or special file, or a path outside ``<name>/``.
    """
    path = PurePosixPath(member.name)
    if not (member.isfile() or member.isdir()):
        raise MloraError(f"the server's archive holds {member.name!r}, which is not a plain file; refused")
    if path.is_absolute() or ".." in path.parts or not path.parts or path.parts[0] != name:
        raise MloraError(f"the server's archive holds {member.name!r}, outside {name}/; refused")
    rest = PurePosixPath(*path.parts[1:]) if len(path.parts) > 1 else None
    if rest is None:
        if member.isfile():
            raise MloraError(f"the server's archive holds a file {member.name!r} where {name}/ should be; refused")
        return None
    return member.replace(name=str(rest), deep=False)
