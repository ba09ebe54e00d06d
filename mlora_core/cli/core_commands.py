"""The core's commands: ``run``, ``validate``, ``plan`` and ``plugins``.

Registered through the same ``mlora_register_commands`` hook as every plugin's commands
(this module is registered as the plugin ``core``). Heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import TYPE_CHECKING, Any

from mlora_core.plugin_api.hookspecs import Register, hookimpl

if TYPE_CHECKING:
    from mlora_core.config.schema import MloraConfig
    from mlora_core.plugin_api.host import PluginHost
    from mlora_core.training.engine import Engine


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``CONFIG [key.path=value ...]``: a config file and overrides of its keys (public API for commands)."""
    parser.add_argument("config", help="the YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override config keys")


def load_config_arguments(args: argparse.Namespace) -> MloraConfig:
    """The config named by :func:`add_config_arguments`' arguments, overrides applied."""
    from mlora_core.config.schema import load_config

    return load_config(args.config, args.overrides)


def add_output_dir_arguments(parser: argparse.ArgumentParser, what: str = "run") -> None:
    """``--resume`` and ``--overwrite``, for commands that train into ``output_dir`` (public API)."""
    parser.add_argument("--resume", action="store_true", help=f"continue the {what} in output_dir from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help=f"start again in an output_dir that holds a {what}")


class RunCommand:
    help = "train every job of a config"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser)
        add_output_dir_arguments(parser)
        parser.add_argument(
            "--nproc",
            type=int,
            default=None,
            metavar="N",
            help="train in N local processes (torch.distributed; see the distributed config section)",
        )

    def run(self, args: argparse.Namespace, host: PluginHost) -> int:
        if args.nproc is not None:
            return _launch(args)
        from mlora_core.training.engine import Engine

        engine = Engine(load_config_arguments(args), host, resume=args.resume, overwrite=args.overwrite)
        stop_on_signals(engine)
        summary = engine.run()
        return 0 if all(j["status"] == "completed" for j in summary["jobs"]) else 1


class ValidateCommand:
    help = "check a config without loading a model"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser)

    def run(self, args: argparse.Namespace, host: PluginHost) -> int:
        from mlora_core.config.validation import validate_config

        config = load_config_arguments(args)
        validate_config(config, host)
        print(f"{args.config}: OK ({len(config.jobs)} job(s): {', '.join(j.name for j in config.jobs)})")
        return 0


class PlanCommand:
    help = "predict peak memory and the largest micro_batch_size and cutoff_len that fit"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser)

    def run(self, args: argparse.Namespace, host: PluginHost) -> int:
        from mlora_core.training.memory_plan import format_plan, plan_memory

        print(format_plan(plan_memory(load_config_arguments(args), host)))
        return 0


class PluginsCommand:
    help = "list plugins and the components and commands they register"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace, host: PluginHost) -> int:
        from mlora_core.plugin_api.host import REGISTRIES

        for info in host.plugins():
            version = f" {info.version}" if info.version else ""
            print(f"{info.name}  ({info.distribution}{version})  hooks: {', '.join(info.hooks)}")
        for kind in REGISTRIES:
            print(f"\n{kind.label}s:")
            for name, entry in sorted(host.registry(kind.key).entries.items()):
                dist, version = host.distribution_of(entry.plugin)
                print(f"  {name:<16} plugin {entry.plugin}, from {dist} {version}".rstrip())
        return 0


def _launch(args: argparse.Namespace) -> int:
    """``--nproc N``: validate here once, then start N workers running the same command."""
    from mlora_core.distributed.launch import launch
    from mlora_core.distributed.world import launched_world_size
    from mlora_core.errors import MloraError

    if launched_world_size() > 1:
        raise MloraError("--nproc: this process is already one of several (torchrun); leave --nproc out")
    if args.nproc < 1:
        raise MloraError(f"--nproc: must be at least 1, not {args.nproc}")
    load_config_arguments(args)  # a bad config or override fails here, once
    flags = [flag for flag, on in (("--resume", args.resume), ("--overwrite", args.overwrite)) if on]
    return launch(args.nproc, [args.config, *args.overrides, *flags])


def stop_on_signals(engine: Engine) -> None:
    """SIGINT / SIGTERM: checkpoint and stop at the next step boundary; a second one stops at once."""

    from mlora_core.distributed.world import launched_world_size

    # Under a launcher a signal may come twice (from a batch system to every process, and
    # passed on by the launcher): repeats are ignored; the launcher kills after its own timeout.
    launched = launched_world_size() > 1

    def handler(signum: int, frame: Any) -> None:
        if engine.stop_signal:
            if launched:
                return
            raise KeyboardInterrupt
        engine.request_stop(signal.Signals(signum).name)
        print(f"mlora: {signal.Signals(signum).name}: stopping after this step (again to stop now)", file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


@hookimpl
def mlora_register_commands(register: Register) -> None:
    register("run", RunCommand)
    register("validate", ValidateCommand)
    register("plan", PlanCommand)
    register("plugins", PluginsCommand)
