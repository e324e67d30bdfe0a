"""Selective classification: confidence scores, acceptance thresholds, risk–coverage analysis.

A selective classifier predicts ``f(x)`` when its confidence ``κ(x) >= θ`` and abstains
otherwise. *Coverage* is the fraction accepted; *selective risk* is the error rate among the
accepted. Everywhere in this module a **higher score means more confident**, and a point is
accepted iff ``score >= threshold``. A learned score plugs in unchanged:
:mod:`branchnet.selfcheck` trains a head on a tapped layer to predict whether the parent is
right (ConfidNet); choose its threshold on rows independent of that head's training rows.

Three ways to choose ``θ``:

* fixed — e.g. the original Neural-Branching rule, accept iff max softmax ``>= 0.96``
  (:data:`ORIGINAL_THRESHOLD`);
* :func:`coverage_threshold` — accept a requested fraction of calibration points;
* :func:`sgr_threshold` — *Selection with Guaranteed Risk* (Geifman & El-Yaniv, 2017).

**The SGR guarantee.** Given ``m`` labelled calibration points drawn i.i.d. from the same
distribution as the test points, a target risk ``r*`` and a confidence ``δ``,
:func:`sgr_threshold` returns a threshold ``θ`` such that, *with probability at least 1 − δ
over the draw of the calibration set*, the selective risk of ``θ`` on the underlying
distribution (hence on i.i.d. test points, in expectation) is at most ``r*``. Each of the
``k = ⌈log2 m⌉`` thresholds the bisection tests is bounded with a one-sided Clopper–Pearson
bound at level ``δ/k``; a union bound over them gives the overall ``δ``. The guarantee is about
the *population* risk, not the risk on any particular test set, and it says nothing about
coverage: when no tested threshold is certified, the result abstains on everything
(``threshold = +inf``, ``feasible = False``).

Example:
    >>> import torch
    >>> logits = torch.tensor([[4.0, 0.0], [0.2, 0.0], [0.0, 5.0]])
    >>> scores = confidence(logits)                 # max softmax
    >>> correct = torch.tensor([True, False, True])
    >>> m = selective_metrics(scores, correct, ORIGINAL_THRESHOLD)
    >>> m["accepted"], m["accuracy_on_accepted"]
    (2, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import stats
from scipy.special import xlogy

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ArrayLike = torch.Tensor | np.ndarray | Sequence[float] | Sequence[bool]

CONFIDENCE_KINDS: tuple[str, ...] = ("msp", "margin", "entropy", "energy")
"""Confidence scores :func:`confidence` knows; all are "higher = more confident"."""

ORIGINAL_THRESHOLD: float = 0.96
"""The original Neural-Branching acceptance rule: accept iff max softmax >= 0.96.

