"""The ``mlora`` command: run, validate, plugins."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mlora_core.errors import MloraError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlora", description="Fine-tune many LoRA adapters over one shared base model."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = (
        ("run", "train every job of a config"),
        ("validate", "check a config without loading a model"),
        ("plan", "predict peak memory and the largest micro_batch_size and cutoff_len that fit"),
    )
    for name, text in commands:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="the YAML config file")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override config keys")
    sub.add_parser("plugins", help="list plugins and the components they register")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "plugins":
            return _plugins()
        return _run_or_validate(args.command, args.config, args.overrides)
    except MloraError as exc:
        print(f"mlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlora: interrupted", file=sys.stderr)
        return 130


def _run_or_validate(command: str, path: str, overrides: list[str]) -> int:
    from mlora_core.config import load_config, validate_config
    from mlora_core.plugins import create_plugin_manager

    config = load_config(path, overrides)
    host = create_plugin_manager()
    if command == "validate":
        validate_config(config, host)
        print(f"{path}: OK ({len(config.jobs)} job(s): {', '.join(j.name for j in config.jobs)})")
        return 0
    if command == "plan":
        from mlora_core.planning import format_plan, plan_memory

        print(format_plan(plan_memory(config, host)))
        return 0
    from mlora_core.engine import run

    summary = run(config, host)
    return 0 if all(j["status"] == "completed" for j in summary["jobs"]) else 1


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
