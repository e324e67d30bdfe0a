"""Branch partitions: which units of a layer belong to which branch.

A :class:`Partition` assigns every unit ``0 .. n_units-1`` of a layer (the channels of a conv,
the features of a linear layer) to exactly one named branch. Build one from block sizes, index
ranges, per-unit labels, at random (a control with the same sizes), or let
:func:`infer_partition` read it off the model's grouped convolutions or, for a virtual-branch
model (:mod:`branchnet.virtual`), off its branch dimension.

Virtual-branch layers produce ``(B, K, C, ...)`` activations (dim 1 = branch, channels ordered
``[shared, unique]`` within each branch). The analysis flattens them to ``(B, K*C, ...)``, so
unit ``k*C + c`` is channel ``c`` of branch ``k`` (:func:`units_view`), and a model's
``(B, K, classes)`` output is read as the ensemble's logits, the mean over branches
(:func:`ensemble_logits`, vbranch's ``before_mean`` merge).

Example:
    >>> p = Partition.from_sizes([2, 3])
    >>> p.names, p.sizes, p.labels().tolist()
    (['branch 0', 'branch 1'], [2, 3], [0, 0, 1, 1, 1])
    >>> Partition.from_ranges({"bw": (0, 2), "colour": (2, 4)}).members[1].tolist()
    [2, 3]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from branchnet.errors import BranchnetError

__all__ = [
    "AnalysisError",
    "Partition",
    "VirtualLayout",
    "ensemble_logits",
    "infer_partition",
    "units_view",
    "virtual_branches",
    "virtual_layout",
    "virtual_unit_kinds",
]

_MAX_LISTED = 10


class AnalysisError(BranchnetError, ValueError):
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

    ``kinds`` optionally labels every unit (e.g. ``"shared"`` / ``"unique"`` for a virtual-branch
    layer, see :func:`infer_partition`); it is an annotation and takes no part in equality.

    >>> Partition.from_sizes([2, 2]).with_kinds(["shared", "unique"] * 2).kinds
    ('shared', 'unique', 'shared', 'unique')

    >>> Partition(["a", "b"], [[0, 2], [1, 2]])
    Traceback (most recent call last):
    ...
    branchnet.analysis.partitions.AnalysisError: invalid partition: unit(s) 2 appear in more than one branch
    """

    names: list[str]
    members: list[np.ndarray]
    kinds: Sequence[str] | None = None

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
        kinds = None
        if self.kinds is not None:
            if isinstance(self.kinds, (str, bytes)):
                raise AnalysisError(f"kinds must be one label per unit, got the string {self.kinds!r}")
            kinds = tuple(str(k) for k in self.kinds)
            if len(kinds) != n:
                raise AnalysisError(f"kinds must have one label per unit ({n}), got {len(kinds)}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "kinds", kinds)

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

    def with_kinds(self, kinds: Sequence[str] | None) -> Partition:
        """The same partition with per-unit ``kinds`` labels (``None`` removes them)."""
        return Partition(self.names, self.members, kinds)

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


# --------------------------------------------------------------------------- virtual branches


@dataclass(frozen=True)
class VirtualLayout:
    """Where a virtual-branch layer's units sit: ``branches`` (K) x ``units`` (C per branch),
    the first ``shared`` of each branch's C shared (``None`` when it cannot be worked out)."""

    branches: int
    units: int
    shared: int | None

    def kinds(self) -> list[str] | None:
        """``"shared"`` / ``"unique"`` for each of the ``K*C`` units (branch-major), or ``None``.

        >>> VirtualLayout(2, 3, 1).kinds()
        ['shared', 'unique', 'unique', 'shared', 'unique', 'unique']
        """
        if self.shared is None:
            return None
        return (["shared"] * self.shared + ["unique"] * (self.units - self.shared)) * self.branches


def _branch_layout(module: nn.Module) -> tuple[int, int, int] | None:
    """``(K, C, shared)`` that a virtual layer (VLinear, VConv2d, VBatchNorm*, VInput) states as
    its ``branch_layout``; ``None`` for any other module. Read duck-typed, so the analysis does
    not depend on :mod:`branchnet.virtual`."""
    layout = getattr(module, "branch_layout", None)
    return None if layout is None else tuple(int(v) for v in layout)


def virtual_branches(model: nn.Module) -> int | None:
    """K of a virtual-branch model (one with ``branchnet.virtual`` layers), ``None`` for any other.

    >>> from branchnet.virtual import vmlp
    >>> virtual_branches(vmlp([4, 3], 2, branches=3)), virtual_branches(nn.Linear(2, 2))
    (3, None)
    """
    found = {layout[0] for m in model.modules() if (layout := _branch_layout(m)) is not None}
    if len(found) > 1:
        raise AnalysisError(f"the model mixes virtual layers with different branch counts {sorted(found)}")
    return found.pop() if found else None


def units_view(h: torch.Tensor, branches: int | None) -> torch.Tensor:
    """``h`` with the branch dim folded into the unit dim: ``(B, K, C, ...) -> (B, K*C, ...)``.

    Unit ``k*C + c`` is channel ``c`` of branch ``k``. Tensors that are not virtual activations
    (``branches`` is ``None``, fewer than 3 dims, or dim 1 is not K) come back unchanged. A view
    when ``h`` is contiguous, so writing into it writes into ``h``.

    >>> units_view(torch.arange(12).view(1, 2, 3, 2), 2)[0, :, 0].tolist()
    [0, 2, 4, 6, 8, 10]
    """
    if branches is None or h.ndim < 3 or h.shape[1] != branches:
        return h
    return h.flatten(1, 2)


def ensemble_logits(out: Any, branches: int | None) -> Any:
    """A virtual model's per-branch logits ``(B, K, classes)`` merged ``before_mean`` (their mean
    over branches: argmax and softmax equal :func:`branchnet.virtual.merge.merge_probs`'s);
    anything else unchanged.

    >>> ensemble_logits(torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]), 2).tolist()
    [[1.0, 0.5]]
    """
    if branches is not None and isinstance(out, torch.Tensor) and out.ndim == 3 and out.shape[1] == branches:
        return out.mean(dim=1)
    return out


def _static_shared(module: nn.Module) -> int | None:
    """Shared units of a module's output, when the module says (every V layer and block does)."""
    layout = _branch_layout(module)
    if layout is not None:
        return layout[2]
    s = getattr(module, "shared_out", None)
    return int(s) if isinstance(s, int) and not isinstance(s, bool) else None


_PROBE_ROWS = 2


def _probe_layout(model: nn.Module, module: nn.Module, layer: str, k: int) -> VirtualLayout | None:
    """Run the model once on zeros and read ``layer``'s output shape; the shared count comes from
    the last module (in execution order, ``layer`` included) that states its ``shared_out`` and
    outputs the same units (or, flattened, the same features)."""
    from branchnet.taps import _frozen, _model_device

    entry = next((m for m in model.modules()
                  if _branch_layout(m) is not None and hasattr(m, "input_shape")), None)
    if entry is None:
        raise AnalysisError(
            f"cannot work out the units of layer {layer!r} ({type(module).__name__}): the model has "
            "no VInput to build a probe input from; analyse a VLinear / VConv2d / VBatchNorm layer "
            "or pass partition=Partition.from_sizes([C] * K)"
        )
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    x = torch.zeros(_PROBE_ROWS, *entry.input_shape, device=_model_device(model),
                    dtype=param.dtype if param is not None and param.is_floating_point() else None)
    record: list[tuple[nn.Module, tuple[int, ...]]] = []

    def hook(mod: nn.Module, args: Any, output: Any) -> None:
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        if isinstance(out, torch.Tensor):
            record.append((mod, tuple(out.shape)))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with _frozen(model):
            model(x)
    except AnalysisError:
        raise
    except Exception as e:  # a custom model may not take a zero batch: say what to do instead
        raise AnalysisError(
            f"cannot probe layer {layer!r}: the model failed on a zero batch ({type(e).__name__}: {e}); "
            "pass partition=Partition.from_sizes([C] * K)"
        ) from e
    finally:
        for h in handles:
            h.remove()
    at = [i for i, (m, _) in enumerate(record) if m is module]
    if not at:
        raise AnalysisError(f"layer {layer!r} did not run in a forward pass of the model")

    def virtual(shape: tuple[int, ...]) -> bool:
        return len(shape) >= 3 and shape[0] == _PROBE_ROWS and shape[1] == k

    shape = record[at[0]][1]
    if not virtual(shape):
        return None
    width, shared = shape[2], None
    for m, shp in reversed(record[: at[0] + 1]):
        s = _static_shared(m)
        if s is None or not virtual(shp):
            continue
        if shp[2] == width:
            shared = s
        elif len(shp) > 3 and math.prod(shp[2:]) == width:  # flattened: (C', H, W) -> C'*H*W
            shared = s * math.prod(shp[3:])
        break
    return VirtualLayout(k, width, shared)


def virtual_layout(model: nn.Module, layer: str) -> VirtualLayout | None:
    """The :class:`VirtualLayout` of ``layer``'s output, ``None`` unless it is a virtual activation.

    ``VLinear`` / ``VConv2d`` / ``VBatchNorm*`` / ``VInput`` layers are read from their
    attributes; any other layer of a virtual model (a block such as ``VConvBN``, a ReLU, a
    stage) by one forward pass on a zero batch (eval mode, no gradients).

    >>> from branchnet.virtual import vcnn
    >>> net = vcnn((4, 8), 3, branches=2, shared_frac=0.5, input_shape=(3, 8, 8))
    >>> virtual_layout(net, "features.0.0.conv"), virtual_layout(net, "features.1")
    (VirtualLayout(branches=2, units=4, shared=2), VirtualLayout(branches=2, units=8, shared=4))
    """
    module = _get_module(model, layer)
    k = virtual_branches(model)
    if k is None:
        return None
    layout = _branch_layout(module)
    if layout is not None:
        return VirtualLayout(*layout)
    return _probe_layout(model, module, layer, k)


def virtual_unit_kinds(model: nn.Module, layer: str) -> list[str]:
    """``"shared"`` or ``"unique"`` for each of the ``K*C`` units of a virtual layer (unit
    ``k*C + c`` = channel ``c`` of branch ``k``; each branch's first ``shared_out`` are shared).

    Shared units use the tied shared->shared weights; in a first layer (which reads the same
    input in every branch) they are exact copies in every branch.

    >>> from branchnet.virtual import vmlp
    >>> virtual_unit_kinds(vmlp([4, 4], 2, branches=2, shared_frac=0.5), "hidden.0.linear")
    ['shared', 'shared', 'unique', 'unique', 'shared', 'shared', 'unique', 'unique']
    """
    layout = virtual_layout(model, layer)
    if layout is None:
        raise AnalysisError(f"layer {layer!r} is not a virtual-branch layer (output (B, K, C, ...))")
    kinds = layout.kinds()
    if kinds is None:
        raise AnalysisError(
            f"cannot tell the shared units of layer {layer!r}: no module before it states the "
            "split of its output (shared_out); ask for a VLinear / VConv2d / VBatchNorm or block"
        )
    return kinds


def _virtual_partition(layout: VirtualLayout, layer: str) -> Partition:
    if layout.branches < 2:
        raise AnalysisError(
            f"layer {layer!r} is a virtual layer with {layout.branches} branch: it is not branched"
        )
    return Partition.from_sizes([layout.units] * layout.branches).with_kinds(layout.kinds())


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
    * A virtual-branch layer (output ``(B, K, C, ...)``, see :func:`virtual_layout`) splits into
      its K branches: branch ``k`` holds units ``k*C .. k*C + C - 1`` (:func:`units_view`), and
      ``Partition.kinds`` says which are ``"shared"`` and which ``"unique"`` (when known).
    * Otherwise the layer is not branched and :class:`AnalysisError` says so.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2))
    >>> infer_partition(net, "0")
    Partition(8 units; 'branch 0': 4, 'branch 1': 4)
    >>> from branchnet.virtual import vmlp
    >>> p = infer_partition(vmlp([4, 4], 2, branches=2, shared_frac=0.25), "hidden.0")
    >>> p, p.kinds[:4]
    (Partition(8 units; 'branch 0': 4, 'branch 1': 4), ('shared', 'unique', 'unique', 'unique'))
    """
    module = _get_module(model, layer)
    layout = virtual_layout(model, layer)
    if layout is not None:
        return _virtual_partition(layout, layer)
    width = _out_units(module)
    if width is None:
        raise AnalysisError(
            f"cannot infer a partition for layer {layer!r} ({type(module).__name__}): only "
            "nn.Conv2d and nn.Linear layers and virtual-branch layers are understood; pass "
            "partition=Partition(...) "
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
