"""Branch partitions: which units of a layer belong to which branch.

A :class:`Partition` assigns every unit ``0 .. n_units-1`` of a layer (the channels of a conv,
the features of a linear layer) to exactly one named branch. Build one from block sizes, index
ranges, per-unit labels, at random (a control with the same sizes), or let
:func:`infer_partition` read it off the model's grouped convolutions.

Example:
    >>> p = Partition.from_sizes([2, 3])
    >>> p.names, p.sizes, p.labels().tolist()
    (['branch 0', 'branch 1'], [2, 3], [0, 0, 1, 1, 1])
    >>> Partition.from_ranges({"bw": (0, 2), "colour": (2, 4)}).members[1].tolist()
    [2, 3]
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

__all__ = ["AnalysisError", "Partition", "infer_partition"]

_MAX_LISTED = 10


class AnalysisError(ValueError):
    """Raised when an analysis cannot run: bad partition, unbranched layer, too few samples."""


def _listed(units: Sequence[int]) -> str:
    shown = ", ".join(str(int(u)) for u in units[:_MAX_LISTED])
    more = f" ... ({len(units)} in all)" if len(units) > _MAX_LISTED else ""
    return shown + more


def _default_names(n: int) -> list[str]:
    return [f"branch {i}" for i in range(n)]


@dataclass(frozen=True, eq=False)
class Partition:
    """Units ``0 .. n_units-1`` split into named, non-empty, disjoint branches.

    ``members[i]`` holds the (sorted) unit indices of branch ``names[i]``. Construction checks
    that every unit occurs exactly once and raises :class:`AnalysisError` naming the missing or
    duplicated units otherwise.

    >>> Partition(["a", "b"], [[0, 2], [1, 2]])
    Traceback (most recent call last):
    ...
    branchnet.analysis.partitions.AnalysisError: invalid partition: unit(s) 2 appear in more than one branch
    """

    names: list[str]
    members: list[np.ndarray]

    def __post_init__(self) -> None:
        names = [str(n) for n in self.names]
        members = [np.sort(np.asarray(m, dtype=np.int64).reshape(-1)) for m in self.members]
        if not members:
            raise AnalysisError("invalid partition: it has no branches")
        if len(names) != len(members):
            raise AnalysisError(
                f"invalid partition: {len(names)} names for {len(members)} branches"
            )
        if len(set(names)) != len(names):
            raise AnalysisError(f"invalid partition: branch names must be unique, got {names}")
        empty = [n for n, m in zip(names, members, strict=True) if m.size == 0]
        if empty:
            raise AnalysisError(f"invalid partition: branch(es) {empty} have no units")
        every = np.concatenate(members)
        if every.min() < 0:
            raise AnalysisError(
                f"invalid partition: negative unit index {int(every.min())} (units are 0..n-1)"
            )
        n = int(every.max()) + 1
        counts = np.bincount(every, minlength=n)
        problems = []
        if (counts > 1).any():
            dup = np.flatnonzero(counts > 1)
            problems.append(f"unit(s) {_listed(dup)} appear in more than one branch")
        if (counts == 0).any():
            missing = np.flatnonzero(counts == 0)
            problems.append(f"unit(s) {_listed(missing)} of 0..{n - 1} are in no branch")
        if problems:
            raise AnalysisError("invalid partition: " + "; ".join(problems))
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "members", members)

    # ------------------------------------------------------------------ properties

    @property
    def n_units(self) -> int:
        """Number of units covered (the layer's width)."""
        return int(sum(m.size for m in self.members))

    @property
    def n_branches(self) -> int:
        return len(self.members)

    @property
    def sizes(self) -> list[int]:
        """Units per branch, in branch order."""
        return [int(m.size) for m in self.members]

    def labels(self) -> np.ndarray:
        """``[n_units]`` int array: the branch index of each unit.

        >>> Partition.from_labels([1, 0, 1]).labels().tolist()
        [1, 0, 1]
        """
        out = np.empty(self.n_units, dtype=np.int64)
        for i, m in enumerate(self.members):
            out[m] = i
        return out

    def order(self) -> np.ndarray:
        """Unit indices sorted by branch (branch 0's units first), for plots."""
        return np.concatenate(self.members)

    def to_dict(self) -> dict[str, list[int]]:
        """``{name: [unit, ...]}`` (JSON-able)."""
        return {n: m.tolist() for n, m in zip(self.names, self.members, strict=True)}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partition):
            return NotImplemented
        return self.names == other.names and len(self.members) == len(other.members) and all(
            np.array_equal(a, b) for a, b in zip(self.members, other.members, strict=True)
        )

    def __hash__(self) -> int:
        return hash((tuple(self.names), tuple(m.tobytes() for m in self.members)))

    def __repr__(self) -> str:
        parts = ", ".join(f"{n!r}: {s}" for n, s in zip(self.names, self.sizes, strict=True))
        return f"Partition({self.n_units} units; {parts})"

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_sizes(cls, sizes: Sequence[int], names: Sequence[str] | None = None) -> Partition:
        """Contiguous blocks: the first ``sizes[0]`` units, then the next ``sizes[1]``, ...

        >>> Partition.from_sizes([1, 2], names=["x", "y"]).to_dict()
        {'x': [0], 'y': [1, 2]}
        """
        sizes = _check_sizes(sizes)
        bounds = np.cumsum([0, *sizes])
        members = [np.arange(a, b) for a, b in itertools.pairwise(bounds)]
        return cls(_names(names, len(sizes)), members)

    @classmethod
    def from_ranges(cls, ranges: Mapping[str, tuple[int, int]]) -> Partition:
        """``{name: (start, stop)}`` half-open unit ranges (like Python slices).

        >>> Partition.from_ranges({"a": (2, 4), "b": (0, 2)}).labels().tolist()
        [1, 1, 0, 0]
        """
        if not ranges:
            raise AnalysisError("from_ranges needs at least one {name: (start, stop)} entry")
        members = []
        for name, r in ranges.items():
            try:
                start, stop = (int(v) for v in r)
            except (TypeError, ValueError):
                raise AnalysisError(
                    f"range for {name!r} must be a (start, stop) pair, got {r!r}"
                ) from None
            if not 0 <= start < stop:
                raise AnalysisError(
                    f"range for {name!r} must satisfy 0 <= start < stop, got ({start}, {stop})"
                )
            members.append(np.arange(start, stop))
        return cls(list(ranges), members)

    @classmethod
    def from_labels(cls, labels: Sequence[object] | np.ndarray) -> Partition:
        """One branch per distinct label (sorted); ``labels[u]`` is unit ``u``'s branch.

        Integer labels ``i`` become branches named ``"branch i"``; other labels keep their text.

        >>> Partition.from_labels(["c", "bw", "c"]).to_dict()
        {'bw': [1], 'c': [0, 2]}
        """
        lab = np.asarray(labels)
        if lab.ndim != 1 or lab.size == 0:
            raise AnalysisError(f"labels must be a non-empty 1-D array, got shape {lab.shape}")
        values, inverse = np.unique(lab, return_inverse=True)
        if np.issubdtype(values.dtype, np.integer):
            names = [f"branch {int(v)}" for v in values]
        else:
            names = [str(v) for v in values]
        return cls(names, [np.flatnonzero(inverse == i) for i in range(len(values))])

    @classmethod
    def random(
        cls, sizes: Sequence[int], seed: int = 0, names: Sequence[str] | None = None
    ) -> Partition:
        """Random membership with fixed branch sizes: the control for any specialization claim.

        >>> p = Partition.random([3, 5], seed=1)
        >>> p.sizes, sorted(np.concatenate(p.members).tolist()) == list(range(8))
        ([3, 5], True)
        """
        sizes = _check_sizes(sizes)
        perm = np.random.default_rng(seed).permutation(sum(sizes))
        bounds = np.cumsum([0, *sizes])
        members = [perm[a:b] for a, b in itertools.pairwise(bounds)]
        return cls(_names(names, len(sizes)), members)


