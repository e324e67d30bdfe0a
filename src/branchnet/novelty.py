"""Open-world novelty scores, a threshold calibrated to a false-rejection rate, and the metrics.

Is this input from a class nobody here knows? Higher score = more novel, for every scorer:

* :class:`MaxSoftmax` (Hendrycks & Gimpel 2017): ``-max softmax(logits)``, the baseline;
* :class:`Energy` (Liu et al. 2020): ``E(x) = -T logsumexp(logits / T)``;
* :class:`Mahalanobis` (Lee et al. 2018, on intermediate features, without input
  preprocessing): ``min_c (x - mu_c)^T S^-1 (x - mu_c)`` with class means and one shared
  covariance ``S`` (Ledoit-Wolf shrinkage of the pooled within-class covariance: a tap of
  hundreds of units from a few thousand rows is near singular without it);
* :class:`KNN` (Sun et al. 2022): the distance of the L2-normalised feature to its k-th nearest
  L2-normalised training feature; ``k="auto"`` scales their k = 50 for 50,000 CIFAR-10 training
  rows with the bank, as they do for subsampled banks (``k = max(1, round(N / 1000))``).

Hand-written (a few lines each): ``pytorch-ood`` requires torchvision, which does not import
beside this torch build. Scorers follow scikit-learn: ``fit(features, labels)`` sets the fitted
state (``_``), ``score(features, logits)`` returns ``[N]`` scores; both arguments are always
passed and each scorer reads what it needs (``needs``).

>>> import torch
>>> x = torch.cat([torch.randn(200, 4), torch.randn(200, 4) + 6]); y = torch.arange(400) // 200
>>> m = Mahalanobis().fit(x, y)
>>> far = torch.full((1, 4), 30.0)
>>> bool(m.score(far, None)[0] > m.score(x[:1], None)[0])
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.stats import binom
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from branchnet.errors import BranchnetError


class NoveltyScoreError(BranchnetError, ValueError):
    """A novelty score cannot be fitted, computed or calibrated as asked."""


def _features(x: Any) -> torch.Tensor:
    x = torch.as_tensor(x.detach() if isinstance(x, torch.Tensor) else np.asarray(x))
    return x.flatten(1).float() if x.ndim > 1 else x.float()[:, None]


def _logits(logits: Any, name: str) -> torch.Tensor:
    if logits is None:
        raise NoveltyScoreError(f"the {name} score reads logits; got None")
    out = _features(logits)
    if out.shape[1] == 0:
        raise NoveltyScoreError(f"the {name} score reads logits, but they are empty (a parent "
                                "cut after its tap has no output)")
    return out


class Scorer:
    """Base of the novelty scorers: options stored as given, state / from_state."""

    name: ClassVar[str] = ""
    needs: ClassVar[str] = "logits"
    _state: ClassVar[tuple[str, ...]] = ()

    def options(self) -> dict[str, Any]:
        return {}

    def fit(self, features: Any, labels: Any) -> Scorer:
        return self

    def score(self, features: Any, logits: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _require(self) -> None:
        if self._state and not hasattr(self, self._state[0]):
            raise NoveltyScoreError(f"{type(self).__name__} is not fitted: call fit(features, "
                                    "labels) on known-class training features first")

    def _check_dim(self, x: torch.Tensor, d: int) -> None:
        if x.shape[1] != d:
            raise NoveltyScoreError(f"{type(self).__name__} was fitted on {d}-d features, got "
                                    f"{x.shape[1]}-d")

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """JSON-able meta (name, options) and the fitted tensors: saved without pickle."""
        self._require()
        return ({"name": self.name, "options": self.options()},
                {k: getattr(self, k) for k in self._state})

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


class MaxSoftmax(Scorer):
    """``-max softmax(logits)``."""

    name = "msp"

    def score(self, features: Any, logits: Any) -> torch.Tensor:
        return -torch.softmax(_logits(logits, "msp"), dim=1).max(dim=1).values


class Energy(Scorer):
    """``-T logsumexp(logits / T)``."""

    name = "energy"

    def __init__(self, temperature: float = 1.0):
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise NoveltyScoreError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = temperature

    def options(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def score(self, features: Any, logits: Any) -> torch.Tensor:
        t = float(self.temperature)
        return -t * torch.logsumexp(_logits(logits, "energy") / t, dim=1)


class Mahalanobis(Scorer):
    """Smallest squared Mahalanobis distance to a class mean, one shared covariance."""

    name = "mahalanobis"
    needs = "features"
    _state = ("means_", "whiten_")

    def fit(self, features: Any, labels: Any) -> Mahalanobis:
        x, y = _features(features).double(), torch.as_tensor(labels).long()
        classes = torch.unique(y)
        means = torch.stack([x[y == c].mean(dim=0) for c in classes])
        centred = x - means[torch.searchsorted(classes, y)]
        cov = torch.from_numpy(LedoitWolf(assume_centered=True).fit(centred.numpy()).covariance_)
        # whitening W with W^T S W = I: a squared distance is then a Euclidean one
        evals, evecs = torch.linalg.eigh(cov)
        w = evecs / evals.clamp_min(1e-12 * float(evals.max())).sqrt()
        self.whiten_ = w.float()
        self.means_ = (means @ w).float()
        return self

    def score(self, features: Any, logits: Any) -> torch.Tensor:
        self._require()
        x = _features(features)
        self._check_dim(x, self.whiten_.shape[0])
        out = []
        for i in range(0, len(x), 4096):
            z = x[i:i + 4096] @ self.whiten_
            out.append(torch.cdist(z.double(), self.means_.double()).pow(2).min(dim=1).values)
        return torch.cat(out).float() if out else torch.zeros(0)


class KNN(Scorer):
    """Distance to the k-th nearest training feature, both L2-normalised."""

    name = "knn"
    needs = "features"
    _state = ("bank_",)

    def __init__(self, k: int | str = "auto"):
        if k != "auto" and not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise NoveltyScoreError(f"k must be a positive integer or 'auto', got {k!r}")
        self.k = k

    def k_for(self, n_bank: int) -> int:
        """The k used against a bank of ``n_bank`` rows (at most ``n_bank``).

        >>> KNN().k_for(50_000), KNN().k_for(4_390), KNN(k=7).k_for(3)
        (50, 4, 3)
        """
        k = max(1, round(n_bank / 1000)) if self.k == "auto" else int(self.k)
        return max(1, min(k, n_bank))

    def options(self) -> dict[str, Any]:
        return {"k": self.k}

    def fit(self, features: Any, labels: Any) -> KNN:
        self.bank_ = torch.nn.functional.normalize(_features(features), dim=1)
        return self

    def score(self, features: Any, logits: Any) -> torch.Tensor:
        self._require()
        x = torch.nn.functional.normalize(_features(features), dim=1)
        self._check_dim(x, self.bank_.shape[1])
        k = self.k_for(len(self.bank_))
        out = []
        for i in range(0, len(x), 1024):  # cosine similarity -> the k-th largest -> distance
            sim = x[i:i + 1024] @ self.bank_.T
            kth = sim.topk(k, dim=1).values[:, -1]
            out.append((2 - 2 * kth).clamp_min(0).sqrt())
        return torch.cat(out) if out else torch.zeros(0)


SCORERS: dict[str, type[Scorer]] = {"msp": MaxSoftmax, "energy": Energy,
                                    "mahalanobis": Mahalanobis, "knn": KNN}


def make_scorer(name: str, **options: Any) -> Scorer:
    """A scorer by name (``msp``, ``energy``, ``mahalanobis``, ``knn``)."""
    if name not in SCORERS:
        raise NoveltyScoreError(f"novelty score {name!r} is not known; choose one of "
                                f"{sorted(SCORERS)}")
    try:
        return SCORERS[name](**options)
    except TypeError as e:
        raise NoveltyScoreError(f"novelty score {name!r} does not take options "
                                f"{sorted(options)}: {e}") from e


def scorer_from_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Scorer:
    """Inverse of :meth:`Scorer.state`."""
    scorer = make_scorer(meta["name"], **meta["options"])
    missing = sorted(set(scorer._state) - set(tensors))
    if missing:
        raise NoveltyScoreError(f"saved {meta['name']} scorer lacks {missing}")
    for k in scorer._state:
        setattr(scorer, k, tensors[k])
    return scorer


# ---------------------------------------------------------------------------- threshold
@dataclass(frozen=True)
class FrrThreshold:
    """A novelty threshold: reject an input when its score is above ``threshold``."""

    threshold: float
    feasible: bool
    n: int
    k: int
    target_frr: float
    delta: float


def frr_threshold(known_scores: Any, target_frr: float, delta: float = 0.1) -> FrrThreshold:
    """The threshold that rejects at most ``target_frr`` of known inputs, with probability at
    least ``1 - delta`` over the draw of the ``n`` known calibration scores.

    The threshold is the k-th smallest score ``s_(k)``. For continuous scores with CDF ``F``,
    ``F(s_(k)) ~ Beta(k, n - k + 1)``, and the false-rejection rate ``1 - F(s_(k))`` exceeds
    ``target_frr`` exactly when at least k of the n scores fall below the ``1 - target_frr``
    quantile: probability ``P(Binomial(n, 1 - target_frr) >= k)``. The smallest k that makes
    it ``<= delta`` is chosen; if even k = n does not, the threshold is +inf (never reject).

    >>> r = frr_threshold(torch.arange(1000.0), target_frr=0.05, delta=0.1)
    >>> r.feasible, 960 <= r.k <= 970
    (True, True)
    """
    for name, v in (("target_frr", target_frr), ("delta", delta)):
        if not (isinstance(v, (int, float)) and 0 < v < 1):
            raise NoveltyScoreError(f"{name} must be a number in (0, 1), got {v!r}")
    s = np.sort(np.asarray(known_scores.detach().cpu() if isinstance(known_scores, torch.Tensor)
                           else known_scores, dtype=np.float64).ravel())
    n = len(s)
    if n == 0:
        raise NoveltyScoreError("frr_threshold needs at least one known calibration score")
    if not np.isfinite(s).all():
        raise NoveltyScoreError("known calibration scores hold NaN or infinite values")
    ks = np.arange(1, n + 1)
    tail = binom.sf(ks - 1, n, 1 - target_frr)  # P(Binomial(n, 1 - frr) >= k)
    ok = np.flatnonzero(tail <= delta)
    if len(ok) == 0:
        return FrrThreshold(math.inf, False, n, n + 1, target_frr, delta)
    k = int(ks[ok[0]])
    return FrrThreshold(float(s[k - 1]), True, n, k, target_frr, delta)


# ------------------------------------------------------------------------------ metrics
def _np(a: Any) -> np.ndarray:
    return np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)


def ood_metrics(known_scores: Any, novel_scores: Any) -> dict[str, float]:
    """AUROC (novel inputs the positive class) and FPR at 95 % TPR.

    FPR95 follows the literature's definition (Liu et al. 2020): with the threshold that keeps
    95 % of the known (in-distribution, positive) inputs, the fraction of novel inputs that
    are kept too.

    >>> ood_metrics([0, 1, 2, 3], [10, 11])["auroc"]
    1.0
    """
    k, n = _np(known_scores).ravel(), _np(novel_scores).ravel()
    if len(k) == 0 or len(n) == 0:
        raise NoveltyScoreError("ood_metrics needs known and novel scores")
    y = np.r_[np.zeros(len(k)), np.ones(len(n))]
    auroc = float(roc_auc_score(y, np.r_[k, n]))
    # the smallest threshold that keeps (score <= t) at least 95 % of the known inputs
    t = np.sort(k)[math.ceil(0.95 * len(k)) - 1]
    return {"auroc": auroc, "fpr95": float((n <= t).mean())}


def joint_outcome(known_correct: Any, known_rejected: Any, novel_rejected: Any
                  ) -> dict[str, Any]:
    """Fractions of the four outcomes: known inputs accepted and right / accepted and wrong /
    rejected (over known inputs), novel inputs rejected / accepted (over novel inputs)."""
    c = np.asarray(known_correct, dtype=bool)
    r = np.asarray(known_rejected, dtype=bool)
    nr = np.asarray(novel_rejected, dtype=bool)
    nk, nn = max(len(c), 1), max(len(nr), 1)
    return {"known_correct": float((c & ~r).sum() / nk), "known_wrong": float((~c & ~r).sum() / nk),
            "known_rejected": float(r.sum() / nk), "novel_rejected": float(nr.sum() / nn),
            "novel_accepted": float((~nr).sum() / nn), "n_known": len(c), "n_novel": len(nr)}