(The original compares ``round(100 * msp, 2) >= 96.0``, which also accepts msp in
``[0.95995, 0.96)``; use ``0.95995`` to reproduce it to the last example.)
"""

__all__ = [
    "CONFIDENCE_KINDS",
    "ORIGINAL_THRESHOLD",
    "SGRResult",
    "aurc",
    "aurc_star",
    "confidence",
    "coverage_threshold",
    "eaurc",
    "plot_risk_coverage",
    "risk_coverage_curve",
    "selective_metrics",
    "sgr_threshold",
]


# --------------------------------------------------------------------------- input helpers


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def _scores_1d(scores: ArrayLike, name: str = "scores") -> np.ndarray:
    """Scores as a 1-D float array, keeping float32 as float32.

    Keeping the dtype matters: a float32 score of 0.96 is 0.9599999785 in float64 and would
    fail ``>= 0.96``; NumPy compares a float32 array with a Python float in float32.
    """
    s = _to_numpy(scores)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per example), got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError(f"{name} contains NaN at positions {np.flatnonzero(np.isnan(s))[:5]}")
    return s


def _correct_1d(correct: ArrayLike, n: int) -> np.ndarray:
    c = _to_numpy(correct)
    if c.ndim != 1 or c.shape[0] != n:
        raise ValueError(f"correct must be 1-D with one entry per score ({n}), got shape {c.shape}")
    if c.dtype != np.bool_:
        if not np.isin(c, (0, 1)).all():
            raise ValueError("correct must be booleans or 0/1 values (1 = prediction is right)")
        c = c.astype(bool)
    return c


def _scores_and_correct(scores: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = _scores_1d(scores)
    if s.size == 0:
        raise ValueError("scores is empty; need at least one example")
    return s, _correct_1d(correct, s.size)


# --------------------------------------------------------------------------- confidence


def confidence(
    logits: ArrayLike,
    kind: str = "msp",
    *,
    from_probs: bool = False,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Confidence score per example from logits ``[..., C]`` (or probabilities); higher = surer.

    Kinds: ``"msp"`` max softmax probability; ``"margin"`` top-1 minus top-2 probability;
    ``"entropy"`` negative entropy of the softmax (nats); ``"energy"`` negative energy
    ``T * logsumexp(logits / T)``. ``temperature`` divides the logits before the softmax for every
    kind. With ``from_probs=True`` the input is already a probability vector per row
    (``"energy"`` then needs logits and is refused).

    Example:
        >>> import torch
        >>> z = torch.tensor([[2.0, 0.0, 0.0]])
        >>> round(confidence(z).item(), 4), round(confidence(z, "margin").item(), 4)
        (0.787, 0.6805)
        >>> round(confidence(torch.tensor([[0.5, 0.5]]), "entropy", from_probs=True).item(), 4)
        -0.6931
    """
    if kind not in CONFIDENCE_KINDS:
        raise ValueError(f"unknown confidence kind {kind!r}; expected one of {CONFIDENCE_KINDS}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = torch.as_tensor(logits)
    if not torch.is_floating_point(x):
        x = x.float()
    if x.ndim == 0 or x.shape[-1] < 1:
        raise ValueError(f"expected scores of shape [..., C] with C >= 1, got {tuple(x.shape)}")
    if from_probs:
        if kind == "energy":
            raise ValueError("kind='energy' needs logits; it is undefined for probabilities")
        if temperature != 1.0:
            raise ValueError("temperature applies to logits; pass from_probs=False to use it")
        _check_probs(x)
        probs = x
    else:
        if kind == "energy":
            return temperature * torch.logsumexp(x / temperature, dim=-1)
        probs = torch.softmax(x / temperature, dim=-1)
    return _prob_confidence(probs, kind)


def _check_probs(p: torch.Tensor, tol: float = 1e-3) -> None:
    if (p < -tol).any() or (p > 1 + tol).any():
        raise ValueError("from_probs=True but values lie outside [0, 1]; did you pass logits?")
    sums = p.sum(dim=-1)
    if ((sums - 1).abs() > tol).any():
        bad = sums[((sums - 1).abs() > tol)][0].item()
        raise ValueError(f"from_probs=True but a row sums to {bad:.4g}, not 1; pass logits?")


def _prob_confidence(probs: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "msp":
        return probs.max(dim=-1).values
    if kind == "margin":
        if probs.shape[-1] < 2:
            raise ValueError("kind='margin' needs at least 2 classes")
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    # entropy: 0 * log 0 = 0 via xlogy
    return torch.special.xlogy(probs, probs).sum(dim=-1)


# --------------------------------------------------------------------------- thresholds


def coverage_threshold(scores: ArrayLike, coverage: float) -> float:
    """Largest threshold that accepts at least ``coverage`` of the (calibration) scores.

    Accepted means ``score >= threshold``. Ties at the threshold are all accepted, so the
    realised coverage can exceed the request. ``coverage = 0`` gives ``+inf`` (abstain on all).

    Example:
        >>> coverage_threshold([0.1, 0.9, 0.5, 0.7], 0.5)
        0.7
        >>> coverage_threshold([0.1, 0.9, 0.5, 0.7], 0.6)   # 3 of 4 needed
        0.5
    """
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage must be in [0, 1], got {coverage}")
    s = _scores_1d(scores)
    n = s.size
    if n == 0:
        raise ValueError("scores is empty; need at least one calibration score")
    if coverage == 0.0:
        return math.inf
    k = min(n, math.ceil(coverage * n))
    if k > 1 and (k - 1) / n >= coverage:  # guard against ceil of a float like 3.0000000000000004
        k -= 1
    return float(np.sort(s)[::-1][k - 1])


@dataclass(frozen=True)
class SGRResult:
    """Outcome of :func:`sgr_threshold`.

    Attributes:
        threshold: accept iff ``score >= threshold``; ``+inf`` when infeasible (abstain on all).
        risk_bound: Clopper–Pearson upper bound on the selective risk of ``threshold`` (at
            level ``delta / k``). When infeasible: the tightest bound any tested threshold
            reached (> ``target_risk``), as a diagnostic.
        empirical_risk: error rate among accepted calibration points (NaN when infeasible).
        coverage: fraction of calibration points accepted (0 when infeasible).
        target_risk, delta, m: the request and the calibration-set size.
        feasible: whether some tested threshold certified ``risk <= target_risk``.
    """

    threshold: float
    risk_bound: float
    empirical_risk: float
    coverage: float
    target_risk: float
    delta: float
    m: int
    feasible: bool

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable; ``inf`` / ``nan`` stay floats)."""
        return asdict(self)


def _risk_upper_bound(errors: int, n: int, delta: float) -> float:
    """One-sided Clopper–Pearson upper bound: b with BinomCDF(errors; n, b) = delta."""
    if errors >= n:
        return 1.0
    return float(stats.beta.ppf(1.0 - delta, errors + 1, n - errors))


def _validate_sgr(target_risk: float, delta: float) -> None:
    if not 0.0 < target_risk < 1.0:
        raise ValueError(f"target_risk must be in (0, 1), got {target_risk}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def sgr_threshold(
    scores: ArrayLike, correct: ArrayLike, target_risk: float, delta: float
) -> SGRResult:
    """Selection with Guaranteed Risk (Geifman & El-Yaniv, 2017, arXiv 1705.08500).

    Sorts the ``m`` calibration scores ascending and bisects over the index ``z`` for
    ``k = ⌈log2 m⌉`` steps (at least 1): the candidate threshold is the ``z``-th smallest score,
    its risk bound is the Clopper–Pearson upper bound at level ``delta / k`` on the accepted
    points; the search moves towards more coverage while the bound is ``<= target_risk``.
    Returns the tested threshold with the largest coverage whose bound is ``<= target_risk``
    (not simply the last iterate). See the module docstring for the guarantee.

    Like the paper's algorithm, the bisection assumes the bound falls as coverage grows, which
    is only roughly true (bounds on few accepted points are loose): near the attainable risk it
    can step towards low coverage and end infeasible although some untested threshold would
    certify. It also never tests the very lowest score (``z = 1``).

    Args:
        scores: confidence per calibration example (higher = more confident).
        correct: whether the classifier was right on each calibration example.
        target_risk: the selective risk to guarantee, in (0, 1).
        delta: allowed failure probability over the calibration draw, in (0, 1).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> s = rng.random(2000)
        >>> correct = rng.random(2000) > 0.3 * (1 - s)   # errors concentrate at low scores
        >>> r = sgr_threshold(s, correct, target_risk=0.1, delta=0.05)
        >>> r.feasible, r.risk_bound <= 0.1, 0.3 < r.coverage < 0.8
        (True, True, True)
    """
    _validate_sgr(target_risk, delta)
    s, c = _scores_and_correct(scores, correct)
    m = s.size
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    errors_sorted = (~c[order]).astype(np.int64)
    # errors_from[i] = errors among sorted positions i..m-1
    errors_from = np.concatenate([np.cumsum(errors_sorted[::-1])[::-1], [0]])

    k = max(1, math.ceil(math.log2(m)))
    level = delta / k
    z_min, z_max = 1, m  # 1-based indices into s_sorted
    best: tuple[float, int, int, float] | None = None  # (threshold, accepted, errors, bound)
    tightest = math.inf
    for _ in range(k):
        z = math.ceil((z_min + z_max) / 2)
        theta = float(s_sorted[z - 1])
        first = int(np.searchsorted(s_sorted, theta, side="left"))  # ties are accepted too
        n_acc, n_err = m - first, int(errors_from[first])
        bound = _risk_upper_bound(n_err, n_acc, level)
        tightest = min(tightest, bound)
        if bound <= target_risk:
            if best is None or n_acc > best[1]:
                best = (theta, n_acc, n_err, bound)
            z_max = z
        else:
            z_min = z

    if best is None:
        return SGRResult(math.inf, tightest, math.nan, 0.0, target_risk, delta, m, False)
    theta, n_acc, n_err, bound = best
    return SGRResult(theta, bound, n_err / n_acc, n_acc / m, target_risk, delta, m, True)


# --------------------------------------------------------------------------- evaluation


def selective_metrics(
    scores: ArrayLike, correct: ArrayLike, threshold: float
) -> dict[str, float | int | None]:
    """Coverage and risk of accepting ``score >= threshold``.

    Returns a dict with ``n``, ``threshold``, ``accepted`` (count), ``coverage``,
    ``selective_risk`` and ``accuracy_on_accepted`` (both ``None`` when nothing is accepted),
    and ``overall_accuracy`` (argmax accuracy on all examples, rejections ignored).

    Example:
        >>> m = selective_metrics([0.99, 0.97, 0.5, 0.3], [True, False, True, False], 0.96)
        >>> m["coverage"], m["selective_risk"], m["overall_accuracy"]
        (0.5, 0.5, 0.5)
        >>> selective_metrics([0.5], [True], 0.9)["accuracy_on_accepted"] is None
        True
    """
    s, c = _scores_and_correct(scores, correct)
    accept = s >= threshold
    n_acc = int(accept.sum())
    acc_on = float(c[accept].mean()) if n_acc else None
    return {
        "n": int(s.size),
        "threshold": float(threshold),
        "accepted": n_acc,
        "coverage": n_acc / s.size,
        "selective_risk": None if acc_on is None else 1.0 - acc_on,
        "accuracy_on_accepted": acc_on,
        "overall_accuracy": float(c.mean()),
    }


def _sorted_groups(s: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sizes and error counts of tie groups, most confident group first."""
    order = np.argsort(-s, kind="stable")
    s_desc, err_desc = s[order], (~c[order]).astype(np.float64)
    starts = np.flatnonzero(np.r_[True, s_desc[1:] != s_desc[:-1]])
    sizes = np.diff(np.r_[starts, s.size])
    errors = np.add.reduceat(err_desc, starts)
    return sizes, errors


def risk_coverage_curve(scores: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Risk–coverage curve: one point per distinct score, sweeping the threshold downwards.

    Examples with equal scores enter together (a threshold cannot split them), so the curve
    has one point per tie group. Returns ``(coverage, risk)``, coverage increasing, ending at
    ``(1.0, overall error)``.

    Example:
        >>> cov, risk = risk_coverage_curve([0.9, 0.8, 0.8, 0.1], [True, True, False, False])
        >>> cov.tolist(), risk.round(4).tolist()
        ([0.25, 0.75, 1.0], [0.0, 0.3333, 0.5])
    """
    s, c = _scores_and_correct(scores, correct)
    sizes, errors = _sorted_groups(s, c)
    accepted, errs = np.cumsum(sizes), np.cumsum(errors)
    return accepted / s.size, errs / accepted


def aurc(scores: ArrayLike, correct: ArrayLike) -> float:
    """Area under the risk–coverage curve: mean over ``k = 1..n`` of the top-``k`` risk.

    Ties are grouped: inside a tie group, errors are spread evenly, which equals the
    expectation of the classic AURC over all orderings of the tied examples (so permuting or
    re-breaking ties never changes the value).

    Example:
        >>> round(aurc([0.9, 0.8, 0.7], [True, False, True]), 4)   # (0 + 1/2 + 1/3) / 3
        0.2778
        >>> aurc([0.5, 0.5], [True, False])                     # (0.5 + 0.5) / 2
        0.5
    """
    s, c = _scores_and_correct(scores, correct)
    sizes, errors = _sorted_groups(s, c)
    before = np.r_[0.0, np.cumsum(errors)[:-1]]  # errors in earlier groups
    start = np.r_[0, np.cumsum(sizes)[:-1]]  # examples in earlier groups
    group = np.repeat(np.arange(sizes.size), sizes)
    k = np.arange(1, s.size + 1, dtype=np.float64)
    expected_errors = before[group] + (k - start[group]) * (errors / sizes)[group]
    return float(np.mean(expected_errors / k))


def aurc_star(error_rate: float, n: int | None = None) -> float:
    """AURC of a perfect ranking (all errors last) at overall error ``error_rate``.

    With ``n=None`` the large-sample value ``r + (1 - r) ln(1 - r)``; with ``n`` examples the
    exact finite-sample optimum (errors ``round(r * n)``).

    Example:
        >>> aurc_star(0.0), aurc_star(1.0), round(aurc_star(0.2), 4)
        (0.0, 1.0, 0.0215)
        >>> round(aurc_star(0.5, n=2), 4)    # ranks: right, wrong -> (0 + 1/2) / 2
        0.25
    """
    r = float(error_rate)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
    if n is None:
        return float(r + xlogy(1.0 - r, 1.0 - r))
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    n_err = round(r * n)
    k = np.arange(n - n_err + 1, n + 1, dtype=np.float64)
    return float(np.sum((k - (n - n_err)) / k) / n)


def eaurc(scores: ArrayLike, correct: ArrayLike, *, exact: bool = False) -> float:
    """Excess AURC: ``aurc - aurc_star(overall error)``; 0 for a perfect ranking.

    ``exact=True`` subtracts the finite-sample optimum (then a perfect ranking gives exactly 0);
    the default uses the usual large-sample formula (a perfect ranking gives ``O(1/n)``).

    Example:
        >>> eaurc([0.9, 0.8, 0.1], [True, True, False], exact=True)
        0.0
    """
    s, c = _scores_and_correct(scores, correct)
    r = 1.0 - float(c.mean())
    return aurc(s, c) - aurc_star(r, n=s.size if exact else None)


def plot_risk_coverage(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]], ax: Axes | None = None
) -> Figure:
    """Plot risk–coverage curves, one per ``name -> (scores, correct)``; legend shows AURC.

    Draws on ``ax`` if given, else on a new Figure (no pyplot, never shown). Returns the figure.

    Example:
        >>> fig = plot_risk_coverage({"msp": ([0.9, 0.5, 0.2], [True, True, False])})
        >>> fig.axes[0].get_xlabel()
        'coverage'
    """
    from matplotlib.figure import Figure

    if ax is None:
        fig = Figure(figsize=(5, 4), layout="constrained")
        ax = fig.add_subplot()
    for name, (scores, correct) in curves.items():
        cov, risk = risk_coverage_curve(scores, correct)
        label = f"{name} (AURC {1000 * aurc(scores, correct):.1f}e-3)"
        ax.plot(cov, risk, label=label)
    ax.set_xlabel("coverage")
    ax.set_ylabel("selective risk")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="upper left")
    return ax.figure