def _check_sizes(sizes: Sequence[int]) -> list[int]:
    out = [int(s) for s in sizes]
    if not out or any(s < 1 for s in out):
        raise AnalysisError(f"branch sizes must be a non-empty list of positive ints, got {sizes!r}")
    return out


def _names(names: Sequence[str] | None, n: int) -> list[str]:
    if names is None:
        return _default_names(n)
    names = [str(s) for s in names]
    if len(names) != n:
        raise AnalysisError(f"{len(names)} names given for {n} branches")
    return names


# --------------------------------------------------------------------------- inference


def _get_module(model: nn.Module, layer: str) -> nn.Module:
    from branchnet.taps import TapError, tap

    try:
        return tap(model, layer).module
    except TapError as e:
        raise AnalysisError(str(e)) from None


def _out_units(module: nn.Module) -> int | None:
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    return None


def _in_units(module: nn.Module) -> int | None:
    if isinstance(module, nn.Conv2d):
        return int(module.in_channels)
    if isinstance(module, nn.Linear):
        return int(module.in_features)
    return None


def consumer(model: nn.Module, layer: str) -> tuple[str, nn.Module] | None:
    """The first ``Conv2d``/``Linear`` after ``layer`` (in ``named_modules`` order) whose input
    width equals ``layer``'s output width: the layer that (most likely) reads its units.

    Module order is registration order, not execution order; for unusual models pass the
    partition explicitly.
    """
    module = _get_module(model, layer)
    width = _out_units(module)
    if width is None:
        return None
    seen = False
    for name, m in model.named_modules():
        if m is module:
            seen = True
            continue
        if seen and _in_units(m) == width:
            return name, m
    return None


