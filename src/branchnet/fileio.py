"""Atomic file writes, JSON that survives NaN, tensors and paths, and file checksums: one
helper for each.

Every file branchnet writes into a run folder, a cache or a model folder goes through
:func:`atomic_write`: the bytes land in a temporary file beside the target and are renamed into
place with :func:`os.replace`, so a reader (or a process killed mid-write) sees either the old
file or the new one, never half of one. On a full disk the temporary file is removed and the
target is untouched.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.json"
    >>> _ = write_json(p, {"accuracy": float("nan"), "n": 3})
    >>> read_json(p)
    {'accuracy': None, 'n': 3}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from branchnet.errors import DamagedFileError, WriteError

__all__ = ["atomic_write", "atomic_write_text", "jsonable", "read_json", "sha256_file",
           "write_json"]


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, hex (read in 1 MiB blocks): the key of caches built from
    an archive, and a pretrained model's identity."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file beside ``path``, then rename it to
    ``path`` (atomic on one filesystem). The temporary file never outlives a failure; an
    ``OSError`` (a full disk) becomes a :class:`~branchnet.errors.WriteError` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        if isinstance(e, WriteError):
            raise
        raise WriteError(e.errno, f"cannot write {path}: {e.strerror or e} (the previous file, "
                         "if any, is unchanged)", str(path)) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def jsonable(obj: Any) -> Any:
    """A JSON-safe copy: NaN and infinities become None, tuples lists, tensors and numpy
    scalars numbers, paths strings, dict keys strings."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    """``obj`` (made :func:`jsonable`) written to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=indent))


def read_json(path: str | Path, error: type[Exception] | None = None) -> Any:
    """The JSON in ``path``; a damaged file raises ``error`` (default
    :class:`~branchnet.errors.DamagedFileError`) naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise (error or DamagedFileError)(f"{path} is damaged (not valid JSON: {e})") from e
