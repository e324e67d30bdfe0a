"""Tests for branchnet.tree: TreeLayout tables, BranchTree fit / predict / calibrate / save /
load / TorchScript, the routing policies and abstention, router and node-input variants,
pretrained parents, custom heads, resume, and the errors for bad input.

Everything runs on tiny synthetic data whose hierarchy is learnable: Gaussian blobs of 6
classes in 2 groups (the groups are far apart, classes within a group closer), inputs [N, 8],
parents ``mlp([8, 32, 16], n)`` tapped at ``hidden.1``, a few epochs each.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import branchnet.engine as engine
from branchnet import models
from branchnet.checkpoint import CheckpointError
from branchnet.data import Data, DataError, Split
from branchnet.data.hierarchy import Hierarchy
from branchnet.tree import BranchTree, Prediction, TreeError, TreeLayout
from branchnet.tree.evaluate import evaluate
from branchnet.tree.tree import ConstantHead

CLASSES = [f"c{i}" for i in range(6)]
HIER = {"g0": ["c0", "c1", "c2"], "g1": ["c3", "c4", "c5"]}
FAST: dict[str, Any] = {"epochs": 5, "lr": 1e-2, "batch_size": 32, "progress": False}
HEAD_FAST: dict[str, Any] = {**FAST, "weight_decay": 0.0, "patience": None}
CHANCE = 1 / 6

_g = torch.Generator().manual_seed(0)
_CENTERS = torch.randn(6, 8, generator=_g)
_CENTERS[:, :4] += torch.tensor([2.0, 2, 2, -2, -2, -2])[:, None]  # the two groups


def blobs(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 6
    return Split(_CENTERS[y] + torch.randn(n, 8, generator=g), y)


@pytest.fixture(scope="module")
def data() -> Data:
    return Data(blobs(240, 1), blobs(120, 2), blobs(240, 3), list(CLASSES), name="blobs")


def parent_net(n_out: int = 6, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.mlp([8, 32, 16], n_out, dropout=dropout)


def make_tree(workdir: Path, parent: nn.Module | None = None, **kw: Any) -> BranchTree:
    kw.setdefault("hierarchy", HIER)
    kw.setdefault("parent_train", FAST)
    kw.setdefault("head_train", HEAD_FAST)
    kw.setdefault("cache_dir", workdir / "cache")  # pretrained parents default to ~/.cache
    return BranchTree(parent if parent is not None else parent_net(), "hidden.1",
                      workdir=workdir, progress=False, **kw)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory, data: Data) -> Path:
    """A workdir holding a finished fit of the default tree (router parent, hard policy)."""
    work = tmp_path_factory.mktemp("base")
    make_tree(work).fit(data, data.val)  # the validation Split may come second positionally
    return work


def variant(base_dir: Path, data: Data, **kw: Any) -> BranchTree:
    """The base tree's weights (resumed from its finished workdir: no training) with other
    routing settings."""
    return make_tree(base_dir, **kw).fit(data, resume=True)


@pytest.fixture(scope="module")
def tree(base_dir: Path, data: Data) -> BranchTree:
    return variant(base_dir, data)


@pytest.fixture
def pretrained(tree: BranchTree) -> nn.Module:
    """A fresh parent with the base tree's trained weights (for train_parent=False)."""
    p = parent_net()
    p.load_state_dict(tree.parent.state_dict())
    return p


def reset(tree: BranchTree, data: Data) -> BranchTree:
    tree.calibrate(method="fixed", threshold=-math.inf)
    return tree


def outputs(p: Prediction) -> dict[str, torch.Tensor]:
    return {"label": p.label, "leaf": p.leaf, "path_nodes": p.path_nodes,
            "path_conf": p.path_conf, "stop_level": p.stop_level, "leaf_probs": p.leaf_probs}


def assert_same(a: Prediction, b: Prediction) -> None:
    for (k, x), y in zip(outputs(a).items(), outputs(b).values(), strict=True):
        assert torch.equal(x.nan_to_num(-7.0), y.nan_to_num(-7.0)), k


# ---------------------------------------------------------------- layout


