"""Per-branch training data for virtual-branch ensembles: bags and the dataset that serves them.

Each of the K branches of a virtual model trains on its *own* minibatches (REFERENCE 2.1, 2.2).
:class:`BranchBags` says which training rows each branch sees:

========== ===================================================================================
mode       branch k's bag (``index[k]``, length M)
========== ===================================================================================
none       all n rows, in branch k's own random order (own minibatches; no bagging)
same       all n rows in one order shared by every branch (shared data: identical minibatches)
bootstrap  ``int(frac * n)`` draws with replacement (frac 1.0 keeps ≈ 63.2 % unique rows)
subsample  ``int(frac * n)`` distinct rows (without replacement)
========== ===================================================================================

``frac`` must lie in (0, 1]; it applies to ``bootstrap`` and ``subsample`` only (``none`` and
``same`` use every row and require ``frac == 1``). Bags are drawn from ``numpy`` generators seeded
with ``(seed, k)``, so branch k's bag does not depend on how many branches there are, and a run
only needs to save :meth:`BranchBags.to_dict` (mode, frac, seed, n, K and a digest that checks the
regeneration).

:class:`BaggedPairs` is the training dataset: position ``j`` of branch ``k`` is training row
``index[k, j]``; a batch of B positions is ``x`` of shape ``(B, K, ...)`` and ``y`` of shape
``(B, K)``. Shuffled through :func:`branchnet.data.batches.make_loader`, every branch's bag is
permuted independently each epoch (:class:`BranchShuffle`; one shared permutation for ``same``).

Example:
    >>> import torch
    >>> from branchnet.data.batches import make_loader
    >>> bags = BranchBags.make(10, 3, mode="bootstrap", seed=0)
    >>> bags.index.shape, bags.oob.shape
    (torch.Size([3, 10]), torch.Size([3, 10]))
    >>> ds = BaggedPairs(torch.randn(10, 4), torch.arange(10), bags)
    >>> x, y = next(iter(make_loader(ds, batch_size=5, shuffle=True)))
    >>> x.shape, y.shape
    (torch.Size([5, 3, 4]), torch.Size([5, 3]))
    >>> BranchBags.from_dict(bags.to_dict()) == bags
    True
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["BAG_MODES", "BaggedPairs", "BranchBags", "BranchShuffle"]

BAG_MODES = ("none", "same", "bootstrap", "subsample")
"""Valid values of ``mode`` for :meth:`BranchBags.make`."""

_KEYS = ("mode", "frac", "seed", "n", "branches")


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _draw(mode: str, frac: float, seed: int, n: int, k: int) -> np.ndarray:
    """Branch ``k``'s bag (int64 row indices); ``same`` always uses stream ``k = 0``."""
    rng = np.random.default_rng([seed, 0 if mode == "same" else k])
    if mode in ("none", "same"):
        return rng.permutation(n)
    m = int(frac * n)
    if mode == "bootstrap":
        return rng.integers(0, n, size=m)
    return rng.permutation(n)[:m]


