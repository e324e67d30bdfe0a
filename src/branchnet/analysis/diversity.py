"""Diversity and strength of an ensemble's members (any number K of members or branches).

* Breiman (2001) strength and correlation of a voting ensemble, for any K (REFERENCE 2.3):
  :func:`raw_margins`, :func:`breiman`;
* pairwise statistics on the members' correctness (REFERENCE 3.4; Kuncheva & Whitaker 2003):
  disagreement, double fault, Yule's Q and the correlation coefficient rho (:func:`pair_counts`,
  :func:`oracle_matrices`);
* label-free: disagreement of the predicted classes (:func:`prediction_disagreement`,
  per example :func:`sample_disagreement`), KL divergence between members (:func:`kl_matrix`)
  and the mutual information between prediction and member (:func:`ensemble_mi`);
* :func:`ensemble_report`: per-member and ensemble accuracy / NLL / Brier / ECE and all of the
  above, as JSON-able numbers.

Conventions: ``preds`` is ``(N, K)`` predicted classes, ``y`` ``(N,)`` labels, ``probs``
``(N, K, C)`` probabilities. Pairwise matrices are ``(K, K)`` numpy arrays; their averages run
over the K(K-1)/2 unordered pairs (ordered pairs for KL, which is not symmetric). A pair
statistic whose denominator is 0 is NaN (Q when ``N11 N00 = N01 N10 = 0``; rho when a member is
always right or always wrong) and is left out of the average; an average over no defined pair,
e.g. any pairwise average with K = 1, is NaN.

Example:
    >>> import torch
    >>> preds = torch.tensor([[0, 0, 1], [1, 1, 1], [2, 0, 2], [0, 0, 0]])
    >>> y = torch.tensor([0, 1, 2, 0])
    >>> b = breiman(preds, y, num_classes=3)
    >>> round(b["strength"], 4), round(b["correlation"], 4)     # member 0 is always right
    (0.6667, -0.3333)
    >>> float(oracle_matrices(preds, y)["disagreement"][0, 1])
    0.25
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from branchnet import metrics

__all__ = [
    "breiman",
    "correctness",
    "ensemble_mi",
    "ensemble_report",
    "entropy",
    "kl_matrix",
    "oracle_matrices",
    "pair_counts",
    "pair_mean",
    "pairwise_diversity",
    "prediction_disagreement",
    "raw_margins",
    "sample_disagreement",
]

ArrayLike = torch.Tensor | np.ndarray

_EPS = 1e-12


# --------------------------------------------------------------------------- input checks


def _ints(x: Any, name: str, ndim: int) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != ndim:
        want = "(N, K)" if ndim == 2 else "(N,)"
        raise ValueError(f"{name} must have shape {want}, got {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {a.dtype}")
    return a.astype(np.int64)


def _preds(preds: Any, num_classes: int | None = None) -> np.ndarray:
    p = _ints(preds, "preds", 2)
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"preds must have at least one example and one member, got shape {p.shape}")
    if num_classes is not None and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"preds must lie in [0, {num_classes}), got min {p.min()}, max {p.max()}")
    return p


def _preds_y(preds: Any, y: Any, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    p, t = _preds(preds, num_classes), _ints(y, "y", 1)
    if len(t) != len(p):
        raise ValueError(f"preds has {len(p)} rows but y has {len(t)} labels")
    if num_classes is not None and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"y must lie in [0, {num_classes}), got min {t.min()}, max {t.max()}")
    return p, t


def _probs(probs: Any) -> torch.Tensor:
    p = torch.as_tensor(probs).detach().cpu()
    if p.ndim != 3 or 0 in p.shape:
        raise ValueError(f"probs must be non-empty (N, K, C) probabilities, got shape {tuple(p.shape)}")
    p = p.double()
    if p.isnan().any() or (p < -1e-6).any() or (p > 1 + 1e-6).any() or \
            ((p.sum(-1) - 1).abs() > 1e-3).any():
        raise ValueError("probs must be probabilities (each member's row in [0, 1] summing to 1); "
                         "apply softmax to the logits first")
    return p.clamp(0, 1)


# --------------------------------------------------------------------------- Breiman


def correctness(preds: ArrayLike, y: ArrayLike) -> np.ndarray:
    """``(N, K)`` bool: member k is right on example n.

    Example:
        >>> correctness(np.array([[0, 1], [1, 1]]), np.array([0, 0])).tolist()
        [[True, False], [False, False]]
    """
    p, t = _preds_y(preds, y)
    return p == t[:, None]


def raw_margins(preds: ArrayLike, y: ArrayLike, num_classes: int) -> np.ndarray:
    """Breiman's raw margins ``rmg[n, m] = 1[pred_m = y] - 1[pred_m = j_hat]`` ``(N, K)``.

    ``j_hat(x)`` is the wrong class with the most votes; ties go to the lowest class index
    (with no wrong vote at all ``j_hat`` is irrelevant: every member is right).

    Example:
        >>> raw_margins(np.array([[1, 2, 0]]), np.array([0]), 3).tolist()   # 1 and 2 tie: j_hat 1
        [[-1, 0, 1]]
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (margins need a wrong class), got {num_classes}")
    p, t = _preds_y(preds, y, num_classes)
    n = len(t)
    votes = np.zeros((n, num_classes), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(n), p.shape[1]), p.ravel()), 1)
    votes[np.arange(n), t] = -1  # the true class is never j_hat
    j_hat = votes.argmax(1)  # numpy: first maximum, i.e. the lowest class on ties
    return (p == t[:, None]).astype(np.int64) - (p == j_hat[:, None]).astype(np.int64)


