"""Novelty scores against the papers' definitions, the false-rejection guarantee by
simulation, and the open-world metrics on cases with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from branchnet.novelty import (
    SCORERS,
    NoveltyScoreError,
    frr_threshold,
    joint_outcome,
    make_scorer,
    ood_metrics,
    scorer_from_state,
)


def gaussian_classes(n: int = 300, dim: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = torch.eye(3, dim) * 5
    x = torch.cat([means[c] + torch.randn(n, dim, generator=g) for c in range(3)])
    y = torch.arange(3).repeat_interleave(n)
    return x, y


def test_logit_scores_match_their_definitions():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    msp = make_scorer("msp").score(None, logits)
    assert torch.allclose(msp, -torch.softmax(logits, 1).max(1).values)
    e = make_scorer("energy", temperature=2.0).score(None, logits)
    manual = -2.0 * torch.log(torch.exp(logits / 2.0).sum(1))
    assert torch.allclose(e, manual)


def test_mahalanobis_matches_a_direct_computation_and_detects_a_shift():
    from sklearn.covariance import LedoitWolf

    x, y = gaussian_classes()
    m = make_scorer("mahalanobis").fit(x, y)
    xn, yn = x.double().numpy(), y.numpy()
    means = np.stack([xn[yn == c].mean(0) for c in range(3)])
    prec = np.linalg.inv(LedoitWolf(assume_centered=True).fit(xn - means[yn]).covariance_)
    q = np.random.default_rng(0).normal(size=(20, 6)) * 3
    direct = np.min([np.einsum("nd,de,ne->n", q - mu, prec, q - mu) for mu in means], axis=0)
    assert np.allclose(m.score(torch.tensor(q, dtype=torch.float32), None).numpy(), direct,
                       rtol=1e-3, atol=1e-3)
    shifted = gaussian_classes(seed=1)[0][:300] + torch.tensor([0, 0, 0, 0, 0, 8.0])
    test = gaussian_classes(seed=2)[0]
    auroc = ood_metrics(m.score(test, None), m.score(shifted, None))["auroc"]
    assert auroc > 0.95


def test_knn_is_the_kth_normalised_distance():
    x, y = gaussian_classes(n=40)
    q = torch.randn(7, 6)
    for k in (1, 5, 1000):  # k above the bank size is capped
        s = make_scorer("knn", k=k).fit(x, y).score(q, None)
        bank = torch.nn.functional.normalize(x, dim=1)
        qq = torch.nn.functional.normalize(q, dim=1)
        d = torch.cdist(qq, bank).sort(dim=1).values[:, min(k, len(x)) - 1]
        assert torch.allclose(s, d, atol=1e-4)


def test_ood_metrics_on_known_cases():
    assert ood_metrics([0, 1, 2], [5, 6])["auroc"] == 1.0
    rng = np.random.default_rng(0)
    same = ood_metrics(rng.normal(size=5000), rng.normal(size=5000))
    assert abs(same["auroc"] - 0.5) < 0.03
    # 20 known scores 1..20: the threshold keeping 95 % of them is 19; novel scores 10, 19,
    # 19.5, 30: two of them (10 and 19) are kept, so FPR95 = 2 / 4
    assert ood_metrics(np.arange(1, 21), [10, 19, 19.5, 30])["fpr95"] == 0.5


def test_joint_outcome_sums_to_one_on_each_side():
    j = joint_outcome([True, False, True, False], [False, False, True, True], [True, False, True])
    assert j["known_correct"] + j["known_wrong"] + j["known_rejected"] == pytest.approx(1)
    assert j["novel_rejected"] + j["novel_accepted"] == pytest.approx(1)
    assert (j["known_correct"], j["known_wrong"], j["novel_rejected"]) == (0.25, 0.25, 2 / 3)


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_state_round_trip(name):
    x, y = gaussian_classes(n=50)
    logits = torch.randn(len(x), 3)
    s = make_scorer(name).fit(x, y)
    meta, tensors = s.state()
    back = scorer_from_state(meta, tensors)
    assert torch.equal(back.score(x, logits), s.score(x, logits))


def test_bad_input():
    with pytest.raises(NoveltyScoreError, match="novelty score 'odin' is not known"):
        make_scorer("odin")
    with pytest.raises(NoveltyScoreError, match="Mahalanobis is not fitted"):
        make_scorer("mahalanobis").score(torch.zeros(2, 3), None)
    x, y = gaussian_classes(n=10)
    with pytest.raises(NoveltyScoreError, match="fitted on 6-d features, got 4-d"):
        make_scorer("knn").fit(x, y).score(torch.zeros(2, 4), None)
    with pytest.raises(NoveltyScoreError, match="k must be a positive integer or 'auto', got 0"):
        make_scorer("knn", k=0)
    with pytest.raises(NoveltyScoreError, match="energy score reads logits"):
        make_scorer("energy").score(x, torch.zeros(len(x), 0))
    for kw, match in (({"target_frr": 0.0}, "target_frr must be a number in"),
                      ({"target_frr": 0.1, "delta": 1.5}, "delta must be a number in")):
        with pytest.raises(NoveltyScoreError, match=match):
            frr_threshold([1.0, 2.0], **kw)
    with pytest.raises(NoveltyScoreError, match="NaN or infinite"):
        frr_threshold([1.0, float("nan")], 0.1)


def test_too_few_calibration_scores_never_reject():
    r = frr_threshold(np.arange(10.0), target_frr=0.01, delta=0.05)
    assert not r.feasible and r.threshold == math.inf


def test_false_rejection_guarantee_by_simulation():
    """1,000 calibration draws of 300 known scores (standard normal, so the population
    false-rejection rate of any threshold is known): the calibrated threshold's rate exceeds
    the target in at most delta of the draws (+ 3 Monte-Carlo SE); the naive empirical 95 %
    quantile exceeds it in far more, so the test can fail."""
    rng = np.random.default_rng(0)
    draws, n, frr, delta = 1000, 300, 0.05, 0.1
    scores = rng.normal(size=(draws, n))
    calibrated = np.array([frr_threshold(s, frr, delta).threshold for s in scores])
    naive = np.quantile(scores, 1 - frr, axis=1)
    violate = (norm.sf(calibrated) > frr).mean()
    violate_naive = (norm.sf(naive) > frr).mean()
    se = math.sqrt(delta * (1 - delta) / draws)
    assert violate <= delta + 3 * se
    assert violate_naive > 2 * delta


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), a=st.floats(0.01, 0.5), b=st.floats(0.01, 0.5))
def test_threshold_is_monotone_in_the_target(seed, a, b):
    s = np.random.default_rng(seed).normal(size=500)
    lo, hi = sorted((a, b))
    assert frr_threshold(s, hi, 0.1).threshold <= frr_threshold(s, lo, 0.1).threshold
