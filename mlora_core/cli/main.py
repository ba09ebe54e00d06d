"""The ``mlora`` command: every sub-command is registered through ``mlora_register_commands``.

The core registers ``run``, ``validate``, ``plan`` and ``plugins``
(:mod:`mlora_core.cli.core_commands`); built-in plugins add ``bench``, ``generate`` and
``eval``; third-party packages add their own the same way. Options and positional
arguments may come in any order (``mlora run CONFIG --overwrite key=value``).

Exit status: what the command returns; 2 for errors the user can fix (invalid config or
input, a broken plugin, an unwritable output dir); 130 / 143 when stopped by SIGINT /
SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from mlora_core.errors import ConfigError, Interrupted, MloraError
from mlora_core.plugin_api.host import DIST_NAME, PluginHost, create_plugin_manager
from mlora_core.plugin_api.protocols import Command

#: Each command's parser and the command object that declared its arguments (and runs).
Commands = dict[str, tuple[argparse.ArgumentParser, Command]]


def build_parser(host: PluginHost) -> tuple[argparse.ArgumentParser, Commands]:
    """The ``mlora`` parser, and a parser per registered command, in registration order.

    The ``mlora`` parser only lists the commands (``--help``, unknown commands); each
    command's own parser parses its arguments. A third-party command that fails to build its
    arguments is left out with a warning that names its plugin and distribution; the other
    commands work.
    """
    parser = argparse.ArgumentParser(
        prog="mlora", description="Fine-tune many LoRA adapters over one shared base model."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands: Commands = {}
    for name, entry in host.commands.entries.items():
        try:
            command = entry.factory()
            command_parser = argparse.ArgumentParser(prog=f"mlora {name}", description=command.help)
            command.add_arguments(command_parser)
        except Exception as exc:
            dist, version = host.distribution_of(entry.plugin)
            if dist == DIST_NAME:
                raise
            warnings.warn(
                f"skipping command {name!r} of plugin {entry.plugin!r} from distribution {dist} {version}: {exc!r}",
                stacklevel=2,
            )
            continue
        sub.add_parser(name, help=command.help)
        commands[name] = (command_parser, command)
    return parser, commands


def parse(host: PluginHost, argv: Sequence[str]) -> tuple[argparse.Namespace, Command]:
    """Parse ``argv``: the arguments and the command to run them. A command's options and
    positionals may be intermixed."""
    parser, commands = build_parser(host)
    if argv and argv[0] in commands:
        command_parser, command = commands[argv[0]]
        args = command_parser.parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args, command
    parser.parse_args(argv)  # --help, or an error listing the commands: both exit
    raise AssertionError("unreachable: argparse exits without a known command")


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        host = create_plugin_manager()
        args, command = parse(host, args_list)
        return command.run(args, host)
    except Interrupted as exc:
        _report(f"mlora: {exc}", repeated=True)
        return 143 if exc.signal_name == "SIGTERM" else 130
    except (MloraError, OSError) as exc:  # OSError: unwritable output dir, full disk, ...
        _report(f"mlora: error: {exc}", repeated=isinstance(exc, ConfigError))
        return 2
    except KeyboardInterrupt:
        print("mlora: interrupted", file=sys.stderr)
        return 130


def _report(message: str, repeated: bool) -> None:
    """Print an error on stderr; in a distributed run, ranks say who they are, and only rank 0
    prints what every rank reports alike (``repeated``)."""
    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (repeated and rank == 0):
        message = message.replace("mlora:", f"mlora: rank {rank}:", 1)
    if rank == 0 or not repeated:
        print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
