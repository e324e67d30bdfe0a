"""Tests for branchnet.selective: confidence scores, thresholds, SGR, risk–coverage analysis."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure
from scipy import stats

from branchnet.selective import (
    CONFIDENCE_KINDS,
    ORIGINAL_THRESHOLD,
    aurc,
    aurc_star,
    confidence,
    coverage_threshold,
    eaurc,
    plot_risk_coverage,
    risk_coverage_curve,
    selective_metrics,
    sgr_threshold,
)

# --------------------------------------------------------------------------- confidence


LOGITS = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 3.0, 2.5]])


def test_confidence_kinds_by_hand() -> None:
    p = torch.softmax(LOGITS, dim=1)
    assert torch.allclose(confidence(LOGITS, "msp"), p.max(1).values)
    top2 = p.sort(1, descending=True).values
    assert torch.allclose(confidence(LOGITS, "margin"), top2[:, 0] - top2[:, 1])
    assert torch.allclose(confidence(LOGITS, "entropy"), (p * p.log()).sum(1))
    assert torch.allclose(confidence(LOGITS, "energy"), torch.logsumexp(LOGITS, 1))
    # uniform row: msp 1/3, margin 0, entropy -ln 3
    assert confidence(LOGITS, "msp")[1].item() == pytest.approx(1 / 3)
    assert confidence(LOGITS, "margin")[1].item() == pytest.approx(0.0, abs=1e-7)
    assert confidence(LOGITS, "entropy")[1].item() == pytest.approx(-math.log(3))


@pytest.mark.parametrize("kind", ["msp", "margin", "entropy"])
def test_confidence_from_probs_matches_logits(kind: str) -> None:
    probs = torch.softmax(LOGITS, 1)
    assert torch.allclose(confidence(probs, kind, from_probs=True), confidence(LOGITS, kind))


def test_confidence_entropy_handles_zero_probabilities() -> None:
    out = confidence(torch.tensor([[1.0, 0.0]]), "entropy", from_probs=True)
    assert out.item() == 0.0 and torch.isfinite(out).all()


def test_confidence_numpy_and_temperature() -> None:
    z = LOGITS.numpy()
    assert torch.allclose(confidence(z), confidence(LOGITS))
    hot = confidence(LOGITS, temperature=2.0)
    assert torch.allclose(hot, torch.softmax(LOGITS / 2, 1).max(1).values)
    energy_t = confidence(LOGITS, "energy", temperature=2.0)
    assert torch.allclose(energy_t, 2 * torch.logsumexp(LOGITS / 2, 1))


def test_confidence_higher_means_more_confident() -> None:
    sharp, flat = torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.0, 0.0]])
    for kind in CONFIDENCE_KINDS:
        assert confidence(sharp, kind) > confidence(flat, kind), kind


def test_confidence_errors() -> None:
    with pytest.raises(ValueError, match=r"msp.*margin.*entropy.*energy"):
        confidence(LOGITS, "softmax")
    with pytest.raises(ValueError, match="energy"):
        confidence(torch.softmax(LOGITS, 1), "energy", from_probs=True)
    with pytest.raises(ValueError, match="logits"):
        confidence(LOGITS, from_probs=True)
    with pytest.raises(ValueError, match="2 classes"):
        confidence(torch.zeros(3, 1), "margin")
    with pytest.raises(ValueError, match="temperature"):
        confidence(LOGITS, temperature=0.0)


# --------------------------------------------------------------------------- coverage threshold


def test_coverage_threshold_by_hand() -> None:
    s = [0.1, 0.9, 0.5, 0.7, 0.3]
    assert coverage_threshold(s, 1.0) == 0.1
    assert coverage_threshold(s, 0.4) == 0.7
    assert coverage_threshold(s, 0.41) == 0.5
    assert coverage_threshold(s, 0.0) == math.inf
    # ties at the threshold are all accepted
    assert coverage_threshold([0.5, 0.5, 0.5, 0.9], 0.5) == 0.5


def test_coverage_threshold_float_rounding() -> None:
    # 0.3 * 10 = 3.0000000000000004 must still mean "3 of 10"
    s = np.arange(10.0)
    assert coverage_threshold(s, 0.3) == 7.0


def test_coverage_threshold_errors() -> None:
    with pytest.raises(ValueError, match=r"1\.5"):
        coverage_threshold([0.1], 1.5)
    with pytest.raises(ValueError, match="empty"):
        coverage_threshold([], 0.5)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0]), min_size=1, max_size=40),
    st.floats(0.0, 1.0),
)
def test_coverage_threshold_accepts_requested_fraction(scores: list[float], cov: float) -> None:
    s = np.array(scores)
    t = coverage_threshold(s, cov)
    assert (s >= t).mean() >= cov
    if math.isfinite(t):  # and it is the largest such threshold
        assert (s > t).mean() < cov


# --------------------------------------------------------------------------- SGR


def test_sgr_hand_case_all_correct() -> None:
    # m = 4 -> k = 2 steps at level delta/2 = 0.25; zero errors: bound = 1 - 0.25 ** (1 / n)
    r = sgr_threshold([0.1, 0.2, 0.3, 0.4], [True] * 4, target_risk=0.6, delta=0.5)
    # step 1: z = 3 (2 accepted, bound 0.5 <= 0.6); step 2: z = 2 (3 accepted, bound 0.370)
    assert r.feasible and r.threshold == 0.2 and r.coverage == 0.75 and r.m == 4
    assert r.risk_bound == pytest.approx(1 - 0.25 ** (1 / 3))
    assert r.empirical_risk == 0.0


def test_sgr_returns_best_feasible_not_last_iterate() -> None:
    # step 1: z = 3 -> {0.3, 0.4}, 0 errors, bound 0.5 (feasible)
    # step 2: z = 2 -> {0.2, 0.3, 0.4}, 1 error, bound beta.ppf(0.75, 2, 2) > 0.6 (infeasible)
    assert stats.beta.ppf(0.75, 2, 2) > 0.6
    r = sgr_threshold([0.1, 0.2, 0.3, 0.4], [True, False, True, True], 0.6, 0.5)
    assert r.feasible and r.threshold == 0.3 and r.coverage == 0.5
    assert r.risk_bound == pytest.approx(0.5)


def test_sgr_infeasible_abstains_on_all() -> None:
    r = sgr_threshold(np.linspace(0, 1, 100), np.ones(100, bool), target_risk=0.001, delta=0.05)
    assert not r.feasible and r.threshold == math.inf and r.coverage == 0.0
    assert math.isnan(r.empirical_risk) and r.risk_bound > 0.001
    assert selective_metrics(np.linspace(0, 1, 100), np.ones(100), r.threshold)["accepted"] == 0


def test_sgr_single_point_and_ties() -> None:
    r = sgr_threshold([0.7], [True], target_risk=0.99, delta=0.5)
    assert r.feasible and r.threshold == 0.7 and r.coverage == 1.0
    # all tied: every threshold accepts everything
    r = sgr_threshold(np.full(50, 0.3), np.ones(50, bool), target_risk=0.2, delta=0.1)
    assert r.coverage == 1.0 and r.threshold == 0.3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_risk": 0.0}, "target_risk.*0.0"),
        ({"target_risk": 1.2}, "target_risk.*1.2"),
        ({"delta": 0.0}, "delta.*0.0"),
        ({"delta": 1.0}, "delta.*1.0"),
    ],
)
def test_sgr_validation(kwargs: dict, match: str) -> None:
    args = {"target_risk": 0.1, "delta": 0.1} | kwargs
    with pytest.raises(ValueError, match=match):
        sgr_threshold([0.1, 0.2], [True, True], **args)


def test_sgr_validation_lengths_and_empty() -> None:
    with pytest.raises(ValueError, match="one entry per score"):
        sgr_threshold([0.1, 0.2], [True], 0.1, 0.1)
    with pytest.raises(ValueError, match="empty"):
        sgr_threshold([], [], 0.1, 0.1)
    with pytest.raises(ValueError, match="0/1"):
        sgr_threshold([0.1, 0.2], [0, 2], 0.1, 0.1)


# Known model: score ~ U(0, 1), P(error | s) = A (1 - s)^2.
# True selective risk of "accept s >= t" is  ∫_t^1 A (1-s)^2 ds / (1 - t) = A (1 - t)^2 / 3.
A = 0.9


def _draw(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
    s = rng.random(m)
    return s, rng.random(m) >= A * (1 - s) ** 2


def _true_risk(t: float) -> float:
    return 0.0 if t >= 1 else A * (1 - max(t, 0.0)) ** 2 / 3


def test_sgr_guarantee_holds_empirically() -> None:
    rng = np.random.default_rng(1234)
    target, delta, draws, m = 0.05, 0.1, 300, 2000
    violations, naive_violations, coverages = 0, 0, []
    for _ in range(draws):
        s, c = _draw(rng, m)
        r = sgr_threshold(s, c, target, delta)
        violations += r.feasible and _true_risk(r.threshold) > target
        coverages.append(r.coverage)
        # naive rule (largest coverage with empirical risk <= target) to show the harness bites
        cov, risk = risk_coverage_curve(s, c)
        ok = np.flatnonzero(risk <= target)
        t_naive = coverage_threshold(s, cov[ok[-1]])
        naive_violations += _true_risk(t_naive) > target
    assert violations / draws <= delta + 0.02
    assert naive_violations / draws > 0.3  # without the bound, the target is missed often
    # not vacuous: the optimal coverage is 1 - sqrt(3 * 0.05 / 0.9) ≈ 0.41
    assert 0.25 < np.mean(coverages) < 0.41


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 400),
    st.floats(0.01, 0.9),
    st.floats(0.01, 0.9),
    st.floats(0.01, 0.5),
)
def test_sgr_monotone_in_target(seed: int, m: int, r1: float, r2: float, delta: float) -> None:
    rng = np.random.default_rng(seed)
    s = np.round(rng.random(m), 2)  # coarse scores -> ties
    c = rng.random(m) >= 0.6 * (1 - s)
    lo, hi = sorted((r1, r2))
    a, b = sgr_threshold(s, c, lo, delta), sgr_threshold(s, c, hi, delta)
    assert b.coverage >= a.coverage
    for r in (a, b):
        if r.feasible:  # reported numbers describe the returned threshold
            assert r.risk_bound <= r.target_risk
            acc = s >= r.threshold
            assert r.coverage == acc.mean()
            assert r.empirical_risk == pytest.approx(1 - c[acc].mean())


# --------------------------------------------------------------------------- selective metrics


def test_selective_metrics_by_hand() -> None:
    s = torch.tensor([0.99, 0.97, 0.96, 0.5, 0.3])
    c = torch.tensor([True, False, True, True, False])
    m = selective_metrics(s, c, ORIGINAL_THRESHOLD)
    assert m == {
        "n": 5,
        "threshold": 0.96,
        "accepted": 3,
        "coverage": 0.6,
        "selective_risk": pytest.approx(1 / 3),
        "accuracy_on_accepted": pytest.approx(2 / 3),
        "overall_accuracy": 0.6,
    }


def test_float32_scores_compare_in_float32() -> None:
    # float32(0.96) is 0.9599999785 in float64: the original rule must still accept it
    s = torch.tensor([0.96, 0.9599], dtype=torch.float32)
    assert selective_metrics(s, [True, True], 0.96)["accepted"] == 1
    t = coverage_threshold(s, 0.5)
    assert selective_metrics(s, [True, True], t)["accepted"] == 1


def test_selective_metrics_nothing_accepted() -> None:
    m = selective_metrics([0.1, 0.2], [1, 0], math.inf)
    assert m["accepted"] == 0 and m["coverage"] == 0.0
    assert m["selective_risk"] is None and m["accuracy_on_accepted"] is None
    assert m["overall_accuracy"] == 0.5


# --------------------------------------------------------------------------- RC curve and AURC


def test_rc_curve_by_hand_and_endpoint() -> None:
    s = [0.9, 0.8, 0.8, 0.4, 0.1]
    c = [True, False, True, False, True]
    cov, risk = risk_coverage_curve(s, c)
    np.testing.assert_allclose(cov, [0.2, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(risk, [0.0, 1 / 3, 0.5, 0.4])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=1, max_size=60))
def test_rc_curve_endpoint_is_overall_error(pairs: list[tuple[int, bool]]) -> None:
    s = np.array([p[0] for p in pairs], float)
    c = np.array([p[1] for p in pairs])
    cov, risk = risk_coverage_curve(s, c)
    assert cov[-1] == 1.0 and risk[-1] == pytest.approx(1 - c.mean())
    assert len(cov) == len(np.unique(s)) and np.all(np.diff(cov) > 0)


def test_aurc_by_hand() -> None:
    # no ties: risks at k=1..4 are 0, 1/2, 1/3, 2/4
    assert aurc([4, 3, 2, 1], [True, False, True, False]) == pytest.approx(
        (0 + 0.5 + 1 / 3 + 0.5) / 4
    )
    # a tie of (right, wrong) at the top: expected risks 1/2, 1/2 then 1/3
    assert aurc([5, 5, 1], [True, False, True]) == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)


def test_aurc_ties_equal_mean_over_orderings() -> None:
    s = np.array([3, 2, 2, 2, 1, 1])
    c = np.array([True, False, True, False, True, False])
    classic = []
    for p1 in itertools.permutations([1, 2, 3]):
        for p2 in itertools.permutations([4, 5]):
            order = [0, *p1, *p2]
            err = ~c[order]
            classic.append(np.mean(np.cumsum(err) / np.arange(1, 7)))
    assert aurc(s, c) == pytest.approx(np.mean(classic))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=50),
    st.randoms(use_true_random=False),
)
def test_aurc_invariant_to_permuting_ties(pairs: list[tuple[int, bool]], rnd) -> None:
    shuffled = pairs[:]
    rnd.shuffle(shuffled)
    s1, c1 = zip(*pairs, strict=True)
    s2, c2 = zip(*shuffled, strict=True)
    assert aurc(np.array(s1, float), np.array(c1)) == pytest.approx(
        aurc(np.array(s2, float), np.array(c2))
    )


def test_aurc_star_edges() -> None:
    assert aurc_star(0.0) == 0.0 and aurc_star(1.0) == 1.0
    assert aurc_star(0.3) == pytest.approx(0.3 + 0.7 * math.log(0.7))
    assert aurc_star(1.0, n=5) == pytest.approx(1.0) and aurc_star(0.0, n=5) == 0.0
    with pytest.raises(ValueError, match=r"1\.5"):
        aurc_star(1.5)


def test_perfect_ranking_has_aurc_star_and_zero_eaurc() -> None:
    n, n_err = 10_000, 2_000
    s = np.linspace(1, 0, n)
    c = np.arange(n) < n - n_err  # all errors at the lowest scores
    assert aurc(s, c) == pytest.approx(aurc_star(0.2), abs=1e-3)
    assert abs(eaurc(s, c)) < 1e-3
    assert eaurc(s, c, exact=True) == pytest.approx(0.0, abs=1e-12)
    # a random ranking is worse than the perfect one, the reversed one worst
    rng = np.random.default_rng(0)
    assert eaurc(rng.random(n), c) > 0.05
    assert aurc(-s, c) > aurc(rng.random(n), c)


def test_all_right_all_wrong() -> None:
    assert aurc([0.3, 0.2], [True, True]) == 0.0 and eaurc([0.3, 0.2], [True, True]) == 0.0
    assert aurc([0.3, 0.2], [False, False]) == 1.0
    assert eaurc([0.3, 0.2], [False, False]) == pytest.approx(0.0)


def test_plot_risk_coverage() -> None:
    rng = np.random.default_rng(0)
    s = rng.random(200)
    c = rng.random(200) > 0.5 * (1 - s)
    fig = plot_risk_coverage({"msp": (s, c), "random": (rng.random(200), c)})
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 2 and "AURC" in ax.get_legend().get_texts()[0].get_text()
    fig2 = Figure()
    ax2 = fig2.add_subplot()
    assert plot_risk_coverage({"msp": (s, c)}, ax=ax2) is fig2
