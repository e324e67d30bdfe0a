"""Evaluation of a fitted :class:`BranchTree`: end-to-end, per branch, and hierarchical metrics.

:func:`evaluate` returns a JSON-able dict of metrics and a dict of matplotlib figures; the CLI
and the demo write both into the run folder.

* **end to end**: accuracy and balanced accuracy (the mean per-class recall, for imbalanced
  classes) of the routed class on every input, coverage, selective risk and
  accuracy on accepted inputs at the calibrated threshold, AURC / E-AURC of the tree's
  confidence, hierarchical precision / recall / F1 (HiClass definitions; a backed-off input
  predicts its group), NLL / Brier / ECE of the path probabilities.
* **per branch, as Neural-Branching measured it**: each branch on the test inputs of its own
  classes (oracle routing): overall accuracy, inputs accepted at max softmax >= 0.96 and
  accuracy on them, the same at the calibrated threshold, and AURC.
* **confidence scores compared** on the same answers (:func:`score_comparison`): AURC, E-AURC
  and, calibrated on held-out data, the coverage at the target risk of ``msp``, ``margin``,
  ``entropy`` and the self-check branch's score.
"""

from __future__ import annotations

from typing import Any

import torch
from matplotlib.figure import Figure
from sklearn.metrics import balanced_accuracy_score

from branchnet import metrics, selective
from branchnet.data.dataset import Split
from branchnet.tree.prediction import Prediction
from branchnet.tree.router import local_score
from branchnet.tree.tree import BranchTree

ORIGINAL_THRESHOLD = selective.ORIGINAL_THRESHOLD


def _accept_stats(conf: torch.Tensor, correct: torch.Tensor, threshold: float) -> dict[str, Any]:
    m = selective.selective_metrics(conf, correct, threshold)
    return {"threshold": threshold, "accepted": m["accepted"], "coverage": m["coverage"],
            "accuracy_on_accepted": m["accuracy_on_accepted"]}


def branch_metrics(tree: BranchTree, test: Split) -> dict[str, dict[str, Any]]:
    """Each internal node on the test inputs of its own classes (the original's protocol)."""
    lay = tree._require_fit()
    out: dict[str, dict[str, Any]] = {}
    calibrated = tree.thresholds_list()
    for i, node in enumerate(lay.nodes):
        slots = lay.slot_of_label(node, test.y)
        rows = torch.nonzero(slots >= 0).flatten()
        if len(rows) == 0 or lay.n_children[i] < 2:
            continue
        probs = tree.node_proba(node, test.x[rows])
        conf = probs.max(dim=1).values  # the original's rule reads the max softmax
        correct = probs.argmax(dim=1) == slots[rows]
        rec: dict[str, Any] = {
            "children": lay.hierarchy.children(node), "n_test": len(rows),
            "overall_accuracy": float(correct.float().mean()),
            "at_0.96": _accept_stats(conf, correct, ORIGINAL_THRESHOLD),
            "aurc": selective.aurc(conf, correct),
            "mean_conf_correct": float(conf[correct].mean()) if correct.any() else None,
            "mean_conf_wrong": float(conf[~correct].mean()) if (~correct).any() else None,
        }
        # the tree's threshold applies to each node's local score under greedy routing only
        # (soft routing thresholds the path probability)
        if calibrated[i] > float("-inf") and tree.policy in ("hard", "threshold"):
            rec["at_calibrated"] = _accept_stats(local_score(probs, tree.confidence), correct,
                                                 calibrated[i])
        out[node] = rec
    return out


def hierarchical_scores(pred: Prediction, y: torch.Tensor, tree: BranchTree) -> dict[str, float]:
    lay = tree._require_fit()
    h = lay.hierarchy
    pred_sets = [set(h.path(n)[1:]) if n else set() for n in pred.predicted_nodes()]
    true_sets = [set(h.path(lay.classes[int(c)])[1:]) for c in y]
    return metrics.hierarchical_prf(pred_sets, true_sets, average="micro")


def score_comparison(scores: dict[str, torch.Tensor], correct: torch.Tensor,
                     calibration: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None,
                     target_risk: float = 0.05, delta: float = 0.05) -> dict[str, dict[str, Any]]:
    """Per confidence score (of :meth:`BranchTree.confidence_scores`) of the tree's answers on
    test data, whose ``correct`` flags are given: AURC and E-AURC, and with ``calibration``
    (the scores and correct flags on data the tree did not fit) the SGR threshold for
    ``target_risk`` at confidence ``1 - delta`` and its test coverage and risk."""
    cal = calibration
    out: dict[str, dict[str, Any]] = {}
    for name, conf in scores.items():
        rec: dict[str, Any] = {"aurc": selective.aurc(conf, correct),
                               "eaurc": selective.eaurc(conf, correct)}
        if cal is not None:
            res = selective.sgr_threshold(cal[0][name], cal[1], target_risk=target_risk,
                                          delta=delta)
            m = selective.selective_metrics(conf, correct, res.threshold)
            rec.update(target_risk=target_risk, delta=delta, feasible=bool(res.feasible),
                       threshold=float(res.threshold), coverage=m["coverage"],
                       selective_risk=m["selective_risk"])
        out[name] = rec
    return out


