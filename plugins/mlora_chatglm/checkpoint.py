"""The files of a ChatGLM2/3 checkpoint in THUDM's layout: where they are and how they are read.

Nothing here runs code from the checkpoint: ``.bin`` shards are read with
``torch.load(weights_only=True)``, safetensors with safetensors, and THUDM's ``*.py``
files are never looked at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlora_core.errors import MloraError
from mlora_core.models.paths import resolve_model_path

#: Buffers THUDM's checkpoints carry that the native model computes instead.
IGNORED_SUFFIXES = ("rotary_pos_emb.inv_freq",)


def checkpoint_dir(config_path: str) -> Path:
    """The resolved checkpoint directory; raises when it is not a directory."""
    path = resolve_model_path(config_path)
    if not path.is_dir():
        raise MloraError(f"{path} is not a directory (expected a checkpoint directory with config.json)")
    return path


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors if any, else ``pytorch_model*.bin``.

    An index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``) names the
    shards when present; otherwise every matching file in the directory is a shard.
    """
    for index_name, pattern in (
        ("model.safetensors.index.json", "model*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = path / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise MloraError(f"{index}: not a valid weight index: {exc!r}") from None
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise MloraError(f"{index} names shards that are missing: {', '.join(missing)}")
            return [path / n for n in names]
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise MloraError(f"{path} has no weights (model*.safetensors or pytorch_model*.bin)")


def read_shard(file: Path) -> dict[str, Any]:
    """One shard's tensors: safetensors, or a pickle read with ``weights_only=True`` (no code runs)."""
    import torch

    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file), device="cpu")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickles that hold anything but tensors
        raise MloraError(f"{file}: cannot be read as plain tensors (torch.load weights_only=True): {exc}") from None
    if not isinstance(state, dict):
        raise MloraError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    return state


def load_weights(model: Any, files: list[Path], dtype: Any) -> None:
    """Fill a meta-device model from THUDM-named shards, cast to ``dtype``, checking every key.

    Raises:
        MloraError: a shard has a key the model lacks, a shape differs, or a weight is missing.
    """
    expected = set(model.state_dict())
    seen: set[str] = set()
    for file in files:
        shard = {k: v.to(dtype) for k, v in read_shard(file).items() if not k.endswith(IGNORED_SUFFIXES)}
        unexpected = sorted(set(shard) - expected)
        if unexpected:
            raise MloraError(f"{file}: unexpected weights {unexpected[:5]} (not a ChatGLM2/3 checkpoint?)")
        try:
            model.load_state_dict(shard, strict=False, assign=True)
        except RuntimeError as exc:
            raise MloraError(f"{file}: weights do not fit config.json: {exc}") from None
        seen |= set(shard)
    missing = sorted(expected - seen)
    if missing:
        raise MloraError(f"weights missing from the checkpoint: {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def tokenizer_file(path: Path) -> Path:
    """``tokenizer.json`` if the checkpoint has one, else a sentencepiece ``tokenizer.model``.

    Raises:
        MloraError: neither file exists, or ``tokenizer.model`` is not sentencepiece (GLM-4's
            THUDM-layout checkpoints ship a tiktoken file under that name).
    """
    if (path / "tokenizer.json").is_file():
        return path / "tokenizer.json"
    file = path / "tokenizer.model"
    if not file.is_file():
        raise MloraError(f"{path} has neither tokenizer.json nor tokenizer.model")
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(file))
    except (OSError, RuntimeError) as exc:
        raise MloraError(
            f"{file} is not a sentencepiece model ({exc}); a tiktoken tokenizer.model (GLM-4) is not "
            "supported, provide a tokenizer.json instead"
        ) from None
    return file
