"""Registers the ``trivial`` scheduler."""

from __future__ import annotations

from mlora_core.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_schedulers(register: Register) -> None:
    from mlora_schedulers.trivial import TrivialScheduler

    register("trivial", TrivialScheduler)