def test_layout_ragged_three_levels() -> None:
    h = Hierarchy.from_dict({"a": ["x"], "b": {"c": ["y", "z"], "d": ["w"]}, "e": ["v", "u"]})
    classes = ["u", "v", "w", "x", "y", "z"]
    lay = TreeLayout(h, classes)
    assert lay.nodes == ["root", "a", "b", "c", "d", "e"]
    assert lay.n_children == [3, 1, 2, 2, 1, 2] and lay.max_children == 3
    assert lay.depth == 3
    assert lay.child_node.tolist() == [[1, 2, 5], [-1, -1, -1], [3, 4, -1], [-1, -1, -1],
                                       [-1, -1, -1], [-1, -1, -1]]
    assert lay.child_leaf.tolist() == [[-1, -1, -1], [3, -1, -1], [-1, -1, -1], [4, 5, -1],
                                       [2, -1, -1], [1, 0, -1]]
    # per class: internal nodes on its path (-1 padded) and the slot taken at each
    assert lay.leaf_nodes.tolist() == [[0, 5, -1], [0, 5, -1], [0, 2, 4], [0, 1, -1],
                                       [0, 2, 3], [0, 2, 3]]
    assert lay.leaf_slots.tolist() == [[2, 1, 0], [2, 0, 0], [1, 1, 0], [0, 0, 0],
                                       [1, 0, 0], [1, 0, 1]]
    assert lay.parent_of == [-1, 0, 0, 2, 2, 0]
    assert lay.slot_of_label("b", torch.arange(6)).tolist() == [-1, -1, 1, -1, 0, 0]
    assert lay.slot_of_label("c", [4, 5, 0]).tolist() == [0, 1, -1]
    assert lay.slot_of_label("root", [3, 2, 0]).tolist() == [0, 1, 2]
    assert lay.root_groups().tolist() == [[0, 0, 1], [0, 0, 1], [0, 1, 0], [1, 0, 0],
                                          [0, 1, 0], [0, 1, 0]]
    # integer leaves are bound to the class names
    lay2 = TreeLayout(Hierarchy.from_dict({"g": [0, 2], "h": [1]}), ["p", "q", "r"])
    assert lay2.hierarchy.leaves == ["p", "r", "q"]
    assert lay2.child_leaf.tolist() == [[-1, -1], [0, 2], [1, -1]]


# ---------------------------------------------------------------- fit and predict


def test_fit_predict(tree: BranchTree, data: Data) -> None:
    reset(tree, data)
    pred = tree.predict(data.test.x)
    n = len(data.test)
    assert len(pred) == n
    assert pred.path_nodes.shape == (n, 2) and pred.path_conf.shape == (n, 2)
    assert pred.leaf_probs.shape == (n, 6)
    acc = float((pred.leaf == data.test.y).float().mean())
    assert acc > 0.75 > 3 * CHANCE
    assert tree.score(data.test.x, data.test.y) == pytest.approx(acc)
    assert torch.equal(pred.label, pred.leaf) and pred.coverage == 1.0
    # the path goes root -> group of the leaf -> leaf
    assert (pred.path_nodes[:, 0] == 0).all()
    group_of_leaf = torch.where(pred.leaf < 3, 1, 2)
    assert torch.equal(pred.path_nodes[:, 1], group_of_leaf)
    assert pred.path(0)[-1] == CLASSES[int(pred.leaf[0])]
    assert pred.explain(0).startswith("accepted: c")
    rec = pred.to_records(k=3)[0]
    assert rec["label"] == rec["prediction"] == pred.path(0)[-1]
    assert len(rec["top"]) == 3 and not rec["abstained"]
    assert json.loads(json.dumps(rec)) == rec
    # numpy inputs and Splits work too
    assert torch.equal(tree.predict(data.test.x.numpy().astype(np.float64)).leaf, pred.leaf)
    assert torch.equal(tree.predict(data.test).leaf, pred.leaf)
    summary = tree.fit_summary_
    assert summary["tap_dim"] == 16 and set(summary["nodes"]) == {"g0", "g1"}
    assert "fitted" in repr(tree)


def test_node_proba(tree: BranchTree, data: Data) -> None:
    x = data.test.x[:50]
    root = tree.node_proba("root", x)
    assert root.shape == (50, 2)
    torch.testing.assert_close(root.sum(1), torch.ones(50))
    # router="parent": the root decision is the parent's class probabilities summed per group
    with torch.inference_mode():
        p = torch.softmax(tree.parent(x), dim=1)
    torch.testing.assert_close(root, torch.stack([p[:, :3].sum(1), p[:, 3:].sum(1)], 1))
    assert tree.node_proba("g1", x).shape == (50, 3)
    with pytest.raises(TreeError, match="unknown node 'zz'"):
        tree.node_proba("zz", x)


# ---------------------------------------------------------------- routing policies


def test_policies_consistent(base_dir: Path, data: Data) -> None:
    x = data.test.x
    trees = {p: variant(base_dir, data, policy=p) for p in ("hard", "soft", "topk", "threshold")}
    preds = {p: t.predict(x) for p, t in trees.items()}
    proba = trees["soft"].predict_proba(x)
    for p, pred in preds.items():
        assert not pred.abstained.any(), p  # thresholds are -inf: nothing abstains
        torch.testing.assert_close(pred.leaf_probs, proba)  # same model, same path products
    torch.testing.assert_close(proba.sum(1), torch.ones(len(x)))
    assert (proba >= 0).all()

    # soft / topk: the leaf with the largest path probability
    soft = preds["soft"]
    assert torch.equal(soft.leaf, proba.argmax(1))
    assert torch.equal(preds["topk"].leaf, soft.leaf)
    # path confidences are path probabilities: non-increasing, ending at P(leaf)
    assert (soft.path_conf[:, 1] <= soft.path_conf[:, 0] + 1e-6).all()
    torch.testing.assert_close(soft.path_conf[:, 1], proba.max(1).values)
    torch.testing.assert_close(soft.confidence, soft.path_conf.min(1).values)
    probs, idx = soft.topk(2)
    assert torch.equal(idx[:, 0], soft.leaf) and (probs[:, 0] >= probs[:, 1]).all()

    # hard: the most probable child at every node; confidence = local max softmax
    hard = preds["hard"]
    root = trees["hard"].node_proba("root", x)
    assert torch.equal(hard.path_nodes[:, 1], root.argmax(1) + 1)
    torch.testing.assert_close(hard.path_conf[:, 0], root.max(1).values)
    for g, node in ((1, "g0"), (2, "g1")):
        rows = hard.path_nodes[:, 1] == g
        local = trees["hard"].node_proba(node, x[rows])
        torch.testing.assert_close(hard.path_conf[rows, 1], local.max(1).values)
        assert torch.equal(hard.leaf[rows], local.argmax(1) + 3 * (g - 1))
    torch.testing.assert_close(hard.confidence, hard.path_conf.min(1).values)
    # hard and soft routing mostly agree on this easy problem
    assert (hard.leaf == soft.leaf).float().mean() > 0.9

    # "threshold" routes like "hard" and backs off instead of abstaining
    assert torch.equal(preds["threshold"].leaf, hard.leaf) and preds["threshold"].backoff