def breiman(preds: ArrayLike, y: ArrayLike, num_classes: int) -> dict[str, float]:
    """Breiman's (2001) strength ``s``, mean correlation ``rho_bar`` and bound on the error.

    With raw margins ``rmg_m`` (:func:`raw_margins`): ``s`` is the mean of ``rmg`` over examples
    and members; ``rho_bar = Σ_{m<n} rho_mn sd_m sd_n / Σ_{m<n} sd_m sd_n`` with
    ``rho_mn = Pearson(rmg_m, rmg_n)`` and ``sd_m = std(rmg_m)``; ``bound = rho_bar (1 - s²) / s²``
    bounds the ensemble's generalization error (lower ``rho_bar / s²`` is better).

    Edge cases (documented choices):

    - ``rho_mn sd_m sd_n`` is the covariance, computed as such, so a member with a constant
      margin (sd 0) adds 0 to both sums and simply drops out — no NaN. If *every* margin is
      constant there is no variance to correlate and ``correlation`` is 0.0, which makes the
      bound 0: exact, since then the ensemble margin is the constant ``s``.
    - K = 1: the only pair is the member with itself, so ``correlation`` is 1.0 (0.0 if its
      margin is constant) and the bound reduces to Breiman's ``(1 - s²)/s²``.
    - ``bound`` is ``inf`` when ``s <= 0`` (the bound needs positive strength).

    Example:
        >>> preds = np.array([[0, 0], [1, 0], [0, 1], [1, 1]]); y = np.zeros(4, dtype=int)
        >>> {k: round(v, 4) for k, v in breiman(preds, y, 2).items()}
        {'strength': 0.0, 'correlation': 0.0, 'bound': inf}
    """
    rmg = raw_margins(preds, y, num_classes).astype(np.float64)
    s = float(rmg.mean())
    centred = rmg - rmg.mean(0)
    cov = centred.T @ centred / len(rmg)  # (K, K), population covariance
    sd = np.sqrt(np.clip(np.diag(cov), 0, None))
    K = rmg.shape[1]
    if K == 1:
        num, den = float(cov[0, 0]), float(sd[0] ** 2)
    else:
        upper = np.triu_indices(K, 1)
        num, den = float(cov[upper].sum()), float(np.outer(sd, sd)[upper].sum())
    rho = float(np.clip(num / den, -1.0, 1.0)) if den > 0 else 0.0
    bound = rho * (1 - s * s) / (s * s) if s > 0 else math.inf
    return {"strength": s, "correlation": rho, "bound": float(bound)}


