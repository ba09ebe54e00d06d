"""The ``mlora`` command line: commands come from the commands hook, arguments in any order."""

from __future__ import annotations

import json

import pytest
from conftest import job

from mlora_core.cli.main import build_parser, main
from mlora_core.plugin_api.hookspecs import hookimpl
from mlora_core.plugin_api.host import create_plugin_manager


def test_flags_and_overrides_in_any_order(make_config, data_dir):
    path = make_config([job("a", data_dir / "a.jsonl", max_steps=3)])
    out = path.parent / "out"
    assert main(["run", str(path), "jobs.0.train.max_steps=1"]) == 0
    assert main(["run", str(path), "--overwrite", "jobs.0.train.max_steps=2"]) == 0  # a flag between
    assert json.loads((out / "summary.json").read_text())["jobs"][0]["steps"] == 2
    assert main(["run", "--overwrite", str(path), "jobs.0.train.max_steps=1"]) == 0  # the flag first
    assert json.loads((out / "summary.json").read_text())["jobs"][0]["steps"] == 1


def test_core_and_plugin_commands_are_registered_alike():
    host = create_plugin_manager(autoload=False)
    service = {"serve", "submit", "status", "cancel", "logs", "fetch"}
    assert set(host.commands) == {"run", "validate", "plan", "plugins", "bench", "generate", "eval", "sweep", *service}
    assert {name: host.commands.get(name).plugin for name in ("run", "bench", "generate", "eval", "sweep")} == {
        "run": "core",
        "bench": "bench",
        "generate": "generate",
        "eval": "eval",
        "sweep": "sweep",
    }


def test_a_plugin_command_runs_with_the_host(capsys):
    class Hello:
        help = "say hello"

        def add_arguments(self, parser):
            parser.add_argument("name")
            parser.add_argument("--shout", action="store_true")

        def run(self, args, host):
            text = f"hello {args.name}, {len(list(host.adapters))} adapter types"
            print(text.upper() if args.shout else text)
            return 3

    class Plugin:
        __name__ = "hello"

        @hookimpl
        def mlora_register_commands(self, register):
            register("hello", Hello)

    host = create_plugin_manager(autoload=False, extra=[Plugin()])
    _, commands = build_parser(host)
    parser, command = commands["hello"]
    args = parser.parse_intermixed_args(["--shout", "you"])
    assert command.run(args, host) == 3
    assert capsys.readouterr().out == "HELLO YOU, 2 ADAPTER TYPES\n"


def test_a_broken_third_party_command_is_left_out_with_a_warning():
    class Broken:
        help = "broken"

        def add_arguments(self, parser):
            raise RuntimeError("argparse misuse")

        def run(self, args, host):
            return 0

    class Plugin:
        __name__ = "broken_cmd"

        @hookimpl
        def mlora_register_commands(self, register):
            register("broken", Broken)

    host = create_plugin_manager(autoload=False, extra=[Plugin()])
    with pytest.warns(UserWarning, match="skipping command 'broken' of plugin 'broken_cmd'.*argparse misuse"):
        _, commands = build_parser(host)
    assert "broken" not in commands and "run" in commands
