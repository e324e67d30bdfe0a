"""Open-world rejection in a tree: each node can say an input is none of its children.

Every internal node gets a novelty scorer (:mod:`branchnet.novelty`) fitted on the training
inputs of the classes under it: feature scores (Mahalanobis, KNN) read the parent's tapped
layer, logit scores (max softmax, energy) the node's own logits (the parent's output at a root
decided by the parent, the node's head elsewhere). Scores of different nodes are made
comparable by turning each into its rank among known held-out inputs at that node (an
empirical CDF on the early-stopping split, which the calibration split never touches):
``u_i(x)`` in [0, 1]. An input's novelty statistic is the largest ``u`` along the path it
takes; it is rejected as novel at the first node where ``u`` exceeds one threshold ``t``.

``t`` is calibrated on known-class calibration inputs with :func:`branchnet.novelty.frr_threshold`:
the statistic is a fixed function of the input (fitted without the calibration data), so with
probability ``1 - delta`` the end-to-end false-rejection rate of known inputs is at most
``target_frr``, whatever path each input takes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from branchnet.errors import BranchnetError
from branchnet.novelty import SCORERS, frr_threshold, make_scorer, scorer_from_state

if TYPE_CHECKING:  # pragma: no cover
    from branchnet.tree.tree import BranchTree


class NoveltyError(BranchnetError, ValueError):
    """Open-world rejection cannot be fitted or used as asked."""


def node_logits(tree: BranchTree, i: int, parent_logits: torch.Tensor,
                feats: torch.Tensor) -> torch.Tensor:
    """The logits node ``i`` decides from: the parent's output where the root decision is the
    parent's, the node's head elsewhere (reading the tap, or the hidden layer above)."""
    if i == 0 and tree.router == "parent":
        return parent_logits
    src = tree.sources_[i]
    x = feats if src < 0 else tree._branch_features(src, feats)
    with torch.inference_mode():
        return tree.heads_[i](x)[0]


class TreeNovelty:
    """Per-node novelty scorers, their reference ranks and the calibrated threshold.

    Build it with :meth:`BranchTree.fit_novelty`, which caches the features; ``fit`` takes the
    tap features (flattened, float32) and labels of the training and reference rows.
    """

    def __init__(self, score: str = "mahalanobis", **options: Any):
        if score not in SCORERS:
            raise NoveltyError(f"novelty score {score!r} is not known; choose one of "
                               f"{sorted(SCORERS)}")
        self.score = score
        self.options = dict(options)

    def fit(self, tree: BranchTree, train: tuple[torch.Tensor, torch.Tensor],
            reference: tuple[torch.Tensor, torch.Tensor],
            parent_logits: torch.Tensor) -> TreeNovelty:
        """Fit one scorer per internal node on the training rows of its classes; rank
        reference rows (the early-stopping split) at every node. ``parent_logits`` are the
        parent's outputs of the reference rows."""
        lay = tree.layout_
        x, y = train
        rx, ry = reference
        self.scorers_: dict[int, Any] = {}
        self.reference_: dict[int, torch.Tensor] = {}
        for i, node in enumerate(lay.nodes):
            if lay.n_children[i] < 2:
                continue
            rows = lay.slot_of_label(node, y) >= 0
            scorer = make_scorer(self.score, **self.options)
            scorer.fit(x[rows], y[rows])
            self.scorers_[i] = scorer
            ref = lay.slot_of_label(node, ry) >= 0
            if not ref.any():
                raise NoveltyError(f"node {node!r} has no reference (validation) inputs of its "
                                   f"classes {lay.hierarchy.leaves_under(node)}")
            s = self._raw(tree, i, rx[ref], parent_logits[ref])
            self.reference_[i] = torch.sort(s).values
        self.threshold_ = float("inf")
        self.calibration_: dict[str, Any] = {}
        return self

    def _raw(self, tree: BranchTree, i: int, feats: torch.Tensor,
             parent_logits: torch.Tensor) -> torch.Tensor:
        logits = node_logits(tree, i, parent_logits, feats)
        return self.scorers_[i].score(feats, logits).float()

    def ranks(self, tree: BranchTree, feats: torch.Tensor, parent_logits: torch.Tensor,
              path_nodes: torch.Tensor) -> torch.Tensor:
        """``[N, D]``: ``u`` at each node on each input's path (NaN where there is none, or
        at a node with a single child, which has nothing to tell apart)."""
        self._require_fit()
        feats = feats.flatten(1).float()
        u = torch.full(path_nodes.shape, float("nan"))
        for i, ref in self.reference_.items():
            at = path_nodes == i
            rows = at.any(dim=1)
            if not rows.any():
                continue
            s = self._raw(tree, i, feats[rows], parent_logits[rows])
            rank = torch.searchsorted(ref, s.contiguous(), right=True).float() / len(ref)
            sub = u[rows]
            sub[at[rows]] = rank  # each input meets node i at most once
            u[rows] = sub
        return u

    def reject(self, u: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """The level at which each input is rejected as novel (-1: not rejected)."""
        t = self.threshold_ if threshold is None else threshold
        over = torch.nan_to_num(u, nan=-1.0) > t
        first = over.float().argmax(dim=1)
        return torch.where(over.any(dim=1), first, torch.full_like(first, -1))

    @staticmethod
    def statistic(u: torch.Tensor) -> torch.Tensor:
        """The end-to-end novelty of each input: the largest ``u`` on its path."""
        return torch.nan_to_num(u, nan=-1.0).max(dim=1).values

    def calibrate(self, u: torch.Tensor, target_frr: float, delta: float) -> dict[str, Any]:
        """The threshold from the ranks ``u`` of known-class calibration inputs."""
        res = frr_threshold(self.statistic(u), target_frr, delta)
        self.threshold_ = float(res.threshold)
        self.calibration_ = {"score": self.score, "target_frr": target_frr, "delta": delta,
                             "threshold": self.threshold_, "feasible": bool(res.feasible),
                             "n_calibration": int(res.n),
                             "calibration_frr": float((self.statistic(u) > self.threshold_)
                                                      .float().mean())}
        return self.calibration_

    def _require_fit(self) -> None:
        if not hasattr(self, "scorers_"):
            raise NoveltyError("novelty is not fitted: call BranchTree.fit_novelty first")

    # ------------------------------------------------------------------- save / load
    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        self._require_fit()
        meta: dict[str, Any] = {"score": self.score, "options": self.options,
                                "threshold": self.threshold_, "calibration": self.calibration_,
                                "nodes": {}}
        tensors: dict[str, torch.Tensor] = {}
        for i, scorer in self.scorers_.items():
            m, t = scorer.state()
            meta["nodes"][str(i)] = m
            tensors.update({f"{i}.{k}": v for k, v in t.items()})
            tensors[f"{i}.reference"] = self.reference_[i]
        return meta, tensors

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> TreeNovelty:
        out = cls(meta["score"], **meta["options"])
        out.scorers_, out.reference_ = {}, {}
        for key, m in meta["nodes"].items():
            prefix = f"{key}."
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            out.reference_[int(key)] = own.pop("reference")
            out.scorers_[int(key)] = scorer_from_state(m, own)
        out.threshold_ = float(meta["threshold"])
        out.calibration_ = dict(meta["calibration"])
        return out
