"""Class hierarchies induced from what a trained parent knows (``Hierarchy.induce``).

Three sources, each clustered into ``groups`` children per internal node, ``depth`` levels of
groups deep (a group with more classes than ``groups`` is split again while depth is left):

* ``confusion`` (HD-CNN): spectral clustering of the parent's confusion matrix on validation
  data; affinity = the symmetrised confusion rates, diagonal removed, plus a small floor so the
  graph is connected.
* ``features``: agglomerative clustering (average linkage, cosine distance) of the class means
  of a tapped layer.
* ``weights`` (NBDT): agglomerative clustering (Ward linkage) of the L2-normalised class rows of
  the last layer's weight matrix.

The functions here return nested groups of class indices; :meth:`Hierarchy.induce` names them
and builds the tree. Groups are named after their members: the two members nearest the
group's centre joined by ``+``, and ``+N`` for the N others (``cat+dog+2``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.cluster import AgglomerativeClustering, SpectralClustering
from sklearn.metrics import adjusted_rand_score, confusion_matrix

from branchnet.data.errors import DataError

METHODS = ("confusion", "features", "weights")
#: affinity added to every pair of classes, relative to the largest confusion rate
_FLOOR = 1e-3

Groups = list[Any]  # nested: a class index (int) or a list of Groups


def _matrix(value: Any, name: str, n_classes: int, square: bool) -> np.ndarray:
    a = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value,
                   dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != n_classes or (square and a.shape[1] != n_classes):
        want = f"[{n_classes}, {n_classes}]" if square else f"[{n_classes}, D]"
        raise DataError(f"{name} must be a {want} matrix for {n_classes} classes, got shape "
                        f"{tuple(a.shape)}")
    if not np.isfinite(a).all():
        raise DataError(f"{name} holds NaN or infinite values")
    return a


def check_shape(n_classes: int, groups: int, depth: int) -> None:
    """One-line errors for a tree shape that cannot be built."""
    if not isinstance(groups, (int, np.integer)) or groups < 2:
        raise DataError(f"groups must be an integer >= 2 (children per internal node), got "
                        f"{groups!r}")
    if groups > n_classes:
        raise DataError(f"groups={groups} but there are only {n_classes} classes; ask for at "
                        "most as many groups as classes")
    if not isinstance(depth, (int, np.integer)) or depth < 1:
        raise DataError(f"depth must be an integer >= 1 (levels of groups), got {depth!r}")


def confusion_affinity(confusion: Any, classes: list[str]) -> np.ndarray:
    """The symmetric affinity of spectral clustering from a confusion matrix (rows: true)."""
    c = _matrix(confusion, "confusion", len(classes), square=True)
    if (c < 0).any():
        raise DataError("confusion holds negative counts")
    never = [classes[i] for i in np.flatnonzero(c.sum(axis=0) == 0)]
    if never:
        raise DataError(f"the parent never predicts class(es) {never}: their confusions say "
                        "nothing about where they belong; use induce: features or weights")
    rates = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
    a = (rates + rates.T) / 2
    np.fill_diagonal(a, 0.0)
    a += _FLOOR * max(float(a.max()), 1e-12)
    np.fill_diagonal(a, 0.0)
    return a


def _split(method: str, data: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster labels in [0, k) for the classes (rows) of ``data``."""
    if method == "confusion":
        return SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed,
                                  assign_labels="kmeans", n_init=10).fit_predict(data)
    if method == "features":
        return AgglomerativeClustering(n_clusters=k, metric="cosine",
                                       linkage="average").fit_predict(data)
    return AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(data)


