"""Registers the ``sft``, ``dpo``, ``cpo`` and ``orpo`` objectives."""

from __future__ import annotations

from mlora_core.plugin_api.hookspecs import Register, hookimpl


@hookimpl
def mlora_register_objectives(register: Register) -> None:
    from mlora_objectives.preference import CPOObjective, DPOObjective, ORPOObjective
    from mlora_objectives.sft import SupervisedObjective

    register("sft", SupervisedObjective)
    register("dpo", DPOObjective)
    register("cpo", CPOObjective)
    register("orpo", ORPOObjective)
