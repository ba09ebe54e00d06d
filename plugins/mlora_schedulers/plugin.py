"""Registers the ``trivial``, ``optimal_fit`` and ``fast_fit`` schedulers."""

from __future__ import annotations

from mlora_core.plugin_api.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_schedulers(register: Register) -> None:
    from mlora_schedulers.fast_fit import FastFitScheduler
    from mlora_schedulers.optimal_fit import OptimalFitScheduler
    from mlora_schedulers.trivial import TrivialScheduler

    register("trivial", TrivialScheduler)
    register("optimal_fit", OptimalFitScheduler)
    register("fast_fit", FastFitScheduler)
