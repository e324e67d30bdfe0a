"""In-memory datasets: a `Split` is (x, y); a `Data` bundles train/val/test with class names;
:func:`stratified_split` is the seeded, stratified split of labelled rows.

Every loader in :mod:`branchnet.data` returns a :class:`Data`. Inputs are float32 tensors,
already normalised with statistics of the training split only, or, for text data, a
:class:`~branchnet.data.texts.Texts`; labels are int64 indices into ``Data.classes``.

Example:
    >>> import torch
    >>> from branchnet.data import Split
    >>> s = Split(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
    >>> len(s), s.subset(torch.tensor([1, 3])).y.tolist()
    (4, [1, 1])
    >>> t = Split(["a cat", "a dog"], [0, 1])
    >>> t.is_text, t.subset(torch.tensor([1])).x.tolist()
    (True, ['a dog'])
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from branchnet.data.errors import DataError
from branchnet.data.texts import Texts


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """A content hash (blake2b, 16 hex digits) of tensors' shapes, dtypes and bytes."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def concat_splits(splits: list[Split]) -> Split:
    """The rows of several splits, one after another (texts or tensors alike).

    >>> concat_splits([Split(["a"], [0]), Split(["b", "c"], [1, 1])]).x.tolist()
    ['a', 'b', 'c']
    """
    if all(s.is_text for s in splits):
        return Split(Texts([t for s in splits for t in s.x]), torch.cat([s.y for s in splits]))
    return Split(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]))


