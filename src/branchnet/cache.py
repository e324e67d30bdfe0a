"""On-disk, memory-mapped cache of a frozen parent network's activations at its layers.

Every branch training run reads the same parent activations, so they are computed once and
stored under ``root/<key>/``, where the key hashes the parent's weights and structure, the
layer, the input data, the preprocessing and the storage dtype. Change any of them (e.g.
retrain the parent) and a new entry is computed; nothing stale is ever served. Each entry holds
one layer; :meth:`ActivationCache.get_many` fills the entries of several layers from one pass
over the data (one forward per batch). The data is a tensor, a :class:`~branchnet.data.Split`
or any other rows with ``len()``, slicing and a ``fingerprint`` str (e.g. texts).

Layout of one entry::

    root/<key>/meta.json                  shape, dtype, shard list (rows, sizes, hashes), ...
    root/<key>/shard_00000.safetensors    one tensor "x" with rows [0, shard_rows)
    root/<key>/shard_00001.safetensors    ...

Shards are safetensors files (never pickle). An entry is written into a ``.tmp-*`` folder
and renamed into place with :func:`os.replace`, so an interrupted write leaves no half entry.
Reading memory-maps each shard's tensor region read-only (after checking the header against
``meta.json``), so an entry is not loaded into RAM; rows come back as float32 tensors.

Several processes may share one cache: :meth:`ActivationCache.get` fills an entry under an
advisory lock (``root/.lock-<key>``, :mod:`filelock`), so a second process asking for the same
entry waits and then reads the first one's instead of computing it again (``get_many`` takes
the locks of all the entries it fills, in key order). An existing entry is
validated before it is served (sizes, safetensors headers and, by default, the content hashes
recorded in ``meta.json``); a damaged one is removed with a warning naming the bad file and
computed again.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> cache = ActivationCache(tempfile.mkdtemp(), shard_rows=64)
    >>> x = torch.randn(100, 4)
    >>> acts = cache.get(net, "1", x, progress=False)
    >>> acts.shape, acts.dtype, len(acts.meta["shards"])
    (torch.Size([100, 8]), torch.float16, 2)
    >>> acts[[5, 70]].dtype
    torch.float32
    >>> cache.get(net, "1", x, progress=False).key == acts.key   # reused, not recomputed
    True
    >>> both = cache.get_many(net, ["1", "2"], x, progress=False)  # "1" reused, "2" computed
    >>> both["1"].key == acts.key, both["2"].shape
    (True, torch.Size([100, 2]))
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from filelock import FileLock
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from branchnet._version import __version__
from branchnet.data.batches import collate_batch
from branchnet.data.dataset import Split, tensor_fingerprint
from branchnet.errors import BranchnetError
from branchnet.fileio import write_json
from branchnet.taps import (
    MultiTap,
    _batch_outputs,
    _check_batch_size,
    _num_rows,
    module_fingerprint,
    tap,
)

__all__ = [
    "ActivationCache",
    "CacheEntry",
    "CacheError",
    "CachedActivations",
    "CachedDataset",
    "Fingerprinted",
    "collate_batch",
]

FORMAT = "branchnet-activation-cache"
FORMAT_VERSION = 1

# torch dtype -> (name in meta.json, safetensors dtype code, numpy storage dtype).
# bfloat16 has no numpy dtype: its bits are stored as int16 and reinterpreted by torch.
_DTYPES: dict[torch.dtype, tuple[str, str, str]] = {
    torch.float16: ("float16", "F16", "<f2"),
    torch.bfloat16: ("bfloat16", "BF16", "<i2"),
    torch.float32: ("float32", "F32", "<f4"),
    torch.float64: ("float64", "F64", "<f8"),
}
_BY_NAME = {name: dt for dt, (name, _, _) in _DTYPES.items()}
_SHARD_NAME = re.compile(r"shard_\d{5,}\.safetensors")
_KEY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*-[0-9a-f]{20}")
_TMP_PREFIX = ".tmp-"
_LOCK_PREFIX = ".lock-"
_VERIFY = ("full", "quick")
log = logging.getLogger(__name__)
_MAX_HEADER = 100 * 1024 * 1024
_META_FIELDS = ("format", "format_version", "key", "layer", "dtype", "shape", "rows", "shards")


class CacheError(BranchnetError, RuntimeError):
    """Raised when a cache entry is missing, incomplete or corrupted."""


def _corrupt(file: Path, problem: str, entry: Path | None = None) -> CacheError:
    entry = entry or file.parent
    return CacheError(
        f"activation cache file {file} {problem}. Delete the folder {entry} "
        "(or call ActivationCache.clear()) and it will be recomputed."
    )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- reading


def _read_meta(entry: Path) -> dict[str, Any]:
    """Parse and structurally validate ``entry/meta.json``."""
    file = entry / "meta.json"
    if not entry.is_dir():
        raise CacheError(f"activation cache entry {entry} does not exist")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _corrupt(file, "is missing (incomplete entry)", entry) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(file, f"cannot be parsed ({type(e).__name__}: {e})", entry) from None

    def bad(problem: str) -> CacheError:
        return _corrupt(file, problem, entry)

    if not isinstance(meta, dict):
        raise bad("does not hold a JSON object")
    missing = [f for f in _META_FIELDS if f not in meta]
    if missing:
        raise bad(f"lacks the fields {missing}")
    if meta["format"] != FORMAT or meta["format_version"] != FORMAT_VERSION:
        raise bad(
            f"has format {meta['format']!r} version {meta['format_version']!r}; "
            f"this branchnet reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    if meta["dtype"] not in _BY_NAME:
        raise bad(f"records unsupported dtype {meta['dtype']!r}")
    shape, rows, shards = meta["shape"], meta["rows"], meta["shards"]
    if not (isinstance(shape, list) and shape and all(_is_int(d) and d >= 0 for d in shape)):
        raise bad(f"records an invalid shape {shape!r}")
    if rows != shape[0]:
        raise bad(f"records {rows!r} rows but shape {shape}")
    if not isinstance(shards, list):
        raise bad("has a 'shards' field that is not a list")
    expected_start = 0
    for i, s in enumerate(shards):
        ok = (
            isinstance(s, dict)
            and isinstance(s.get("file"), str)
            and _SHARD_NAME.fullmatch(s["file"]) is not None
            and all(_is_int(s.get(k)) for k in ("start", "stop", "bytes"))
            and isinstance(s.get("blake2b"), str)
        )
        if not ok:
            raise bad(f"has a malformed shard record #{i}: {s!r}")
        if s["start"] != expected_start or s["stop"] <= s["start"]:
            raise bad(f"has shard row ranges that do not tile 0..{rows} (shard #{i}: {s!r})")
        expected_start = s["stop"]
    if expected_start != rows:
        raise bad(f"has shards covering {expected_start} rows, not {rows}")
    return meta


def _open_shard(entry: Path, meta: dict[str, Any], shard: dict[str, Any]) -> np.memmap:
    """Check one shard's size and safetensors header against meta.json, then memory-map it."""
    file = entry / shard["file"]
    _, code, np_dtype = _DTYPES[_BY_NAME[meta["dtype"]]]

    def bad(problem: str) -> CacheError:
        return _corrupt(file, problem, entry)

    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise bad("is missing") from None
    if size != shard["bytes"]:
        raise bad(f"has {size} bytes but meta.json records {shard['bytes']} (truncated?)")
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, _MAX_HEADER):
                raise bad("does not start with a valid safetensors header length")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise bad(f"cannot be read ({e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("has an unreadable safetensors header") from None
    info = header.get("x") if isinstance(header, dict) else None
    if not isinstance(info, dict):
        raise bad('has no tensor "x" in its safetensors header')
    shape = [shard["stop"] - shard["start"], *meta["shape"][1:]]
    if info.get("dtype") != code or info.get("shape") != shape:
        raise bad(
            f"holds {info.get('dtype')} {info.get('shape')} but meta.json expects {code} {shape}"
        )
    offsets = info.get("data_offsets")
    nbytes = math.prod(shape) * np.dtype(np_dtype).itemsize
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) for o in offsets)
        and offsets[1] - offsets[0] == nbytes
        and 8 + n + offsets[1] == size
        and offsets[0] >= 0
    ):
        raise bad(f"has data offsets {offsets!r} that do not match its shape or size")
    if nbytes == 0:
        return np.empty(shape, dtype=np_dtype)  # type: ignore[return-value]
    try:
        return np.memmap(
            file, dtype=np_dtype, mode="r", offset=8 + n + offsets[0], shape=tuple(shape)
        )
    except (OSError, ValueError) as e:
        raise bad(f"cannot be memory-mapped ({e})") from None


