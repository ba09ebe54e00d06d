"""Saved adapters back into a model: the adapter type named by ``adapter_config.json`` loads them.

Used by ``mlora generate`` and ``mlora eval``; the LoRA maths stays in the adapter-type
plugins (:meth:`mlora_core.protocols.AdapterType.load`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlora_core.errors import MloraError
from mlora_core.protocols import Adapter
from mlora_core.routing import RowRouter

#: adapter_config.json ``peft_type`` -> registered adapter type; other values are lowercased.
PEFT_TYPES = {"LORA": "lora"}


def load_adapter(host: Any, model: Any, name: str, directory: str | Path, router: RowRouter) -> Adapter:
    """Attach the adapter saved in ``directory`` as ``name``, through its adapter type's ``load``.

    The type comes from ``adapter_config.json``'s ``peft_type`` (``LORA`` -> ``lora``).

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
    type_name = PEFT_TYPES.get(str(peft_type), str(peft_type).lower())
    if type_name not in host.adapters:
        raise MloraError(f"adapter {name!r}: peft_type {peft_type!r}: {host.adapters.unknown_message(type_name)}")
    adapter_type = host.adapters.create(type_name)
    loader = getattr(adapter_type, "load", None)
    if not callable(loader):
        plugin = host.adapters.get(type_name).plugin
        raise MloraError(f"adapter type {type_name!r} (plugin {plugin}) cannot load saved adapters: it has no load()")
    adapter: Adapter = loader(model, name, str(where), router)
    return adapter
