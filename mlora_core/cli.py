"""The ``mlora`` command: run, validate, plan, eval, generate, bench, plugins."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import Any

from mlora_core.errors import Interrupted, MloraError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlora", description="Fine-tune many LoRA adapters over one shared base model."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = (
        ("run", "train every job of a config"),
        ("validate", "check a config without loading a model"),
        ("plan", "predict peak memory and the largest micro_batch_size and cutoff_len that fit"),
        ("eval", "held-out loss and exact-match accuracy of each job's saved adapter, and of the base"),
    )
    for name, text in commands:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="the YAML config file")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override config keys")
        if name == "run":
            p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its checkpoint")
            p.add_argument("--overwrite", action="store_true", help="start again in an output_dir that holds a run")
    sub.add_parser("plugins", help="list plugins and the components they register")
    bench = sub.add_parser(
        "bench",
        help="benchmark N jobs: PEFT one after another, PEFT in parallel, mlora, and the floor",
        description="benchmark N jobs: PEFT one after another, PEFT in parallel, mlora, and the floor",
    )
    from mlora_core.bench import add_arguments

    add_arguments(bench)
    text = "generate text with saved adapters, many adapters per batch over one base"
    from mlora_core import generate_cli

    generate_cli.add_arguments(sub.add_parser("generate", help=text, description=text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "plugins":
            return _plugins()
        if args.command == "bench":
            from mlora_core import bench

            return bench.main(args, list(argv) if argv is not None else sys.argv[1:])
        if args.command == "generate":
            return _generate(args)
        return _run_or_validate(args)
    except Interrupted as exc:
        print(f"mlora: {exc}", file=sys.stderr)
        return 143 if exc.signal_name == "SIGTERM" else 130
    except MloraError as exc:
        print(f"mlora: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output dir, full disk, ...
        print(f"mlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlora: interrupted", file=sys.stderr)
        return 130


def _run_or_validate(args: argparse.Namespace) -> int:
    from mlora_core.config import load_config
    from mlora_core.validation import validate_config
    from mlora_core.plugins import create_plugin_manager

    config = load_config(args.config, args.overrides)
    host = create_plugin_manager()
    if args.command == "validate":
        validate_config(config, host)
        print(f"{args.config}: OK ({len(config.jobs)} job(s): {', '.join(j.name for j in config.jobs)})")
        return 0
    if args.command == "eval":
        from mlora_core.eval_saved import main as eval_main

        return eval_main(config, host)
    if args.command == "plan":
        from mlora_core.planning import format_plan, plan_memory

        print(format_plan(plan_memory(config, host)))
        return 0
    from mlora_core.engine import Engine

    engine = Engine(config, host, resume=args.resume, overwrite=args.overwrite)
    _stop_on_signals(engine)
    summary = engine.run()
    return 0 if all(j["status"] == "completed" for j in summary["jobs"]) else 1


def _generate(args: argparse.Namespace) -> int:
    from mlora_core import generate_cli

    return generate_cli.main(args)


def _stop_on_signals(engine: Any) -> None:
    """SIGINT / SIGTERM: checkpoint and stop at the next step boundary; a second one stops at once."""

    def handler(signum: int, frame: Any) -> None:
        if engine.stop_signal:
            raise KeyboardInterrupt
        engine.request_stop(signal.Signals(signum).name)
        print(f"mlora: {signal.Signals(signum).name}: stopping after this step (again to stop now)", file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _plugins() -> int:
    from mlora_core.plugins import REGISTRATION_HOOKS, create_plugin_manager

    host = create_plugin_manager()
    for info in host.plugins():
        version = f" {info.version}" if info.version else ""
        print(f"{info.name}  ({info.distribution}{version})  hooks: {', '.join(info.hooks)}")
    for kind in REGISTRATION_HOOKS:
        registry = host.registry(kind)
        print(f"\n{kind}s:")
        for name, entry in sorted(registry.entries.items()):
            dist, version = host.distribution_of(entry.plugin)
            print(f"  {name:<16} plugin {entry.plugin}, from {dist} {version}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