# --------------------------------------------------------------------------- pairwise


def pair_counts(correct: ArrayLike) -> dict[str, np.ndarray]:
    """Pair counts ``(K, K)`` int64 from ``(N, K)`` correctness: ``n11`` both right, ``n00`` both
    wrong, ``n10[k, l]`` only k right, ``n01[k, l]`` only l right.

    Example:
        >>> c = pair_counts(np.array([[1, 1], [1, 0], [0, 1], [0, 0], [1, 1]], dtype=bool))
        >>> [int(c[k][0, 1]) for k in ("n11", "n10", "n01", "n00")]
        [2, 1, 1, 1]
    """
    c = torch.as_tensor(correct).cpu().numpy() if isinstance(correct, torch.Tensor) else np.asarray(correct)
    if c.ndim != 2 or c.dtype != np.bool_:
        raise ValueError(f"correct must be an (N, K) bool array, got shape {c.shape}, dtype {c.dtype}")
    r, w = c.astype(np.int64), (~c).astype(np.int64)
    return {"n11": r.T @ r, "n00": w.T @ w, "n10": r.T @ w, "n01": w.T @ r}


def oracle_matrices(preds: ArrayLike, y: ArrayLike) -> dict[str, np.ndarray]:
    """Pairwise ``(K, K)`` statistics on correctness (Kuncheva & Whitaker 2003).

    ``disagreement = (N01 + N10)/N``, ``double_fault = N00/N``,
    ``q = (N11 N00 - N01 N10)/(N11 N00 + N01 N10)``,
    ``rho = (N11 N00 - N01 N10)/sqrt((N11+N10)(N01+N00)(N11+N01)(N10+N00))``; NaN where a
    denominator is 0. The diagonal compares a member with itself (disagreement 0, double fault
    its error rate, q = rho = 1).

    Example:
        >>> m = oracle_matrices(np.array([[0, 0], [0, 1], [1, 0], [1, 1], [0, 0]]), np.zeros(5, int))
        >>> [round(float(m[k][0, 1]), 4) for k in ("disagreement", "double_fault", "q", "rho")]
        [0.4, 0.2, 0.3333, 0.1667]
    """
    c = pair_counts(correctness(preds, y))
    n11, n00, n10, n01 = (c[k].astype(np.float64) for k in ("n11", "n00", "n10", "n01"))
    n = float(n11[0, 0] + n00[0, 0])
    num = n11 * n00 - n01 * n10
    q_den = n11 * n00 + n01 * n10
    r_den = np.sqrt((n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00))
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(q_den > 0, num / q_den, np.nan)
        rho = np.where(r_den > 0, num / r_den, np.nan)
    np.fill_diagonal(q, 1.0)
    np.fill_diagonal(rho, 1.0)
    return {"disagreement": (n01 + n10) / n, "double_fault": n00 / n, "q": q, "rho": rho}


def prediction_disagreement(preds: ArrayLike) -> np.ndarray:
    """Label-free ``(K, K)`` disagreement: ``d[k, l] = mean_n 1[pred_k != pred_l]``.

    Example:
        >>> prediction_disagreement(np.array([[0, 1], [2, 2]])).tolist()
        [[0.0, 0.5], [0.5, 0.0]]
    """
    p = _preds(preds)
    return (p[:, :, None] != p[:, None, :]).mean(0)