@dataclass(frozen=True, eq=False)
class BranchBags:
    """Which training rows each branch sees: ``index`` ``(K, M)`` int64, ``oob`` ``(K, n)`` bool.

    Build with :meth:`make`; ``oob[k, i]`` is True when row ``i`` is *not* in branch k's bag
    (out-of-bag rows give each branch a free validation set).
    """

    mode: str
    frac: float
    seed: int
    n: int
    branches: int
    index: torch.Tensor
    oob: torch.Tensor

    @classmethod
    def make(cls, n: int, branches: int, mode: str = "none", frac: float = 1.0,
             seed: int = 0) -> BranchBags:
        """Draw the bags of ``branches`` branches over ``n`` training rows (seeded, deterministic).

        Example:
            >>> b = BranchBags.make(1000, 2, mode="subsample", frac=0.3, seed=1)
            >>> b.size, b.unique_fraction()
            (300, [0.3, 0.3])
        """
        n = _check_int(n, "n (number of training rows)", 1)
        branches = _check_int(branches, "branches", 1)
        seed = _check_int(seed, "seed", 0)
        if mode not in BAG_MODES:
            raise ValueError(f"bagging mode must be one of {list(BAG_MODES)}, got {mode!r}")
        if isinstance(frac, bool) or not isinstance(frac, numbers.Real) or not 0 < frac <= 1:
            raise ValueError(f"bagging frac must be a number in (0, 1], got {frac!r}")
        frac = float(frac)
        if mode in ("none", "same") and frac != 1.0:
            raise ValueError(
                f"bagging frac applies to 'bootstrap' and 'subsample' only; mode {mode!r} uses all "
                f"{n} rows, so frac must be 1.0 (got {frac})")
        if int(frac * n) < 1:
            raise ValueError(f"bagging frac {frac} of {n} rows leaves int(frac * n) = 0 rows per "
                             "branch; use a larger frac")
        index = torch.from_numpy(
            np.stack([_draw(mode, frac, seed, n, k) for k in range(branches)]).astype(np.int64))
        oob = torch.ones(branches, n, dtype=torch.bool)
        oob[torch.arange(branches).unsqueeze(1), index] = False
        return cls(mode, frac, seed, n, branches, index, oob)

    @property
    def size(self) -> int:
        """M, the number of positions in every bag (the length of one epoch)."""
        return int(self.index.shape[1])

    def unique_fraction(self) -> list[float]:
        """Per branch, the fraction of the n training rows in its bag (``1 - oob.mean``).

        Example:
            >>> BranchBags.make(10, 2, mode="same").unique_fraction()
            [1.0, 1.0]
        """
        return [float(v) for v in (~self.oob).double().mean(1)]

    def digest(self) -> str:
        """A short SHA-256 of the bag indices (checks that a regeneration is identical)."""
        return hashlib.sha256(self.index.numpy().tobytes()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description; :meth:`from_dict` regenerates the same bags from it.

        Example:
            >>> BranchBags.make(5, 2, seed=3).to_dict()["mode"]
            'none'
        """
        return {"mode": self.mode, "frac": self.frac, "seed": self.seed, "n": self.n,
                "branches": self.branches, "digest": self.digest()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BranchBags:
        """Regenerate bags from :meth:`to_dict`; a saved ``digest`` must match the regeneration."""
        if not isinstance(d, dict):
            raise ValueError(f"bags must be described by a dict, got {type(d).__name__}")
        missing = [k for k in _KEYS if k not in d]
        unknown = sorted(set(d) - {*_KEYS, "digest"})
        if missing or unknown:
            raise ValueError(f"bags dict must have keys {list(_KEYS)} (and optionally 'digest'); "
                             f"missing {missing}, unknown {unknown}")
        bags = cls.make(d["n"], d["branches"], mode=d["mode"], frac=d["frac"], seed=d["seed"])
        if "digest" in d and d["digest"] != bags.digest():
            raise ValueError(
                f"regenerated bags differ from the saved ones (digest {bags.digest()} != "
                f"{d['digest']}); numpy's random streams changed since they were drawn")
        return bags

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BranchBags):
            return NotImplemented
        same_meta = all(getattr(self, k) == getattr(other, k) for k in _KEYS)
        return same_meta and torch.equal(self.index, other.index)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"BranchBags(mode={self.mode!r}, frac={self.frac}, seed={self.seed}, n={self.n}, "
                f"branches={self.branches}, size={self.size})")


class BranchShuffle(Sampler[tuple[int, ...]]):
    """Per epoch, an independent random permutation of the M bag positions for each branch.

    Yields K-tuples ``(j_0, ..., j_{K-1})``: branch k's next position. Drawn from
    ``(seed, epoch)`` alone, like :class:`branchnet.data.batches.EpochShuffle`, so a resumed run
    sees the same order; ``shared=True`` uses one permutation for every branch.
    """

    def __init__(self, size: int, branches: int, seed: int = 0, shared: bool = False):
        self.size = _check_int(size, "size", 1)
        self.branches = _check_int(branches, "branches", 1)
        self.seed, self.shared, self.epoch = seed, shared, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.shared:
            perms = torch.randperm(self.size, generator=g).expand(self.branches, -1)
        else:
            perms = torch.stack([torch.randperm(self.size, generator=g)
                                 for _ in range(self.branches)])
        return iter([tuple(row) for row in perms.T.tolist()])


class BaggedPairs(Dataset):
    """Training pairs of a K-branch model: position ``j`` of branch ``k`` is row ``bags.index[k, j]``.

    ``__getitems__`` (one indexing operation per batch) takes bag positions: a plain int ``j``
    means position ``j`` in every branch's bag, a K-tuple gives one position per branch (what
    :class:`BranchShuffle` yields). It returns ``x`` ``(B, K, ...)`` and ``y`` ``(B, K)``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, bags: BranchBags):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        if len(y) != bags.n:
            raise ValueError(f"the bags were drawn over {bags.n} rows but x and y have {len(y)}")
        self.x, self.y, self.bags = x, y, bags
        self._rows = bags.index.T.contiguous()  # (M, K)

    def __len__(self) -> int:
        return self.bags.size

    def _positions(self, idx: Sequence[Any]) -> torch.Tensor:
        pos = torch.as_tensor(idx, dtype=torch.long)
        K = self.bags.branches
        if pos.ndim == 1:
            pos = pos.unsqueeze(1).expand(-1, K)
        elif pos.ndim != 2 or pos.shape[1] != K:
            raise ValueError(f"indices must be ints or {K}-tuples (one position per branch), "
                             f"got shape {tuple(pos.shape)}")
        if pos.numel() and (pos.min() < 0 or pos.max() >= len(self)):
            raise IndexError(f"bag positions must lie in [0, {len(self)}), got "
                             f"min {int(pos.min())}, max {int(pos.max())}")
        return self._rows.gather(0, pos)  # rows[b, k] = index[k, pos[b, k]]

    def __getitems__(self, idx: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._positions(idx)
        return self.x[rows], self.y[rows]

    def __getitem__(self, i: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def make_sampler(self, seed: int = 0) -> BranchShuffle:
        """The shuffling sampler :func:`~branchnet.data.batches.make_loader` uses."""
        return BranchShuffle(len(self), self.bags.branches, seed, shared=self.bags.mode == "same")
