"""Self-check branches: a head on a tapped layer that predicts whether the parent is right.

A *self-check* reads hidden features ``[N, D]`` of a frozen parent (or tree) and outputs one
confidence per example, used exactly like ``msp`` or ``margin`` in :mod:`branchnet.selective`
(higher = surer; accept iff ``score >= threshold``). It learns one of :data:`TARGETS`:

* ``"tcp"`` — the *true-class probability* ``p(y | x)`` of the parent, regressed with an MSE
  loss on ``sigmoid(logit)`` (ConfidNet: Corbière et al., NeurIPS 2019, "Addressing Failure
  Prediction by Learning Model Confidence"). Unlike the max softmax, TCP is low on a
  *confident* mistake, so it ranks errors better;
* ``"correct"`` — whether the parent's argmax is right, a 0/1 target with a logistic loss.

**Data.** Train it on rows the parent did not fit (a held-out split, or cross-fitting): on the
parent's own training rows the parent is nearly always right and TCP nearly 1, so there is
nothing to learn. For :func:`~branchnet.selective.sgr_threshold`'s guarantee, calibrate the
threshold on yet another split, independent of the self-check's training rows.

Example:
    >>> import torch
    >>> probs = torch.tensor([[0.75, 0.25], [0.25, 0.75], [0.625, 0.375]])
    >>> y = torch.tensor([0, 0, 1])
    >>> selfcheck_targets(probs, y, "tcp").tolist(), selfcheck_targets(probs, y, "correct").tolist()
    ([0.75, 0.25, 0.375], [1.0, 0.0, 0.0])
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import Dataset

from branchnet.data.batches import TensorPairs
from branchnet.engine import FitResult, TrainConfig, fit

__all__ = ["TARGETS", "TRAIN_DEFAULTS", "SelfCheck", "SelfCheckHead", "fit_selfcheck",
           "selfcheck_targets"]

TARGETS: tuple[str, ...] = ("tcp", "correct")
"""What a self-check learns: the parent's true-class probability, or whether it is right."""

TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 50, "patience": 5, "lr": 1e-3,
                                  "weight_decay": 1e-4, "batch_size": 128}
"""Training options of a self-check that differ from :class:`~branchnet.engine.TrainConfig`'s;
a ``cfg`` dict is applied on top of them."""

_VAL_FRACTION = 0.2


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


def _int_at_least(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def selfcheck_targets(probs: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
                      target: str = "tcp") -> torch.Tensor:
    """Float targets ``[N]`` of a self-check from the parent's probabilities ``[N, C]``.

    ``"tcp"``: ``probs[i, y[i]]``; ``"correct"``: 1.0 where ``argmax(probs[i]) == y[i]``,
    else 0.0. Rows of ``probs`` must be probability vectors (sum 1 within 1e-3).

    >>> selfcheck_targets(torch.tensor([[0.5, 0.2]]), torch.tensor([0]))
    Traceback (most recent call last):
    ...
    ValueError: probs must be probabilities, but row 0 sums to 0.7; pass softmax(logits), not logits
    """
    _check_target(target)
    p, labels = torch.as_tensor(probs), torch.as_tensor(y)
    if p.ndim != 2 or not torch.is_floating_point(p):
        raise ValueError(f"probs must be a float tensor [N, C], got {p.dtype} of shape "
                         f"{tuple(p.shape)}")
    if labels.shape != (len(p),) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"y must be integer labels of shape ({len(p)},), got {labels.dtype} of "
                         f"shape {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= p.shape[1]):
        raise ValueError(f"y must be class indices in [0, {p.shape[1]}), got values in "
                         f"[{labels.min().item()}, {labels.max().item()}]")
    sums = p.sum(dim=1)
    bad = torch.nonzero(~((sums - 1).abs() <= 1e-3) | (p < -1e-3).any(dim=1))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"probs must be probabilities, but row {i} sums to {sums[i].item():.4g}"
                         f"{' with a negative entry' if (p[i] < -1e-3).any() else ''}; "
                         "pass softmax(logits), not logits")
    labels = labels.long()
    if target == "tcp":
        return p.gather(1, labels[:, None])[:, 0].clamp(0.0, 1.0).float()
    return (p.argmax(dim=1) == labels).float()


