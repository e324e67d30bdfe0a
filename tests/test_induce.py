"""Induced class hierarchies (``Hierarchy.induce``) on sources with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from branchnet.data.dataset import DataError
from branchnet.data.hierarchy import ROOT, Hierarchy
from branchnet.data.induce import class_means, confusion_from_predictions, output_weights

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
NAMES = [f"k{i}" for i in range(9)]


def blocks(sizes: list[int], rng: np.random.Generator) -> np.ndarray:
    """A confusion matrix confused only inside blocks of the given sizes."""
    n = sum(sizes)
    c = np.zeros((n, n))
    start = 0
    for s in sizes:
        c[start:start + s, start:start + s] = rng.integers(1, 20, size=(s, s))
        start += s
    np.fill_diagonal(c, 100)
    return c


def clustered(rng: np.random.Generator, n_per: int = 3, dim: int = 8) -> np.ndarray:
    centres = np.eye(3, dim) * 10
    return np.repeat(centres, n_per, axis=0) + rng.normal(scale=0.5, size=(3 * n_per, dim))


def truth(h: Hierarchy) -> set[frozenset[str]]:
    return {frozenset(v) for v in h.top_groups().values()}


EXPECTED = {frozenset(NAMES[i:i + 3]) for i in (0, 3, 6)}


def test_confusion_blocks_are_recovered():
    h = Hierarchy.induce("confusion", NAMES, confusion=blocks([3, 3, 3], np.random.default_rng(0)),
                         groups=3)
    assert truth(h) == EXPECTED


@pytest.mark.parametrize("method", ["features", "weights"])
def test_rows_around_centres_are_recovered(method):
    rows = clustered(np.random.default_rng(1))
    h = Hierarchy.induce(method, NAMES, groups=3, **{method: rows})
    assert truth(h) == EXPECTED


def test_deterministic_for_a_seed():
    c = np.random.default_rng(3).integers(0, 50, size=(10, 10)) + np.eye(10, dtype=int) * 200
    a = Hierarchy.induce("confusion", CIFAR, confusion=c, groups=3, depth=2, seed=7)
    b = Hierarchy.induce("confusion", CIFAR, confusion=c, groups=3, depth=2, seed=7)
    assert a == b and a.to_dict() == b.to_dict()


def test_depth_two_nests_groups_and_names_follow_members():
    rows = np.concatenate([clustered(np.random.default_rng(2)),
                           clustered(np.random.default_rng(3)) + 40])
    names = [f"c{i}" for i in range(18)]
    h = Hierarchy.induce("features", names, features=rows, groups=2, depth=2)
    assert h.depth() == 3  # root -> groups -> subgroups -> classes
    groups = h.children(ROOT)
    assert len(groups) == 2 and all(not h.is_leaf(g) for g in groups)
    for g in h.internal_nodes()[1:]:
        first = g.split("+")[0]
        assert first in h.leaves_under(g)  # named after a member
    assert len(set(h.internal_nodes())) == len(h.internal_nodes())


def test_agreement_is_the_adjusted_rand_index():
    hand = Hierarchy.builtin("cifar10").bind(CIFAR)
    assert hand.agreement(hand) == 1.0
    flipped = Hierarchy.from_dict({"a": ["airplane", "bird"], "b": [c for c in CIFAR
                                                                    if c not in ("airplane", "bird")]})
    assert hand.agreement(flipped) < 0.5
    with pytest.raises(DataError, match="different classes"):
        hand.agreement(Hierarchy.flat(CIFAR[:5]))


def test_sources_from_a_model_and_predictions():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    assert np.allclose(output_weights(net, 5), net[2].weight.detach().numpy())
    with pytest.raises(DataError, match=r"no nn\.Linear layer with 7 outputs"):
        output_weights(net, 7)
    c = confusion_from_predictions(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), 3)
    assert c.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    means = class_means(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 0, 1]), 2)
    assert means.tolist() == [[2.0], [5.0]]
    with pytest.raises(DataError, match=r"classes \[2\] have no rows"):
        class_means(torch.zeros(2, 1), torch.tensor([0, 1]), 3)


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "kmeans", "features": np.eye(3)}, "induce must be one of"),
    ({"method": "features", "features": np.eye(3), "groups": 1}, "groups must be an integer >= 2"),
    ({"method": "features", "features": np.eye(3), "groups": 4},
     "groups=4 but there are only 3 classes"),
    ({"method": "features", "features": np.eye(3), "depth": 0}, "depth must be an integer >= 1"),
    ({"method": "features", "features": np.eye(4)}, r"must be a \[3, D\] matrix .* \(4, 4\)"),
    ({"method": "weights", "weights": np.full((3, 2), np.nan)}, "NaN or infinite"),
    ({"method": "weights", "features": np.eye(3)}, "needs exactly its own source weights"),
    ({"method": "confusion", "confusion": np.array([[5, 0, 1], [2, 0, 3], [1, 0, 4]])},
     r"never predicts class\(es\) \['b'\]"),
])
def test_bad_input(kwargs, match):
    method = kwargs.pop("method")
    with pytest.raises(DataError, match=match):
        Hierarchy.induce(method, ["a", "b", "c"], **kwargs)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 12), groups=st.integers(2, 4), depth=st.integers(1, 3),
       method=st.sampled_from(["confusion", "features", "weights"]), seed=st.integers(0, 99))
def test_any_source_gives_a_valid_tree(n, groups, depth, method, seed):
    groups = min(groups, n)
    rng = np.random.default_rng(seed)
    names = [f"x{i}" for i in range(n)]
    source = (rng.integers(1, 30, size=(n, n)) if method == "confusion"
              else rng.normal(size=(n, 5)))
    h = Hierarchy.induce(method, names, groups=groups, depth=depth, seed=seed, **{method: source})
    assert sorted(h.leaves) == sorted(names)  # every class exactly once
    assert len(h.children(ROOT)) <= groups  # the root is split whenever it has more classes
    assert all(len(h.children(node)) >= 2 for node in h.internal_nodes())
    assert h.depth() <= depth + 1
