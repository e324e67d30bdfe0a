"""Open-world evaluation of a fitted tree: known test inputs against inputs of novel classes.

For every novelty score (max softmax, energy, Mahalanobis, KNN):

* **on the tapped layer**: the score fitted on the parent's tap (all known classes) or read from
  its output, AUROC and FPR at 95 % TPR (:func:`branchnet.novelty.ood_metrics`) of known test
  inputs against novel ones;
* **in the tree**: the per-node statistic of :class:`~branchnet.tree.open_world.TreeNovelty`
  (largest node rank along the path), its AUROC / FPR95, the threshold calibrated on the
  held-out known inputs to a false-rejection rate, and the joint outcome there: known inputs
  accepted and right, accepted and wrong, unsure, rejected as novel; novel inputs rejected,
  unsure, accepted (and so given a known class's label).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from branchnet.data.dataset import Split
from branchnet.novelty import SCORERS, frr_threshold, joint_outcome, make_scorer, ood_metrics
from branchnet.tree.open_world import TreeNovelty
from branchnet.tree.tree import BranchTree


def _outputs(tree: BranchTree, split: Split) -> dict[str, Any]:
    """One parent pass: the prediction without novelty and the parent's outputs it used."""
    pred, kept = tree._predict(split.x, all_heads=False)
    logits, feats = (tuple(torch.cat(p) for p in zip(*kept, strict=True)) if kept
                     else tree.parent_outputs(split.x))
    return {"pred": pred, "logits": logits, "feats": feats.flatten(1).float()}


def score_options(score: str, knn_k: int | str) -> dict[str, Any]:
    return {"k": knn_k} if score == "knn" else {}


def evaluate_open_world(tree: BranchTree, test: Split, novel: Split, calibration: Split,
                        scores: list[str], *, target_frr: float = 0.05, delta: float = 0.1,
                        knn_k: int | str = "auto") -> tuple[dict[str, Any], dict[str, Figure]]:
    """Metrics (JSON-able) and the novelty histograms; see the module docstring."""
    out = {name: _outputs(tree, split) for name, split in
           (("test", test), ("novel", novel), ("calibration", calibration))}
    train_feats, train_y = tree._fit_features("train"), tree.fit_data_["train_y"]
    correct = out["test"]["pred"].leaf == test.y
    unsure = {k: out[k]["pred"].abstained for k in ("test", "novel")}
    result: dict[str, Any] = {"n_known": len(test), "n_novel": len(novel),
                              "n_calibration": len(calibration), "target_frr": target_frr,
                              "delta": delta, "scores": {}}
    raw_tap: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    has_logits = out["test"]["logits"].shape[1] > 0
    for score in scores:
        opts = score_options(score, knn_k)
        rec: dict[str, Any] = {}
        if SCORERS[score].needs == "features" or has_logits:  # a truncated parent has no output
            scorer = make_scorer(score, **opts).fit(train_feats, train_y)
            s = {k: scorer.score(out[k]["feats"], out[k]["logits"]).numpy()
                 for k in ("test", "novel")}
            raw_tap[score] = (s["test"], s["novel"])
            rec["tap"] = ood_metrics(s["test"], s["novel"])
        nov = (tree.novelty_ if tree.novelty_ is not None and tree.novelty_.score == score
               else tree.make_novelty(score, **opts))
        u = {k: nov.ranks(tree, out[k]["feats"], out[k]["logits"], out[k]["pred"].path_nodes)
             for k in out}
        st = {k: TreeNovelty.statistic(v) for k, v in u.items()}
        stats[score] = (st["test"].numpy(), st["novel"].numpy())
        th = frr_threshold(st["calibration"], target_frr, delta)
        rej = {k: st[k] > th.threshold for k in ("test", "novel")}
        rec["tree"] = {
            **ood_metrics(st["test"].numpy(), st["novel"].numpy()),
            "threshold": float(th.threshold), "feasible": bool(th.feasible),
            "test_frr": float(rej["test"].float().mean()),
            "joint": _joint(correct, unsure, rej),
        }
        result["scores"][score] = rec
    best = max((s for s in scores  # feature space: Mahalanobis, KNN (energy reads logits)
                if SCORERS[s].needs == "features" and "tap" in result["scores"][s]),
               key=lambda s: result["scores"][s]["tap"]["auroc"], default=None)
    if best is not None and "tap" in result["scores"].get("msp", {}):
        result["best_feature_score"] = best
        result["auroc_gain_over_msp"] = (result["scores"][best]["tap"]["auroc"]
                                         - result["scores"]["msp"]["tap"]["auroc"])
    figures = {"novelty": plot_novelty(raw_tap, "on the tapped layer"),
               "novelty_tree": plot_novelty(stats, "in the tree (largest node rank on the path)")}
    return result, figures


def _joint(correct: torch.Tensor, unsure: dict[str, torch.Tensor],
           rejected: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The joint outcome; an input rejected as novel counts as novel, not as unsure."""
    known_unsure = unsure["test"] & ~rejected["test"]
    base = joint_outcome((correct & ~known_unsure).numpy(),
                         (rejected["test"] | known_unsure).numpy(), rejected["novel"].numpy())
    return {**base, "known_unsure": float(known_unsure.float().mean()),
            "known_rejected_novel": float(rejected["test"].float().mean()),
            "novel_unsure": float((unsure["novel"] & ~rejected["novel"]).float().mean())}


def plot_novelty(scores: dict[str, tuple[np.ndarray, np.ndarray]], where: str) -> Figure:
    """One histogram per score: known test inputs against novel ones."""
    n = max(1, len(scores))
    fig = Figure(figsize=(3.2 * n, 2.8))
    for k, (name, (known, novel)) in enumerate(scores.items()):
        ax = fig.add_subplot(1, n, k + 1)
        lo, hi = np.percentile(np.concatenate([known, novel]), [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
        ax.hist(np.clip(known, lo, hi), bins=bins, alpha=0.6, density=True, label="known")
        ax.hist(np.clip(novel, lo, hi), bins=bins, alpha=0.6, density=True, label="novel")
        ax.set_title(name, fontsize=9)
        ax.set_yticks([])
        if k == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"novelty scores {where}", fontsize=9)
    fig.tight_layout()
    return fig
