"""Texts: an immutable sequence of input texts that stands in for ``Split.x`` of a text dataset.

Indexing follows tensor indexing: an int gives one text; a slice, a list of ints, an integer
array or tensor, or a boolean mask gives a :class:`Texts`.

Example:
    >>> import torch
    >>> t = Texts(["a cat", "a dog", "a bird"])
    >>> t[1], t[torch.tensor([2, 0])].tolist(), t[torch.tensor([True, False, True])].tolist()
    ('a dog', ['a bird', 'a cat'], ['a cat', 'a bird'])
    >>> t.shape, t.shape[1:], len(t[1:])
    (torch.Size([3]), torch.Size([]), 2)
    >>> Texts(["fine", 3], where="x.jsonl")
    Traceback (most recent call last):
    ...
    branchnet.data.errors.DataError: x.jsonl: text #1 is int, not a string
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import numpy as np
import torch

from branchnet.data.errors import DataError

_REPR_CHARS = 40


class Texts(Sequence[str]):
    """An immutable sequence of non-empty strings, indexed like a 1-D tensor.

    ``where`` (e.g. a file name) prefixes the messages of invalid items: a non-string, or an
    empty or whitespace-only string, is a :class:`DataError` naming its position (from 0).
    """

    __slots__ = ("_fingerprint", "_items")

    def __init__(self, texts: Iterable[str] = (), *, where: str = "") -> None:
        items = tuple(texts)
        if not isinstance(texts, Texts):
            prefix = f"{where}: " if where else ""
            for i, t in enumerate(items):
                if not isinstance(t, str):
                    raise DataError(f"{prefix}text #{i} is {type(t).__name__}, not a string")
                if not t.strip():
                    raise DataError(f"{prefix}text #{i} is empty")
        self._items: tuple[str, ...] = items
        self._fingerprint: str | None = None

    @classmethod
    def _of(cls, items: tuple[str, ...]) -> Texts:
        """Already validated items (a selection of another Texts)."""
        out = cls.__new__(cls)
        out._items, out._fingerprint = items, None
        return out

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice | Sequence[int] | np.ndarray | torch.Tensor) -> Texts: ...

    def __getitem__(self, index: Any) -> str | Texts:
        if isinstance(index, slice):
            return Texts._of(self._items[index])
        if isinstance(index, list) or (
            isinstance(index, (np.ndarray, torch.Tensor)) and index.ndim > 0
        ):
            return Texts._of(tuple(self._items[i] for i in self._positions(index)))
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(
                "Texts are indexed by an int, a slice, a list of ints, an integer array or "
                f"tensor, or a boolean mask; got {type(index).__name__}"
            ) from None
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is out of range for {len(self)} texts")
        return self._items[i]

    def _positions(self, index: list[Any] | np.ndarray | torch.Tensor) -> np.ndarray:
        """Non-negative positions of an integer index or a boolean mask (1-D)."""
        arr = index.detach().cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        n = len(self)
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise IndexError(f"a boolean mask of shape {arr.shape} does not match {n} texts")
            return np.flatnonzero(arr)
        if arr.size == 0:
            return np.empty(0, dtype=np.int64)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise IndexError(
                f"Texts take a 1-D integer index or boolean mask, got shape {arr.shape} of {arr.dtype}"
            )
        bad = (arr < -n) | (arr >= n)
        if bad.any():
            raise IndexError(f"index {int(arr[bad][0])} is out of range for {n} texts")
        return arr % n

    @property
    def shape(self) -> torch.Size:
        """``torch.Size([N])``, like a 1-D tensor's: ``shape[0]`` is the count, ``shape[1:]`` is ``()``."""
        return torch.Size([len(self)])

    @property
    def fingerprint(self) -> str:
        """Content hash (blake2b, 16 hex digits) of the texts in order, computed once.

        >>> Texts(["ab", "c"]).fingerprint != Texts(["a", "bc"]).fingerprint
        True
        """
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=8)
            for t in self._items:
                b = t.encode("utf-8")
                h.update(len(b).to_bytes(8, "little"))
                h.update(b)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def tolist(self) -> list[str]:
        return list(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Texts):
            return NotImplemented
        return self._items == other._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        if not self._items:
            return "Texts([])"
        first = self._items[0]
        if len(first) > _REPR_CHARS:
            first = first[:_REPR_CHARS] + "..."
        return f"Texts({len(self)} texts, first {first!r})"
