"""Trees that grow and that say "none of my children": induced hierarchies in ``fit``,
``BranchTree.grow``, per-node novelty rejection and its calibration, save / load.

Data: Gaussian blobs, 6 known classes in 3 pairs (each pair close together, pairs far apart)
and 2 novel classes far from all of them, so the right answers are known.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from branchnet import models
from branchnet.data import Data, Split
from branchnet.data.hierarchy import Hierarchy
from branchnet.tree import BranchTree
from branchnet.tree.evaluate_open_world import evaluate_open_world
from branchnet.tree.fitting import TreeError

DIM = 12
FAST = {"epochs": 25, "batch_size": 64, "lr": 3e-3, "patience": 5}
PAIRS = {"p0": ["c0", "c1"], "p1": ["c2", "c3"], "p2": ["c4", "c5"]}


def _centres(n: int, rng: np.random.Generator) -> np.ndarray:
    """Pairs of class centres: pair k at 8·e_k, its two classes ±1.6 along another axis."""
    c = np.zeros((n, DIM))
    for i in range(n):
        c[i, i // 2] = 8.0
        c[i, 6 + i // 2] = 1.6 if i % 2 else -1.6
    return c


def blobs(n_per: int, classes: list[int], seed: int) -> Split:
    rng = np.random.default_rng(seed)
    centres = _centres(8, rng)
    centres[6:, :] = 0.0
    centres[6, 10], centres[7, 11] = 9.0, -9.0  # the novel classes: away from every pair
    x = np.concatenate([centres[c] + rng.normal(size=(n_per, DIM)) for c in classes])
    y = np.repeat(np.arange(len(classes)), n_per)
    return Split(torch.tensor(x, dtype=torch.float32), torch.tensor(y))


def known(seed: int = 0, n: int = 150) -> Data:
    names = [f"c{i}" for i in range(6)]
    return Data(blobs(n, list(range(6)), seed), blobs(n // 3, list(range(6)), seed + 1),
                blobs(n // 3, list(range(6)), seed + 2), names, "blobs", {})


def make_tree(workdir: Path, **kw) -> BranchTree:
    torch.manual_seed(0)
    return BranchTree(models.mlp([DIM, 32], 6), tap="hidden.0", parent_train=FAST,
                      head_train=FAST, workdir=workdir, **kw)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[BranchTree, Data, Split]:
    data = known()
    select, calib = data.val.split(0.5, seed=0)
    tree = make_tree(tmp_path_factory.mktemp("tree"), novelty={"score": "mahalanobis"})
    tree.fit(data.train, val=select, hierarchy=PAIRS, classes=data.classes)
    return tree, data, calib


# ------------------------------------------------------------------------- induction in fit
@pytest.mark.parametrize("method", ["confusion", "features", "weights"])
def test_fit_induces_the_pairs(tmp_path, method):
    """The three pairs are what the parent knows: its confusions and its tap's class means
    find them (a small parent's class weights need not: NBDT's source is tested on weights
    with a known answer in test_induce.py)."""
    data = known()
    tree = make_tree(tmp_path).fit(data, hierarchy={"induce": method, "groups": 3})
    if method != "weights":
        assert tree.hierarchy_.agreement(Hierarchy.from_dict(PAIRS).bind(data.classes)) == 1.0
    assert len(tree.hierarchy_.children("root")) == 3
    assert tree.fit_summary_["induced"]["induce"] == method
    assert sorted(tree.hierarchy_.leaves) == sorted(data.classes)
    assert tree.score(data.test.x, data.test.y) > 0.9


def test_induced_tree_saves_and_loads(tmp_path):
    data = known()
    tree = make_tree(tmp_path / "w").fit(data, hierarchy={"induce": "weights", "groups": 3})
    back = BranchTree.load(tree.save(tmp_path / "saved"))
    assert back.hierarchy_ == tree.hierarchy_
    assert torch.equal(back.predict(data.test.x).leaf, tree.predict(data.test.x).leaf)


@pytest.mark.parametrize("spec, match", [
    ({"induce": "spectral"}, "hierarchy induce='spectral'"),
    ({"induce": "features", "groups": 1}, "groups must be an integer >= 2, got 1"),
    ({"induce": "features", "depth": 0}, "depth must be an integer >= 1, got 0"),
    ({"induce": "features", "group": 3}, r"unknown hierarchy induction option\(s\) \['group'\]"),
])
def test_bad_induction_fails_before_work(tmp_path, spec, match):
    with pytest.raises(TreeError, match=match):
        make_tree(tmp_path).fit(known(n=30), hierarchy=spec)
    assert not (tmp_path / "parent").exists()  # nothing trained


def test_induction_needs_fine_parent_labels(tmp_path):
    tree = make_tree(tmp_path, parent_labels="coarse")
    with pytest.raises(TreeError, match="parent_labels='fine'"):
        tree.fit(known(n=30), hierarchy={"induce": "weights", "groups": 3})


# ------------------------------------------------------------------------------------ grow
def _new_classes(seed: int = 5) -> Data:
    """Two more classes beside pair p2 (at 8·e_2, ±3.5 along an axis of their own)."""
    centres = np.zeros((2, DIM))
    centres[:, 2], centres[0, 9], centres[1, 9] = 8.0, 3.5, -3.5

    def split(n: int, s: int) -> Split:
        rng = np.random.default_rng(s)
        x = np.concatenate([c + rng.normal(size=(n, DIM)) for c in centres])
        return Split(torch.tensor(x, dtype=torch.float32),
                     torch.repeat_interleave(torch.arange(2), n))

    return Data(split(150, seed), split(50, seed + 1), split(50, seed + 2), ["n0", "n1"],
                "more", {})


@pytest.mark.parametrize("group", [None, "p3"])
def test_grow_keeps_every_other_branch(tmp_path, group):
    data = known()
    tree = make_tree(tmp_path).fit(data, hierarchy=PAIRS)
    before = {n: tree.node_proba(n, data.test.x) for n in ("p0", "p1")}
    root_before = tree.node_proba("root", data.test.x)
    heads = {n: {k: v.clone() for k, v in tree.heads_[tree.layout_.node_index[n]].state_dict()
                 .items()} for n in ("p0", "p1")}
    parent = {k: v.clone() for k, v in tree.parent.state_dict().items()}
    new = _new_classes()
    under = "p2"
    tree.grow(new, under=under, group=group)
    assert tree.classes_ == [*data.classes, "n0", "n1"]
    expected = ["c4", "c5", "n0", "n1"] if group is None else ["c4", "c5", group]
    assert tree.hierarchy_.children(under) == expected
    # by construction: the parent and the other branches are untouched, so their answers on
    # the classes they had are the same
    for k, v in tree.parent.state_dict().items():
        assert torch.equal(v, parent[k])
    for n in ("p0", "p1"):
        state = tree.heads_[tree.layout_.node_index[n]].state_dict()
        assert all(torch.equal(state[k], heads[n][k]) for k in state)
        assert torch.equal(tree.node_proba(n, data.test.x), before[n])
    assert torch.equal(tree.node_proba("root", data.test.x), root_before)
    # the new classes are learned
    offset = len(data.classes)
    leaf = tree.predict(new.test.x).leaf
    assert (leaf == new.test.y + offset).float().mean() > 0.8
    assert tree.fit_summary_["grown"][0]["classes"] == ["n0", "n1"]
    # and survive saving
    back = BranchTree.load(tree.save(tmp_path / "grown"))
    assert torch.equal(back.predict(new.test.x).leaf, leaf)


def test_grow_bad_input(tmp_path):
    data = known(n=60)
    tree = make_tree(tmp_path).fit(data, hierarchy=PAIRS)
    overlap = Data(data.train, data.val, data.test, data.classes, "same", {})
    with pytest.raises(TreeError, match=r"classes \['c0', .*\] are already in the tree"):
        tree.grow(overlap, under="p0")
    with pytest.raises(TreeError, match="under='nowhere' is not an internal node"):
        tree.grow(_new_classes(), under="nowhere")
    with pytest.raises(TreeError, match="under='root' needs router='learned'"):
        tree.grow(_new_classes(), under="root")
    with pytest.raises(TreeError, match="group='p0' is already a node"):
        tree.grow(_new_classes(), under="p1", group="p0")
    with pytest.raises(TreeError, match="without classes"):
        tree.grow(_new_classes().train, under="p1")


def test_grow_without_the_cache_says_so(tmp_path):
    data = known(n=60)
    tree = BranchTree(models.mlp([DIM, 32], 6), tap="hidden.0", parent_train=FAST,
                      head_train=FAST).fit(data, hierarchy=PAIRS)  # temporary workdir: gone
    with pytest.raises(TreeError, match="cached activations this tree was fitted on are gone"):
        tree.grow(_new_classes(), under="p2")


# ----------------------------------------------------------------------------- open world
def test_novel_inputs_are_rejected_and_told_from_unsure(fitted):
    tree, data, calib = fitted
    info = tree.calibrate_novelty(calib, target_frr=0.1, delta=0.2)
    assert info["feasible"] and math.isfinite(info["threshold"])
    novel = blobs(60, [6, 7], seed=9)
    pred = tree.predict(novel.x)
    assert pred.novel.float().mean() > 0.9
    assert (pred.label[pred.novel] == -1).all()
    assert set(pred.status) <= {"novel", "unsure", "known"}
    i = int(torch.nonzero(pred.novel)[0])
    assert pred.explain(i).startswith("novel at ") and pred.node(i) is None
    assert pred.to_records()[i]["status"] == "novel"
    on_known = tree.predict(data.test.x)
    assert on_known.novel.float().mean() < 0.25  # calibrated to 10 % (with slack for n = 100)
    assert not on_known.abstained.any()  # no abstention threshold set: nothing is unsure


def test_novelty_calibration_refuses_fitted_rows(fitted):
    tree, data, _ = fitted
    with pytest.raises(TreeError, match="were used to fit this tree"):
        tree.calibrate_novelty(data.train)


def test_novelty_needs_scorers(tmp_path):
    data = known(n=60)
    select, calib = data.val.split(0.5)
    tree = make_tree(tmp_path).fit(data.train, val=select, hierarchy=PAIRS,
                                   classes=data.classes)
    with pytest.raises(TreeError, match="has no novelty scorers"):
        tree.calibrate_novelty(calib)
    with pytest.raises(Exception, match="novelty score 'odin' is not known"):
        make_tree(tmp_path, novelty={"score": "odin"})


def test_novelty_survives_save_load(fitted, tmp_path):
    tree, _, calib = fitted
    tree.calibrate_novelty(calib, target_frr=0.1, delta=0.2)
    back = BranchTree.load(tree.save(tmp_path / "t"))
    novel = blobs(20, [6, 7], seed=3)
    a, b = tree.predict(novel.x), back.predict(novel.x)
    assert torch.equal(a.novel_level, b.novel_level)
    assert torch.allclose(a.novelty, b.novelty)


def test_open_world_evaluation_on_blobs(fitted):
    tree, data, calib = fitted
    novel = blobs(60, [6, 7], seed=11)
    result, figures = evaluate_open_world(tree, data.test, novel, calib,
                                          ["msp", "energy", "mahalanobis", "knn"],
                                          target_frr=0.1, delta=0.2, knn_k=10)
    for name in ("mahalanobis", "knn"):
        assert result["scores"][name]["tap"]["auroc"] > 0.95
        assert result["scores"][name]["tree"]["auroc"] > 0.95
        j = result["scores"][name]["tree"]["joint"]
        assert j["novel_rejected"] + j["novel_unsure"] + j["novel_accepted"] == pytest.approx(1)
    assert set(figures) == {"novelty", "novelty_tree"}
    assert result["best_feature_score"] in ("mahalanobis", "knn")  # energy reads logits


# ------------------------------------------------------------------------------- the CLI
def test_cli_open_world_run_and_grow(tmp_path):
    """A digits tree on 8 classes with 8 and 9 as novel inputs, then 8 and 9 grown in."""
    from branchnet.runs import Run
    from cli_helpers import DIGITS_CONFIG, run_cli, write_config

    cfg = {**DIGITS_CONFIG,
           "data": {**DIGITS_CONFIG["data"], "classes": [str(c) for c in range(8)]},
           "hierarchy": {"round": ["0", "6"], "straight": ["1", "4", "7"],
                         "curly": ["2", "3", "5"]},
           "novelty": {"classes": ["8", "9"], "knn_k": 5, "target_frr": 0.2, "delta": 0.2}}
    config = write_config(tmp_path / "c.yaml", cfg)
    code, out, err = run_cli(["tree", "fit", str(config), "--out", str(tmp_path / "runs")])
    assert code == 0, err
    assert "open world (AUROC" in out
    run = next((tmp_path / "runs").iterdir())
    metrics = Run.open(run).read_metrics()
    ow = metrics["open_world"]
    assert set(ow["scores"]) == {"msp", "energy", "mahalanobis", "knn"}
    assert ow["n_novel"] > 0 and "auroc_gain_over_msp" in ow
    assert (run / "figures" / "novelty.png").is_file()
    assert "Open world" in (run / "report.html").read_text()
    code, out, err = run_cli(["tree", "grow", str(run), "8:round", "9:curly"])
    assert code == 0, err
    grown = json.loads((run / "grown" / "grow.json").read_text())
    assert grown["classes"][-2:] == ["8", "9"]
    untouched = grown["branches"]["straight"]
    assert not untouched["retrained"] and untouched["after"] == untouched["before"]
    code, _, err = run_cli(["tree", "grow", str(run), "3:round"])
    assert code == 2 and "classes ['3'] are already in the tree" in err
    code, _, err = run_cli(["tree", "grow", str(run), "8-round"])
    assert code == 2 and "must be CLASS:NODE" in err