def infer_partition(model: nn.Module, layer: str) -> Partition:
    """The branch partition of ``layer``'s output units, read off grouped convolutions.

    * If the first layer that reads ``layer``'s units (see :func:`consumer`) is an
      ``nn.Conv2d`` with ``groups=g > 1``, the units split into ``g`` contiguous blocks: each
      block feeds one group (AlexNet's conv1 is branched this way, by conv2's two groups).
    * Else, if ``layer`` is itself an ``nn.Conv2d`` with ``groups=g > 1``, its output channels
      split into ``g`` blocks (one per group).
    * Otherwise the layer is not branched and :class:`AnalysisError` says so.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2))
    >>> infer_partition(net, "0")
    Partition(8 units; 'branch 0': 4, 'branch 1': 4)
    """
    module = _get_module(model, layer)
    width = _out_units(module)
    if width is None:
        raise AnalysisError(
            f"cannot infer a partition for layer {layer!r} ({type(module).__name__}): only "
            "nn.Conv2d and nn.Linear layers are understood; pass partition=Partition(...) "
            "(e.g. Partition.from_sizes or from_ranges)"
        )
    found = consumer(model, layer)
    if found is not None:
        reader = found[1]
        groups = int(getattr(reader, "groups", 1))
        if isinstance(reader, nn.Conv2d) and groups > 1:
            return Partition.from_sizes([width // groups] * groups)
    own = int(getattr(module, "groups", 1))
    if isinstance(module, nn.Conv2d) and own > 1:
        return Partition.from_sizes([width // own] * own)
    read = (
        f"its units are read by {found[0]!r} ({type(found[1]).__name__}, not grouped)"
        if found is not None
        else "no later Conv2d/Linear reads its units"
    )
    raise AnalysisError(
        f"layer {layer!r} is not branched: {read} and it is not a grouped convolution. "
        "Pass partition=Partition.from_sizes(...)/from_ranges(...) to name the branches, or "
        "partition=Partition.random(sizes, seed) to run a random-partition control"
    )
