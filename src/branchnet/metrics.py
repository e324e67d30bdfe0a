"""Classification metrics shared by all of branchnet.

* flat: :func:`accuracy`, :func:`confusion_matrix`, :func:`per_class_table`;
* probabilistic: :func:`nll`, :func:`brier`, :func:`ece`;
* hierarchical: :func:`hierarchical_prf` (Kiritchenko et al. 2006, as in HiClass),
  with :func:`ancestor_set` to build its node sets;
* presentation: :func:`format_table`, :func:`plot_confusion`.

Conventions: labels are class indices; a prediction of ``-1`` means *abstained*. Abstentions
count as wrong in :func:`accuracy` and are left out of :func:`confusion_matrix`.

Example:
    >>> import torch
    >>> pred, y = torch.tensor([0, 1, -1, 1]), torch.tensor([0, 1, 1, 0])
    >>> accuracy(pred, y)
    0.5
    >>> confusion_matrix(pred, y, 2).tolist()
    [[1, 1], [0, 1]]
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]

ABSTAIN: int = -1
"""Prediction value meaning "abstained"."""

__all__ = [
    "ABSTAIN",
    "accuracy",
    "ancestor_set",
    "brier",
    "confusion_matrix",
    "ece",
    "format_table",
    "hierarchical_prf",
    "nll",
    "per_class_table",
    "plot_confusion",
]


# --------------------------------------------------------------------------- helpers


def _labels(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D class indices, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must hold integer class indices, got dtype {t.dtype}")
    return t.long().cpu()


def _pred_and_target(pred: ArrayLike, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    p, t = _labels(pred, "pred"), _labels(y, "y")
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.numel()} entries but y has {t.numel()}; they must match")
    if p.numel() == 0:
        raise ValueError("pred and y are empty; need at least one example")
    return p, t


def _probs_and_target(probs: ArrayLike, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(probs).detach().cpu()
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, C] probabilities, got shape {tuple(p.shape)}")
    p = p.double()
    t = _labels(y, "y")
    if t.numel() != p.shape[0]:
        raise ValueError(f"probs has {p.shape[0]} rows but y has {t.numel()} labels")
    if p.shape[0] == 0:
        raise ValueError("probs is empty; need at least one example")
    if (t < 0).any() or (t >= p.shape[1]).any():
        raise ValueError(f"y must lie in [0, {p.shape[1]}) to index the {p.shape[1]} columns")
    bad = p.isnan().any() or (p < -1e-6).any() or (p > 1 + 1e-6).any()
    if bad or ((p.sum(1) - 1).abs() > 1e-3).any():
        raise ValueError(
            "probs must be probabilities (rows in [0, 1] summing to 1); "
            "apply softmax to logits first"
        )
    return p, t


# --------------------------------------------------------------------------- flat metrics


def accuracy(pred: ArrayLike, y: ArrayLike) -> float:
    """Fraction of examples whose prediction equals the label (abstentions, ``-1``, are wrong).

    Example:
        >>> accuracy([0, 2, -1, 1], [0, 2, 1, 0])
        0.5
    """
    p, t = _pred_and_target(pred, y)
    return float((p == t).double().mean())


def confusion_matrix(pred: ArrayLike, y: ArrayLike, num_classes: int) -> torch.Tensor:
    """Counts ``cm[true, predicted]`` (int64, ``[C, C]``), skipping abstentions (``pred == -1``).

    Hand-written (one ``bincount``) because torchmetrics' ``ignore_index`` filters on the
    target, not on the prediction.

    Example:
        >>> confusion_matrix([0, 1, 1, -1], [0, 0, 1, 1], 2).tolist()
        [[1, 1], [0, 1]]
    """
    p, t = _pred_and_target(pred, y)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    keep = p != ABSTAIN
    p, t = p[keep], t[keep]
    for name, v in (("pred", p), ("y", t)):
        if v.numel() and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(
                f"{name} has values outside [0, {num_classes}) (besides -1 = abstain): "
                f"min {int(v.min())}, max {int(v.max())}"
            )
    flat = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_table(
    pred: ArrayLike,
    y: ArrayLike,
    classes: Sequence[str],
    scores: ArrayLike | None = None,
    threshold: float | None = None,
) -> list[dict[str, Any]]:
    """One row per true class: support, accuracy, accepted, accuracy on accepted, confidence.

    An example is *accepted* when it was not abstained (``pred != -1``) and, if ``threshold``
    is given, ``score >= threshold``. ``accuracy_on_accepted`` and ``mean_confidence`` are
    ``None`` where undefined (nothing accepted / no scores / empty class).

    Example:
        >>> rows = per_class_table([0, 1, 1], [0, 0, 1], ["a", "b"], [0.9, 0.5, 0.99], 0.8)
        >>> [(r["class"], r["support"], r["accuracy"], r["accepted"]) for r in rows]
        [('a', 2, 0.5, 1), ('b', 1, 1.0, 1)]
    """
    p, t = _pred_and_target(pred, y)
    accepted = p != ABSTAIN
    s = None
    if scores is not None:
        s = torch.as_tensor(scores).detach().cpu().double()
        if s.shape != p.shape:
            raise ValueError(f"scores has shape {tuple(s.shape)}, expected {tuple(p.shape)}")
        if threshold is not None:
            accepted &= s >= threshold
    elif threshold is not None:
        raise ValueError("threshold given without scores; pass the confidence scores too")

    rows = []
    for k, name in enumerate(classes):
        mine = t == k
        n, n_acc = int(mine.sum()), int((mine & accepted).sum())
        right = p == t
        rows.append(
            {
                "class": name,
                "support": n,
                "accuracy": float(right[mine].double().mean()) if n else None,
                "accepted": n_acc,
                "accuracy_on_accepted": (
                    float(right[mine & accepted].double().mean()) if n_acc else None
                ),
                "mean_confidence": float(s[mine].mean()) if (s is not None and n) else None,
            }
        )
    return rows


# --------------------------------------------------------------------------- probabilistic


def nll(probs: ArrayLike, y: ArrayLike, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``-log p[y]`` (probabilities clamped at ``eps``).

    Example:
        >>> round(nll([[0.5, 0.5], [0.9, 0.1]], [0, 0]), 4)     # (ln 2 + ln(1/0.9)) / 2
        0.3993
    """
    p, t = _probs_and_target(probs, y)
    return float(-p[torch.arange(t.numel()), t].clamp_min(eps).log().mean())


