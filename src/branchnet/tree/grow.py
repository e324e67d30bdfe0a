"""Growing a fitted tree: new classes as new leaves or a new branch, nothing else retrained.

:func:`grow` (what :meth:`BranchTree.grow` runs) adds classes under one internal node ``under``.
The frozen parent runs only on the new inputs (their tapped activations join the cache); the
head at ``under`` is trained again, on the cached activations of its old classes and the new
ones, because its children change; with ``group`` a new internal node holding the new classes
gets its own head. Every other head, and the parent, keep their weights: on the classes they
already had, their answers are the same as before, by construction.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from branchnet.cache import ActivationCache
from branchnet.data.batches import TensorPairs
from branchnet.data.dataset import Data, Split
from branchnet.data.hierarchy import ROOT, Hierarchy
from branchnet.engine import fit
from branchnet.tree.fitting import (
    HEAD_TRAIN_DEFAULTS,
    TreeError,
    _fit_brief,
    _row_hashes,
    _safe,
    _train_config,
)
from branchnet.tree.layout import TreeLayout
from branchnet.tree.router import Tapped

if TYPE_CHECKING:  # pragma: no cover
    from branchnet.tree.tree import BranchTree


def _new_data(tree: BranchTree, data: Any, classes: list[str] | None, seed: int
              ) -> tuple[Split, Split, list[str]]:
    if isinstance(data, Data):
        return data.train, data.val, list(classes or data.classes)
    if isinstance(data, Split):
        if not classes:
            raise TreeError("grow got a Split without classes=[...]: name the new classes its "
                            "labels 0, 1, ... stand for (or pass a Data)")
        train, val = data.split(0.1, seed=seed)
        return train, val, list(classes)
    raise TreeError(f"grow expects a Data or a Split of the new classes, got "
                    f"{type(data).__name__}")


def _grown_hierarchy(h: Hierarchy, under: str, new: list[str], group: str | None) -> Hierarchy:
    children = {n: list(h.children(n)) for n in h.internal_nodes()}
    if group is None:
        children[under] += new
    else:
        children[under].append(group)
        children[group] = list(new)
    return Hierarchy(children)


def check_grow(tree: BranchTree, under: str, new: list[str], group: str | None) -> None:
    """Every reason a grow call cannot work, before any work."""
    lay = tree._require_fit()
    if under not in lay.nodes:
        raise TreeError(f"under={under!r} is not an internal node of the tree; its internal "
                        f"nodes are {lay.nodes}")
    if under == ROOT and tree.router == "parent":
        raise TreeError("under='root' needs router='learned': this tree's root decision is the "
                        "parent's own output, which cannot know new classes without retraining "
                        f"the parent; grow under one of {lay.nodes[1:]}")
    overlap = sorted(set(new) & set(lay.classes))
    if overlap:
        raise TreeError(f"classes {overlap} are already in the tree; grow adds new classes only "
                        f"(the tree has {lay.classes})")
    if len(set(new)) != len(new) or not new:
        raise TreeError(f"the new classes must be distinct and at least one, got {new}")
    names = set(lay.hierarchy.internal_nodes()) | set(lay.classes) | set(new)
    if group is not None and group in names:
        raise TreeError(f"group={group!r} is already a node or class name; give the new branch "
                        "a name of its own")
    if group is not None and len(new) < 2:
        raise TreeError(f"a new branch needs at least 2 classes to choose among, got {new}; "
                        "add a single class as a leaf (group=None)")
    if tree.node_input != "parent":
        raise TreeError("grow needs node_input='parent': with branches of branches a retrained "
                        "head would change the inputs of the heads below it")
    if tree.confidence == "selfcheck":
        raise TreeError("a tree whose confidence is its self-check branch cannot grow: the "
                        "self-check learned the old tree's mistakes")


def grow(tree: BranchTree, data: Data | Split, *, under: str, group: str | None = None,
         classes: list[str] | None = None) -> dict[str, Any]:
    """Add ``data``'s classes under node ``under`` (see the module docstring); returns a
    summary of what was trained. ``tree`` is changed in place."""
    head_train = _train_config(tree.head_train, tree.progress, default=HEAD_TRAIN_DEFAULTS)
    train, val, new = _new_data(tree, data, classes, head_train.seed)
    check_grow(tree, under, new, group)
    old_features = {s: tree._fit_features(s) for s in ("train", "val")}  # checks the cache
    old = tree.layout_
    n_old = len(old.classes)
    for name, split in (("training", train), ("validation", val)):
        missing = sorted(set(range(len(new))) - set(split.y.tolist()))
        if missing:
            raise TreeError(f"the new classes {[new[i] for i in missing]} have no {name} inputs")
    fd = tree.fit_data_
    cache = ActivationCache(Path(fd["cache"]), dtype=getattr(torch, tree.cache_dtype))
    acts = {name: cache.get_many(tree.parent, [tree.tap], split,
                                 preprocessing=tree.preprocessing_, progress=tree.progress)[tree.tap]
            for name, split in (("train", train), ("val", val))}
    layout = TreeLayout(_grown_hierarchy(old.hierarchy, under, new, group),
                        [*old.classes, *new])
    feats = {s: torch.cat([old_features[s], acts[s].as_tensor().flatten(1)])
             for s in ("train", "val")}
    labels = {"train": torch.cat([fd["train_y"], train.y + n_old]),
              "val": torch.cat([fd["val_y"], val.y + n_old])}

    heads = {layout.node_index[node]: tree.heads_[i] for i, node in enumerate(old.nodes)
             if node != under and i in tree.heads_}  # a root decided by the parent has none
    tree.classes_, tree.layout_, tree.hierarchy_ = list(layout.classes), layout, layout.hierarchy
    tree.sources_ = [-1] * len(layout.nodes)
    trained: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="branchnet-grow-") as tmp:
        root = Path(tree.workdir) / "grow" if tree.workdir else Path(tmp)
        for node in [under, *([group] if group else [])]:
            i = layout.node_index[node]
            head = tree._make_head(i, feats["train"].shape[1], layout.n_children[i],
                                   head_train.seed)
            pairs = {}
            for s in ("train", "val"):
                slots = layout.slot_of_label(node, labels[s])
                rows = torch.nonzero(slots >= 0).flatten()
                pairs[s] = TensorPairs(feats[s][rows], slots[rows])
            res = fit(head, pairs["train"], pairs["val"], head_train,
                      workdir=root / f"{i:02d}-{_safe(node)}-{len(layout.classes)}",
                      description=f"branch {node!r} ({layout.n_children[i]} children)")
            heads[i] = Tapped(head.eval().requires_grad_(False), None)
            trained[node] = {"n_train": len(pairs["train"]), "n_val": len(pairs["val"]),
                             **_fit_brief(res)}
    tree.heads_ = dict(sorted(heads.items()))

    # the fitted state now covers the new rows: a later grow or make_novelty reads them too
    val_logits = fd.get("val_logits")
    if val_logits is not None:
        with torch.inference_mode():
            new_logits = torch.cat([tree.parent(val.x[i:i + 1024])
                                    for i in range(0, len(val), 1024)])
        val_logits = torch.cat([val_logits, new_logits])
    tree.fit_data_ = {**fd, "train": [*fd["train"], acts["train"].key],
                      "val": [*fd["val"], acts["val"].key], "train_y": labels["train"],
                      "val_y": labels["val"], "val_logits": val_logits}
    if tree.fitted_rows_ is not None:
        tree.fitted_rows_ = np.unique(np.concatenate(
            [tree.fitted_rows_, _row_hashes(train.x), _row_hashes(val.x)]))
    tree._build_router()
    summary = {"classes": new, "under": under, "group": group, "trained": trained}
    tree.fit_summary_.setdefault("grown", []).append(summary)
    if tree.novelty_ is not None:  # its node scorers and reference ranks describe the old tree
        tree.novelty_ = tree.make_novelty(tree.novelty_.score, **tree.novelty_.options)
        warnings.warn("grow refitted the novelty scorers; call calibrate_novelty again on "
                      "held-out inputs of all classes (until then nothing is rejected as novel)",
                      stacklevel=3)
    if tree.calibration_.get("method") in ("risk", "coverage"):
        warnings.warn("the abstention threshold was calibrated on the tree before it grew; "
                      "calibrate() again on held-out inputs of all classes to keep its "
                      "guarantee", stacklevel=3)
    return summary
