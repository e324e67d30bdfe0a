"""Tests for branchnet.virtual.bagging: per-branch bags, their dataset and sampler."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from branchnet.data.batches import make_loader
from branchnet.virtual.bagging import BAG_MODES, BaggedPairs, BranchBags, BranchShuffle

# --------------------------------------------------------------------------- BranchBags.make


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "bagging"},
         r"mode must be one of \['none', 'same', 'bootstrap', 'subsample'\], got 'bagging'"),
        ({"mode": "bootstrap", "frac": 0.0}, r"frac must be a number in \(0, 1\], got 0.0"),
        ({"mode": "bootstrap", "frac": 1.5}, r"got 1.5"),
        ({"mode": "subsample", "frac": -0.1}, r"got -0.1"),
        ({"mode": "subsample", "frac": True}, r"got True"),
        ({"mode": "subsample", "frac": "0.5"}, r"got '0.5'"),
        ({"mode": "none", "frac": 0.5}, r"mode 'none' uses all 10 rows, so frac must be 1.0 \(got 0.5\)"),
        ({"mode": "same", "frac": 0.5}, r"mode 'same'"),
        ({"mode": "subsample", "frac": 0.05}, r"leaves int\(frac \* n\) = 0 rows"),
        ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
        ({"seed": 1.5}, r"got 1.5"),
    ],
)
def test_make_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BranchBags.make(10, 2, **kwargs)


@pytest.mark.parametrize(("n", "k", "match"), [(0, 2, r"n \(number of training rows\) must be an integer "
                                                      r">= 1, got 0"),
                                              (5, 0, r"branches must be an integer >= 1, got 0"),
                                              (5.0, 2, r"got 5.0")])
def test_make_rejects_bad_sizes(n, k, match):
    with pytest.raises(ValueError, match=match):
        BranchBags.make(n, k)


def test_none_gives_each_branch_its_own_order_of_all_rows():
    b = BranchBags.make(50, 3, mode="none", seed=1)
    assert b.index.shape == (3, 50) and b.size == 50
    for row in b.index:
        assert sorted(row.tolist()) == list(range(50))
    assert not torch.equal(b.index[0], b.index[1]) and not torch.equal(b.index[1], b.index[2])
    assert not b.oob.any()
    assert b.unique_fraction() == [1.0, 1.0, 1.0]


def test_same_shares_one_order():
    b = BranchBags.make(30, 4, mode="same", seed=2)
    assert all(torch.equal(b.index[0], row) for row in b.index)
    assert sorted(b.index[0].tolist()) == list(range(30))
    assert b.index[0].tolist() != list(range(30))  # shuffled, not the identity
    assert b.unique_fraction() == [1.0] * 4


def test_bootstrap_keeps_about_632_percent_unique():
    b = BranchBags.make(20_000, 3, mode="bootstrap", seed=0)
    assert b.index.shape == (3, 20_000)
    for u in b.unique_fraction():
        assert abs(u - (1 - (1 - 1 / 20_000) ** 20_000)) < 0.01  # ≈ 1 - 1/e
    assert len(set(b.unique_fraction())) == 3  # the branches draw different bags


def test_bootstrap_frac_sets_the_bag_size():
    b = BranchBags.make(1000, 2, mode="bootstrap", frac=0.25, seed=0)
    assert b.size == 250
    assert all(u <= 0.25 for u in b.unique_fraction())


def test_subsample_draws_distinct_rows():
    b = BranchBags.make(101, 3, mode="subsample", frac=0.5, seed=4)
    assert b.size == 50
    for row in b.index:
        assert len(set(row.tolist())) == 50
    assert b.unique_fraction() == [50 / 101] * 3
    assert not torch.equal(b.index[0].sort().values, b.index[1].sort().values)


def test_bags_are_deterministic_and_seeded():
    a = BranchBags.make(100, 3, mode="bootstrap", seed=7)
    assert a == BranchBags.make(100, 3, mode="bootstrap", seed=7)
    assert a != BranchBags.make(100, 3, mode="bootstrap", seed=8)
    assert a != BranchBags.make(100, 3, mode="subsample", frac=1.0, seed=7)


@pytest.mark.parametrize("mode", ["none", "bootstrap", "subsample"])
def test_a_branch_bag_does_not_depend_on_the_number_of_branches(mode):
    frac = 0.6 if mode != "none" else 1.0
    two = BranchBags.make(40, 2, mode=mode, frac=frac, seed=3)
    five = BranchBags.make(40, 5, mode=mode, frac=frac, seed=3)
    assert torch.equal(two.index, five.index[:2])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(1, 5), mode=st.sampled_from(BAG_MODES),
       frac=st.floats(0.05, 1.0), seed=st.integers(0, 2**31))
def test_bag_invariants(n, k, mode, frac, seed):
    if mode in ("none", "same"):
        frac = 1.0
    if int(frac * n) < 1:
        with pytest.raises(ValueError, match="leaves"):
            BranchBags.make(n, k, mode=mode, frac=frac, seed=seed)
        return
    b = BranchBags.make(n, k, mode=mode, frac=frac, seed=seed)
    assert b.index.dtype == torch.int64 and b.index.shape == (k, int(frac * n))
    assert b.index.min() >= 0 and b.index.max() < n
    for kk in range(k):  # oob is exactly the complement of the bag
        assert set(torch.nonzero(~b.oob[kk]).flatten().tolist()) == set(b.index[kk].tolist())
    d = json.loads(json.dumps(b.to_dict()))
    assert BranchBags.from_dict(d) == b


# --------------------------------------------------------------------------- to_dict / from_dict


@pytest.mark.parametrize("mode", BAG_MODES)
def test_saved_bags_regenerate_identically(mode):
    frac = 0.7 if mode in ("bootstrap", "subsample") else 1.0
    b = BranchBags.make(77, 3, mode=mode, frac=frac, seed=11)
    d = b.to_dict()
    assert set(d) == {"mode", "frac", "seed", "n", "branches", "digest"}
    again = BranchBags.from_dict(json.loads(json.dumps(d)))
    assert torch.equal(again.index, b.index) and torch.equal(again.oob, b.oob)
    assert again.digest() == b.digest()


def test_from_dict_checks_the_digest_and_keys():
    d = BranchBags.make(20, 2, mode="bootstrap", seed=0).to_dict()
    with pytest.raises(ValueError, match="regenerated bags differ"):
        BranchBags.from_dict({**d, "digest": "0" * 16})
    with pytest.raises(ValueError, match=r"missing \['seed'\]"):
        BranchBags.from_dict({k: v for k, v in d.items() if k != "seed"})
    with pytest.raises(ValueError, match=r"unknown \['colour'\]"):
        BranchBags.from_dict({**d, "colour": 1})
    with pytest.raises(ValueError, match="must be described by a dict"):
        BranchBags.from_dict([1, 2])  # type: ignore[arg-type]
    no_digest = {k: v for k, v in d.items() if k != "digest"}
    assert BranchBags.from_dict(no_digest).digest() == d["digest"]


# --------------------------------------------------------------------------- BaggedPairs


def _data(n=12, d=3):
    x = torch.arange(n * d, dtype=torch.float32).view(n, d)
    return x, torch.arange(n) * 10


def test_getitems_maps_positions_to_each_branch_rows():
    x, y = _data()
    bags = BranchBags.make(12, 3, mode="bootstrap", seed=5)
    ds = BaggedPairs(x, y, bags)
    assert len(ds) == 12
    xb, yb = ds.__getitems__([0, 4, 7])
    assert xb.shape == (3, 3, 3) and yb.shape == (3, 3)
    for b, j in enumerate([0, 4, 7]):
        for k in range(3):
            row = int(bags.index[k, j])
            assert torch.equal(xb[b, k], x[row]) and yb[b, k] == y[row]
    # one position per branch
    xt, yt = ds.__getitems__([(1, 2, 3)])
    assert [int(v) for v in yt[0]] == [int(y[bags.index[k, k + 1]]) for k in range(3)]
    assert torch.equal(xt[0, 2], x[bags.index[2, 3]])
    x1, y1 = ds[4]
    assert torch.equal(x1, xb[1]) and torch.equal(y1, yb[1])
    assert torch.equal(ds[(1, 2, 3)][1], yt[0])


def test_bagged_pairs_rejects_bad_inputs():
    x, y = _data()
    bags = BranchBags.make(12, 2, seed=0)
    with pytest.raises(ValueError, match="x has 11 rows but y has 12"):
        BaggedPairs(x[:11], y, bags)
    with pytest.raises(ValueError, match="drawn over 12 rows but x and y have 10"):
        BaggedPairs(x[:10], y[:10], bags)
    ds = BaggedPairs(x, y, bags)
    with pytest.raises(ValueError, match=r"ints or 2-tuples"):
        ds.__getitems__([(0, 1, 2)])
    with pytest.raises(IndexError, match=r"\[0, 12\), got min 0, max 12"):
        ds.__getitems__([0, 12])


def _epoch(ds, batch_size, seed=0, epoch=0, shuffle=True):
    loader = make_loader(ds, batch_size=batch_size, shuffle=shuffle, seed=seed)
    if shuffle:
        loader.sampler.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("mode", BAG_MODES)
def test_one_shuffled_epoch_serves_each_bag_exactly_once(mode):
    n, K = 23, 3
    x, y = _data(n)
    frac = 0.8 if mode in ("bootstrap", "subsample") else 1.0
    bags = BranchBags.make(n, K, mode=mode, frac=frac, seed=1)
    ds = BaggedPairs(x, y, bags)
    batches = _epoch(ds, batch_size=5)
    assert all(xb.shape[1:] == (K, 3) and yb.shape[1] == K for xb, yb in batches)
    ys = torch.cat([yb for _, yb in batches])
    assert len(ys) == bags.size
    for k in range(K):
        assert Counter((ys[:, k] // 10).tolist()) == Counter(bags.index[k].tolist())
    first = batches[0][1]
    if mode == "same":
        assert all(torch.equal(yb[:, 0], yb[:, k]) for _, yb in batches for k in range(K))
    else:  # every branch gets its own minibatches
        assert not torch.equal(first[:, 0], first[:, 1])


def test_shuffle_is_reproducible_and_changes_per_epoch():
    x, y = _data(40)
    ds = BaggedPairs(x, y, BranchBags.make(40, 2, mode="none", seed=0))
    e0 = torch.cat([yb for _, yb in _epoch(ds, 8, seed=3, epoch=0)])
    assert torch.equal(e0, torch.cat([yb for _, yb in _epoch(ds, 8, seed=3, epoch=0)]))
    assert not torch.equal(e0, torch.cat([yb for _, yb in _epoch(ds, 8, seed=3, epoch=1)]))
    assert not torch.equal(e0, torch.cat([yb for _, yb in _epoch(ds, 8, seed=4, epoch=0)]))


def test_unshuffled_loader_follows_each_bag_order():
    x, y = _data(10)
    bags = BranchBags.make(10, 2, mode="none", seed=9)
    ys = torch.cat([yb for _, yb in _epoch(BaggedPairs(x, y, bags), 4, shuffle=False)])
    assert torch.equal(ys.T // 10, bags.index)


def test_branch_shuffle_sampler():
    s = BranchShuffle(6, 3, seed=0)
    rows = list(s)
    assert len(rows) == len(s) == 6 and all(len(r) == 3 for r in rows)
    for k in range(3):
        assert sorted(r[k] for r in rows) == list(range(6))
    shared = list(BranchShuffle(6, 3, seed=0, shared=True))
    assert all(len(set(r)) == 1 for r in shared)
    with pytest.raises(ValueError, match="branches must be an integer >= 1, got 0"):
        BranchShuffle(6, 0)