def brier(probs: ArrayLike, y: ArrayLike) -> float:
    """Multi-class Brier score: mean over examples of ``sum_c (p_c - 1[c = y])**2`` (in [0, 2]).

    Example:
        >>> brier([[1.0, 0.0], [0.5, 0.5]], [0, 1])          # (0 + 0.5) / 2
        0.25
    """
    p, t = _probs_and_target(probs, y)
    onehot = torch.nn.functional.one_hot(t, p.shape[1]).double()
    return float(((p - onehot) ** 2).sum(1).mean())


def ece(probs: ArrayLike, y: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence (L1, ``n_bins`` equal-width bins).

    Uses torchmetrics' ``multiclass_calibration_error`` (same definition as torch-uncertainty).

    Example:
        >>> p = [[0.8, 0.2]] * 5                  # 80% confident, 4 of 5 right: calibrated
        >>> round(ece(p, [0, 0, 0, 0, 1]), 6), round(ece(p, [0, 0, 0, 0, 0]), 6)
        (0.0, 0.2)
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, t = _probs_and_target(probs, y)
    value = multiclass_calibration_error(p, t, num_classes=p.shape[1], n_bins=n_bins, norm="l1")
    return float(value)


# --------------------------------------------------------------------------- hierarchical


def ancestor_set(node: Hashable, parent: Mapping[Hashable, Hashable | None]) -> set[Hashable]:
    """``node`` and all its ancestors, excluding the root (the node with no parent).

    ``parent`` maps each non-root node to its parent (the root may map to ``None`` or be
    absent).

    Example:
        >>> tree = {"fish": "animal", "shark": "fish", "animal": "root"}
        >>> sorted(ancestor_set("shark", tree))
        ['animal', 'fish', 'shark']
        >>> ancestor_set("root", tree)
        set()
    """
    if node not in parent and node not in set(parent.values()):
        raise ValueError(f"unknown node {node!r}: not in the hierarchy")
    out: set[Hashable] = set()
    while parent.get(node) is not None:
        if node in out:
            raise ValueError(f"the hierarchy has a cycle through {node!r}")
        out.add(node)
        node = parent[node]
    return out


def _safe_div(a: float, b: float) -> float:
    return a / b if b else 0.0


def _f1(p: float, r: float) -> float:
    return _safe_div(2 * p * r, p + r)


def _as_sets(items: Iterable[Iterable[Hashable]], name: str) -> list[set[Hashable]]:
    items = list(items)
    if any(isinstance(x, str) for x in items):
        raise ValueError(
            f"{name} must hold one *set* of node names per example (the node and its "
            "ancestors, see ancestor_set), not bare node names"
        )
    return [set(x) for x in items]


def hierarchical_prf(
    pred_sets: Iterable[Iterable[Hashable]],
    true_sets: Iterable[Iterable[Hashable]],
    average: str = "micro",
) -> dict[str, float]:
    """Hierarchical precision, recall and F1 (Kiritchenko et al. 2006; HiClass definitions).

    Each element is a *set* of node names: the predicted (resp. true) node and all its
    ancestors, excluding the root (see :func:`ancestor_set`). With ``a`` predicted and ``b``
    true sets: micro ``hP = Σ|a∩b| / Σ|a|``, ``hR = Σ|a∩b| / Σ|b|``, ``hF = 2 hP hR /
    (hP + hR)``; macro averages per-example ``hP_i``, ``hR_i`` and ``hF_i``.

    Abstentions: an empty predicted set (abstained at the root) adds 0 to the numerators and
    nothing to hP's denominator — in macro mode it is left out of the hP average — so abstaining
    never lowers precision, only recall (``hR_i = hF_i = 0``). Stopping at an inner node is a
    partial prediction and is scored naturally. A quantity whose denominator is 0 is 0.

    Example:
        >>> pred = [{"animal", "fish"}, {"animal", "fish", "shark"}, set()]
        >>> true = [{"animal", "fish", "shark"}, {"animal", "bird", "owl"}, {"animal"}]
        >>> m = hierarchical_prf(pred, true)
        >>> round(m["hP"], 4), round(m["hR"], 4), round(m["hF"], 4)  # 3/5, 3/7
        (0.6, 0.4286, 0.5)
    """
    if average not in ("micro", "macro"):
        raise ValueError(f"average must be 'micro' or 'macro', got {average!r}")
    preds, trues = _as_sets(pred_sets, "pred_sets"), _as_sets(true_sets, "true_sets")
    if len(preds) != len(trues):
        raise ValueError(f"{len(preds)} predicted sets but {len(trues)} true sets; must match")
    if not trues:
        raise ValueError("no examples: pred_sets and true_sets are empty")
    if any(not b for b in trues):
        raise ValueError("a true set is empty; every true label must be a non-root node")
    inter = [len(a & b) for a, b in zip(preds, trues, strict=True)]
    if average == "micro":
        hp = _safe_div(sum(inter), sum(len(a) for a in preds))
        hr = _safe_div(sum(inter), sum(len(b) for b in trues))
        return {"hP": hp, "hR": hr, "hF": _f1(hp, hr)}
    hp_i = [i / len(a) for i, a in zip(inter, preds, strict=True) if a]
    hr_i = [i / len(b) for i, b in zip(inter, trues, strict=True)]
    hf_i = [_f1(i / len(a), r) if a else 0.0 for i, a, r in zip(inter, preds, hr_i, strict=True)]
    return {
        "hP": float(np.mean(hp_i)) if hp_i else 0.0,
        "hR": float(np.mean(hr_i)),
        "hF": float(np.mean(hf_i)),
    }


# --------------------------------------------------------------------------- presentation


def _cell(v: Any, floatfmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return "nan" if math.isnan(v) else format(float(v), floatfmt)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return _cell(v.item(), floatfmt)
    return str(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".4f"
) -> str:
    """Aligned plain-text table: header, rule, one line per row; numbers right-aligned.

    ``columns`` defaults to every key in order of first appearance; missing values and
    ``None`` print as ``-``; floats use ``floatfmt``.

    Example:
        >>> print(format_table([{"class": "crab", "acc": 0.8}, {"class": "shark", "acc": 1}]))
        class     acc
        -----  ------
        crab   0.8000
        shark       1
    """
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    if not columns:
        return ""
    cells = [[_cell(row.get(c), floatfmt) for c in columns] for row in rows]
    numeric = [
        any(_is_number(row.get(c)) for row in rows)
        and all(row.get(c) is None or _is_number(row.get(c)) for row in rows)
        for c in columns
    ]
    widths = [max([len(str(c))] + [len(r[j]) for r in cells]) for j, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line([str(c) for c in columns]), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def plot_confusion(
    cm: ArrayLike, classes: Sequence[str], normalize: bool = False, title: str | None = None
) -> Figure:
    """Heat map of ``cm[true, predicted]`` with counts (or row fractions if ``normalize``).

    Returns a new matplotlib Figure (no pyplot, never shown).

    Example:
        >>> fig = plot_confusion([[5, 1], [0, 4]], ["cat", "dog"])
        >>> fig.axes[0].get_ylabel()
        'true'
    """
    from matplotlib.figure import Figure

    m = torch.as_tensor(cm).detach().cpu().double().numpy()
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(classes):
        raise ValueError(
            f"cm must be square [C, C] with C = len(classes) = {len(classes)}, got {m.shape}"
        )
    if normalize:
        m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = 1.5 + 0.5 * len(classes)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax)
    ticks = range(len(classes))
    ax.set_xticks(ticks, labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(ticks, labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    high = m.max() / 2 if m.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            text = f"{m[i, j]:.2f}" if normalize else f"{int(m[i, j])}"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                color="white" if m[i, j] > high else "black",
                fontsize=8,
            )
    return fig


def mean_std_rows(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Group ``rows`` by ``keys``; numbers become ``"mean ± std"`` strings, with the count ``n``.

    >>> mean_std_rows([{"k": 1, "acc": 0.5}, {"k": 1, "acc": 0.7}], ["k"])
    [{'k': '1', 'n': 2, 'acc': '0.6000 ± 0.1414'}]
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(str(r.get(k)) for k in keys), []).append(r)
    out = []
    for key, members in sorted(groups.items(), key=lambda kv: [_sortable(v) for v in kv[0]]):
        row: dict[str, Any] = dict(zip(keys, key, strict=True))
        row["n"] = len(members)
        for col in members[0]:
            if col in keys:
                continue
            vals = [m[col] for m in members if isinstance(m.get(col), (int, float))
                    and m[col] is not None and math.isfinite(m[col])]
            if not vals:
                continue
            if all(isinstance(v, int) and not isinstance(v, bool) for v in vals) and len(set(vals)) == 1:
                row[col] = f"{vals[0]:,}"  # a count that does not vary: parameters
            else:
                row[col] = (f"{np.mean(vals):.4f} ± {np.std(vals, ddof=1):.4f}" if len(vals) > 1
                            else f"{vals[0]:.4f}")
        out.append(row)
    return out


def _sortable(v: str) -> tuple[int, Any]:
    try:
        return (0, float(v))
    except ValueError:
        return (1, v)
