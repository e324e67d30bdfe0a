"""Tests for branchnet.analysis.diversity: Breiman strength/correlation, pairwise diversity,
label-free disagreement, KL, mutual information and the ensemble report."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from branchnet import metrics
from branchnet.analysis.diversity import (
    breiman,
    correctness,
    ensemble_mi,
    ensemble_report,
    entropy,
    kl_matrix,
    oracle_matrices,
    pair_counts,
    pair_mean,
    pairwise_diversity,
    prediction_disagreement,
    raw_margins,
    sample_disagreement,
)
from branchnet.virtual.merge import merge_probs

# 3 members, 5 examples, 4 classes. Ties among wrong classes at x1 (1 vs 2) and x3 (0 vs 1).
Y = np.array([0, 0, 1, 2, 3])
PREDS = np.array([[0, 0, 0], [1, 2, 0], [3, 3, 1], [2, 0, 1], [3, 0, 0]])
# j_hat = 1 (lowest, no wrong vote), 1 (tie 1/2), 3, 0 (tie 0/1), 0
RMG = np.array([[1, 1, 1], [-1, 0, 1], [-1, -1, 1], [1, -1, 0], [1, -1, -1]])


def _probs(N, K, C, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, K, C, generator=g, dtype=torch.float64) * scale
    return logits, logits.softmax(-1)


# --------------------------------------------------------------------------- Breiman


def test_raw_margins_by_hand_with_ties_to_the_lowest_class():
    assert raw_margins(PREDS, Y, 4).tolist() == RMG.tolist()


def test_breiman_by_hand():
    b = breiman(PREDS, Y, 4)
    assert b["strength"] == pytest.approx(1 / 15)
    # member sds: sqrt(0.96), 0.8, 0.8; covariances 0.08, -0.48, 0.36
    rho = (0.08 - 0.48 + 0.36) / (2 * 0.8 * math.sqrt(0.96) + 0.64)
    assert b["correlation"] == pytest.approx(rho)
    assert b["bound"] == pytest.approx(rho * (1 - 1 / 225) * 225)


def _breiman_reference(rmg):
    """rho_bar straight from the definition with Pearson correlations, pair by pair."""
    K = rmg.shape[1]
    num = den = 0.0
    for m, n in itertools.combinations(range(K), 2):
        sm, sn = rmg[:, m].std(), rmg[:, n].std()
        if sm > 0 and sn > 0:
            num += np.corrcoef(rmg[:, m], rmg[:, n])[0, 1] * sm * sn
            den += sm * sn
    return num / den if den > 0 else 0.0


_preds_cases = st.tuples(st.integers(4, 30), st.integers(2, 5), st.integers(2, 4), st.integers(0, 10**6))


@settings(max_examples=40, deadline=None)
@given(_preds_cases)
def test_breiman_matches_the_definition_for_any_k(case):
    N, K, C, seed = case
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, N)
    # members right with probability 0.6, else a random class
    preds = np.where(rng.random((N, K)) < 0.6, y[:, None], rng.integers(0, C, (N, K)))
    b = breiman(preds, y, C)
    rmg = raw_margins(preds, y, C)
    assert b["strength"] == pytest.approx(rmg.mean())
    assert b["correlation"] == pytest.approx(_breiman_reference(rmg.astype(float)), abs=1e-12)
    assert -1 <= b["correlation"] <= 1
    assert not any(math.isnan(v) for v in b.values())


@settings(max_examples=40, deadline=None)
@given(_preds_cases)
def test_two_members_correlation_is_pearson(case):
    N, _, C, seed = case
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, N)
    preds = np.where(rng.random((N, 2)) < 0.5, y[:, None], rng.integers(0, C, (N, 2)))
    rmg = raw_margins(preds, y, C)
    assume(rmg[:, 0].std() > 0 and rmg[:, 1].std() > 0)
    pearson = np.corrcoef(rmg[:, 0], rmg[:, 1])[0, 1]
    assert breiman(preds, y, C)["correlation"] == pytest.approx(pearson)


def test_breiman_edge_cases():
    y = np.array([0, 1, 0, 1])
    right = np.stack([y, y, y], 1)
    # identical, non-constant members: perfectly correlated
    same = np.stack([[0, 0, 1, 1]] * 3, 1)
    assert breiman(same, y, 2)["correlation"] == pytest.approx(1.0)
    # every margin constant (all right): no NaN, correlation 0, bound 0
    assert breiman(right, y, 2) == {"strength": 1.0, "correlation": 0.0, "bound": 0.0}
    # one constant member drops out; the other two decide
    mixed = np.stack([y, [0, 0, 1, 1], [0, 0, 1, 1]], 1)
    assert breiman(mixed, y, 2)["correlation"] == pytest.approx(1.0)
    # K = 1: the member with itself
    assert breiman(same[:, :1], y, 2)["correlation"] == 1.0
    assert breiman(right[:, :1], y, 2)["correlation"] == 0.0
    # non-positive strength: the bound does not apply
    wrong = 1 - right
    assert breiman(wrong, y, 2)["bound"] == math.inf


def test_breiman_rejects_bad_input():
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        breiman(PREDS, Y, 1)
    with pytest.raises(ValueError, match=r"preds must lie in \[0, 3\), got min 0, max 3"):
        breiman(PREDS, Y, 3)
    with pytest.raises(ValueError, match="preds has 5 rows but y has 4 labels"):
        breiman(PREDS, Y[:4], 4)
    with pytest.raises(ValueError, match=r"preds must have shape \(N, K\), got \(5,\)"):
        breiman(Y, Y, 4)
    with pytest.raises(ValueError, match="integer class indices, got dtype float64"):
        breiman(PREDS.astype(float), Y, 4)
    with pytest.raises(ValueError, match=r"y must lie in \[0, 4\)"):
        breiman(PREDS, Y + 1, 4)


# --------------------------------------------------------------------------- pairwise


def test_pair_statistics_by_hand():
    # correct: m0 [1,0,0,1,1], m1 [1,0,0,0,0], m2 [1,1,1,0,0]
    m = oracle_matrices(PREDS, Y)
    s24 = math.sqrt(24)
    expected = {  # pairs (0,1), (0,2), (1,2)
        "disagreement": [2 / 5, 4 / 5, 2 / 5],
        "double_fault": [2 / 5, 0, 2 / 5],
        "q": [1.0, -1.0, 1.0],
        "rho": [2 / s24, -2 / 3, 2 / s24],
    }
    for name, values in expected.items():
        got = [m[name][i, j] for i, j in [(0, 1), (0, 2), (1, 2)]]
        assert got == pytest.approx(values), name
        assert np.allclose(m[name], m[name].T)
    d = pairwise_diversity(PREDS, Y)
    assert d["disagreement"] == pytest.approx(8 / 15) and d["double_fault"] == pytest.approx(4 / 15)
    assert d["q"] == pytest.approx(1 / 3)
    assert d["rho"] == pytest.approx((4 / s24 - 2 / 3) / 3)
    # label-free: the predicted classes differ on 3, 4 and 3 of the 5 examples
    assert d["label_free_disagreement"] == pytest.approx(2 / 3)
    assert sample_disagreement(PREDS).tolist() == pytest.approx([0, 1, 2 / 3, 1, 2 / 3])
    assert np.diag(m["double_fault"]).tolist() == pytest.approx([2 / 5, 4 / 5, 2 / 5])
    assert np.diag(m["disagreement"]).tolist() == [0, 0, 0]


def test_pair_counts_and_undefined_q():
    c = correctness(np.array([[0, 0], [0, 1], [1, 0], [1, 1], [0, 0]]), np.zeros(5, int))
    counts = pair_counts(c)
    assert [int(counts[k][0, 1]) for k in ("n11", "n10", "n01", "n00")] == [2, 1, 1, 1]
    assert counts["n10"][0, 1] == counts["n01"][1, 0]
    # member 0 always right, member 1 sometimes: N00 = N01 = 0, so Q and rho are undefined
    m = oracle_matrices(np.array([[0, 0], [0, 1]]), np.array([0, 0]))
    assert math.isnan(m["q"][0, 1]) and math.isnan(m["rho"][0, 1])
    assert math.isnan(pairwise_diversity(np.array([[0, 0], [0, 1]]), np.array([0, 0]))["q"])
    with pytest.raises(ValueError, match=r"\(N, K\) bool array"):
        pair_counts(np.ones((3, 2)))


def test_pair_mean():
    m = np.array([[0.0, 1.0, np.nan], [3.0, 0.0, 2.0], [5.0, 6.0, 0.0]])
    assert pair_mean(m) == 1.5
    assert pair_mean(m, ordered=True) == pytest.approx((1 + 3 + 2 + 5 + 6) / 5)
    assert math.isnan(pair_mean(np.zeros((1, 1))))


@settings(max_examples=30, deadline=None)
@given(_preds_cases)
def test_sample_disagreement_averages_to_pairwise(case):
    N, K, C, seed = case
    preds = np.random.default_rng(seed).integers(0, C, (N, K))
    assert sample_disagreement(preds).mean() == pytest.approx(pair_mean(prediction_disagreement(preds)))


# --------------------------------------------------------------------------- KL, MI


def test_kl_matrix_matches_torch():
    _, p = _probs(7, 3, 4, seed=0)
    kl = kl_matrix(p)
    for i, j in itertools.product(range(3), repeat=2):
        ref = torch.nn.functional.kl_div(p[:, j].log(), p[:, i], reduction="batchmean")
        assert kl[i, j] == pytest.approx(float(ref), abs=1e-12)
    assert np.diag(kl).tolist() == [0, 0, 0]


def test_entropy_and_mi_identity():
    assert float(entropy(torch.tensor([0.25] * 4))) == pytest.approx(math.log(4))
    _, p = _probs(6, 4, 3, seed=1)
    mean = p.mean(1, keepdim=True)
    kl_to_mean = (p * (p.log() - mean.log())).sum(-1).mean(1)  # (1/K) Σ_k KL(p_k || p̄)
    assert ensemble_mi(p) == pytest.approx(kl_to_mean.numpy())


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 8), K=st.integers(1, 5), C=st.integers(2, 5), seed=st.integers(0, 10**6),
       scale=st.sampled_from([0.1, 1.0, 5.0, 40.0]))
def test_mi_and_kl_are_non_negative_and_bounded(N, K, C, seed, scale):
    _, p = _probs(N, K, C, seed, scale)
    mi = ensemble_mi(p)
    assert mi.shape == (N,)
    assert (mi >= 0).all() and (mi <= math.log(K) + 1e-9).all()
    assert (kl_matrix(p) >= 0).all()


def test_identical_members_show_no_diversity():
    _, p1 = _probs(20, 1, 3, seed=2, scale=1.0)
    p = p1.expand(20, 3, 3)
    y = torch.tensor([0, 1, 2, 0] * 5)
    d = ensemble_report(p, y)["diversity"]
    assert d["disagreement"] == 0 and d["label_free_disagreement"] == 0
    assert d["mi"] == pytest.approx(0, abs=1e-12) and d["kl"] == pytest.approx(0, abs=1e-12)
    assert d["correlation"] == pytest.approx(1.0)
    assert d["q"] == pytest.approx(1.0) and d["rho"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- report


@settings(max_examples=25, deadline=None)
@given(N=st.integers(2, 12), K=st.integers(1, 4), C=st.integers(2, 4), seed=st.integers(0, 10**6),
       scale=st.sampled_from([0.5, 2.0, 10.0]))
def test_ensemble_nll_is_at_most_the_mean_member_nll(N, K, C, seed, scale):
    """Jensen: the after-mean by convexity of -log, the before-mean by AM-GM."""
    _, p = _probs(N, K, C, seed, scale)
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(seed))
    for how in ("before_mean", "after_mean"):
        r = ensemble_report(p, y, merge=how)
        assert r["ensemble"]["nll"] <= r["branch_mean"]["nll"] + 1e-9


def test_report_contents():
    logits, p = _probs(40, 3, 4, seed=3, scale=2.0)
    y = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(0))
    r = ensemble_report(p, y)
    assert set(r) == {"branches", "branch_mean", "ensemble", "diversity"}
    assert len(r["branches"]) == 3
    for k, b in enumerate(r["branches"]):
        assert set(b) == {"accuracy", "nll", "brier", "ece"}
        assert b["accuracy"] == metrics.accuracy(p[:, k].argmax(-1), y)
        assert b["ece"] == pytest.approx(metrics.ece(p[:, k], y, n_bins=15))
    assert r["branch_mean"]["accuracy"] == pytest.approx(np.mean([b["accuracy"] for b in r["branches"]]))
    # merged=None, before_mean: softmax of mean log-probabilities = softmax of mean logits
    merged = merge_probs(logits, "before_mean")
    assert r == ensemble_report(p, y, merged)
    assert r["ensemble"]["nll"] == pytest.approx(metrics.nll(merged, y))
    after = ensemble_report(p, y, merge="after_mean")
    assert after["ensemble"]["brier"] == pytest.approx(metrics.brier(p.mean(1), y))
    div = r["diversity"]
    preds = p.argmax(-1)
    assert {k: div[k] for k in ("strength", "correlation", "bound")} == breiman(preds, y, 4)
    assert div["disagreement_matrix"] == oracle_matrices(preds, y)["disagreement"].tolist()
    assert {"kl", "mi", "q", "rho", "double_fault", "kl_matrix", "q_matrix"} <= set(div)
    json.dumps(r)  # plain floats and lists
    for v in div.values():
        assert isinstance(v, (float, list))


def test_report_rejects_bad_input():
    _, p = _probs(5, 2, 3, seed=0)
    y = torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="apply softmax to the logits first"):
        ensemble_report(p * 2, y)
    with pytest.raises(ValueError, match=r"non-empty \(N, K, C\) probabilities, got shape \(5, 3\)"):
        ensemble_report(p[:, 0], y)
    with pytest.raises(ValueError, match=r"y must be \(5,\) integer labels"):
        ensemble_report(p, y[:4])
    with pytest.raises(ValueError, match=r"merged must be \(5, 3\) ensemble probabilities, got \(5, 2\)"):
        ensemble_report(p, y, p[:, :, :2].sum(1))
    with pytest.raises(ValueError, match="merge must be 'before_mean' or 'after_mean', got 'concat'"):
        ensemble_report(p, y, merge="concat")
    with pytest.raises(ValueError, match="probs has 2 members but preds has 3"):
        pairwise_diversity(np.zeros((5, 3), int), y, p)
