"""Saved adapters back into a model: the adapter type that declares their ``peft_type`` loads them.

Used by ``mlora generate`` and ``mlora eval``; the LoRA maths stays in the adapter-type
plugins (:meth:`mlora_core.plugin_api.protocols.AdapterType.load`).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from mlora_core.errors import MloraError
from mlora_core.plugin_api.host import PluginHost
from mlora_core.plugin_api.protocols import Adapter
from mlora_core.plugin_api.routing import RowRouter


def load_adapter(host: PluginHost, model: nn.Module, name: str, directory: str | Path, router: RowRouter) -> Adapter:
    """Attach the adapter saved in ``directory`` as ``name``, through its adapter type's ``load``.

    The type is the registered adapter type whose ``peft_type`` is ``adapter_config.json``'s
    (``LORA``: the built-in ``lora``).

    Raises:
        MloraError: no such directory or config, no type for it, or the type cannot load.
    """
    where = Path(directory)
    config_file = where / "adapter_config.json"
    if not where.is_dir():
        raise MloraError(f"adapter {name!r}: {where} is not a directory")
    try:
        peft_type = json.loads(config_file.read_text(encoding="utf-8")).get("peft_type")
    except FileNotFoundError:
        raise MloraError(f"adapter {name!r}: {where} has no adapter_config.json (not a PEFT adapter dir)") from None
    except (OSError, ValueError, AttributeError) as exc:
        raise MloraError(f"adapter {name!r}: {config_file} is not a readable JSON object: {exc}") from None
    type_name = loader_of(host, str(peft_type), name)
    adapter_type = host.adapters.create(type_name)
    loader = getattr(adapter_type, "load", None)
    if not callable(loader):
        plugin = host.adapters.get(type_name).plugin
        raise MloraError(f"adapter type {type_name!r} (plugin {plugin}) cannot load saved adapters: it has no load()")
    adapter: Adapter = loader(model, name, str(where), router)
    return adapter


def loader_of(host: PluginHost, peft_type: str, name: str) -> str:
    """The one registered adapter type that loads ``peft_type``; raises MloraError otherwise."""
    declared = {type_name: entry.factory().peft_type for type_name, entry in host.adapters.entries.items()}
    types = [type_name for type_name, loads in declared.items() if loads == peft_type]
    if len(types) != 1:
        found = (
            f"types {types} all declare it"
            if types
            else f"no adapter type loads it (declared: {', '.join(sorted(str(v) for v in set(declared.values())))})"
        )
        raise MloraError(f"adapter {name!r}: peft_type {peft_type!r}: {found}")
    return types[0]
