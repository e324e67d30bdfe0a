"""Exit thresholds with a finite-sample guarantee: Learn-then-Test fixed-sequence testing.

An early-exit network answers at the first exit whose confidence reaches the threshold ``λ``
(the last exit, the full model, always answers). Lowering ``λ`` saves compute and risks more
answers that differ from the full model's. :func:`calibrate_exit_threshold` picks the lowest
``λ`` on a grid such that, with probability at least ``1 - delta`` over the calibration draw,

* ``kind="consistency"``: P(early answer ≠ full model's answer) ≤ ``epsilon`` (as CALM), or
* ``kind="accuracy"``: P(early answer wrong and full answer right) ≤ ``epsilon``, which bounds
  the accuracy drop against the full model by ``epsilon`` (conservatively: early answers that
  are right where the full model is wrong are not counted in their favour), or
* ``kind="accuracy_drop"``: the accuracy drop itself, accuracy(full) − accuracy(early) ≤
  ``epsilon``: the loss per input is +1 (early wrong, full right), −1 (early right, full
  wrong) or 0.

The first two losses are 0/1, so each hypothesis ``H_λ: risk(λ) > epsilon`` has an exact
binomial p-value; the signed loss of ``accuracy_drop`` gets the betting p-value of
:func:`betting_p_value` (Waudby-Smith & Ramdas, "Estimating means of bounded random variables by
betting", 2023; the WSR bound LTT and RCPS use), valid for any bounded loss. The grid is tested
in a fixed sequence from the most conservative ``λ`` down, stopping at the first ``H_λ`` not
rejected at level ``delta``. Fixed-sequence testing controls the family-wise error at ``delta``
without any monotonicity of the risk in ``λ``, so the returned ``λ`` meets the bound with
probability ≥ ``1 - delta`` (Angelopoulos, Bates, Candès, Jordan, Lei: "Learn then Test:
Calibrating Predictive Algorithms to Achieve Risk Control", 2021, §3 and Proposition 1; Schuster
et al., "Confident Adaptive Language Modeling", NeurIPS 2022, applies it to early exits). Written
here because no well-kept library implements LTT for exits; the binomial tail comes from SciPy.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> scores = torch.rand(2000, 2, generator=g)           # confidence at 2 early exits
    >>> full = torch.randint(0, 3, (2000,), generator=g)
    >>> early = torch.where(scores > 0.5, full[:, None], (full[:, None] + 1) % 3)
    >>> cal = calibrate_exit_threshold(scores, early, full, epsilon=0.05, delta=0.1)
    >>> cal.feasible, 0.45 < cal.threshold <= 0.5   # below 0.5 the early answers are wrong
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats

from branchnet.errors import BranchnetError

__all__ = ["KINDS", "ExitCalibration", "ExitError", "betting_p_value", "binomial_p_value",
           "calibrate_exit_threshold", "exit_at"]

KINDS = ("consistency", "accuracy", "accuracy_drop")


class ExitError(BranchnetError, ValueError):
    """Exit calibration cannot be done as asked."""


@dataclass
class ExitCalibration:
    """The chosen threshold and the evidence for it.

    ``threshold`` is ``inf`` (every input runs the full model) when no grid value passes
    (``feasible`` False). ``tested`` lists ``(threshold, empirical risk, p-value)`` in test order.
    """

    threshold: float
    feasible: bool
    epsilon: float
    delta: float
    kind: str
    n: int
    empirical_risk: float | None = None
    exit_fraction: list[float] = field(default_factory=list)
    tested: list[tuple[float, float, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("threshold", "feasible", "epsilon", "delta",
                                              "kind", "n", "empirical_risk", "exit_fraction")}


def _check_unit(name: str, value: Any) -> float:
    if not (isinstance(value, (int, float)) and 0 < value < 1):
        raise ExitError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def binomial_p_value(losses: int, n: int, epsilon: float) -> float:
    """P(Binomial(n, epsilon) <= losses): the p-value of ``H: risk > epsilon`` for 0/1 losses.

    >>> round(binomial_p_value(0, 100, 0.05), 4)
    0.0059
    """
    return float(stats.binom.cdf(losses, n, epsilon))


def betting_p_value(losses: np.ndarray | torch.Tensor, epsilon: float, delta: float,
                    seed: int = 0) -> float:
    """A p-value of ``H: E[loss] >= epsilon`` for i.i.d. losses in [-1, 1]: ``1 / max_t K_t``
    of the test supermartingale ``K_t = prod_i (1 + b_i (a - x_i))`` on the losses mapped to
    ``x = (loss + 1) / 2`` in [0, 1], ``a = (epsilon + 1) / 2``, with WSR's predictable bets
    ``b_i`` (from the running variance, capped so every factor stays positive) over a seeded
    random order. Valid by Ville's inequality; adaptive to small variance (most losses 0).

    >>> round(betting_p_value(np.zeros(2000), 0.01, 0.1), 4) < 0.1   # no loss at all: reject
    True
    >>> betting_p_value(np.full(500, 0.2), 0.01, 0.1)                # loss 0.2 > 0.01: keep H
    1.0
    """
    x = (np.asarray(losses, dtype=float) + 1.0) / 2.0
    x = x[np.random.default_rng(seed).permutation(len(x))]
    a, n = (epsilon + 1.0) / 2.0, len(x)
    t = np.arange(1, n + 1)
    mu = (0.5 + np.cumsum(x)) / (t + 1)
    var = (0.25 + np.cumsum((x - mu) ** 2)) / (t + 1)
    var_before = np.concatenate([[0.25], var[:-1]])  # predictable: from x_1 .. x_{i-1}
    bets = np.minimum(np.sqrt(2 * np.log(1 / delta) / (n * var_before)), 0.5 / (1 - a))
    log_wealth = np.cumsum(np.log1p(bets * (a - x)))
    return float(min(1.0, np.exp(-log_wealth.max())))


def exit_at(scores: torch.Tensor, threshold: float | list[float]) -> torch.Tensor:
    """``[N]`` the exit each input takes: the first early exit (0 .. E-1) whose score reaches
    ``threshold`` (one for all exits, or one per exit), else ``E`` (the full model)."""
    hit = scores >= torch.as_tensor(threshold, dtype=scores.dtype)
    first = hit.int().argmax(dim=1)
    return torch.where(hit.any(dim=1), first, torch.full_like(first, scores.shape[1]))


def _losses(scores: torch.Tensor, early: torch.Tensor, full: torch.Tensor,
            y: torch.Tensor | None, threshold: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    exits = exit_at(scores, threshold)
    answers = torch.cat([early, full[:, None]], dim=1).gather(1, exits[:, None])[:, 0]
    if kind == "consistency":
        return (answers != full).float(), exits
    assert y is not None
    worse = ((answers != y) & (full == y)).float()
    if kind == "accuracy":
        return worse, exits
    return worse - ((answers == y) & (full != y)).float(), exits


def calibrate_exit_threshold(
    scores: torch.Tensor,
    early: torch.Tensor,
    full: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    epsilon: float = 0.05,
    delta: float = 0.1,
    kind: str = "consistency",
    grid: np.ndarray | list[float] | None = None,
) -> ExitCalibration:
    """The lowest exit threshold on ``grid`` whose risk is ≤ ``epsilon`` with probability
    ≥ ``1 - delta``, on calibration data the exits did not train on.

    ``scores [N, E]``: the confidence of each of the ``E`` early exits (higher = surer);
    ``early [N, E]``: their answers; ``full [N]``: the full model's answers; ``y [N]``: labels
    (needed by the accuracy kinds). ``grid``: candidate thresholds (default: 200 quantiles of
    the scores plus their maximum); they are tested from the highest down.
    """
    epsilon, delta = _check_unit("epsilon", epsilon), _check_unit("delta", delta)
    if kind not in KINDS:
        raise ExitError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    scores, early, full = (torch.as_tensor(scores).float(), torch.as_tensor(early),
                           torch.as_tensor(full))
    if scores.ndim != 2 or early.shape != scores.shape or full.shape != scores.shape[:1]:
        raise ExitError(f"scores and early answers must be [N, E] and the full answers [N]; got "
                        f"{tuple(scores.shape)}, {tuple(early.shape)}, {tuple(full.shape)}")
    if kind != "consistency":
        if y is None:
            raise ExitError(f"kind={kind!r} needs the labels y")
        y = torch.as_tensor(y)
    n = len(full)
    if n == 0:
        raise ExitError("no calibration inputs")
    if grid is None:
        flat = scores.flatten().numpy()
        grid = np.unique(np.concatenate([np.quantile(flat, np.linspace(0, 1, 200)), [flat.max()]]))
    order = np.sort(np.asarray(grid, dtype=float))[::-1]  # the most conservative first
    tested: list[tuple[float, float, float]] = []
    best: float | None = None
    for lam in order:
        loss, _ = _losses(scores, early, full, y, float(lam), kind)
        p = (betting_p_value(loss.numpy(), epsilon, delta) if kind == "accuracy_drop"
             else binomial_p_value(int(loss.sum()), n, epsilon))
        tested.append((float(lam), float(loss.mean()), p))
        if p > delta:
            break
        best = float(lam)
    if best is None:
        return ExitCalibration(float("inf"), False, epsilon, delta, kind, n, tested=tested)
    loss, exits = _losses(scores, early, full, y, best, kind)
    share = torch.bincount(exits, minlength=scores.shape[1] + 1).float() / n
    return ExitCalibration(best, True, epsilon, delta, kind, n, float(loss.float().mean()),
                           share.tolist(), tested)