def evaluate(tree: BranchTree, test: Split, calibration: Split | None = None
             ) -> tuple[dict[str, Any], dict[str, Figure]]:
    """Metrics (JSON-able) and figures for a fitted, usually calibrated, tree on ``test``;
    ``calibration`` (held-out data) calibrates every score in the score comparison."""
    lay = tree._require_fit()
    pred = tree.predict(test.x)
    y = test.y
    correct = pred.leaf == y
    conf = pred.confidence
    accepted = ~pred.rejected  # neither unsure nor novel
    result: dict[str, Any] = {
        "n_test": len(test),
        "accuracy": float(correct.float().mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y.numpy(), pred.leaf.numpy())),
        "coverage": float(accepted.float().mean()),
        "accepted": int(accepted.sum()),
        "accuracy_on_accepted": float(correct[accepted].float().mean()) if accepted.any() else None,
        "selective_risk": float((~correct[accepted]).float().mean()) if accepted.any() else None,
        "aurc": selective.aurc(conf, correct),
        "eaurc": selective.eaurc(conf, correct),
        "nll": metrics.nll(pred.leaf_probs, y),
        "brier": metrics.brier(pred.leaf_probs, y),
        "ece": metrics.ece(pred.leaf_probs, y),
        "hierarchical": hierarchical_scores(pred, y, tree),
        "calibration": tree.calibration_,
        "branches": branch_metrics(tree, test),
        "per_class": metrics.per_class_table(pred.leaf, y, lay.classes, scores=conf,
                                             threshold=tree.calibration_.get("threshold")),
    }
    if pred.backoff:
        result["backed_off"] = int((pred.stop_level > 0).sum())
    if pred.novel_level is not None:
        result["rejected_novel"] = int(pred.novel.sum())
    risk = {k: tree.calibration_[k] for k in ("target_risk", "delta") if k in tree.calibration_}
    scores = tree.confidence_scores(test.x)
    cal = None if calibration is None else (
        tree.confidence_scores(calibration.x), tree.predict(calibration.x).leaf == calibration.y)
    result["scores"] = score_comparison(scores, correct, cal, **risk)
    rc = selective.plot_risk_coverage({"tree": (conf, correct),
                                       **{f"{k} (path)": (v, correct) for k, v in scores.items()
                                          if k != tree.confidence}})
    if tree.calibration_:
        ax = rc.axes[0]
        ax.axvline(result["coverage"], ls="--", color="gray",
                   label=f"calibrated threshold ({result['coverage']:.1%} accepted)")
        if tree.calibration_.get("target_risk"):
            ax.axhline(tree.calibration_["target_risk"], ls=":", color="red", label="target risk")
        ax.legend(fontsize=8)
    figures = {
        "risk_coverage": rc,
        "confusion": metrics.plot_confusion(metrics.confusion_matrix(pred.leaf, y, len(lay.classes)),
                                            lay.classes, title="routed class (before abstention)"),
        "branches": plot_branches(result["branches"]),
    }
    return result, figures


def plot_branches(branches: dict[str, dict[str, Any]]) -> Figure:
    """Bar chart: per branch, overall accuracy, coverage at 0.96 and accuracy on accepted."""
    fig = Figure(figsize=(max(4.0, 1.6 * len(branches) + 2), 3.2))
    ax = fig.add_subplot(1, 1, 1)
    names = list(branches)
    series = {
        "accuracy": [b["overall_accuracy"] for b in branches.values()],
        "coverage @0.96": [b["at_0.96"]["coverage"] for b in branches.values()],
        "acc. on accepted @0.96": [b["at_0.96"]["accuracy_on_accepted"] or 0.0
                                   for b in branches.values()],
    }
    width = 0.8 / len(series)
    for k, (label, vals) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(names))], vals, width, label=label)
    ax.set_xticks([i + width for i in range(len(names))], names)
    ax.set_ylim(0, 1.05)
    ax.set_title("branches on their own classes (oracle routing)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the printed table: the tree end to end, then each branch."""
    rows = [{
        "model": "tree (end to end)", "n": result["n_test"], "accuracy": result["accuracy"],
        "balanced_acc": result.get("balanced_accuracy"),
        "coverage": result["coverage"], "acc_on_accepted": result["accuracy_on_accepted"],
        "aurc": result["aurc"], "hF": result["hierarchical"]["hF"],
    }]
    for node, b in result["branches"].items():
        at = b.get("at_calibrated", b["at_0.96"])
        rows.append({
            "model": f"branch {node}", "n": b["n_test"], "accuracy": b["overall_accuracy"],
            "balanced_acc": None,
            "coverage": at["coverage"], "acc_on_accepted": at["accuracy_on_accepted"],
            "aurc": b["aurc"], "hF": None,
        })
    return rows
