"""Conditional computation in the tree: path-only routing (:meth:`TreeRouter.forward_paths`)
gives the all-heads forward's outputs while running only the heads on each input's path, and a
learned router stops the parent at its tap (torch.fx), with a hooked whole parent as fallback.

Routers are built directly on random trees (depths 1-3, single-child nodes included) with
untrained heads, so no training runs except in the BranchTree tests at the end.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from branchnet import models
from branchnet.data import Data, Split
from branchnet.data.hierarchy import ROOT, Hierarchy
from branchnet.selfcheck import SelfCheckHead
from branchnet.tree import BranchTree, Prediction, TreeLayout
from branchnet.tree.router import (
    PathsOnly,
    Tapped,
    TreeRouter,
    TruncatedParent,
    local_score,
    parent_module,
)
from branchnet.tree.tree import ConstantHead, PathPrediction

IN, TAP_DIM, HIDDEN = 8, 16, 12


def random_hierarchy(rng: random.Random, depth: int) -> tuple[Hierarchy, list[str]]:
    """A random tree whose deepest leaf is ``depth`` edges below the root; nodes below the root
    have 1-4 children (so single-child nodes occur), leaves named ``c0, c1, ...``."""
    children: dict[str, list[str]] = {}
    classes: list[str] = []

    def grow(name: str, levels: int, must_reach: bool) -> None:
        kids: list[str] = []
        n = rng.randint(2 if name == ROOT else 1, 4)  # at least two classes
        deep = rng.randrange(n) if must_reach else -1  # the child that carries the full depth
        for k in range(n):
            if levels > 1 and (k == deep or rng.random() < 0.5):
                sub = f"n{len(children) + 1}_{k}"
                children[sub] = []
                kids.append(sub)
                grow(sub, levels - 1, k == deep)
            else:
                leaf = f"c{len(classes)}"
                classes.append(leaf)
                kids.append(leaf)
        children[name] = kids

    grow(ROOT, depth, True)
    return Hierarchy(children), classes


def spread(module: nn.Module) -> nn.Module:
    """Random weights without biases, so that untrained heads route inputs to many leaves."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=2 / m.in_features ** 0.5)
            nn.init.zeros_(m.bias)
    return module.eval()


def build_router(layout: TreeLayout, *, node_input: str, router: str, score: str = "msp",
                 policy: str = "hard", seed: int = 0,
                 parent: nn.Module | None = None) -> TreeRouter:
    """A router as BranchTree builds it (same sources and branch taps), with random heads."""
    torch.manual_seed(seed)
    n_classes = len(layout.classes)
    parent = parent if parent is not None else spread(models.mlp([IN, TAP_DIM], n_classes))
    heads: dict[int, Tapped] = {}
    sources: list[int] = []
    for i in range(len(layout.nodes)):
        up, src = layout.parent_of[i], -1
        if node_input == "branch" and up in heads:
            src = up if heads[up].layer else sources[up]
        sources.append(src)
        if i == 0 and router == "parent":
            continue
        k = layout.n_children[i]
        head: nn.Module = (ConstantHead() if k == 1 else
                           models.branch_head(TAP_DIM if src < 0 else HIDDEN, k, hidden=HIDDEN))
        inner = any(int(c) >= 0 for c in layout.child_node[i])
        layer = "hidden.0" if node_input == "branch" and inner and k > 1 else None
        heads[i] = Tapped(spread(head), layer)
    module, how = parent_module(parent, "hidden.0", output_needed=router == "parent")
    check = SelfCheckHead(TAP_DIM, 8, 0.0).eval() if score == "selfcheck" else None
    return TreeRouter(layout, module, heads, sources, root_from_parent=router == "parent",
                      parent_groups=layout.root_groups(), policy=policy, score=score,
                      selfcheck=check, parent_run=how).eval()


def set_thresholds(r: TreeRouter, x: torch.Tensor, q: float = 0.3) -> None:
    """Thresholds at the ``q`` quantile of each node's confidence, so that some inputs abstain."""
    with torch.inference_mode():
        P, feats = r.probs_and_features(x)
        if r.score == "selfcheck":
            t = torch.full((r.n_nodes,), float(r.selfcheck_score(feats).quantile(q)))
        else:
            t = torch.stack([local_score(P[:, i], r.score).quantile(q) for i in range(r.n_nodes)])
    r.thresholds.copy_(t)


