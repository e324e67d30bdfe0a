"""Tests for branchnet.analysis statistics and unit properties (no model training)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from branchnet.analysis import (
    AnalysisError,
    Partition,
    ablation,
    branch_table,
    class_means,
    class_selectivity,
    colourfulness,
    cramers_v,
    dominant_frequency,
    enrichment_pvalue,
    hypergeom_all_in,
    linear_cka,
    mutual_information,
    permutation_test,
    svd_factors,
)

# --------------------------------------------------------------------------- hypergeometric


def test_article_numbers() -> None:
    # Voss et al. 2021: all 9 BW-vs-colour units in 32 of 256; all 30 curve units in 96 of 480
    assert hypergeom_all_in(9, 32, 256) == pytest.approx(2.48e-9, rel=1e-2)
    assert hypergeom_all_in(30, 96, 480) == pytest.approx(1.68e-23, rel=1e-2)
    # the all-in case of the enrichment tail is the same number
    assert enrichment_pvalue(9, 9, 32, 256) == pytest.approx(2.48e-9, rel=1e-2)
    assert enrichment_pvalue(30, 30, 96, 480) == pytest.approx(1.68e-23, rel=1e-2)


def _brute_tail(k: int, family: int, branch: int, n: int) -> float:
    total = math.comb(n, branch)
    return sum(math.comb(family, j) * math.comb(n - family, branch - j)
               for j in range(k, min(family, branch) + 1)) / total


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.data())
def test_enrichment_equals_brute_force(n: int, data: st.DataObject) -> None:
    family = data.draw(st.integers(0, n))
    branch = data.draw(st.integers(0, n))
    k = data.draw(st.integers(0, min(family, branch)))
    assert enrichment_pvalue(k, family, branch, n) == pytest.approx(_brute_tail(k, family, branch, n),
                                                                     rel=1e-9, abs=1e-15)


def test_hypergeometric_errors_and_edges() -> None:
    assert hypergeom_all_in(0, 5, 10) == 1.0
    assert hypergeom_all_in(4, 3, 10) == 0.0
    assert enrichment_pvalue(0, 3, 3, 10) == 1.0
    with pytest.raises(AnalysisError, match="k_in_branch"):
        enrichment_pvalue(4, 3, 5, 10)
    with pytest.raises(AnalysisError, match="non-negative integer"):
        hypergeom_all_in(-1, 3, 10)


def test_branch_table_counts() -> None:
    p = Partition.from_sizes([3, 5])
    cats = ["c", "c", "c", "b", "b", "b", "b", "b"]
    rows = {(r["branch"], r["category"]): r for r in branch_table(cats, p)}
    r = rows[("branch 0", "c")]
    assert (r["observed"], r["category_size"], r["branch_size"]) == (3, 3, 3)
    assert r["expected"] == pytest.approx(3 * 3 / 8)
    assert r["p_value"] == pytest.approx(1 / math.comb(8, 3))
    assert rows[("branch 1", "c")]["observed"] == 0 and rows[("branch 1", "c")]["p_value"] == 1.0
    with pytest.raises(AnalysisError, match="one entry per unit"):
        branch_table(["a"], p)


# --------------------------------------------------------------------------- permutation test


def test_permutation_planted_property_is_significant() -> None:
    rng = np.random.default_rng(0)
    p = Partition.random([10, 30], seed=3)
    values = rng.normal(size=40)
    values[p.members[0]] += 2.0
    r = permutation_test(values, p, n_permutations=500, seed=1)
    assert r.p_value < 0.01
    assert r.null.shape == (500,) and r.n_permutations == 500
    assert r.p_value >= 1 / 501


def test_permutation_uniform_under_null() -> None:
    p = Partition.from_sizes([6, 10, 8])
    rng = np.random.default_rng(42)
    ps = [permutation_test(rng.normal(size=24), p, n_permutations=200, seed=s).p_value for s in range(50)]
    assert 0.35 <= float(np.mean(ps)) <= 0.65
    assert min(ps) >= 1 / 201


def test_permutation_keeps_branch_sizes() -> None:
    p = Partition.from_sizes([2, 5, 3])
    seen = []

    def sizes(values: np.ndarray, labels: np.ndarray) -> float:
        seen.append(np.bincount(labels, minlength=3).tolist())
        return float(values[labels == 0].mean())

    r = permutation_test(np.arange(10.0), p, statistic=sizes, n_permutations=100)
    assert len(seen) == 101 and all(s == [2, 5, 3] for s in seen)
    assert r.observed == pytest.approx(0.5)


def test_permutation_vectorised_matches_loop() -> None:
    rng = np.random.default_rng(1)
    p = Partition.random([4, 7, 5], seed=0)
    v = rng.normal(size=16)

    def max_dev(values: np.ndarray, labels: np.ndarray) -> float:
        return max(abs(values[labels == b].mean() - values.mean()) for b in range(3))

    fast = permutation_test(v, p, n_permutations=300, seed=5)
    slow = permutation_test(v, p, statistic=max_dev, n_permutations=300, seed=5)
    np.testing.assert_allclose(fast.null, slow.null)
    assert fast.p_value == slow.p_value


def test_permutation_mutual_information_and_ties() -> None:
    p = Partition.from_sizes([5, 5])
    clusters = np.r_[np.zeros(5, int), np.ones(5, int)]
    r = permutation_test(clusters, p, statistic="mutual_information", n_permutations=400)
    assert r.observed == pytest.approx(math.log(2))
    assert r.p_value < 0.05
    const = permutation_test(np.ones(10), p, n_permutations=100)
    assert const.p_value == 1.0  # every permutation ties the observed 0


def test_permutation_errors() -> None:
    with pytest.raises(AnalysisError, match=">= 2 units"):
        permutation_test(np.arange(5.0), Partition.from_sizes([1, 4]))
    with pytest.raises(AnalysisError, match="n_permutations must be >= 100"):
        permutation_test(np.arange(6.0), Partition.from_sizes([3, 3]), n_permutations=50)
    with pytest.raises(AnalysisError, match="one row per unit"):
        permutation_test(np.arange(5.0), Partition.from_sizes([3, 3]))
    with pytest.raises(AnalysisError, match="unknown statistic"):
        permutation_test(np.arange(6.0), Partition.from_sizes([3, 3]), statistic="median")


# --------------------------------------------------------------------------- association, CKA


def test_mutual_information_and_cramers_v() -> None:
    a = [0, 0, 1, 1, 2, 2]
    assert mutual_information(a, ["x", "x", "y", "y", "z", "z"]) == pytest.approx(math.log(3))
    assert cramers_v(a, [5, 5, 6, 6, 7, 7]) == pytest.approx(1.0)
    assert cramers_v([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.0)
    assert mutual_information([0, 0, 0], [1, 2, 3]) == 0.0
    with pytest.raises(AnalysisError):
        cramers_v([0, 1], [0, 1, 2])


def test_linear_cka_properties() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 2.5 * x) == pytest.approx(1.0)
    assert linear_cka(x, x @ q) == pytest.approx(1.0)
    assert linear_cka(x, x + 7.0) == pytest.approx(1.0)  # column centring
    y = rng.normal(size=(500, 4))
    assert linear_cka(x, y) < 0.05
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x))
    z = np.c_[x[:, :2], rng.normal(size=(500, 3))]
    assert 0.1 < linear_cka(x, z) < 0.9
    assert math.isnan(linear_cka(x, np.ones((500, 2))))
    with pytest.raises(AnalysisError, match="at least 10 samples"):
        linear_cka(x[:5], x[:5])
    with pytest.raises(AnalysisError, match="same samples"):
        linear_cka(x, x[:100])


# --------------------------------------------------------------------------- unit properties


def test_colourfulness_grey_vs_red_green() -> None:
    rng = np.random.default_rng(0)
    grey = np.repeat(rng.normal(size=(1, 1, 5, 5)), 3, axis=1)
    red_green = np.zeros((1, 3, 5, 5))
    red_green[0, 0] = rng.normal(size=(5, 5))
    red_green[0, 1] = -red_green[0, 0]
    c = colourfulness(torch.tensor(np.concatenate([grey, red_green, np.zeros((1, 3, 5, 5))])))
    assert c[0] == pytest.approx(0.0, abs=1e-12)
    assert c[1] > 0.95
    assert c[2] == 0.0
    with pytest.raises(AnalysisError, match="RGB"):
        colourfulness(np.ones((2, 4, 3, 3)))


def test_dominant_frequency_checkerboard_vs_ramp() -> None:
    checker = (np.indices((6, 6)).sum(0) % 2).astype(float)
    ramp = np.tile(np.linspace(0, 1, 6), (6, 1))
    w = np.stack([np.stack([checker] * 3), np.stack([ramp] * 3), np.ones((3, 6, 6))])
    f = dominant_frequency(w)
    assert f[0] > f[1] > 0
    assert f[0] == pytest.approx(math.sqrt(0.5))  # all energy at (0.5, 0.5) cycles/pixel
    assert f[2] == 0.0


def test_svd_factors_separate_input_blocks() -> None:
    rng = np.random.default_rng(0)
    w = rng.uniform(0, 0.1, size=(8, 6, 3, 3))
    w[:4, :3] += 1.0  # outputs 0-3 read inputs 0-2, outputs 4-7 read inputs 3-5
    w[4:, 3:] += 1.0
    f = svd_factors(w * np.sign(rng.normal(size=w.shape)), k=2)  # |W| ignores signs
    assert f.shape == (6, 2)
    assert np.all(np.sign(f[:3, 0]) == np.sign(f[0, 0])) and np.all(np.sign(f[3:, 0]) == -np.sign(f[0, 0]))
    with pytest.raises(AnalysisError, match="k must be"):
        svd_factors(w, k=7)


def test_class_means_and_selectivity() -> None:
    acts = np.zeros((12, 2))
    y = np.repeat([0, 1, 2], 4)
    acts[y == 1, 0] = 3.0  # unit 0 fires only for class 1
    acts[:, 1] = 1.0  # unit 1 fires for everything
    m = class_means(acts, y, 3)
    np.testing.assert_allclose(m, [[0, 3, 0], [1, 1, 1]])
    np.testing.assert_allclose(class_selectivity(m), [1.0, 0.0])
    with pytest.raises(AnalysisError, match="at least 10 samples"):
        class_means(acts[:6], y[:6], 3)
    with pytest.raises(AnalysisError, match="at least 2 samples of every class"):
        class_means(acts, np.r_[np.zeros(11, int), 2], 3)


# --------------------------------------------------------------------------- ablation


def _class0_net() -> nn.Module:
    """Units 0-1 carry the evidence for class 0, units 2-3 for class 1 (hand-built)."""
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]]))
        net[2].bias.copy_(torch.tensor([0.0, 0.1]))
    return net


def test_ablation_hurts_only_the_class_the_branch_serves() -> None:
    net = _class0_net().train()
    rng = np.random.default_rng(0)
    y = torch.tensor(rng.integers(0, 2, size=40))
    x = torch.nn.functional.one_hot(y, 2).float() + 0.05 * torch.tensor(rng.random((40, 2))).float()
    p = Partition.from_sizes([2, 2], names=["class-0 units", "class-1 units"])
    r = ablation(net, "0", p, x, y, n_classes=2, batch_size=16)
    np.testing.assert_allclose(r["baseline"], [1.0, 1.0])
    assert r["drop"][0, 0] < -0.5 and r["drop"][0, 1] == 0.0
    assert r["drop"][1, 0] == 0.0  # zeroing the class-1 units leaves class 0 alone
    assert r["drop"][1, 1] == 0.0  # (and class 1 survives on its bias)
    assert r["ablated"].shape == (2, 2) and r["branches"] == ["class-0 units", "class-1 units"]
    assert net.training  # mode restored
    with pytest.raises(AnalysisError, match="at least 1 sample of every class"):
        ablation(net, "0", p, x, torch.zeros(40, dtype=torch.long), n_classes=2)
    with pytest.raises(AnalysisError, match="partition has 4 units"):
        ablation(net, "2", p, x, y, n_classes=2)
