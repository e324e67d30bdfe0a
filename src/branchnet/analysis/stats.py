"""Statistics for branch specialization: is a property concentrated in one branch by chance?

* :func:`hypergeom_all_in`, :func:`enrichment_pvalue`, :func:`branch_table` — a family of units
  (e.g. the colour detectors) and how many of them landed in each branch, against the
  hypergeometric null "branch membership is random";
* :func:`permutation_test` — any per-unit property, shuffling membership at fixed branch sizes;
* :func:`mutual_information`, :func:`cramers_v` — association of two labelings of the units;
* :func:`linear_cka` — similarity of two sets of units' activations;
* :func:`ablation` — per-class accuracy change when one branch's units are zeroed.

Example (the Distill article's two claims; it names no test, these are the exact tails):
    >>> f"{hypergeom_all_in(9, 32, 256):.3g}"       # all 9 BW-vs-colour units in 32 of 256
    '2.48e-09'
    >>> f"{hypergeom_all_in(30, 96, 480):.3g}"      # all 30 curve units in 96 of 480
    '1.68e-23'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from branchnet.analysis.partitions import (
    AnalysisError,
    Partition,
    _get_module,
    ensemble_logits,
    units_view,
    virtual_branches,
)
from branchnet.analysis.units import MIN_SAMPLES, ArrayLike, _array, _labels
from branchnet.data.dataset import Split

__all__ = [
    "PermutationResult",
    "ablation",
    "branch_table",
    "cramers_v",
    "enrichment_pvalue",
    "hypergeom_all_in",
    "linear_cka",
    "mutual_information",
    "permutation_test",
]

MIN_PERMUTATIONS = 100
"""Fewest permutations :func:`permutation_test` accepts (p-values are multiples of 1/(1+n))."""

_CHUNK_ELEMENTS = 2**24  # permutations are processed in chunks of about this many numbers

Statistic = str | Callable[[np.ndarray, np.ndarray], float]


# --------------------------------------------------------------------------- hypergeometric


def _count(v: int, name: str) -> int:
    if isinstance(v, bool) or int(v) != v or v < 0:
        raise AnalysisError(f"{name} must be a non-negative integer, got {v!r}")
    return int(v)


def hypergeom_all_in(k: int, branch_size: int, n_units: int) -> float:
    """P(all ``k`` units of a family fall in a branch of ``branch_size`` of ``n_units``).

    ``C(b, k) / C(N, k)`` with exact integer arithmetic (no overflow, correctly rounded).

    >>> hypergeom_all_in(1, 1, 2), hypergeom_all_in(3, 2, 10)
    (0.5, 0.0)
    """
    k, b, n = _count(k, "k"), _count(branch_size, "branch_size"), _count(n_units, "n_units")
    if b > n or k > n:
        raise AnalysisError(f"need k <= n_units and branch_size <= n_units, got {k}, {b}, {n}")
    return math.comb(b, k) / math.comb(n, k)


def enrichment_pvalue(k_in_branch: int, family_size: int, branch_size: int, n_units: int) -> float:
    """Hypergeometric ``P(X >= k)``: X = family members in a random branch of ``branch_size``.

    ``n_units`` units, ``family_size`` of them in the family; with ``k_in_branch ==
    family_size`` this equals :func:`hypergeom_all_in`.

    >>> round(enrichment_pvalue(2, 2, 2, 4), 4)        # both in a half: 1 / C(4, 2)
    0.1667
    """
    from scipy.stats import hypergeom

    k = _count(k_in_branch, "k_in_branch")
    fam, b = _count(family_size, "family_size"), _count(branch_size, "branch_size")
    n = _count(n_units, "n_units")
    if fam > n or b > n or k > min(fam, b):
        raise AnalysisError(
            "need k_in_branch <= min(family_size, branch_size) and both <= n_units, got "
            f"k={k}, family_size={fam}, branch_size={b}, n_units={n}"
        )
    if k == 0:
        return 1.0
    return float(min(1.0, max(0.0, hypergeom.sf(k - 1, n, fam, b))))


def branch_table(
    category_labels: Sequence[object] | np.ndarray, partition: Partition
) -> list[dict[str, Any]]:
    """One row per branch x category: observed and expected counts and ``P(X >= observed)``.

    ``category_labels[u]`` is unit ``u``'s category (any values). Expected counts assume
    random membership at the partition's sizes.

    >>> p = Partition.from_sizes([2, 2])
    >>> rows = branch_table(["colour", "colour", "bw", "bw"], p)
    >>> [(r["branch"], r["category"], r["observed"], r["expected"]) for r in rows][:2]
    [('branch 0', 'bw', 0, 1.0), ('branch 0', 'colour', 2, 1.0)]
    """
    cats = np.asarray(category_labels)
    n = partition.n_units
    if cats.ndim != 1 or cats.shape[0] != n:
        raise AnalysisError(
            f"category_labels must have one entry per unit ({n}), got shape {cats.shape}"
        )
    values, inverse = np.unique(cats, return_inverse=True)
    family_sizes = np.bincount(inverse, minlength=len(values))
    rows = []
    for name, members in zip(partition.names, partition.members, strict=True):
        observed = np.bincount(inverse[members], minlength=len(values))
        for c, value in enumerate(values):
            k, fam, b = int(observed[c]), int(family_sizes[c]), int(members.size)
            rows.append({
                "branch": name,
                "category": value.item() if hasattr(value, "item") else value,
                "observed": k,
                "expected": fam * b / n,
                "branch_size": b,
                "category_size": fam,
                "p_value": enrichment_pvalue(k, fam, b, n),
            })
    return rows


# --------------------------------------------------------------------------- permutation test


@dataclass(frozen=True)
class PermutationResult:
    """Observed statistic, its permutation null distribution and the one-sided p-value.

    ``p_value = (1 + #(null >= observed)) / (1 + n_permutations)`` (never 0).
    """

    observed: float
    null: np.ndarray = field(repr=False)
    p_value: float
    statistic: str = "mean_deviation"

    @property
    def n_permutations(self) -> int:
        return int(self.null.size)

    def to_dict(self, with_null: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "statistic": self.statistic,
            "observed": float(self.observed),
            "p_value": float(self.p_value),
            "n_permutations": self.n_permutations,
            "null_mean": float(self.null.mean()),
            "null_std": float(self.null.std()),
        }
        if with_null:
            out["null"] = self.null.tolist()
        return out


def _onehot_stats(values: np.ndarray, labels: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """mean_deviation for a batch ``labels [P, n]``: max_b ||mean_b - mean||, shape ``[P]``."""
    n_branches = sizes.size
    onehot = (labels[:, None, :] == np.arange(n_branches)[None, :, None]).astype(values.dtype)
    means = onehot @ values / sizes[None, :, None]  # [P, B, d]
    dev = np.linalg.norm(means - values.mean(axis=0), axis=2)
    return dev.max(axis=1)


def _mi_stats(categories: np.ndarray, labels: np.ndarray, n_categories: int, n_branches: int) -> np.ndarray:
    """Mutual information (nats) of ``categories`` with each row of ``labels [P, n]``."""
    p, n = labels.shape
    cells = n_categories * n_branches
    flat = (np.arange(p)[:, None] * cells + categories[None, :] * n_branches + labels).ravel()
    joint = np.bincount(flat, minlength=p * cells).reshape(p, n_categories, n_branches) / n
    pc = joint.sum(axis=2, keepdims=True)
    pb = joint.sum(axis=1, keepdims=True)
    ratio = np.divide(joint, pc * pb, out=np.ones_like(joint), where=joint > 0)
    return (joint * np.log(ratio)).sum(axis=(1, 2))


def permutation_test(
    values: ArrayLike,
    partition: Partition,
    statistic: Statistic = "mean_deviation",
    n_permutations: int = 2000,
    seed: int = 0,
) -> PermutationResult:
    """Test whether a per-unit property depends on branch membership.

    The null distribution shuffles which units belong to which branch, keeping every branch's
    size. ``statistic`` is

    * ``"mean_deviation"`` (default): ``max over branches of |branch mean - overall mean|``
      of ``values`` (``[n_units]``; for ``[n_units, d]`` the Euclidean norm of the difference);
    * ``"mutual_information"``: MI (nats) between ``values`` read as categories (e.g. cluster
      ids) and the branch labels;
    * a callable ``statistic(values, labels) -> float`` (``labels[u]`` = branch index of unit
      ``u``), called once per permutation — slower than the vectorised built-ins.

    Large values mean "more specialised". Needs >= 2 units per branch and >= 100 permutations.

    >>> v = np.r_[np.ones(5), np.zeros(5)]          # the property lives in branch 0
    >>> r = permutation_test(v, Partition.from_sizes([5, 5]), n_permutations=500)
    >>> r.observed, r.p_value < 0.05
    (0.5, True)
    """
    if partition.n_branches < 2:
        raise AnalysisError("a permutation test needs at least 2 branches")
    if min(partition.sizes) < 2:
        raise AnalysisError(
            f"a permutation test needs every branch to have >= 2 units; sizes are "
            f"{dict(zip(partition.names, partition.sizes, strict=True))}"
        )
    if int(n_permutations) < MIN_PERMUTATIONS:
        raise AnalysisError(
            f"n_permutations must be >= {MIN_PERMUTATIONS} (p-values are multiples of "
            f"1/(1 + n_permutations)), got {n_permutations}"
        )
    n_permutations = int(n_permutations)
    n = partition.n_units
    labels = partition.labels()
    sizes = np.asarray(partition.sizes, dtype=float)
    if isinstance(statistic, str) and statistic == "mutual_information":
        raw = np.asarray(values)
        if raw.ndim != 1 or raw.shape[0] != n:
            raise AnalysisError(f"values must be [n_units={n}] category labels, got shape {raw.shape}")
        cats, categories = np.unique(raw, return_inverse=True)
        compute = lambda lab: _mi_stats(categories, lab, len(cats), partition.n_branches)  # noqa: E731
        width = len(cats) * partition.n_branches
    elif isinstance(statistic, str) and statistic == "mean_deviation":
        v = _array(values, "values", (1, 2))
        if v.shape[0] != n:
            raise AnalysisError(f"values must have one row per unit ({n}), got shape {v.shape}")
        v = v.reshape(n, -1)
        compute = lambda lab: _onehot_stats(v, lab, sizes)  # noqa: E731
        width = partition.n_branches * max(n, v.shape[1])
    elif callable(statistic):
        fn = statistic
        compute = lambda lab: np.array([float(fn(values, row)) for row in lab])  # noqa: E731
        width = 1
    else:
        raise AnalysisError(
            f"unknown statistic {statistic!r}; use 'mean_deviation', 'mutual_information' "
            "or a callable(values, labels) -> float"
        )
    observed = float(compute(labels[None, :])[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n * width))
    null = np.empty(n_permutations)
    for start in range(0, n_permutations, chunk):
        rows = min(chunk, n_permutations - start)
        shuffled = rng.permuted(np.tile(labels, (rows, 1)), axis=1)
        null[start : start + rows] = compute(shuffled)
    tol = 1e-10 * max(1.0, abs(observed))  # ties (e.g. a swap of equal-sized branches)
    p = (1 + int(np.count_nonzero(null >= observed - tol))) / (1 + n_permutations)
    name = statistic if isinstance(statistic, str) else getattr(statistic, "__name__", "custom")
    return PermutationResult(observed, null, p, name)


# --------------------------------------------------------------------------- association


Labels = Sequence[object] | np.ndarray


def _categories(a: Labels, b: Labels) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise AnalysisError(f"need two non-empty 1-D labelings of equal length, got {a.shape}, {b.shape}")
    return np.unique(a, return_inverse=True)[1], np.unique(b, return_inverse=True)[1]


def mutual_information(a: Labels, b: Labels) -> float:
    """Mutual information (nats) between two labelings (scikit-learn's ``mutual_info_score``).

    >>> round(mutual_information([0, 0, 1, 1], ["x", "x", "y", "y"]), 4)    # = log 2
    0.6931
    """
    from sklearn.metrics import mutual_info_score

    ia, ib = _categories(a, b)
    return float(max(0.0, mutual_info_score(ia, ib)))


def cramers_v(a: Labels, b: Labels) -> float:
    """Cramér's V (0 = independent, 1 = one labeling determines the other), no bias correction.

    >>> cramers_v([0, 0, 1, 1], [1, 1, 0, 0]), cramers_v([0, 1, 0, 1], [0, 0, 1, 1])
    (1.0, 0.0)
    """
    ia, ib = _categories(a, b)
    r, c = ia.max() + 1, ib.max() + 1
    if min(r, c) < 2:
        return 0.0
    table = np.zeros((r, c))
    np.add.at(table, (ia, ib), 1.0)
    n = table.sum()
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / n
    chi2 = ((table - expected) ** 2 / expected).sum()
    return float(min(1.0, math.sqrt(chi2 / n / (min(r, c) - 1))))


def linear_cka(x: ArrayLike, y: ArrayLike) -> float:
    """Linear CKA ``||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F)`` on column-centred ``X [n, p]``, ``Y [n, q]``.

    1 for identical representations (and under orthogonal transforms and isotropic scaling),
    near 0 for independent ones; symmetric. NaN if either side is constant. Needs >= 10 rows.

    >>> rng = np.random.default_rng(0); x = rng.normal(size=(50, 4))
    >>> round(linear_cka(x, 3 * x), 6)
    1.0
    """
    a, b = _array(x, "X", 2), _array(y, "Y", 2)
    if a.shape[0] != b.shape[0]:
        raise AnalysisError(f"X and Y need the same samples (rows), got {a.shape[0]} and {b.shape[0]}")
    if a.shape[0] < MIN_SAMPLES:
        raise AnalysisError(f"linear CKA needs at least {MIN_SAMPLES} samples, got {a.shape[0]}")
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    den = np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)
    if den <= 0:
        return float("nan")
    return float(np.linalg.norm(b.T @ a) ** 2 / den)


# --------------------------------------------------------------------------- ablation


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> np.ndarray:
    from branchnet.taps import _model_device

    device = _model_device(model)
    branches = virtual_branches(model)
    preds = []
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        out = model(chunk if device is None else chunk.to(device))
        if isinstance(out, (tuple, list)):
            out = out[0]
        out = ensemble_logits(out, branches)  # a virtual model's (B, K, classes): their mean
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise AnalysisError(f"ablation needs a classifier returning logits [N, classes], got {shape}")
        preds.append(out.argmax(dim=1).cpu())
    return torch.cat(preds).numpy()


def ablation(
    model: nn.Module,
    layer: str,
    partition: Partition,
    x: torch.Tensor | Split,
    y: ArrayLike,
    n_classes: int,
    batch_size: int = 256,
    *,
    baseline_predictions: ArrayLike | None = None,
) -> dict[str, Any]:
    """Per-class accuracy when each branch's units of ``layer`` are zeroed, against baseline.

    A forward hook sets ``layer``'s output channels (dim 1) of one branch to 0; the model runs
    in eval mode without gradients (training flags restored). For a virtual-branch model the
    units are those of :func:`~branchnet.analysis.partitions.units_view` (``K*C``, branch-major)
    and accuracy is the ensemble's (mean of the branches' logits). Returns a dict:

    * ``"branches"`` — branch names; ``"baseline"`` — ``[classes]`` accuracy, nothing ablated;
    * ``"ablated"`` — ``[branches, classes]`` accuracy with that branch zeroed;
    * ``"drop"`` — ``ablated - baseline`` (negative = the branch was needed for that class);
    * ``"baseline_overall"``, ``"ablated_overall"`` — the same over all samples.

    Needs at least one sample of every class. ``baseline_predictions`` (the intact model's
    predicted classes for ``x``), when already at hand, saves one forward pass.

    >>> net = nn.Sequential(nn.Linear(2, 2))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.eye(2)); _ = net[0].bias.fill_(0.5)
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]); y = torch.tensor([0, 1])
    >>> r = ablation(net, "0", Partition.from_sizes([1, 1]), x, y, n_classes=2)
    >>> r["baseline"].tolist(), r["drop"].tolist()
    ([1.0, 1.0], [[-1.0, 0.0], [0.0, -1.0]])
    """
    from branchnet.taps import _frozen

    if isinstance(x, Split):
        x = x.x
    x = torch.as_tensor(x)
    lab = _labels(y, len(x))
    if n_classes < 1 or (lab.size and lab.max() >= n_classes):
        raise AnalysisError(f"labels must be in 0..{n_classes - 1} (n_classes={n_classes})")
    counts = np.bincount(lab, minlength=n_classes)
    if counts.min() < 1:
        raise AnalysisError(
            f"ablation needs at least 1 sample of every class; class(es) "
            f"{np.flatnonzero(counts == 0).tolist()} have none"
        )
    if batch_size < 1:
        raise AnalysisError(f"batch_size must be >= 1, got {batch_size}")
    module = _get_module(model, layer)
    branches = virtual_branches(model)

    def per_class(pred: np.ndarray) -> np.ndarray:
        return np.bincount(lab, weights=(pred == lab).astype(float), minlength=n_classes) / counts

    def zeroing(units: torch.Tensor) -> Callable[..., Any]:
        def hook(mod: nn.Module, args: Any, output: Any) -> Any:
            first = output[0] if isinstance(output, (tuple, list)) else output
            out = first.clone(memory_format=torch.contiguous_format)
            view = units_view(out, branches)  # (B, K, C, ...) -> (B, K*C, ...), a view of out
            if view.ndim < 2 or view.shape[1] != partition.n_units:
                raise AnalysisError(
                    f"layer {layer!r} outputs shape {tuple(first.shape)} but the partition has "
                    f"{partition.n_units} units (dim 1{', times K for a virtual layer' if branches else ''})"
                )
            view[:, units.to(out.device)] = 0
            return (out, *output[1:]) if isinstance(output, (tuple, list)) else out

        return hook

    if baseline_predictions is not None:
        base_pred = _labels(baseline_predictions, len(x))
    with _frozen(model):
        if baseline_predictions is None:
            base_pred = _predict(model, x, batch_size)
        ablated, overall = [], []
        for members in partition.members:
            handle = module.register_forward_hook(zeroing(torch.from_numpy(members)))
            try:
                pred = _predict(model, x, batch_size)
            finally:
                handle.remove()
            ablated.append(per_class(pred))
            overall.append(float((pred == lab).mean()))
    baseline = per_class(base_pred)
    ablated_arr = np.stack(ablated)
    return {
        "branches": list(partition.names),
        "baseline": baseline,
        "ablated": ablated_arr,
        "drop": ablated_arr - baseline,
        "baseline_overall": float((base_pred == lab).mean()),
        "ablated_overall": np.asarray(overall),
    }