@pytest.mark.parametrize("score", ["margin", "entropy"])
def test_other_confidence_scores(base_dir: Path, data: Data, score: str) -> None:
    t = variant(base_dir, data, confidence=score)
    pred = t.predict(data.test.x[:40])
    root = t.node_proba("root", data.test.x[:40])
    if score == "margin":
        expected = (root[:, 0] - root[:, 1]).abs()
    else:
        expected = (root * root.clamp_min(1e-12).log()).sum(1)
    torch.testing.assert_close(pred.path_conf[:, 0], expected)


# ---------------------------------------------------------------- abstention


@pytest.mark.parametrize("policy", ["hard", "soft"])
def test_fixed_threshold_abstention(base_dir: Path, data: Data, policy: str) -> None:
    t = variant(base_dir, data, policy=policy)
    free = t.predict(data.test.x)
    conf = free.confidence
    thr = float(conf.quantile(0.5))
    info = t.calibrate(method="fixed", threshold=thr)
    assert info == {"method": "fixed", "threshold": thr}
    assert t.thresholds_list() == [thr] * 3
    pred = t.predict(data.test.x)
    assert torch.equal(pred.leaf, free.leaf)
    assert torch.equal(pred.abstained, conf < thr)
    assert 0 < int(pred.abstained.sum()) < len(pred)
    assert torch.equal(pred.label, torch.where(pred.abstained, -1, pred.leaf))
    # stop_level: the first level whose confidence is below the threshold
    below = free.path_conf < thr
    first = torch.where(below.any(1), below.int().argmax(1), -1)
    assert torch.equal(pred.stop_level, first)
    if policy == "hard":
        assert set(first.tolist()) == {-1, 0, 1}  # both levels reject some inputs here
    records = pred.to_records()
    for i in range(len(pred)):
        s = int(pred.stop_level[i])
        rec = records[i]
        assert rec["abstained"] == (s >= 0)
        if s >= 0:
            node = pred.nodes[int(pred.path_nodes[i, s])]
            assert rec["why"] == pred.explain(i)
            assert rec["why"].startswith(f"abstained at {node!r}: confidence ")
            assert rec["label"] is None and rec["prediction"] is None  # no backoff
        else:
            assert rec["why"].startswith(f"accepted: {rec['label']}")
    if policy == "soft":  # path probabilities only fall: everything below stops by level 1
        assert pred.coverage == pytest.approx(float((conf >= thr).float().mean()))


def test_per_node_thresholds(tree: BranchTree, data: Data, tmp_path: Path) -> None:
    info = tree.calibrate(method="fixed", threshold={"g0": 2.0})
    assert info["thresholds"] == {"root": -math.inf, "g0": 2.0, "g1": -math.inf}
    assert tree.thresholds_list() == [-math.inf, 2.0, -math.inf]
    pred = tree.predict(data.test.x)
    in_g0 = pred.path_nodes[:, 1] == 1
    assert in_g0.any() and (~in_g0).any()
    assert torch.equal(pred.abstained, in_g0)
    assert (pred.stop_level[in_g0] == 1).all()
    i = int(torch.nonzero(in_g0)[0])
    assert pred.explain(i).startswith("abstained at 'g0'")
    assert "< threshold 2.000" in pred.explain(i)
    # saved and loaded: the same thresholds (-inf for the nodes without one)
    loaded = BranchTree.load(tree.save(tmp_path / "t"))
    assert loaded.thresholds_list() == [-math.inf, 2.0, -math.inf]
    assert loaded.calibration_ == info
    assert_same(loaded.predict(data.test.x), pred)
    with pytest.raises(TreeError, match="unknown nodes"):
        tree.calibrate(method="fixed", threshold={"nope": 0.5})
    reset(tree, data)


def test_backoff_predicts_the_stopping_node(base_dir: Path, data: Data) -> None:
    x = data.test.x[:60]
    for t in (variant(base_dir, data, backoff=True), variant(base_dir, data, policy="threshold")):
        t.calibrate(method="fixed", threshold={"g0": 2.0, "g1": 2.0})
        pred = t.predict(x)
        assert pred.backoff and pred.abstained.all() and (pred.stop_level == 1).all()
        groups = [pred.nodes[int(n)] for n in pred.path_nodes[:, 1]]
        assert pred.predicted_nodes() == groups
        assert {r["prediction"] for r in pred.to_records()} == {"g0", "g1"}
        assert all(r["label"] is None for r in pred.to_records())
        # stopping at the root backs off to nothing
        t.calibrate(method="fixed", threshold={"root": 2.0})
        assert t.predict(x).predicted_nodes() == [None] * len(x)