def assert_paths_equal(full: tuple[torch.Tensor, ...], paths: tuple[torch.Tensor, ...]) -> None:
    leaf, path_nodes, path_conf, stop = full[:4]
    assert torch.equal(paths[0], leaf)
    assert torch.equal(paths[1], path_nodes)
    torch.testing.assert_close(paths[2], path_conf, equal_nan=True, rtol=1e-5, atol=1e-6)
    assert torch.equal(paths[3], stop)


class RowCounter:
    """Counts the rows each head is called on (a forward pre-hook per head)."""

    def __init__(self, r: TreeRouter):
        self.rows: dict[int, int] = {}
        self.calls: dict[int, int] = {}
        self.handles = [h.register_forward_pre_hook(self._hook(int(i)))
                        for i, h in r.heads.items()]

    def _hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.rows[i] = self.rows.get(i, 0) + int(args[0].shape[0])
            self.calls[i] = self.calls.get(i, 0) + 1
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------- path-only == all heads


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), depth=st.integers(1, 3),
       node_input=st.sampled_from(["parent", "branch"]),
       router=st.sampled_from(["parent", "learned"]),
       score=st.sampled_from(["msp", "margin", "entropy", "selfcheck"]),
       n=st.integers(1, 70))
def test_paths_equal_all_heads(seed: int, depth: int, node_input: str, router: str, score: str,
                               n: int) -> None:
    hier, classes = random_hierarchy(random.Random(seed), depth)
    lay = TreeLayout(hier, classes)
    assert lay.depth == depth
    r = build_router(lay, node_input=node_input, router=router, score=score, seed=seed)
    x = 3 * torch.randn(n, IN, generator=torch.Generator().manual_seed(seed))
    set_thresholds(r, x)
    counter = RowCounter(r)
    with torch.inference_mode():
        full = r(x)
        counter.remove()
        counter = RowCounter(r)
        paths = r.forward_paths(x)
        counter.remove()
        assert_paths_equal(full, paths)
        # each head ran once at most, on exactly the inputs whose path passes through it
        path_nodes = full[1]
        for i in range(len(lay.nodes)):
            visits = int((path_nodes == i).sum())
            if str(i) in r.heads:
                assert counter.rows.get(i, 0) == visits, (i, counter.rows)
                assert counter.calls.get(i, 0) == (1 if visits else 0)
        # stopping at the abstention: the same path up to and including the stop level
        leaf, nodes, conf, stop = r.forward_paths(x, stop_on_abstain=True)
    assert torch.equal(stop, full[3])
    accepted = stop < 0
    assert torch.equal(leaf[accepted], full[0][accepted])
    assert (leaf[~accepted] == -1).all()
    levels = torch.arange(lay.depth)[None, :]
    upto = accepted[:, None] | (levels <= stop[:, None])
    assert torch.equal(torch.where(upto, full[1], -1), nodes)
    torch.testing.assert_close(torch.where(upto, full[2], math.nan), conf, equal_nan=True)


def test_paths_on_a_ragged_three_level_tree() -> None:
    """The layout test's ragged tree (single-child nodes at two depths), every node input."""
    h = Hierarchy.from_dict({"a": ["x"], "b": {"c": ["y", "z"], "d": ["w"]}, "e": ["v", "u"]})
    lay = TreeLayout(h, ["u", "v", "w", "x", "y", "z"])
    x = 3 * torch.randn(500, IN, generator=torch.Generator().manual_seed(1))
    for node_input in ("parent", "branch"):
        for router in ("parent", "learned"):
            r = build_router(lay, node_input=node_input, router=router, seed=3)
            set_thresholds(r, x, 0.2)
            with torch.inference_mode():
                full, paths = r(x), r.forward_paths(x)
            assert_paths_equal(full, paths)
            assert (full[3] >= 0).any() and (full[3] < 0).any()
            assert len(set(full[0].tolist())) > 2  # the inputs go to several leaves