def stratified_split(
    y: np.ndarray | torch.Tensor | Sequence[int], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..len(y)-1`` into ``(idx_keep, idx_split)``, seeded and stratified.

    ``idx_split`` holds ``ceil(fraction * len(y))`` indices with (as far as possible) the class
    proportions of ``y``. Falls back to an unstratified (still seeded) split when some class has
    too few examples to stratify. Both index arrays are sorted.

    >>> keep, split = stratified_split([0, 0, 0, 0, 1, 1, 1, 1], 0.5, seed=0)
    >>> len(keep), len(split), sorted(int(v) for v in np.asarray([0] * 4 + [1] * 4)[split])
    (4, 4, [0, 0, 1, 1])
    """
    y = np.asarray(y)
    n = len(y)
    if not (isinstance(fraction, (int, float)) and 0 <= fraction < 1):
        raise DataError(f"split fraction must be a number in [0, 1), got {fraction!r}")
    idx = np.arange(n, dtype=np.int64)
    if fraction == 0 or n == 0:
        return idx, idx[:0]
    n_split = math.ceil(fraction * n)
    if n_split >= n:
        raise DataError(
            f"cannot split off {fraction} of {n} examples: nothing would remain; "
            "use a smaller fraction or more data"
        )
    try:
        keep, split = train_test_split(idx, test_size=fraction, random_state=seed, stratify=y)
    except ValueError:  # a class with < 2 members, or fewer split slots than classes
        keep, split = train_test_split(idx, test_size=fraction, random_state=seed)
    return np.sort(keep), np.sort(split)


@dataclass
class Split:
    """One split of a dataset: inputs ``x`` ``[N, ...]`` (float32), or N texts (a :class:`Texts`;
    a list or tuple of strings becomes one), and labels ``y`` ``[N]`` (int64)."""

    x: torch.Tensor | Texts
    y: torch.Tensor
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.x, (list, tuple)) and self.x and isinstance(self.x[0], str):
            self.x = Texts(self.x)
        elif not isinstance(self.x, (torch.Tensor, Texts)):
            self.x = torch.as_tensor(self.x)
        if not isinstance(self.y, torch.Tensor):
            self.y = torch.as_tensor(self.y)
        self.y = self.y.long()
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"x has {self.x.shape[0]} rows but y has {self.y.shape[0]} labels; "
                "they must have the same length"
            )
        if self.y.ndim != 1:
            raise DataError(f"y must be 1-D class indices, got shape {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def is_text(self) -> bool:
        """Whether the inputs are texts."""
        return isinstance(self.x, Texts)

    @property
    def fingerprint(self) -> str:
        """Content hash of x and y, computed once (used to key activation caches)."""
        if self._fingerprint is None:
            if isinstance(self.x, Texts):
                both = f"texts {self.x.fingerprint}|{tensor_fingerprint(self.y)}".encode()
                self._fingerprint = hashlib.blake2b(both, digest_size=8).hexdigest()
            else:
                self._fingerprint = tensor_fingerprint(self.x, self.y)
        return self._fingerprint

    def subset(self, index: torch.Tensor) -> Split:
        """The rows selected by an index or boolean mask."""
        return Split(self.x[index], self.y[index])

    def split(self, fraction: float, seed: int = 0) -> tuple[Split, Split]:
        """Seeded, stratified ``(rest, held_out)`` with ``fraction`` of the rows held out.

        >>> a, b = Split(torch.zeros(8, 1), torch.tensor([0, 1] * 4)).split(0.5)
        >>> len(a), sorted(b.y.tolist())
        (4, [0, 0, 1, 1])
        """
        if not 0 < fraction < 1:
            raise DataError(f"fraction must be in (0, 1), got {fraction}")
        keep, held = stratified_split(self.y.numpy(), fraction, seed)
        return self.subset(torch.from_numpy(keep)), self.subset(torch.from_numpy(held))

    def relabel(self, mapping: dict[int, int]) -> Split:
        """Keep only labels in ``mapping`` and renumber them."""
        keep = torch.zeros_like(self.y, dtype=torch.bool)
        new_y = torch.full_like(self.y, -1)
        for old, new in mapping.items():
            m = self.y == old
            keep |= m
            new_y[m] = new
        return Split(self.x[keep], new_y[keep])


@dataclass
class Data:
    """A dataset: train / val / test splits, class names and how the inputs were prepared.

    ``preprocessing`` records everything needed to prepare new raw inputs the same way
    (scale, mean, std, mode), and is part of the activation-cache key. ``groups``, where the
    source has them, maps each group of classes to its class names.
    """

    train: Split
    val: Split
    test: Split
    classes: list[str]
    name: str = "data"
    preprocessing: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, list[str]] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input: ``()`` for texts."""
        return tuple(self.train.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def select_classes(self, classes: list[str | int]) -> Data:
        """Keep only the given classes (names or indices), renumbered in the given order.

        >>> import torch
        >>> s = Split(torch.zeros(3, 1), torch.tensor([0, 1, 2]))
        >>> d = Data(s, s, s, ["a", "b", "c"]).select_classes(["c", "a"])
        >>> d.classes, d.train.y.tolist()
        (['c', 'a'], [1, 0])
        >>> Data(s, s, s, ["a", "b", "c"], groups={"x": ["a", "b"], "y": ["c"]}).select_classes(
        ...     ["b", "a"]).groups
        {'x': ['b', 'a']}
        """
        idx = []
        for c in classes:
            if isinstance(c, int) and not isinstance(c, bool):
                if not 0 <= c < len(self.classes):
                    raise DataError(f"class index {c} out of range 0..{len(self.classes) - 1}")
                idx.append(c)
            elif c in self.classes:
                idx.append(self.classes.index(c))
            else:
                raise DataError(f"unknown class {c!r}; this dataset has classes {self.classes}")
        if len(set(idx)) != len(idx):
            raise DataError(f"class list {classes} names a class twice")
        mapping = {old: new for new, old in enumerate(idx)}
        kept = [self.classes[i] for i in idx]
        return replace(
            self,
            train=self.train.relabel(mapping),
            val=self.val.relabel(mapping),
            test=self.test.relabel(mapping),
            classes=kept,
            groups=restrict_groups(self.groups, kept),
        )

    def summary(self) -> str:
        """One line: name, classes, input, split sizes.

        >>> Data(Split(["a b"], [0]), Split(["c"], [0]), Split(["d"], [0]), ["x"]).summary()
        'data: 1 classes, text, train 1 / val 1 / test 1'
        """
        inputs = "text" if self.train.is_text else f"input {self.input_shape}"
        return (
            f"{self.name}: {self.num_classes} classes, {inputs}, "
            f"train {len(self.train)} / val {len(self.val)} / test {len(self.test)}"
        )


def restrict_groups(
    groups: dict[str, list[str]] | None, classes: list[str]
) -> dict[str, list[str]] | None:
    """Groups of classes kept to ``classes`` (in that order); groups left empty are dropped.

    >>> restrict_groups({"a": ["x", "y"], "b": ["z"]}, ["y", "x"])
    {'a': ['y', 'x']}
    """
    if groups is None:
        return None
    kept = {g: [c for c in classes if c in members] for g, members in groups.items()}
    return {g: members for g, members in kept.items() if members}
