"""What a ``.gguf`` file's metadata says about the model in it, read without loading its tensors."""

from __future__ import annotations

from pathlib import Path

from mlora_core.errors import MloraError


def gguf_architecture(path: Path) -> str:
    """The file's ``general.architecture`` (``llama``, ``qwen2``, ...).

    Raises:
        MloraError: the file is not a readable GGUF file or has no architecture.
    """
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields.get("general.architecture")
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise MloraError(f"{path}: not a readable GGUF file ({exc})") from None
    value = field.contents() if field is not None else None
    if not isinstance(value, str):
        raise MloraError(f"{path}: the GGUF metadata names no general.architecture")
    return value