def test_calibrate_coverage(tree: BranchTree, data: Data) -> None:
    cal = blobs(300, 4)
    info = tree.calibrate(cal, method="coverage", coverage=0.8)
    assert info["method"] == "coverage" and info["n_calibration"] == 300
    pred = tree.predict(cal.x)
    assert 0.8 <= pred.coverage <= 0.81
    assert float(pred.confidence[~pred.abstained].min()) >= info["threshold"]
    # the calibration ignores earlier thresholds
    tree.calibrate(cal, method="fixed", threshold=2.0)
    assert tree.calibrate(cal, method="coverage", coverage=0.8) == info
    for bad in (None, 0.0, 1.5):
        with pytest.raises(TreeError, match="coverage must be in"):
            tree.calibrate(cal, method="coverage", coverage=bad)
    with pytest.raises(TreeError, match="method='bogus'"):
        tree.calibrate(cal, method="bogus")
    reset(tree, data)


def test_calibrate_risk(tree: BranchTree, data: Data) -> None:
    cal = blobs(600, 5)
    info = tree.calibrate(cal, method="risk", target_risk=0.1, delta=0.1)
    assert info["feasible"] and info["risk_bound"] <= 0.1
    pred = tree.predict(cal.x)
    accepted = ~pred.abstained
    risk = float((pred.leaf[accepted] != cal.y[accepted]).float().mean())
    assert risk <= 0.1
    assert risk == pytest.approx(info["calibration_risk"])
    assert pred.coverage == pytest.approx(info["calibration_coverage"])
    assert 0 < pred.coverage < 1
    reset(tree, data)


def test_calibrate_risk_infeasible_abstains_on_everything(
        tree: BranchTree, data: Data, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="abstain on every input"):
        info = tree.calibrate(blobs(120, 6), method="risk", target_risk=1e-3, delta=0.05)
    assert not info["feasible"] and info["threshold"] == math.inf
    pred = tree.predict(data.test.x)
    assert pred.coverage == 0.0 and (pred.label == -1).all() and (pred.stop_level == 0).all()
    # the saved tree (JSON has no infinity) abstains on everything too
    loaded = BranchTree.load(tree.save(tmp_path / "t"))
    assert loaded.predict(data.test.x).coverage == 0.0
    assert loaded.calibration_["threshold"] == math.inf
    reset(tree, data)


def test_calibration_refuses_data_used_in_fitting(tree: BranchTree, data: Data) -> None:
    # fit(data) stopped early on data.val: calibrating on it would void the guarantee
    for used, n in ((data.val, len(data.val)), (data.train, len(data.train))):
        with pytest.raises(TreeError, match=f"{n} of {n} calibration inputs were used to fit"):
            tree.calibrate(used, method="coverage", coverage=0.9)
    with pytest.raises(TreeError, match=r"calibrate got a Data.*data\.val\.split\(0\.5\)"):
        tree.calibrate(data)
    with pytest.raises(TreeError, match="needs calibration data as a Split"):
        tree.calibrate(method="risk")
    # disjoint held-out inputs calibrate, and fixed thresholds need no data at all
    assert tree.calibrate(blobs(120, 6), method="coverage", coverage=0.9)["n_calibration"] == 120
    reset(tree, data)


@given(row=st.integers(0, 239), at=st.integers(0, 60))
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_one_training_row_in_the_calibration_set_is_caught(tree: BranchTree, data: Data,
                                                          row: int, at: int) -> None:
    held = blobs(60, 8)
    x = torch.cat([held.x[:at], data.train.x[row:row + 1], held.x[at:]])
    y = torch.cat([held.y[:at], data.train.y[row:row + 1], held.y[at:]])
    with pytest.raises(TreeError, match=r"^1 of 61 calibration inputs were used to fit"):
        tree.calibrate(Split(x, y), method="risk")


def test_a_loaded_tree_cannot_check_calibration_data(tree: BranchTree, data: Data,
                                                     tmp_path: Path) -> None:
    loaded = BranchTree.load(tree.save(tmp_path / "t"))
    assert loaded.fitted_rows_ is None
    assert loaded.calibrate(data.val, method="coverage", coverage=0.9)["n_calibration"] == 120


def test_evaluate(base_dir: Path, data: Data) -> None:
    t = variant(base_dir, data, backoff=True)
    t.calibrate(blobs(120, 6), method="coverage", coverage=0.7)
    result, figures = evaluate(t, data.test)
    assert result["n_test"] == len(data.test)
    assert 0.6 < result["coverage"] < 0.8
    assert result["accuracy_on_accepted"] >= result["accuracy"] > 0.75
    assert set(result["branches"]) == {"root", "g0", "g1"}
    assert 0 < result["hierarchical"]["hF"] <= 1
    assert result["backed_off"] > 0
    assert set(figures) == {"risk_coverage", "confusion", "branches"}
    json.dumps(result)


