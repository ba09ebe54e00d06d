"""Registers the ``mlora bench`` command (its PEFT baselines need the ``bench`` extra)."""

from __future__ import annotations

from mlora_core.plugin_api.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_commands(register: Register) -> None:
    from mlora_bench.bench import BenchCommand

    register("bench", BenchCommand)
