"""``mlora serve CONFIG``: keep the base loaded and take jobs over HTTP while it trains.

The engine runs in the main thread, the HTTP server (uvicorn) in another; they share the
:class:`~mlora_serve.store.JobStore` (SQLite, ``<output_dir>/serve.db``) and the
:class:`~mlora_serve.service.Service`. A restart with the same CONFIG continues: queued jobs
are still queued, finished ones listed with their adapters, and running ones resume from the
engine's latest checkpoint. See docs/serve.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mlora_core.cli.core_commands import stop_on_signals
from mlora_core.config.schema import MloraConfig, config_from_mapping, read_config_file
from mlora_core.errors import Interrupted, MloraError
from mlora_core.plugin_api.host import PluginHost

#: Engine steps between checkpoints when the config does not say (restarts resume from them).
DEFAULT_CHECKPOINT_EVERY = 10
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServeCommand:
    help = "a fine-tuning service: keep the base loaded and take jobs over HTTP while it trains"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("config", help="a run config (base_model, scheduler, monitor, output_dir; jobs optional)")
        parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override config keys")
        parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
        parser.add_argument("--port", type=int, default=8800)
        parser.add_argument(
            "--token-file",
            default=None,
            metavar="PATH",
            help="the bearer token's file; created (mode 0600) with a new token if missing "
            "(default: OUTPUT_DIR/serve.token)",
        )
        parser.add_argument(
            "--data-root",
            action="append",
            default=None,
            metavar="DIR",
            help="a directory jobs may read data from (repeatable; default: the current directory); uploads always",
        )
        parser.add_argument("--max-upload-mb", type=float, default=64.0, help="largest data upload (default 64)")

    def run(self, args: argparse.Namespace, host: PluginHost) -> int:
        raw, problems = read_config_file(args.config, args.overrides)
        config = config_from_mapping(raw, problems, jobs_required=False)
        every = config.checkpoint_every or DEFAULT_CHECKPOINT_EVERY
        config = dataclasses.replace(config, checkpoint_every=every)
        token_path = Path(args.token_file) if args.token_file else Path(config.output_dir) / "serve.token"
        token = read_or_create_token(token_path)
        roots = [Path(d).resolve() for d in (args.data_root or [os.getcwd()])]
        return serve(config, host, token, args.host, args.port, roots, int(args.max_upload_mb * 2**20), token_path)


def serve(
    config: MloraConfig,
    host: PluginHost,
    token: str,
    address: str,
    port: int,
    data_roots: list[Path],
    max_upload: int,
    token_path: Path,
) -> int:
    """Run the service until SIGINT / SIGTERM; returns the exit status."""
    import uvicorn

    from mlora_core.training.engine import Engine
    from mlora_serve.api import Limits, ServeContext, create_app
    from mlora_serve.service import Service
    from mlora_serve.store import INTERRUPTED, RUNNING, STORE_FILE, JobStore

    store = JobStore(Path(config.output_dir) / STORE_FILE)
    service = Service(store)
    engine = Engine(config, host, resume=True, between_steps=service)
    ctx = ServeContext(config, host, store, service, token, data_roots, Limits(max_upload=max_upload))
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), host=address, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="mlora-serve-http", daemon=True)
    thread.start()
    _wait_started(server, thread, address, port)
    where = f"http://{address}:{port}"
    print(f"mlora serve: listening on {where} (token in {token_path}; API reference at {where}/docs)", flush=True)
    if address not in LOOPBACK:
        print(f"mlora serve: warning: listening on {address}, beyond this machine; use TLS in front", file=sys.stderr)
    stop_on_signals(engine)
    host.add_listener(service, "serve:service")
    try:
        engine.run()
    except Interrupted:
        for record in store.with_status(RUNNING):
            store.update(record["name"], status=INTERRUPTED)
        raise
    finally:
        host.remove_listener(service)
        server.should_exit = True
        thread.join(timeout=10)
        store.close()
    return 0


def _wait_started(server: Any, thread: threading.Thread, address: str, port: int) -> None:
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise MloraError(f"could not listen on {address}:{port} (in use, or not an address of this machine)")
        time.sleep(0.05)


def read_or_create_token(path: Path) -> str:
    """The token in ``path``; a new random one written there (mode 0600) if it does not exist.

    Raises:
        MloraError: the file is readable by others, or empty.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise MloraError(f"token file {path} can be read by others (mode {mode:04o}); run: chmod 600 {path}")
    token = path.read_text().strip()
    if not token:
        raise MloraError(f"token file {path} is empty")
    return token