# ---------------------------------------------------------------- router and node input


def test_learned_router_on_a_feature_parent(tree: BranchTree, tmp_path: Path, data: Data) -> None:
    # a pretrained "feature extractor" with 4 outputs: no class output to route with, so the
    # root decision is learned by a head on the tapped layer like every other node
    parent = parent_net(n_out=4)
    hidden = {k: v for k, v in tree.parent.state_dict().items() if k.startswith("hidden.")}
    parent.load_state_dict(hidden, strict=False)  # trained features, an unrelated output
    t = make_tree(tmp_path, parent, router="learned", train_parent=False)
    t.fit(data)
    assert sorted(t.heads_) == [0, 1, 2] and t.sources_ == [-1, -1, -1]
    assert not (tmp_path / "parent").exists()  # the parent was not trained
    assert "root" in t.fit_summary_["nodes"] and "parent" not in t.fit_summary_
    assert t.score(data.test.x, data.test.y) > 0.75
    root = t.node_proba("root", data.test.x)
    assert ((root.argmax(1) == 1) == (data.test.y >= 3)).float().mean() > 0.9
    with pytest.raises(TreeError, match="outputs shape"):
        make_tree(tmp_path / "other", parent_net(n_out=4), router="parent",
                  train_parent=False).fit(data)


def test_parent_labels_coarse(tmp_path: Path, data: Data) -> None:
    t = make_tree(tmp_path, parent_net(n_out=2), parent_labels="coarse").fit(data)
    x = data.test.x
    with torch.inference_mode():
        p = torch.softmax(t.parent(x), dim=1)
    torch.testing.assert_close(t.node_proba("root", x), p)
    routed = t.predict(x).path_nodes[:, 1] - 1
    assert (routed == (data.test.y >= 3).long()).float().mean() > 0.9
    # a parent trained on the groups only keeps less within-group detail in its tap
    assert t.score(x, data.test.y) > 0.4
    with pytest.raises(TreeError, match="2 coarse classes"):
        make_tree(tmp_path / "b", parent_net(n_out=6), parent_labels="coarse").fit(data)


HIER3 = {"g0": {"s0": ["c0", "c1"], "s1": ["c2"]}, "g1": ["c3", "c4", "c5"]}


def test_branches_of_branches(tmp_path: Path, data: Data, pretrained: nn.Module) -> None:
    def head(n_in: int, n_out: int) -> nn.Module:
        return models.branch_head(n_in, n_out, hidden=24, dropout=0.1)

    t = make_tree(tmp_path, pretrained, hierarchy=HIER3, router="learned", node_input="branch",
                  head=head, train_parent=False, head_train={**HEAD_FAST, "epochs": 8}).fit(data)
    lay = t.layout_
    assert lay is not None and lay.nodes == ["root", "g0", "s0", "s1", "g1"]
    # every node reads the hidden layer of the head above it
    assert t.sources_ == [-1, 0, 1, 1, 0]
    assert t.heads_[0].layer == "hidden.0" and t.heads_[1].layer == "hidden.0"
    assert t.heads_[2].layer is None and t.heads_[4].layer is None  # no inner children
    assert isinstance(t.heads_[3].module, ConstantHead)  # s1 has a single child
    spec = {i: getattr(t.heads_[i].module, "spec", None) for i in t.heads_}
    assert spec[0]["sizes"] == [16, 24]  # root reads the parent's tap
    assert spec[1]["sizes"] == [24, 24] and spec[2]["sizes"] == [24, 24]
    assert spec[4]["sizes"] == [24, 24]
    pred = t.predict(data.test.x)
    assert pred.path_nodes.shape == (len(data.test), 3)
    assert (pred.leaf == data.test.y).float().mean() > 0.6
    # leaves under g1 stop one level early: their last level is padding
    in_g1 = pred.path_nodes[:, 1] == 4
    assert (pred.path_nodes[in_g1, 2] == -1).all() and pred.path_conf[in_g1, 2].isnan().all()
    torch.testing.assert_close(t.predict_proba(data.test.x).sum(1), torch.ones(len(data.test)))
    # saved and loaded, traced: identical
    loaded = BranchTree.load(t.save(tmp_path / "saved"))
    assert loaded.sources_ == t.sources_
    assert_same(loaded.predict(data.test.x), pred)
    traced = t.to_torchscript()
    leaf, _, _, stop, probs = traced(data.test.x)
    assert torch.equal(leaf, pred.leaf) and torch.equal(stop, pred.stop_level)
    torch.testing.assert_close(probs, pred.leaf_probs)


