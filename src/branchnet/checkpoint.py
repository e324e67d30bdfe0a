"""Checkpoints as safetensors + JSON: no pickle, loading never executes code.

A checkpoint is any nested structure of dicts, lists, tuples, tensors and JSON scalars (what
Lightning and ``optimizer.state_dict()`` produce). Tensors go into the safetensors payload; the
structure goes, as JSON, into the file's metadata. Writes are atomic (temp file, then rename),
so an interrupted save never damages the previous checkpoint.

Example:
    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> save_checkpoint({"w": torch.ones(2), "step": 3, "betas": (0.9, 0.99)}, f"{d}/c.safetensors")
    >>> ck = load_checkpoint(f"{d}/c.safetensors")
    >>> ck["step"], ck["betas"], ck["w"].tolist()
    (3, (0.9, 0.99), [1.0, 1.0])
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from safetensors import safe_open
from safetensors.torch import save_file

from branchnet.errors import BranchnetError, WriteError
from branchnet.fileio import atomic_write

_STRUCT_KEY = "branchnet.structure"
# marker keys of the JSON encoding; a dict using one of them is stored as an item list
_MARKERS = frozenset({"__tensor__", "__tuple__", "__items__", "__float__", "__str__"})


class CheckpointError(BranchnetError, RuntimeError):
    """A checkpoint file is missing, damaged, or holds something that cannot be stored safely."""


class CheckpointWriteError(CheckpointError, WriteError):
    """A checkpoint could not be written (a full disk): still an ``OSError`` for callers."""


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and _MARKERS.isdisjoint(obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                              for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, where) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():  # numpy scalar
        return obj.item()
    if isinstance(obj, (torch.dtype, torch.device, os.PathLike)):
        return {"__str__": str(obj)}
    raise CheckpointError(
        f"cannot store {type(obj).__name__} at {where or 'top level'} in a safetensors "
        "checkpoint; only tensors, dicts, lists, tuples and JSON scalars are allowed"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__str__" in obj:
            return obj["__str__"]
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def save_checkpoint(obj: Any, path: str | Path) -> None:
    """Write ``obj`` atomically to ``path`` (safetensors with a JSON structure in metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj, tensors, "")
    metadata = {_STRUCT_KEY: json.dumps(structure)}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    except WriteError as e:
        raise CheckpointWriteError(e.errno, str(e), str(path)) from e
    except Exception as e:  # safetensors' own error wrapping an OSError (a full disk)
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {e} (the previous checkpoint, "
                              "if any, is unchanged)") from e


def load_checkpoint(path: str | Path) -> Any:
    """Read a checkpoint written by :func:`save_checkpoint`; clear error if missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
        structure = json.loads(meta[_STRUCT_KEY])
        return _decode(structure, tensors)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is damaged or not a branchnet checkpoint ({type(e).__name__}: "
            f"{e}); delete it or resume from an earlier one"
        ) from e


def save_weights(tensors: dict[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, Any] | None = None) -> None:
    """Plain safetensors weights (a flat name -> tensor dict), atomically, with JSON metadata."""
    save_checkpoint({"weights": dict(tensors), "meta": metadata or {}}, path)


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or "weights" not in ck:
        raise CheckpointError(f"{path} holds no weights")
    return ck["weights"], ck.get("meta", {})


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning checkpoint plugin: every checkpoint Lightning writes is safetensors + JSON."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        save_checkpoint(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path)

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)