class SelfCheckHead(nn.Module):
    """A small MLP ``in_features -> hidden -> 1`` with ReLU and dropout; ``hidden=0`` makes it
    linear (``dropout`` then has no effect).

    ``forward`` flattens ``[N, ...]`` inputs to ``[N, in_features]`` and returns one logit per
    example (``[N]``); :meth:`score` gives ``sigmoid(logit)``, the confidence.

    >>> head = SelfCheckHead(8, hidden=16)
    >>> head(torch.zeros(5, 2, 4)).shape, head.score(torch.zeros(5, 8)).shape
    (torch.Size([5]), torch.Size([5]))
    >>> SelfCheckHead(8, hidden=0)
    SelfCheckHead(
      in_features=8, hidden=0, dropout=0.1
      (net): Linear(in_features=8, out_features=1, bias=True)
    )
    """

    def __init__(self, in_features: int, hidden: int = 128, dropout: float = 0.1, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = _int_at_least("in_features", in_features, 1)
        self.hidden = _int_at_least("hidden", hidden, 0)
        if not (isinstance(dropout, numbers.Real) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.net: nn.Module = (
            nn.Sequential(nn.Linear(self.in_features, self.hidden, **kw), nn.ReLU(),
                          nn.Dropout(self.dropout), nn.Linear(self.hidden, 1, **kw))
            if self.hidden else nn.Linear(self.in_features, 1, **kw))

    def reset_parameters(self) -> None:
        """Draw fresh weights (PyTorch's default ``nn.Linear`` initialisation)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, hidden={self.hidden}, dropout={self.dropout}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.in_features:
            raise ValueError(f"SelfCheckHead expects [N, {self.in_features}] features (or [N, ...] "
                             f"that flatten to it), got shape {tuple(x.shape)}")
        return self.net(x.flatten(1))[:, 0]

    def score(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Confidence in [0, 1] per example (``sigmoid`` of the logit), in eval mode under
        :func:`torch.inference_mode`; the training flag is restored afterwards."""
        param = next(self.parameters())
        x = torch.as_tensor(x).to(device=param.device, dtype=param.dtype)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                return torch.sigmoid(self(x))
        finally:
            self.train(was_training)


def _tcp_loss(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(torch.sigmoid(logits), t.to(logits.dtype))


def _correct_loss(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, t.to(logits.dtype))


def _within_half(logits: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The history's ``acc``: scores within 0.5 of the target (binary accuracy for 0/1)."""
    return ((torch.sigmoid(logits) - t).abs() < 0.5).sum(), t.numel()


def _train_config(cfg: TrainConfig | dict[str, Any] | None) -> TrainConfig:
    if isinstance(cfg, TrainConfig):
        return cfg
    if cfg is None or isinstance(cfg, dict):
        return TrainConfig.from_dict({**TRAIN_DEFAULTS, **(cfg or {})})
    raise TypeError(f"cfg must be a TrainConfig, a dict or None, got {type(cfg).__name__}")


def _pairs(features: torch.Tensor | Dataset | None, targets: torch.Tensor | None,
           target: str, head: SelfCheckHead, name: str) -> Dataset | None:
    """A dataset of ``(features, target)`` rows: a given Dataset as is, or tensors paired."""
    if isinstance(features, Dataset):
        if targets is not None:
            raise ValueError(f"{name}_features is a Dataset, which yields its own targets: "
                             f"pass {name}_targets=None")
        return features
    if features is None:
        if targets is not None:
            raise ValueError(f"{name}_targets given without {name}_features")
        return None
    if targets is None:
        raise ValueError(f"{name}_targets is required when {name}_features is a tensor")
    param = next(head.parameters())
    x = torch.as_tensor(features).to(dtype=param.dtype)
    t = torch.as_tensor(targets, dtype=param.dtype)
    if t.shape != (len(x),):
        raise ValueError(f"{name}_targets must have shape ({len(x)},), one per feature row, "
                         f"got {tuple(t.shape)}")
    if not ((t >= 0) & (t <= 1)).all() or (target == "correct" and not ((t == 0) | (t == 1)).all()):
        raise ValueError(f"{name}_targets must be {'0/1' if target == 'correct' else 'in [0, 1]'} "
                         f"for target={target!r}, got values in [{t.min().item():.4g}, "
                         f"{t.max().item():.4g}] (see selfcheck_targets)")
    return TensorPairs(x, t)


def fit_selfcheck(
    head: SelfCheckHead,
    train_features: torch.Tensor | Dataset,
    train_targets: torch.Tensor | None,
    val_features: torch.Tensor | Dataset | None,
    val_targets: torch.Tensor | None,
    *,
    target: str = "tcp",
    cfg: TrainConfig | dict[str, Any] | None = None,
    workdir: str | Path | None = None,
    resume: bool = False,
    description: str = "self-check",
) -> FitResult:
    """Train ``head`` in place with :func:`branchnet.engine.fit` on targets of
    :func:`selfcheck_targets` (``"tcp"``: MSE of ``sigmoid(logit)``; ``"correct"``: BCE with
    logits); with validation data and ``patience``, it stops early and keeps the best epoch.

    Features are tensors ``[N, ...]`` with their targets ``[N]``, or Datasets of
    ``(features, target)`` rows with ``*_targets=None``, e.g.
    ``CachedActivations.dataset(targets, rows=..., flatten=True)``. Validation may be None (no
    early stopping). ``cfg``: a :class:`TrainConfig` as is, or a dict applied over
    :data:`TRAIN_DEFAULTS`. The history's ``acc`` columns are the fraction of scores within 0.5
    of the target (for ``"correct"``: binary accuracy). Without ``workdir`` the checkpoints go
    to a temporary folder (then ``best_checkpoint`` is None); ``resume=True`` needs one.

    >>> x, t = torch.randn(64, 4), torch.rand(64)
    >>> r = fit_selfcheck(SelfCheckHead(4, hidden=8), x, t, x, t, cfg={"epochs": 2, "progress": False})
    >>> r.epochs_run, sorted(r.history[-1])
    (2, ['epoch', 'train_acc', 'train_loss', 'val_acc', 'val_loss'])
    """
    _check_target(target)
    config = _train_config(cfg)
    train = _pairs(train_features, train_targets, target, head, "train")
    val = _pairs(val_features, val_targets, target, head, "val")
    loss_fn = _tcp_loss if target == "tcp" else _correct_loss
    kwargs: dict[str, Any] = {"loss_fn": loss_fn, "score_fn": _within_half,
                              "description": description}
    if workdir is not None:
        return fit(head, train, val, config, workdir=workdir, resume=resume, **kwargs)
    if resume:
        raise ValueError("resume=True needs the workdir of the run to resume")
    with tempfile.TemporaryDirectory(prefix="branchnet-selfcheck-") as tmp:
        return dataclasses.replace(fit(head, train, val, config, workdir=tmp, **kwargs),
                                   best_checkpoint=None)


def _rows(features: Any) -> torch.Tensor:
    x = torch.as_tensor(features)
    if x.ndim < 2:
        raise ValueError(f"features must be [N, ...] with one row per example, got shape "
                         f"{tuple(x.shape)}")
    return x


class SelfCheck:
    """A scikit-learn style self-check: fit on features, parent probabilities and labels;
    :meth:`score_samples` gives the confidence (higher = surer).

    Parameters are stored as given and checked by :meth:`fit`. ``train`` is a
    :class:`TrainConfig` or a dict over :data:`TRAIN_DEFAULTS`; ``seed`` replaces its seed and
    also seeds the head's initial weights and the validation split.

    >>> x, y = torch.randn(200, 3), torch.randint(0, 2, (200,))
    >>> probs = torch.softmax(torch.randn(200, 2), dim=1)
    >>> sc = SelfCheck(hidden=8, train={"epochs": 2, "progress": False}).fit(x, probs, y)
    >>> sc.n_features_in_, sc.score_samples(x.numpy()).shape
    (3, (200,))
    """

    def __init__(self, target: str = "tcp", hidden: int = 128, dropout: float = 0.1,
                 train: TrainConfig | dict[str, Any] | None = None, seed: int = 0):
        self.target = target
        self.hidden = hidden
        self.dropout = dropout
        self.train = train
        self.seed = seed

    def fit(self, features: Any, probs: Any, y: Any,
            val: tuple[Any, Any, Any] | None = None) -> SelfCheck:
        """Train on ``features [N, ...]`` with targets from the parent's ``probs [N, C]`` and
        labels ``y [N]``. Early stopping uses ``val = (features, probs, y)``, or, when None, a
        seeded 20% of the given rows, stratified by whether the parent is right."""
        _check_target(self.target)
        seed = _int_at_least("seed", self.seed, 0)
        cfg = dataclasses.replace(_train_config(self.train), seed=seed)
        x, y = _rows(features), torch.as_tensor(y)
        t = selfcheck_targets(probs, y, self.target)
        if len(x) != len(t):
            raise ValueError(f"features has {len(x)} rows but probs and y have {len(t)}")
        if val is None:
            right = selfcheck_targets(probs, y, "correct").numpy()
            fit_rows, val_rows = train_test_split(np.arange(len(x)), test_size=_VAL_FRACTION,
                                                  random_state=seed, stratify=right)
            x_val, t_val = x[val_rows], t[val_rows]
            x, t = x[fit_rows], t[fit_rows]
        else:
            x_val = _rows(val[0])
            t_val = selfcheck_targets(val[1], val[2], self.target)
        n_features = math.prod(x.shape[1:])
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            head = SelfCheckHead(n_features, self.hidden, self.dropout)
        self.fit_result_ = fit_selfcheck(head, x, t, x_val, t_val, target=self.target, cfg=cfg)
        self.head_ = head.eval()
        self.n_features_in_ = n_features
        return self

    def score_samples(self, features: Any) -> torch.Tensor | np.ndarray:
        """Confidence per example ``[N]`` in [0, 1]; a NumPy array for NumPy input, else a
        tensor."""
        if not hasattr(self, "head_"):
            raise RuntimeError("this SelfCheck is not fitted yet; call fit(features, probs, y) first")
        x = _rows(features)
        if math.prod(x.shape[1:]) != self.n_features_in_:
            raise ValueError(f"features must have {self.n_features_in_} values per row, as in "
                             f"fit, got shape {tuple(x.shape)}")
        scores = self.head_.score(x)
        return scores.numpy() if isinstance(features, np.ndarray) else scores