def sample_disagreement(preds: ArrayLike) -> np.ndarray:
    """Per example, the fraction of member pairs that predict different classes ``(N,)``:
    ``1 - Σ_c C(n_c, 2) / C(K, 2)`` with ``n_c`` the votes for class c (0 when K = 1). Its mean
    is the mean of :func:`prediction_disagreement` over pairs.

    Example:
        >>> sample_disagreement(np.array([[0, 0, 1], [2, 2, 2]])).round(4).tolist()
        [0.6667, 0.0]
    """
    p = _preds(preds)
    K = p.shape[1]
    if K == 1:
        return np.zeros(len(p))
    same = (p[:, :, None] == p[:, None, :]).sum((1, 2)) - K  # ordered pairs that agree
    return 1.0 - same / (K * (K - 1))


def entropy(p: ArrayLike, dim: int = -1) -> torch.Tensor:
    """Shannon entropy (nats) along ``dim``, with ``0 log 0 = 0``.

    Example:
        >>> round(float(entropy(torch.tensor([0.5, 0.5, 0.0]))), 4)
        0.6931
    """
    t = torch.as_tensor(p).double()
    return -torch.special.xlogy(t, t).sum(dim)


def kl_matrix(probs: ArrayLike) -> np.ndarray:
    """``(K, K)`` mean over examples of ``KL(p_k || p_l)`` (nats; ``p_l`` clamped at 1e-12).

    Example:
        >>> p = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]])
        >>> kl_matrix(p).round(4).tolist()
        [[0.0, 0.5108], [0.3681, 0.0]]
    """
    p = _probs(probs)
    neg_h = -entropy(p).mean(0)  # (K,) mean_n Σ_c p_k log p_k
    cross = torch.einsum("nkc,nlc->kl", p, p.clamp_min(_EPS).log()) / p.shape[0]
    kl = (neg_h[:, None] - cross).clamp_min(0).numpy()
    np.fill_diagonal(kl, 0.0)
    return kl


def ensemble_mi(probs: ArrayLike) -> np.ndarray:
    """Per example, mutual information between the prediction and the member ``(N,)``:
    ``H(p̄) - (1/K) Σ_k H(p_k)`` (= mean_k KL(p_k || p̄)), clamped at 0.

    Example:
        >>> p = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.3, 0.7], [0.3, 0.7]]])
        >>> ensemble_mi(p).round(4).tolist()              # ln 2 for total disagreement
        [0.6931, 0.0]
    """
    p = _probs(probs)
    return (entropy(p.mean(1)) - entropy(p).mean(1)).clamp_min(0).numpy()


def pair_mean(matrix: np.ndarray, ordered: bool = False) -> float:
    """Mean of a ``(K, K)`` matrix over pairs ``k < l`` (``ordered``: all ``k != l``), skipping
    NaN; NaN when no pair is defined.

    Example:
        >>> pair_mean(np.array([[0, 1, 2], [1, 0, np.nan], [2, np.nan, 0]]))
        1.5
    """
    m = np.asarray(matrix, dtype=np.float64)
    K = m.shape[0]
    vals = m[~np.eye(K, dtype=bool)] if ordered else m[np.triu_indices(K, 1)]
    vals = vals[~np.isnan(vals)]
    return float(vals.mean()) if vals.size else math.nan


