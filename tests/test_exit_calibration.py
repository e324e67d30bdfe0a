"""Learn-then-Test exit thresholds: the guarantee by simulation, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from branchnet.exits import ExitError, calibrate_exit_threshold, exit_at

GRID = np.linspace(0.0, 1.0, 101)


def draw(n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Two early exits; an exit with score s disagrees with the full model w.p. 0.6 (1 - s)^2,
    the full model is right w.p. 0.8; an early answer that disagrees with a right full answer
    is wrong, with a wrong one it is right half the time (so early exits can also gain)."""
    scores = torch.rand(n, 2, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    full = torch.where(torch.rand(n, generator=g) < 0.8, y, (y + 1) % 5)
    disagree = torch.rand(n, 2, generator=g) < 0.6 * (1 - scores) ** 2
    fix = (full != y)[:, None] & (torch.rand(n, 2, generator=g) < 0.5)
    other = torch.where(fix, y[:, None], (full[:, None] + 2) % 5)
    early = torch.where(disagree, other, full[:, None])
    return scores, early, full, y


def population_risk(kind: str) -> np.ndarray:
    """The risk of every grid threshold, on 400,000 fresh inputs (the 'population')."""
    population = draw(400_000, torch.Generator().manual_seed(123))
    return np.asarray([_empirical(*population, lam, kind) for lam in GRID])


@pytest.mark.parametrize("kind", ["consistency", "accuracy", "accuracy_drop"])
def test_violation_rate_is_at_most_delta_over_1000_draws(kind: str) -> None:
    risk = population_risk(kind)
    eps, delta, draws = 0.05, 0.1, 1000
    g = torch.Generator().manual_seed(0)
    violations = feasible = 0
    for _ in range(draws):
        scores, early, full, y = draw(400, g)
        cal = calibrate_exit_threshold(scores, early, full, y, epsilon=eps, delta=delta,
                                       kind=kind, grid=GRID)
        if cal.feasible:
            feasible += 1
            violations += risk[int(np.argmin(np.abs(GRID - cal.threshold)))] > eps
    # at most delta, within 3 Monte-Carlo standard errors
    assert violations / draws <= delta + 3 * np.sqrt(delta * (1 - delta) / draws)
    assert feasible > 0.9 * draws  # and it does find thresholds that save something
    # a rule that picks the lowest threshold whose calibration risk <= eps does violate often,
    # so the simulation can see a violation (and the test can fail)
    naive = 0
    for _ in range(100):
        scores, early, full, y = draw(400, g)
        ok = [lam for lam in GRID if _empirical(scores, early, full, y, lam, kind) <= eps]
        naive += risk[int(np.argmin(np.abs(GRID - min(ok))))] > eps
    assert naive / 100 > 2 * delta


def _empirical(scores, early, full, y, lam, kind) -> float:
    e = exit_at(scores, float(lam))
    ans = torch.cat([early, full[:, None]], 1).gather(1, e[:, None])[:, 0]
    if kind == "consistency":
        return float((ans != full).float().mean())
    worse = ((ans != y) & (full == y)).float().mean()
    better = ((ans == y) & (full != y)).float().mean() if kind == "accuracy_drop" else 0.0
    return float(worse - better)


def test_infeasible_target_falls_back_to_the_full_model() -> None:
    scores, early, full, _ = draw(50, torch.Generator().manual_seed(1))
    cal = calibrate_exit_threshold(scores, early, full, epsilon=0.001, delta=0.01, grid=GRID)
    assert not cal.feasible and cal.threshold == float("inf")
    assert (exit_at(scores, cal.threshold) == 2).all()  # every input runs the full model


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"epsilon": 0}, "epsilon must be a number in"),
    ({"delta": 1.5}, "delta must be a number in"),
    ({"kind": "agreement"}, "kind must be one of"),
    ({"kind": "accuracy"}, "needs the labels y"),
])
def test_bad_input(kwargs: dict, message: str) -> None:
    scores, early, full, _ = draw(20, torch.Generator().manual_seed(2))
    with pytest.raises(ExitError, match=message):
        calibrate_exit_threshold(scores, early, full, **kwargs)
    with pytest.raises(ExitError, match=r"must be \[N, E\]"):
        calibrate_exit_threshold(scores, early[:, :1], full)
