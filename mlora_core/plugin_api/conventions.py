"""Small rules every part of mlora shares, each defined once (public API for plugins).

- :data:`IGNORE_INDEX`: the label of a position that is not learned (prompt, padding).
- :data:`JOB_NAME`: what a job name (and so an adapter name) may look like.
- :func:`module_key`: the key an adapter name takes in a ``torch.nn.ModuleDict``.
- :func:`pad_token_id`: the token that pads rows.
- :func:`device_problems`: which ``base_model.device`` values mlora runs on.
"""

from __future__ import annotations

import re
from typing import Any

#: Label of a position whose next token is not learned (PyTorch's cross-entropy default).
IGNORE_INDEX = -100

#: Job names: letters, digits, ``_`` and ``-``, starting with a letter or digit. They name
#: output directories (so no ``/``) and TensorBoard tags; the same rule holds for the names
#: ``mlora generate --adapter NAME=DIR`` gives adapters.
JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
JOB_NAME_RULE = "letters, digits, '_' or '-', starting with a letter or digit"

#: Prefix of :func:`module_key`.
_MODULE_KEY_PREFIX = "adapter_"


def module_key(name: str) -> str:
    """The key adapter ``name`` takes in a ``ModuleDict``/``ParameterDict``.

    A job may be named ``train``, ``double`` or ``to``, which are attributes of every
    ``nn.Module`` and so refused as ``ModuleDict`` keys; the prefix keeps every valid job
    name usable. Users never see the key: files and messages use ``name``.
    """
    return _MODULE_KEY_PREFIX + name


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, else its EOS token, else 0.

    Rows are padded only where the attention mask is 0 and the label is
    :data:`IGNORE_INDEX`, so the choice changes no result; it only has to be a valid id.
    """
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def device_problems(device: str) -> list[str]:
    """Problems with a ``base_model.device`` value: mlora runs on ``cpu`` and ``cuda[:N]``."""
    if device == "cpu" or re.fullmatch(r"cuda(:\d+)?", device):
        return []
    return [f"device: {device!r} is not 'cpu' or 'cuda[:N]'"]