def pairwise_diversity(preds: ArrayLike, y: ArrayLike, probs: ArrayLike | None = None) -> dict[str, Any]:
    """Pair-averaged diversity (floats) and the ``(K, K)`` matrices (nested lists, ``*_matrix``).

    Keys: ``disagreement``, ``double_fault``, ``q``, ``rho``, ``label_free_disagreement`` and,
    with ``probs``, ``kl`` and ``mi`` (mean of :func:`ensemble_mi`).

    Example:
        >>> d = pairwise_diversity(np.array([[0, 0], [1, 0]]), np.array([0, 0]))
        >>> d["disagreement"], d["double_fault"], d["disagreement_matrix"]
        (0.5, 0.0, [[0.0, 0.5], [0.5, 0.0]])
    """
    mats = oracle_matrices(preds, y)
    mats["label_free_disagreement"] = prediction_disagreement(preds)
    out: dict[str, Any] = {name: pair_mean(m) for name, m in mats.items()}
    if probs is not None:
        kl = kl_matrix(probs)
        if kl.shape[0] != mats["q"].shape[0]:
            raise ValueError(f"probs has {kl.shape[0]} members but preds has {mats['q'].shape[0]}")
        mats["kl"] = kl
        out["kl"] = pair_mean(kl, ordered=True)
        out["mi"] = float(ensemble_mi(probs).mean())
    for name, m in mats.items():
        out[f"{name}_matrix"] = m.tolist()
    return out


# --------------------------------------------------------------------------- report


def _scores(probs: torch.Tensor, y: torch.Tensor, n_bins: int) -> dict[str, float]:
    return {"accuracy": metrics.accuracy(probs.argmax(-1), y), "nll": metrics.nll(probs, y),
            "brier": metrics.brier(probs, y), "ece": metrics.ece(probs, y, n_bins=n_bins)}


def ensemble_report(probs: ArrayLike, y: ArrayLike, merged: ArrayLike | None = None, *,
                    merge: str = "before_mean", n_bins: int = 15) -> dict[str, Any]:
    """Per-member, mean-member and ensemble metrics and the members' diversity (JSON-able).

    ``probs`` ``(N, K, C)`` are the members' probabilities, ``merged`` ``(N, C)`` the ensemble's;
    without ``merged`` it is computed by ``merge``: ``before_mean`` = softmax of the mean log
    probabilities (equal to the softmax of the mean logits), ``after_mean`` = mean probability.

    Returns ``{"branches": [per member {accuracy, nll, brier, ece}], "branch_mean": {...},
    "ensemble": {...}, "diversity": {strength, correlation, bound} + :func:`pairwise_diversity`}``
    (ECE with ``n_bins`` equal-width bins, as torch-uncertainty).

    Example:
        >>> p = torch.tensor([[[0.9, 0.1], [0.6, 0.4]], [[0.2, 0.8], [0.7, 0.3]]])
        >>> r = ensemble_report(p, torch.tensor([0, 1]), merge="after_mean")
        >>> [b["accuracy"] for b in r["branches"]], r["ensemble"]["accuracy"]
        ([1.0, 0.5], 1.0)
        >>> r["diversity"]["disagreement"], round(r["diversity"]["strength"], 4)
        (0.5, 0.5)
    """
    p = _probs(probs)
    N, K, C = p.shape
    t = torch.as_tensor(y).detach().cpu()
    if t.shape != (N,) or t.is_floating_point():
        raise ValueError(f"y must be ({N},) integer labels for probs of shape {tuple(p.shape)}, "
                         f"got shape {tuple(t.shape)}, dtype {t.dtype}")
    t = t.long()
    if merged is None:
        if merge == "before_mean":
            merged = p.clamp_min(_EPS).log().mean(1).softmax(-1)
        elif merge == "after_mean":
            merged = p.mean(1)
        else:
            raise ValueError(f"merge must be 'before_mean' or 'after_mean', got {merge!r}")
    m = torch.as_tensor(merged).detach().cpu().double()
    if m.shape != (N, C):
        raise ValueError(f"merged must be ({N}, {C}) ensemble probabilities, got {tuple(m.shape)}")
    branches = [_scores(p[:, k], t, n_bins) for k in range(K)]
    mean = {key: float(np.mean([b[key] for b in branches])) for key in branches[0]}
    preds = p.argmax(-1)
    diversity = {**breiman(preds, t, C), **pairwise_diversity(preds, t, p)}
    return {"branches": branches, "branch_mean": mean, "ensemble": _scores(m, t, n_bins),
            "diversity": diversity}