@pytest.mark.parametrize("node_input", ["parent", "branch"])
def test_single_child_node(tmp_path: Path, data: Data, pretrained: nn.Module,
                           node_input: str) -> None:
    hier = {"g0": ["c0", "c1", "c2"], "g1": {"only": ["c3", "c4", "c5"]}}
    t = make_tree(tmp_path, pretrained, hierarchy=hier, node_input=node_input,
                  train_parent=False).fit(data)
    assert t.layout_ is not None and t.layout_.nodes == ["root", "g0", "g1", "only"]
    assert isinstance(t.heads_[2].module, ConstantHead)
    assert t.fit_summary_["nodes"]["g1"]["constant"] is True
    # "only" must not read the constant head's (empty) hidden layer
    assert t.sources_[3] == -1
    x = data.test.x
    torch.testing.assert_close(t.node_proba("g1", x), torch.ones(len(x), 1))
    pred = t.predict(x)
    assert (pred.leaf == data.test.y).float().mean() > 0.75
    in_g1 = pred.path_nodes[:, 1] == 2
    assert (pred.path_conf[in_g1, 1] == 1.0).all() and (pred.path_nodes[in_g1, 2] == 3).all()
    assert_same(BranchTree.load(t.save(tmp_path / "saved")).predict(x), pred)
    t.to_torchscript(tmp_path / "t.pt")
    out = torch.jit.load(str(tmp_path / "t.pt"))(x)
    assert torch.equal(out[0], pred.leaf)


# ---------------------------------------------------------------- pretrained parent


def test_pretrained_parent_is_not_modified(tree: BranchTree, tmp_path: Path, data: Data) -> None:
    parent = parent_net(dropout=0.5)
    parent.load_state_dict(tree.parent.state_dict())  # "pretrained", with dropout
    parent.train()
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    t = make_tree(tmp_path, parent, train_parent=False).fit(data)
    after = parent.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in parent.modules())  # eval mode: dropout off
    assert not (tmp_path / "parent").exists()
    a, b = t.predict(data.test.x), t.predict(data.test.x)
    assert_same(a, b)
    # extraction ran without dropout: the heads learned as well as on the dropout-free parent
    assert t.score(data.test.x, data.test.y) > 0.75
    torch.testing.assert_close(t.node_proba("root", data.test.x),
                               tree.node_proba("root", data.test.x))


# ---------------------------------------------------------------- save / load / TorchScript


def test_save_load_identical(tree: BranchTree, data: Data, tmp_path: Path) -> None:
    tree.calibrate(blobs(120, 6), method="coverage", coverage=0.8)
    path = tree.save(tmp_path / "saved")
    assert (path / "tree.json").is_file() and (path / "weights.safetensors").is_file()
    loaded = BranchTree.load(path)
    assert_same(loaded.predict(data.test.x), tree.predict(data.test.x))
    assert loaded.thresholds_list() == tree.thresholds_list()
    assert loaded.calibration_ == tree.calibration_
    assert loaded.hierarchy_ == tree.hierarchy_
    assert loaded.input_shape_ == (8,)
    assert loaded.fit_summary_ == json.loads(json.dumps(tree.fit_summary_))
    assert not any(p.requires_grad for p in loaded.parent.parameters())
    reset(tree, data)