def test_paths_of_one_input_and_of_none() -> None:
    hier, classes = random_hierarchy(random.Random(5), 3)
    lay = TreeLayout(hier, classes)
    r = build_router(lay, node_input="branch", router="learned")
    x = 3 * torch.randn(30, IN, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = r(x)
        for k in range(len(x)):  # batch size 1: every input alone
            assert_paths_equal(tuple(t[k:k + 1] for t in full), r.forward_paths(x[k:k + 1]))
        leaf, nodes, conf, _ = r.forward_paths(x[:0])
    assert leaf.shape == (0,) and nodes.shape == (0, lay.depth) and conf.shape == (0, lay.depth)


def test_paths_need_one_child_per_node() -> None:
    lay = TreeLayout(Hierarchy.from_dict({"g0": ["a", "b"], "g1": ["c"]}), ["a", "b", "c"])
    r = build_router(lay, node_input="parent", router="parent", policy="soft")
    with pytest.raises(ValueError, match="soft policy needs every head"):
        r.forward_paths(torch.zeros(2, IN))


# ---------------------------------------------------------------- the parent stops at its tap


class Untraceable(nn.Module):
    """A parent with data-dependent control flow, which torch.fx cannot trace."""

    def __init__(self, n_out: int):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(IN, TAP_DIM), nn.ReLU())
        self.head = nn.Linear(TAP_DIM, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        return self.head(h) if h.sum() >= 0 else -self.head(h)


def test_learned_router_truncates_the_parent() -> None:
    lay = TreeLayout(Hierarchy.from_dict({"g0": ["a", "b"], "g1": ["c", "d"]}), list("abcd"))
    x = torch.randn(40, IN)
    torch.manual_seed(0)
    parent = models.mlp([IN, TAP_DIM], 4).eval()
    learned = build_router(lay, node_input="parent", router="learned", parent=parent)
    assert isinstance(learned.parent, TruncatedParent)
    assert learned.parent_run == "parent truncated after 'hidden.0' (torch.fx)"
    assert "truncated" in repr(learned)
    calls: list[int] = []
    handle = parent.get_submodule("head").register_forward_hook(lambda *a: calls.append(1))
    with torch.inference_mode():
        full, paths = learned(x), learned.forward_paths(x)
        truncated = learned.features(x)[1]
    handle.remove()
    assert calls == []  # the parent's output layer never ran
    assert_paths_equal(full, paths)
    # the same features as the whole parent read by a hook
    whole = Tapped(parent, "hidden.0")
    with torch.inference_mode():
        assert torch.equal(whole(x)[1], truncated)
    # the parent decides the root: it runs whole
    routed = build_router(lay, node_input="parent", router="parent")
    assert isinstance(routed.parent, Tapped)
    assert routed.parent_run.startswith("whole parent (its output is the root decision)")
    with pytest.raises(ValueError, match="needs the parent's output"):
        TreeRouter(lay, learned.parent, {}, [-1, -1, -1], root_from_parent=True,
                   parent_groups=lay.root_groups())


def test_untraceable_parent_falls_back_to_a_hook() -> None:
    lay = TreeLayout(Hierarchy.from_dict({"g0": ["a", "b"], "g1": ["c"]}), list("abc"))
    torch.manual_seed(0)
    parent = Untraceable(3).eval()
    r = build_router(lay, node_input="branch", router="learned", parent=parent)
    assert isinstance(r.parent, Tapped)
    assert r.parent_run.startswith("whole parent, tap 'hidden.0' read by a forward hook "
                                   "(cannot truncate: cannot trace Untraceable")
    x = torch.randn(50, IN)
    with torch.inference_mode():
        assert_paths_equal(r(x), r.forward_paths(x))


# ---------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("router", ["parent", "learned"])
def test_path_only_traces(router: str) -> None:
    """Traced, every node runs on its (maybe empty) share of the batch: the trace holds for
    batches that reach other nodes, and for a batch that reaches none of some nodes."""
    hier, classes = random_hierarchy(random.Random(11), 3)
    lay = TreeLayout(hier, classes)
    r = build_router(lay, node_input="branch", router=router, seed=4)
    x = 3 * torch.randn(300, IN, generator=torch.Generator().manual_seed(3))
    set_thresholds(r, x)
    with torch.no_grad():
        traced = torch.jit.trace(PathsOnly(r), (x[:7],), check_trace=False)
    with torch.inference_mode():
        for batch in (x, x[:1], x[100:137]):
            assert_paths_equal(r(batch), traced(batch))


def test_path_only_exports() -> None:
    """torch.export (non-strict, dynamic batch) captures path-only routing as it does the
    all-heads forward; strict export stops at the forward hooks that read branch taps."""
    hier, classes = random_hierarchy(random.Random(11), 3)
    lay = TreeLayout(hier, classes)
    r = build_router(lay, node_input="branch", router="learned", seed=4)
    x = 3 * torch.randn(300, IN, generator=torch.Generator().manual_seed(3))
    set_thresholds(r, x)
    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(PathsOnly(r), (x[:7],), dynamic_shapes=({0: batch},),
                                   strict=False).module()
    with torch.inference_mode():
        for part in (x, x[:1], x[100:137]):
            assert_paths_equal(r(part), exported(part))


# ---------------------------------------------------------------- BranchTree


CLASSES = [f"c{i}" for i in range(6)]
HIER3 = {"g0": {"s0": ["c0", "c1"], "s1": ["c2"]}, "g1": ["c3", "c4", "c5"]}
FAST: dict[str, Any] = {"epochs": 4, "lr": 1e-2, "batch_size": 32, "progress": False,
                        "weight_decay": 0.0, "patience": None}
_CENTERS = torch.randn(6, IN, generator=torch.Generator().manual_seed(0))
_CENTERS[:, :4] += torch.tensor([2.0, 2, 2, -2, -2, -2])[:, None]


def blobs(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 6
    return Split(_CENTERS[y] + torch.randn(n, IN, generator=g), y)


@pytest.fixture(scope="module")
def data() -> Data:
    return Data(blobs(240, 1), blobs(120, 2), blobs(240, 3), list(CLASSES), name="blobs")


def assert_same_prediction(a: Prediction, b: Prediction) -> None:
    for k in ("label", "leaf", "path_nodes", "stop_level"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    torch.testing.assert_close(a.path_conf, b.path_conf, equal_nan=True)
    torch.testing.assert_close(a.leaf_probs, b.leaf_probs)


@pytest.mark.parametrize(("router", "node_input", "policy"),
                         [("parent", "parent", "threshold"), ("learned", "branch", "hard")])
def test_branch_tree_predicts_on_the_paths(tmp_path: Path, data: Data, router: str,
                                           node_input: str, policy: str) -> None:
    torch.manual_seed(0)
    tree = BranchTree(models.mlp([IN, TAP_DIM], 6), "hidden.0", hierarchy=HIER3, router=router,
                      node_input=node_input, policy=policy, parent_train=FAST, head_train=FAST,
                      workdir=tmp_path, cache_dir=tmp_path / "cache", progress=False)
    tree.fit(data)
    assert ("truncated" in tree.router_.parent_run) == (router == "learned")
    tree.calibrate(blobs(120, 9), method="coverage", coverage=0.7)
    x = data.test.x
    counter = RowCounter(tree.router_)
    pred = tree.predict(x)
    counter.remove()
    assert isinstance(pred, PathPrediction) and isinstance(pred, Prediction)
    assert sum(counter.rows.values()) < len(x) * len(tree.router_.heads)  # not every head
    full = tree.predict(x, all_heads=True)
    assert type(full) is Prediction
    assert 0.5 < pred.coverage < 0.9
    assert_same_prediction(pred, full)  # reading pred.leaf_probs runs the other heads
    torch.testing.assert_close(pred.leaf_probs, tree.predict_proba(x))
    assert pred.to_records(k=2)[0] == full.to_records(k=2)[0]
    assert tree.score(x, data.test.y) == float((full.leaf == data.test.y).float().mean())
    loaded = BranchTree.load(tree.save(tmp_path / "saved"))
    assert loaded.router_.parent_run == tree.router_.parent_run
    assert_same_prediction(loaded.predict(x), full)
    # TorchScript: the all-heads forward, and the path-only one
    script = tree.to_torchscript(tmp_path / "all.pt")
    paths = tree.to_torchscript(tmp_path / "paths.pt", paths_only=True)
    for module in (script, paths, torch.jit.load(str(tmp_path / "paths.pt"))):
        out = module(x[:53])
        assert torch.equal(out[0], full.leaf[:53]) and torch.equal(out[3], full.stop_level[:53])
        assert torch.equal(out[1], full.path_nodes[:53])
    assert len(paths(x[:5])) == 4 and len(script(x[:5])) == 5


def test_soft_policy_keeps_every_head(tmp_path: Path, data: Data) -> None:
    torch.manual_seed(0)
    tree = BranchTree(models.mlp([IN, TAP_DIM], 6), "hidden.0", hierarchy=HIER3, policy="soft",
                      parent_train=FAST, head_train=FAST, workdir=tmp_path,
                      cache_dir=tmp_path / "cache", progress=False).fit(data)
    assert type(tree.predict(data.test.x)) is Prediction
    with pytest.raises(Exception, match="soft policy needs every head"):
        tree.to_torchscript(paths_only=True)