def _hash_bytes(buf: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(buf)
    return h.hexdigest()


class CachedActivations:
    """A read-only, memory-mapped activation matrix ``[N, ...]`` stored in shards.

    Indexing returns float32 tensors: an int gives one row; a slice, a list, a LongTensor,
    an integer ndarray or a boolean mask gives the selected rows (gathered across shards,
    with a fast path for contiguous ranges). ``dtype`` is the *storage* dtype.
    Pickling keeps only the path, so DataLoader workers reopen the maps instead of copying.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> cache = ActivationCache(tempfile.mkdtemp(), dtype=torch.float32, shard_rows=3)
    >>> acts = cache.get(nn.Sequential(nn.Identity()), "0", torch.arange(8.).view(8, 1),
    ...                  progress=False)
    >>> acts[2].tolist(), acts[6:8].flatten().tolist()
    ([2.0], [6.0, 7.0])
    >>> acts[torch.tensor([7, 0])].flatten().tolist()
    [7.0, 0.0]
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta = _read_meta(self.path)
        self._arrays: list[np.memmap] | None = None
        self._open()

    def _open(self) -> list[np.memmap]:
        if self._arrays is None:
            self._arrays = [_open_shard(self.path, self.meta, s) for s in self.meta["shards"]]
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.meta, self._arrays = state["path"], state["meta"], None

    # -- description

    @property
    def key(self) -> str:
        return str(self.meta["key"])

    @property
    def layer(self) -> str:
        return str(self.meta["layer"])

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.meta["shape"])

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype (rows are returned as float32)."""
        return _BY_NAME[self.meta["dtype"]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.meta["shape"]) * self.dtype.itemsize

    def __len__(self) -> int:
        return int(self.meta["rows"])

    def __repr__(self) -> str:
        return (
            f"CachedActivations(layer={self.layer!r}, shape={tuple(self.shape)}, "
            f"dtype={self.meta['dtype']}, shards={len(self.meta['shards'])}, path='{self.path}')"
        )

    # -- reading

    def _to_torch(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.float()

    def _range(self, start: int, stop: int) -> torch.Tensor:
        arrays = self._open()
        out = np.empty((stop - start, *self.meta["shape"][1:]), dtype=_DTYPES[self.dtype][2])
        for arr, s in zip(arrays, self.meta["shards"], strict=True):
            lo, hi = max(start, s["start"]), min(stop, s["stop"])
            if lo < hi:
                out[lo - start : hi - start] = arr[lo - s["start"] : hi - s["start"]]
        return self._to_torch(out)

    def _gather(self, idx: np.ndarray) -> torch.Tensor:
        """Rows at non-negative, in-range int64 indices ``idx`` (1-D)."""
        if len(idx) and idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1):
            return self._range(int(idx[0]), int(idx[-1]) + 1)
        arrays = self._open()
        out = np.empty((len(idx), *self.meta["shape"][1:]), dtype=_DTYPES[self.dtype][2])
        if len(arrays) == 1:
            np.take(arrays[0], idx, axis=0, out=out)
        elif len(idx):
            starts = np.array([s["start"] for s in self.meta["shards"]], dtype=np.int64)
            shard_of = np.searchsorted(starts, idx, side="right") - 1
            for s in np.unique(shard_of):
                m = shard_of == s
                out[m] = arrays[s][idx[m] - starts[s]]
        return self._to_torch(out)

    def __getitem__(self, index: Any) -> torch.Tensor:
        n = len(self)
        if isinstance(index, torch.Tensor):
            index = index.detach().cpu().numpy()
        if isinstance(index, (int, np.integer)) or (
            isinstance(index, np.ndarray) and index.ndim == 0 and index.dtype.kind in "iu"
        ):
            i = int(index)
            if not -n <= i < n:
                raise IndexError(f"row {i} out of range for {n} cached rows")
            i %= n
            return self._range(i, i + 1)[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                return self._range(start, max(start, stop))
            index = np.arange(start, stop, step)
        idx = np.asarray(index)
        if idx.dtype == np.bool_:
            if idx.shape != (n,):
                raise IndexError(f"boolean mask of shape {idx.shape} for {n} cached rows")
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = idx.astype(np.int64)
        elif idx.dtype.kind not in "iu":
            raise TypeError(
                f"cannot index cached activations with {type(index).__name__} of dtype "
                f"{idx.dtype}; use an int, slice, integer array/tensor or boolean mask"
            )
        flat = idx.reshape(-1).astype(np.int64, copy=False)
        if flat.size and (flat.min() < -n or flat.max() >= n):
            bad = flat[(flat < -n) | (flat >= n)][0]
            raise IndexError(f"row {bad} out of range for {n} cached rows")
        flat = np.where(flat < 0, flat + n, flat)
        return self._gather(flat).reshape(*idx.shape, *self.meta["shape"][1:])

    def as_tensor(self) -> torch.Tensor:
        """All rows as one float32 tensor in RAM."""
        return self._range(0, len(self))

    def dataset(self, y: torch.Tensor | Sequence[int],
                rows: torch.Tensor | Sequence[int] | None = None,
                flatten: bool = False) -> CachedDataset:
        """A map-style dataset of ``(activation_row, label)`` pairs over all rows or the given
        ``rows`` (``y`` then labels those rows), optionally flattened to vectors; see
        :class:`CachedDataset`."""
        return CachedDataset(self, y, rows, flatten)

    def verify(self, full: bool = True) -> None:
        """Re-check meta.json and every shard's size and header; with ``full`` also the
        content hashes (reads every byte). Raises :class:`CacheError` on the first problem."""
        meta = _read_meta(self.path)
        for s in meta["shards"]:
            arr = _open_shard(self.path, meta, s)
            if full and _hash_bytes(np.ascontiguousarray(arr).view(np.uint8)) != s["blake2b"]:
                raise _corrupt(
                    self.path / s["file"],
                    "does not match the content hash in meta.json (modified or corrupted)",
                    self.path,
                )


# ----------------------------------------------------------------------------- datasets


class CachedDataset(Dataset):
    """``(x_row float32, y)`` pairs over cached activations, with batched fetching.

    Implements ``__getitems__``, so a :class:`~torch.utils.data.DataLoader` with a
    ``batch_size`` fetches a whole batch with one gather; pass ``collate_fn=collate_batch``
    (or use :meth:`loader`). Works with any sampler, including ``DistributedSampler``.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> cache = ActivationCache(tempfile.mkdtemp())
    >>> acts = cache.get(nn.Sequential(nn.Linear(3, 5)), "0", torch.randn(10, 3), progress=False)
    >>> xb, yb = next(iter(acts.dataset(torch.arange(10)).loader(batch_size=4)))
    >>> xb.shape, yb.tolist()
    (torch.Size([4, 5]), [0, 1, 2, 3])
    """

    collate = staticmethod(collate_batch)

    def __init__(self, acts: CachedActivations, y: torch.Tensor | Sequence[int],
                 rows: torch.Tensor | Sequence[int] | None = None, flatten: bool = False) -> None:
        self.acts = acts
        self.y = torch.as_tensor(y)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.flatten = flatten
        n = len(acts) if self.rows is None else len(self.rows)
        if len(self.y) != n:
            raise ValueError(f"y has {len(self.y)} labels but the dataset has {n} rows")

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(index, torch.Tensor):
            index = index.cpu().tolist()
        if isinstance(index, (list, tuple)):
            return self.__getitems__(index)
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        x = self.acts[idx if self.rows is None else self.rows[idx]]
        return (x.flatten(1) if self.flatten else x), self.y[torch.from_numpy(idx)]

    def loader(self, batch_size: int = 256, *, shuffle: bool = False, **kwargs: Any) -> DataLoader:
        """A DataLoader over this dataset with batched fetching (``collate_fn=collate_batch``)."""
        return DataLoader(
            self, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_batch, **kwargs
        )


# ----------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class CacheEntry:
    """Summary of one folder in the cache (``error`` is set when it cannot be read)."""

    key: str
    path: Path
    layer: str | None = None
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    created: str | None = None
    error: str | None = None


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Fingerprinted(Protocol):
    """Rows that are not a tensor (e.g. :class:`branchnet.data.Texts`): ``len()``, slicing
    ``x[a:b]`` to a batch the model takes, and a content hash naming them in cache keys."""

    @property
    def fingerprint(self) -> str: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice) -> Any: ...


Data = torch.Tensor | Split | Fingerprinted


def _data_of(data: Data) -> tuple[Any, str]:
    """The rows to feed the model and their fingerprint."""
    if isinstance(data, Split):
        return data.x, data.fingerprint
    if isinstance(data, torch.Tensor):
        return data, tensor_fingerprint(data)
    fingerprint = getattr(data, "fingerprint", None)
    if isinstance(fingerprint, str) and hasattr(data, "__len__"):
        return data, fingerprint
    raise TypeError(
        "data must be a Split, a tensor or rows with len() and a str 'fingerprint' "
        f"(e.g. branchnet.data.Texts), got {type(data).__name__}"
    )


class _EntryWriter:
    """Writes the shards of one entry into ``folder`` as batches of ``rows`` rows arrive.

    ``add`` takes the layer's output for the next rows (any device and dtype), stores it in
    ``dtype`` and writes each shard of ``shard_rows`` rows once full (a batch may straddle a
    shard boundary); ``finish`` writes meta.json.
    """

    def __init__(self, folder: Path, layer: str, dtype: torch.dtype, shard_rows: int,
                 rows: int) -> None:
        self.folder, self.layer, self.dtype = folder, layer, dtype
        self.shard_rows, self.rows = shard_rows, rows
        self.shards: list[dict[str, Any]] = []
        self.features: tuple[int, ...] | None = None
        self._buf: torch.Tensor | None = None  # the shard being filled: rows [lo, hi)
        self._lo = self._hi = self._pos = 0

    def add(self, h: torch.Tensor) -> None:
        h = self._convert(h)
        if self.features is None:
            self.features = tuple(h.shape[1:])
        elif tuple(h.shape[1:]) != self.features:
            raise CacheError(
                f"layer {self.layer!r} returned rows of shape {tuple(h.shape[1:])} after "
                f"{self.features}; its output shape must not depend on the batch"
            )
        a, b = self._pos, self._pos + len(h)
        while self._pos < b:
            if self._buf is None:
                self._lo, self._hi = self._hi, min(self.rows, self._hi + self.shard_rows)
                self._buf = torch.empty((self._hi - self._lo, *self.features), dtype=self.dtype)
            end = min(b, self._hi)
            self._buf[self._pos - self._lo : end - self._lo] = h[self._pos - a : end - a]
            self._pos = end
            if self._pos == self._hi:
                self.shards.append(
                    self._write_shard(self.folder, len(self.shards), self._lo, self._hi,
                                      self._buf)
                )
                self._buf = None

    def finish(self, meta: dict[str, Any]) -> None:
        """Write ``meta`` (completed with the shape, dtype and shards) as meta.json."""
        if self.features is None or self._pos != self.rows:
            raise CacheError(f"layer {self.layer!r}: {self._pos} of {self.rows} rows were added")
        meta = {
            **meta,
            "dtype": _DTYPES[self.dtype][0],
            "shape": [self.rows, *self.features],
            "rows": self.rows,
            "shard_rows": self.shard_rows,
            "shards": self.shards,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "branchnet_version": __version__,
            "torch_version": torch.__version__,
        }
        _fsync(write_json(self.folder / "meta.json", meta))

    def _convert(self, h: torch.Tensor) -> torch.Tensor:
        """A batch in the storage dtype, on the CPU; float16 overflow is an error."""
        stored = h.to("cpu", self.dtype)
        overflow = self.dtype == torch.float16 and not torch.isfinite(stored).all()
        if overflow and torch.isfinite(h).all():
            raise CacheError(
                f"activations of layer {self.layer!r} exceed the float16 range "
                f"(max |a| = {h.abs().max().item():.4g}); use ActivationCache(..., "
                "dtype=torch.float32) or torch.bfloat16"
            )
        return stored

    @staticmethod
    def _write_shard(
        folder: Path, i: int, start: int, stop: int, buf: torch.Tensor
    ) -> dict[str, Any]:
        name = f"shard_{i:05d}.safetensors"
        file = folder / name
        buf = buf.contiguous()
        save_file({"x": buf}, str(file))
        _fsync(file)
        return {
            "file": name,
            "start": start,
            "stop": stop,
            "bytes": file.stat().st_size,
            "blake2b": _hash_bytes(buf.reshape(-1).view(torch.uint8).numpy()),
        }


class ActivationCache:
    """Activations of parent networks, computed once and stored under ``root``.

    ``dtype`` is the storage dtype (float16 by default: a 50,000 x 512 entry takes 51 MB;
    float32 is exact; bfloat16 and float64 are also accepted). ``shard_rows`` is the number of
    rows per shard file. Entries written with other settings are still readable. ``verify``
    is how :meth:`get` checks an existing entry before serving it: ``"full"`` (default) also
    compares the content hashes (reads the entry once), ``"quick"`` only meta.json, the shard
    sizes and headers.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> cache = ActivationCache(tempfile.mkdtemp())
    >>> net, x = nn.Sequential(nn.Tanh()), torch.ones(4, 2)
    >>> cache.has(net, "0", x)
    False
    >>> acts = cache.get(net, "0", x, preprocessing={"scale": 255}, progress=False)
    >>> cache.has(net, "0", x), cache.has(net, "0", x, preprocessing={"scale": 255})
    (False, True)
    >>> [(e.layer, e.shape, e.dtype) for e in cache.entries()]
    [('0', (4, 2), 'float16')]
    >>> cache.clear(), cache.entries()
    (1, [])
    """

    def __init__(
        self,
        root: str | Path,
        dtype: torch.dtype = torch.float16,
        shard_rows: int = 65536,
        verify: str = "full",
    ) -> None:
        if dtype not in _DTYPES:
            names = ", ".join(f"torch.{n}" for n, _, _ in _DTYPES.values())
            raise ValueError(f"unsupported cache dtype {dtype}; use one of {names}")
        if not _is_int(shard_rows) or shard_rows < 1:
            raise ValueError(f"shard_rows must be a positive int, got {shard_rows!r}")
        if verify not in _VERIFY:
            raise ValueError(f"verify must be one of {list(_VERIFY)}, got {verify!r}")
        self.root = Path(root)
        self.dtype = dtype
        self.shard_rows = shard_rows
        self.verify_mode = verify

    def __repr__(self) -> str:
        return f"ActivationCache('{self.root}', dtype={self.dtype}, shard_rows={self.shard_rows})"

    def key(
        self,
        model: nn.Module,
        layer: str,
        split_or_x: Data,
        preprocessing: dict[str, Any] | None = None,
        truncate: bool = False,
    ) -> str:
        """The entry name: ``<layer>-<hash>``, the hash covering the model's fingerprint, the
        layer, the data fingerprint, the preprocessing and the storage dtype.

        ``truncate`` does not change the key: truncated and hooked extraction give identical
        values.

        >>> import torch
        >>> from torch import nn
        >>> cache, x = ActivationCache("unused"), torch.ones(3, 2)
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> k = cache.key(net, "0", x)
        >>> k.startswith("0-"), k == cache.key(net, "0", x, {"scale": 1})
        (True, False)
        """
        del truncate
        _, data_fp = _data_of(split_or_x)
        return self._key(module_fingerprint(model), layer, data_fp, preprocessing)

    def _key(
        self, model_fp: str, layer: str, data_fp: str, preprocessing: dict[str, Any] | None
    ) -> str:
        h = hashlib.blake2b(digest_size=10)
        for part in (
            FORMAT,
            str(FORMAT_VERSION),
            model_fp,
            layer,
            data_fp,
            json.dumps(preprocessing, sort_keys=True, default=str),
            _DTYPES[self.dtype][0],
        ):
            h.update(part.encode())
            h.update(b"\0")
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", layer).lstrip(".-")[:40] or "layer"
        return f"{slug}-{h.hexdigest()}"

    def path(self, key: str) -> Path:
        """The folder of entry ``key``."""
        if not _KEY_NAME.fullmatch(key):
            raise ValueError(f"{key!r} is not an activation cache key")
        return self.root / key

    def has(
        self,
        model: nn.Module,
        layer: str,
        data: Data,
        *,
        preprocessing: dict[str, Any] | None = None,
    ) -> bool:
        """Whether an entry for these arguments exists (it is not validated here)."""
        return (self.path(self.key(model, layer, data, preprocessing)) / "meta.json").is_file()

    def open(self, key: str) -> CachedActivations:
        """Open (and structurally validate) the existing entry ``key``."""
        return CachedActivations(self.path(key))

    def get(
        self,
        model: nn.Module,
        layer: str,
        data: Data,
        *,
        preprocessing: dict[str, Any] | None = None,
        batch_size: int = 1024,
        progress: bool = True,
        truncate: bool = False,
    ) -> CachedActivations:
        """The activations of ``layer`` for ``data``: opened from disk if cached, else computed
        (in eval mode, see :mod:`branchnet.taps`), written atomically and opened.

        The fill runs under a per-key lock: a concurrent ``get`` of the same entry in another
        process waits, then reads this one's. An existing entry that fails validation (see
        ``verify``) is removed with a warning naming the damaged file, and computed again.
        ``truncate=True`` computes it with a :mod:`torch.fx`-truncated model (same values).
        """
        return self._serve(model, [layer], data, preprocessing, batch_size, progress,
                           truncate)[layer]

    def get_many(
        self,
        model: nn.Module,
        layers: Sequence[str],
        data: Data,
        *,
        preprocessing: dict[str, Any] | None = None,
        batch_size: int = 1024,
        progress: bool = True,
    ) -> dict[str, CachedActivations]:
        """``{layer: get(model, layer, data, ...)}`` for each of ``layers``, the missing entries
        computed together in one pass over ``data`` (one forward per batch, with hooks).

        Entries have the keys :meth:`get` uses, so each is shared with it. The locks of the
        missing keys are taken in key order (two processes asking for overlapping layers do not
        deadlock); entries another process filled meanwhile are read, not computed. Duplicate
        layers are a ``ValueError``, an unknown one a :class:`~branchnet.taps.TapError`, both
        raised before any work.

        >>> import tempfile, torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> cache, x = ActivationCache(tempfile.mkdtemp()), torch.randn(20, 4)
        >>> acts = cache.get_many(net, ["0", "2"], x, progress=False)
        >>> {layer: a.shape for layer, a in acts.items()}
        {'0': torch.Size([20, 8]), '2': torch.Size([20, 2])}
        >>> cache.get(net, "2", x, progress=False).key == acts["2"].key
        True
        """
        return self._serve(model, layers, data, preprocessing, batch_size, progress, False)

    def _serve(
        self,
        model: nn.Module,
        layers: Sequence[str],
        data: Data,
        preprocessing: dict[str, Any] | None,
        batch_size: int,
        progress: bool,
        truncate: bool,
    ) -> dict[str, CachedActivations]:
        """get / get_many: valid entries are opened, the missing ones filled under their locks."""
        layers = MultiTap(model, layers).layers  # names checked before any work
        _check_batch_size(batch_size)
        x, data_fp = _data_of(data)
        model_fp = module_fingerprint(model)
        keys = {layer: self._key(model_fp, layer, data_fp, preprocessing) for layer in layers}
        found = {layer: self._valid_entry(self.path(key)) for layer, key in keys.items()}
        missing = {layer: key for layer, key in keys.items() if found[layer] is None}
        if missing:
            self.root.mkdir(parents=True, exist_ok=True)
            with ExitStack() as held:
                for key in sorted(missing.values()):  # one order for all: no deadlock
                    held.callback(self._lock(key).release)
                todo: dict[str, str] = {}
                for layer, key in missing.items():
                    # written (or damaged) while this process waited for the lock?
                    found[layer] = self._valid_entry(self.path(key), remove_damaged=True)
                    if found[layer] is None:
                        todo[layer] = key
                    else:
                        log.info("activation cache entry %s: read, filled by another process",
                                 self.path(key))
                if todo:
                    meta = {
                        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                        "model_fingerprint": model_fp,
                        "data_fingerprint": data_fp,
                        "preprocessing": json.loads(
                            json.dumps(preprocessing, sort_keys=True, default=str)
                        ),
                    }
                    self._fill(model, todo, x, meta, batch_size, progress, truncate)
        return {
            layer: CachedActivations(self.path(key)) if found[layer] is None else found[layer]
            for layer, key in keys.items()
        }

    def _lock(self, key: str) -> FileLock:
        """The key's fill lock, acquired (after waiting, with a log line, if another process
        holds it)."""
        lock = FileLock(str(self.root / f"{_LOCK_PREFIX}{key}"))
        try:
            lock.acquire(timeout=0)
        except TimeoutError:  # filelock.Timeout derives from TimeoutError
            log.info("waiting for another process filling activation cache entry %s",
                     self.path(key))
            lock.acquire()
        return lock

    def _fill(
        self,
        model: nn.Module,
        todo: dict[str, str],
        x: Any,
        meta: dict[str, Any],
        batch_size: int,
        progress: bool,
        truncate: bool,
    ) -> None:
        """Compute the entries ``todo`` (``{layer: key}``, their locks held) in one pass over
        ``x``: each is written into a temporary folder, then renamed into place."""
        call: Callable[[Any], dict[str, torch.Tensor]]
        if truncate:  # one layer (get)
            t = tap(model, *todo, truncate=True)

            def call(chunk: Any) -> dict[str, torch.Tensor]:
                return {t.layer: t(chunk)}

        else:
            call = MultiTap(model, list(todo))
        n = _num_rows(x)
        t0 = time.perf_counter()
        folders: list[Path] = []
        try:
            writers = {}
            for layer, key in todo.items():
                self._remove_leftovers(key)
                log.info("computing activation cache entry %s (%d rows)", self.path(key), n)
                folders.append(self.root / f"{_TMP_PREFIX}{key}-{uuid.uuid4().hex[:12]}")
                folders[-1].mkdir()
                writers[layer] = _EntryWriter(folders[-1], layer, self.dtype, self.shard_rows, n)
            desc = f"caching {', '.join(todo)}" if len(todo) == 1 else f"caching {len(todo)} layers"
            for _, outputs in _batch_outputs(call, x, batch_size, progress=progress, desc=desc):
                for layer, h in outputs.items():
                    writers[layer].add(h)
            for (layer, key), folder in zip(todo.items(), folders, strict=True):
                writers[layer].finish({"format": FORMAT, "format_version": FORMAT_VERSION,
                                       "key": key, "layer": layer, **meta})
                try:
                    os.replace(folder, self.path(key))
                except OSError:
                    # a writer that ignored the lock (a filesystem without flock) was first
                    if not (self.path(key) / "meta.json").is_file():
                        raise
                    shutil.rmtree(folder, ignore_errors=True)
        except BaseException:
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        _fsync(self.root)
        for key in todo.values():
            log.info("computed activation cache entry %s in %.2fs", self.path(key),
                     time.perf_counter() - t0)

    def _valid_entry(self, final: Path, remove_damaged: bool = False) -> CachedActivations | None:
        """The entry at ``final`` if it passes validation; else None (and, with
        ``remove_damaged``, the damaged entry is removed with a warning naming the bad file;
        only call that while holding the entry's lock)."""
        if not final.exists():
            return None
        try:
            acts = CachedActivations(final)
            if self.verify_mode == "full":
                acts.verify(full=True)
            return acts
        except CacheError as e:
            if not remove_damaged:
                return None
            warnings.warn(f"{e.args[0].split('. Delete the folder')[0]}: removing the damaged "
                          f"entry {final} and computing it again", RuntimeWarning, stacklevel=4)
            # renamed first, so that no reader finds a half-deleted entry under the key
            trash = self.root / f"{_TMP_PREFIX}{final.name}-damaged-{uuid.uuid4().hex[:12]}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
            return None

    def _remove_leftovers(self, key: str) -> None:
        """Delete the temporary folders of fills of ``key`` that were killed (only called with
        the key's lock held, so no live fill owns one)."""
        for p in self.root.glob(f"{_TMP_PREFIX}{key}-*"):
            log.info("removing %s, left by an interrupted fill", p)
            shutil.rmtree(p, ignore_errors=True)

    # -- housekeeping

    def entries(self) -> list[CacheEntry]:
        """All complete entries under ``root`` (unfinished ``.tmp-*`` folders are skipped);
        unreadable ones are listed with ``error`` set."""
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            if not p.is_dir() or not _KEY_NAME.fullmatch(p.name):
                continue
            try:
                m = _read_meta(p)
            except CacheError as e:
                out.append(CacheEntry(p.name, p, error=str(e)))
                continue
            out.append(
                CacheEntry(p.name, p, m["layer"], tuple(m["shape"]), m["dtype"], m.get("created"))
            )
        return out

    def verify(self, full: bool = True) -> dict[str, str | None]:
        """Check every entry; returns ``{key: None if fine else the error message}``."""
        report: dict[str, str | None] = {}
        for e in self.entries():
            report[e.key] = e.error
            if e.error is None:
                try:
                    CachedActivations(e.path).verify(full=full)
                except CacheError as err:
                    report[e.key] = str(err)
        return report

    def remove(self, key: str) -> bool:
        """Delete entry ``key``; returns whether it existed."""
        p = self.path(key)
        if not p.exists():
            return False
        shutil.rmtree(p)
        return True

    def clear(self) -> int:
        """Delete every entry and leftover temporary folder (and the lock files); returns how
        many entries and temporary folders were removed.

        Only folders named like cache entries are touched, so a mistaken ``root`` is safe.
        """
        if not self.root.is_dir():
            return 0
        removed = 0
        for p in self.root.iterdir():
            if p.is_dir() and (_KEY_NAME.fullmatch(p.name) or p.name.startswith(_TMP_PREFIX)):
                shutil.rmtree(p, ignore_errors=True)
                removed += 1
            elif p.is_file() and p.name.startswith(_LOCK_PREFIX):
                p.unlink(missing_ok=True)  # safe while held: filelock re-checks the inode
        return removed