def test_load_damaged(tree: BranchTree, tmp_path: Path) -> None:
    good = tree.save(tmp_path / "good")

    def copy(name: str) -> Path:
        return Path(shutil.copytree(good, tmp_path / name))

    p = copy("garbage-weights")
    (p / "weights.safetensors").write_bytes(b"\x00\x01not safetensors" * 10)
    with pytest.raises(CheckpointError):
        BranchTree.load(p)
    p = copy("truncated-weights")
    w = (p / "weights.safetensors").read_bytes()
    (p / "weights.safetensors").write_bytes(w[: len(w) // 2])
    with pytest.raises(CheckpointError):
        BranchTree.load(p)
    p = copy("no-weights")
    (p / "weights.safetensors").unlink()
    with pytest.raises(CheckpointError):
        BranchTree.load(p)
    p = copy("truncated-json")
    text = (p / "tree.json").read_text()
    (p / "tree.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="damaged"):
        BranchTree.load(p)
    p = copy("other-json")
    (p / "tree.json").write_text('{"format": "something else"}')
    with pytest.raises(CheckpointError, match="not a branchnet tree"):
        BranchTree.load(p)
    p = copy("shape-mismatch")
    meta = json.loads((p / "tree.json").read_text())
    meta["parent_spec"]["sizes"] = [8, 32, 20]
    (p / "tree.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit the parent"):
        BranchTree.load(p)
    with pytest.raises(CheckpointError, match=r"no tree\.json"):
        BranchTree.load(tmp_path / "missing")


@pytest.mark.parametrize("policy", ["hard", "soft"])
def test_torchscript_identical(base_dir: Path, data: Data, tmp_path: Path, policy: str) -> None:
    t = variant(base_dir, data, policy=policy)
    t.calibrate(blobs(120, 6), method="coverage", coverage=0.8)
    t.to_torchscript(tmp_path / "tree.pt")
    traced = torch.jit.load(str(tmp_path / "tree.pt"))
    x = data.test.x[:97]  # another batch size than the traced example
    leaf, path_nodes, path_conf, stop, probs = traced(x)
    pred = t.predict(x)
    assert torch.equal(leaf, pred.leaf)
    assert torch.equal(stop, pred.stop_level) and (stop >= 0).any()
    assert torch.equal(path_nodes, pred.path_nodes)
    torch.testing.assert_close(probs, pred.leaf_probs)
    torch.testing.assert_close(path_conf, pred.path_conf, equal_nan=True)


# ---------------------------------------------------------------- custom heads


def test_custom_head_factory(tmp_path: Path, data: Data, pretrained: nn.Module) -> None:
    def small(n_in: int, n_out: int) -> nn.Module:
        return nn.Sequential(nn.Linear(n_in, 12), nn.ReLU(), nn.Linear(12, n_out))

    # g1 gets the default head; fitting on a bare Split splits a validation set off it
    t = make_tree(tmp_path, pretrained, head={"g0": small}, train_parent=False)
    t.fit(data.train, classes=CLASSES)
    g0 = t.fit_summary_["nodes"]["g0"]
    assert g0["n_train"] + g0["n_val"] == 120 and g0["n_val"] > 0
    assert isinstance(t.heads_[1].module, nn.Sequential)
    assert isinstance(t.heads_[2].module, models.MLP)
    assert t.score(data.test.x, data.test.y) > 0.75
    path = t.save(tmp_path / "saved")
    with pytest.raises(TreeError, match="custom module: pass heads"):
        BranchTree.load(path)
    loaded = BranchTree.load(path, heads={"g0": small(16, 3)})
    assert_same(loaded.predict(data.test.x), t.predict(data.test.x))


# ---------------------------------------------------------------- resume and the cache


def test_resume_reuses_training_and_cache(tmp_path: Path, data: Data,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    trainers: list[int] = []
    real_trainer = engine.L.Trainer

    def counting_trainer(*args: Any, **kwargs: Any) -> Any:
        trainers.append(1)
        return real_trainer(*args, **kwargs)

    monkeypatch.setattr(engine.L, "Trainer", counting_trainer)

    def counted_parent() -> tuple[nn.Module, list[int]]:
        calls: list[int] = []
        p = parent_net(seed=7)
        p.register_forward_pre_hook(lambda m, inp: calls.append(len(inp[0])))
        return p, calls

    p1, calls1 = counted_parent()
    first = make_tree(tmp_path, p1).fit(data)
    assert len(trainers) == 3  # parent, g0, g1
    assert any(n > 2 for n in calls1)

    p2, calls2 = counted_parent()
    second = make_tree(tmp_path, p2).fit(data, resume=True)
    assert len(trainers) == 3  # nothing trained again
    assert all(n <= 2 for n in calls2)  # only the output-size check: activations were cached
    assert_same(second.predict(data.test.x), first.predict(data.test.x))
    assert second.fit_summary_ == first.fit_summary_

    # an interrupted run: only the unfinished node is trained again
    (tmp_path / "nodes" / "02-g1" / "result.json").unlink()
    third = make_tree(tmp_path, parent_net(seed=7)).fit(data, resume=True)
    assert len(trainers) == 4
    assert_same(third.predict(data.test.x), first.predict(data.test.x))

    # without resume a used workdir is refused rather than overwritten
    with pytest.raises(engine.TrainingError, match="resume=True"):
        make_tree(tmp_path, parent_net()).fit(data)


# ---------------------------------------------------------------- bad input


def test_unknown_tap_lists_layers() -> None:
    with pytest.raises(TreeError, match=r"no layer 'hidden\.9'.*'hidden\.1'"):
        BranchTree(parent_net(), "hidden.9")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"router": "magic"}, "router='magic'"),
        ({"node_input": "x"}, "node_input='x'"),
        ({"policy": "greedy"}, "policy='greedy'"),
        ({"confidence": "energy"}, "confidence='energy'"),
        ({"parent_labels": "mid"}, "parent_labels='mid'"),
        ({"cache_dtype": "int8"}, "cache_dtype='int8'"),
    ],
)
def test_bad_choices(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(TreeError, match=match):
        BranchTree(parent_net(), "hidden.1", **kw)


def test_parent_must_be_a_module() -> None:
    with pytest.raises(TreeError, match=r"nn\.Module"):
        BranchTree(lambda x: x, "hidden.1")  # type: ignore[arg-type]


def test_hierarchy_not_covering_a_class(tmp_path: Path, data: Data) -> None:
    hier = {"g0": ["c0", "c1", "c2"], "g1": ["c3", "c4"]}
    with pytest.raises(DataError, match="'c5'"):
        make_tree(tmp_path, hierarchy=hier).fit(data)
    with pytest.raises(DataError, match="'c9' is not a class"):
        make_tree(tmp_path, hierarchy={**HIER, "g2": ["c9"]}).fit(data)


def test_parent_output_size_mismatch(tmp_path: Path, data: Data) -> None:
    with pytest.raises(TreeError, match=r"outputs shape \(5,\) but 6 fine classes"):
        make_tree(tmp_path, parent_net(n_out=5)).fit(data)
    assert not (tmp_path / "parent").exists()  # refused before any training


def test_bad_head_factories(tree: BranchTree, tmp_path: Path, data: Data) -> None:
    def pretrained() -> nn.Module:
        p = parent_net()
        p.load_state_dict(tree.parent.state_dict())
        return p

    with pytest.raises(TreeError, match=r"head of 'g0' outputs \(4,\), expected \(3,\)"):
        make_tree(tmp_path / "a", pretrained(), train_parent=False,
                  head=lambda i, o: nn.Linear(i, o + 1)).fit(data)
    with pytest.raises(TreeError, match=r"returned str, not an nn\.Module"):
        make_tree(tmp_path / "b", pretrained(), train_parent=False,
                  head=lambda i, o: "head").fit(data)
    with pytest.raises(TreeError, match="cannot read 16-d inputs"):
        make_tree(tmp_path / "c", pretrained(), train_parent=False,
                  head=lambda i, o: nn.Linear(i + 1, o)).fit(data)
    # branches of branches need the branch tap in the head
    with pytest.raises(TreeError, match=r"branch_tap 'hidden\.0' is not a layer of the head"):
        make_tree(tmp_path / "d", pretrained(), train_parent=False, hierarchy=HIER3,
                  node_input="branch", head=lambda i, o: nn.Linear(i, o)).fit(data)


def test_predict_bad_inputs(tree: BranchTree, data: Data) -> None:
    with pytest.raises(TreeError, match=r"shape \(7,\) but the tree was fitted on inputs of shape \(8,\)"):
        tree.predict(data.test.x[:, :7])
    with pytest.raises(TreeError, match="fitted on"):
        tree.predict(data.test.x.view(-1, 2, 4))
    with pytest.raises(TreeError, match="fitted on"):
        tree.predict_proba(torch.zeros(3, 9))
    with pytest.raises(TreeError, match="expected a tensor"):
        tree.predict([[0.0] * 8])


def test_unfitted_tree() -> None:
    t = BranchTree(parent_net(), "hidden.1")
    x = torch.zeros(2, 8)
    for call in (lambda: t.predict(x), lambda: t.predict_proba(x), lambda: t.score(x, [0, 1]),
                 lambda: t.node_proba("root", x), lambda: t.calibrate(Split(x, torch.zeros(2))),
                 lambda: t.save("unused"), lambda: t.to_torchscript(), t.thresholds_list):
        with pytest.raises(TreeError, match="not fitted"):
            call()
    assert "not fitted" in repr(t)


def test_fit_bad_combinations(tmp_path: Path, data: Data) -> None:
    t = make_tree(tmp_path)
    x, y = data.train.x, data.train.y
    for args, kw, match in [
        (((x, y),), {}, r"fit expects a Data, a Split, or inputs X .* got tuple"),
        ((x,), {}, r"inputs X \(Tensor\) without labels y"),
        ((data, y), {}, "a Data carries its labels"),
        ((data.train, y.numpy()), {}, "a Split carries its labels"),
        ((data,), {"val": "val"}, "val must be a Split or an"),
        ((x, y.float()), {}, "class indices or class names, got dtype float32"),
        ((x, ["c9"] * len(x)), {"classes": CLASSES}, r"labels \['c9'\] are not among"),
    ]:
        with pytest.raises(TreeError, match=match):
            t.fit(*args, **kw)
    with pytest.raises(TreeError, match=r"resume=True .* construct it with workdir"):
        BranchTree(parent_net(), "hidden.1").fit(data, resume=True)
    assert not any(tmp_path.iterdir())  # every refusal came before any work


def test_constructor_arguments_are_stored_as_given() -> None:
    head_train = {"epochs": 2}
    t = BranchTree(parent_net(), "hidden.1", hierarchy=HIER, router="learned", confidence="margin",
                   head_train=head_train, workdir="somewhere")
    params = t.get_params()
    assert params["hierarchy"] is HIER and params["head_train"] is head_train
    assert params["router"] == "learned" and params["confidence"] == "margin"
    assert params["workdir"] == "somewhere" and params["progress"] is False
    assert BranchTree(**params).get_params() == params
    assert not [a for a in vars(t) if a.endswith("_")]  # no fitted state before fit


def test_fit_on_arrays_and_class_names_leaves_no_temporary_folder(
        tmp_path: Path, data: Data, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    names = np.array(CLASSES)[data.train.y.numpy()]
    t = BranchTree(parent_net(), "hidden.1", hierarchy=HIER, parent_train=FAST, head_train=HEAD_FAST)
    t.fit(data.train.x.numpy(), names, val=(data.val.x, np.array(CLASSES)[data.val.y.numpy()]))
    assert t.classes_ == CLASSES and t.hierarchy_.leaves_under("g1") == ["c3", "c4", "c5"]
    assert t.fit_summary_["nodes"]["g0"]["n_val"] == 60  # the given validation set was used
    # the checkpoints and the parent's activation cache lived in a folder that is gone; the
    # heads hold their own weights
    assert list(tmp_path.iterdir()) == []
    accuracy = t.score(data.test.x, data.test.y)
    assert accuracy > 0.75 and t.score(data.test.x, np.array(CLASSES)[data.test.y]) == accuracy
    loaded = BranchTree.load(t.save(tmp_path / "saved"))
    assert_same(loaded.predict(data.test.x), t.predict(data.test.x))
    # also when fit fails halfway (after training the parent)
    bad = BranchTree(parent_net(), "hidden.1", hierarchy=HIER, parent_train=FAST,
                     head=lambda i, o: nn.Linear(i, o + 1))
    with pytest.raises(TreeError, match="outputs"):
        bad.fit(torch.from_numpy(data.train.x.numpy()), data.train.y, classes=CLASSES)
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]
    assert "not fitted" in repr(bad)
