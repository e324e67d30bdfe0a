"""CIFAR-10 / CIFAR-100 "python version" folders, read with a restricted unpickler.

``cifar-10-batches-py`` holds ``data_batch_1..5``, ``test_batch`` and ``batches.meta``;
``cifar-100-python`` holds ``train``, ``test`` and ``meta`` (fine and coarse labels). The files
are pickles; they are read with :class:`RestrictedUnpickler`, which only resolves the numpy
globals needed to rebuild arrays and refuses anything else.

Example:
    >>> import io, pickle, numpy as np
    >>> blob = pickle.dumps({b"data": np.zeros((1, 3), np.uint8)})
    >>> RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()[b"data"].shape
    (1, 3)
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from branchnet.data.dataset import DataError
from branchnet.data.prepare import RawData

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"


def _allowed_globals() -> dict[tuple[str, str], Any]:
    arr = np.zeros(1, dtype=np.uint8)
    reconstruct = arr.__reduce__()[0]
    frombuffer = arr.__reduce_ex__(5)[0]
    scalar = np.float64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("builtins", "bytes"): bytes,
        ("builtins", "bytearray"): bytearray,
        ("__builtin__", "bytearray"): bytearray,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("__builtin__", "set"): set,
        ("__builtin__", "frozenset"): frozenset,
        ("_codecs", "encode"): __import__("_codecs").encode,  # bytes in protocol-2 pickles
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = frombuffer
    return allowed


_ALLOWED = _allowed_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds numpy arrays, dtypes, scalars and plain containers.

    Any other global (``os.system``, arbitrary classes, ...) raises :class:`DataError`.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name}: CIFAR files only need numpy arrays; "
                "the file is not a genuine CIFAR batch or has been tampered with"
            ) from None


def load_pickle(path: str | Path) -> Any:
    """Unpickle a CIFAR batch file with :class:`RestrictedUnpickler` (``encoding="bytes"``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read CIFAR file {path}: {e}") from e
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    except Exception as e:  # malformed pickles raise many different exception types
        raise DataError(f"cannot unpickle CIFAR file {path}: {e}; is it complete?") from e


def find_cifar_dir(path: str | Path) -> Path | None:
    """The CIFAR python folder at ``path`` or directly inside it, else None."""
    p = Path(path)
    for cand in (p, p / CIFAR10_DIR, p / CIFAR100_DIR):
        if (cand / "batches.meta").is_file() and (cand / "data_batch_1").is_file():
            return cand
        if all((cand / f).is_file() for f in ("train", "test", "meta")):
            return cand
    return None


def _get(d: Any, key: str, path: Path) -> Any:
    if not isinstance(d, dict):
        raise DataError(f"{path} does not hold a dict as CIFAR files do (got {type(d).__name__})")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{path} lacks the key {key!r}; keys present: {sorted(map(str, d))}")


def _batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = load_pickle(path)
    x = np.asarray(_get(d, "data", path))
    y = np.asarray(_get(d, label_key, path), dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' should be uint8 [N, 3072], got {x.dtype} {list(x.shape)}")
    if y.shape != (x.shape[0],):
        raise DataError(f"{path}: {len(y)} labels for {x.shape[0]} images")
    return x.reshape(-1, 3, 32, 32), y


def _names(path: Path, key: str) -> list[str]:
    names = _get(load_pickle(path), key, path)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_cifar(path: str | Path, *, label_set: str = "fine") -> RawData:
    """Read a CIFAR-10 or CIFAR-100 python folder into :class:`RawData` (uint8 ``[N,3,32,32]``).

    ``label_set`` (CIFAR-100 only): ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).
    """
    root = find_cifar_dir(path)
    if root is None:
        raise DataError(
            f"{path} is not a CIFAR python folder: expected data_batch_1..5, test_batch and "
            "batches.meta (CIFAR-10) or train, test and meta (CIFAR-100)"
        )
    if label_set not in ("fine", "coarse"):
        raise DataError(f"label_set must be 'fine' or 'coarse', got {label_set!r}")
    if (root / "batches.meta").is_file():
        if label_set != "fine":
            raise DataError("label_set='coarse' only applies to CIFAR-100; CIFAR-10 has one set")
        batches = sorted(
            (p for p in root.glob("data_batch_*") if p.name[11:].isdigit()),
            key=lambda p: int(p.name[11:]),
        )
        parts = [_batch(b, "labels") for b in batches]
        train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        test = _batch(root / "test_batch", "labels")
        classes, name = _names(root / "batches.meta", "label_names"), "cifar10"
    else:
        key = f"{label_set}_labels"
        train, test = _batch(root / "train", key), _batch(root / "test", key)
        classes = _names(root / "meta", f"{label_set}_label_names")
        name = "cifar100" if label_set == "fine" else "cifar100-coarse"
    return RawData(
        splits={"train": train, "test": test},
        classes=classes,
        name=name,
        kind="image",
        scale=1.0 / 255.0,
        default_normalize="channel",
        info={"image_mode": "RGB", "resample": None},
    )