def induce_groups(method: str, source: np.ndarray, groups: int, depth: int,
                  seed: int) -> Groups:
    """Nested groups of row indices: ``source`` is the affinity (confusion) or the row
    vectors (features, weights, already normalised as the method wants)."""
    def build(idx: np.ndarray, levels: int) -> Groups:
        if len(idx) <= groups or levels == 0:
            return [int(i) for i in idx]
        sub = source[np.ix_(idx, idx)] if method == "confusion" else source[idx]
        labels = _split(method, sub, groups, seed)
        parts = [idx[labels == g] for g in range(groups) if (labels == g).any()]
        parts.sort(key=lambda p: int(p.min()))  # deterministic order: by smallest class index
        if len(parts) == 1:  # nothing told apart: the classes stay together
            return [int(i) for i in idx]
        return [int(p[0]) if len(p) == 1 else build(p, levels - 1) for p in parts]

    return build(np.arange(source.shape[0]), depth)


def prepare(method: str, source: Any, classes: list[str]) -> np.ndarray:
    """The method's input from its source: the affinity, or L2-normalised rows."""
    if method not in METHODS:
        raise DataError(f"induce must be one of {list(METHODS)}, got {method!r}")
    if method == "confusion":
        return confusion_affinity(source, classes)
    rows = _matrix(source, method, len(classes), square=False)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if (norms == 0).any():
        zero = [classes[i] for i in np.flatnonzero(norms[:, 0] == 0)]
        raise DataError(f"{method}: the rows of class(es) {zero} are all zero")
    return rows / norms


def name_groups(groups: Groups, classes: list[str], source: np.ndarray,
                method: str) -> dict[str, Any]:
    """The nested dict of :meth:`Hierarchy.from_dict`, each group named after its members."""
    taken = set(classes)

    def members(g: Any) -> list[int]:
        return [g] if isinstance(g, int) else [m for x in g for m in members(x)]

    def central(idx: list[int]) -> list[int]:
        if method == "confusion":  # most confused with the rest of the group
            score = source[np.ix_(idx, idx)].sum(axis=1)
            return [idx[i] for i in np.argsort(-score, kind="stable")]
        centre = source[idx].mean(axis=0)
        dist = np.linalg.norm(source[idx] - centre, axis=1)
        return [idx[i] for i in np.argsort(dist, kind="stable")]

    def name(idx: list[int]) -> str:
        top = [classes[i] for i in central(idx)[:2]]
        base = "+".join(top) + (f"+{len(idx) - 2}" if len(idx) > 2 else "")
        out, k = base, 2
        while out in taken:
            out, k = f"{base}-{k}", k + 1
        taken.add(out)
        return out

    def build(g: Groups) -> list[Any]:
        return [classes[x] if isinstance(x, int) else {name(members(x)): build(x)} for x in g]

    return {"root": build(groups)}


def confusion_from_predictions(pred: Any, y: Any, n_classes: int) -> np.ndarray:
    """``[C, C]`` counts, rows the true class, columns the predicted one."""
    return confusion_matrix(np.asarray(y), np.asarray(pred), labels=list(range(n_classes)))


def class_means(features: Any, y: Any, n_classes: int) -> np.ndarray:
    """``[C, D]`` mean of the (flattened) features of each class."""
    x = torch.as_tensor(features).flatten(1).double()
    y = torch.as_tensor(y).long()
    counts = torch.bincount(y, minlength=n_classes)
    if (counts == 0).any():
        raise DataError(f"class_means: classes {torch.nonzero(counts == 0).flatten().tolist()} "
                        "have no rows")
    sums = torch.zeros(n_classes, x.shape[1], dtype=torch.float64).index_add_(0, y, x)
    return (sums / counts[:, None]).numpy()


def output_weights(model: torch.nn.Module, n_classes: int) -> np.ndarray:
    """The weight matrix ``[C, D]`` of the last ``nn.Linear`` with ``n_classes`` outputs."""
    found = [m for m in model.modules()
             if isinstance(m, torch.nn.Linear) and m.out_features == n_classes]
    if not found:
        raise DataError(f"{type(model).__name__} has no nn.Linear layer with {n_classes} "
                        "outputs to read class weights from; use induce: confusion or features")
    return found[-1].weight.detach().cpu().double().numpy()


def agreement(labels_a: Any, labels_b: Any) -> float:
    """Adjusted Rand index of two flat assignments of the same items."""
    return float(adjusted_rand_score(np.asarray(labels_a), np.asarray(labels_b)))
