"""What an early-exit network costs and gets right: the calibrated operating point, fixed
thresholds (SDN-style) and PABEE patience beside it, the accuracy-FLOPs curve, the exit
histogram, and the wall-clock time of staged inference against the full parent.

Everything but the timing is computed from every exit's cached probabilities
(:meth:`~branchnet.exits.MultiExit.exit_probs`), so a whole curve costs one pass of the parent.

Example:
    >>> import torch
    >>> p = torch.tensor([[[0.9, 0.1], [0.6, 0.4]], [[0.5, 0.5], [0.2, 0.8]]])
    >>> point(p, torch.tensor([0, 1]), torch.tensor([0, 1]), [10.0, 30.0], 25.0)["accuracy"]
    1.0
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from branchnet.exits.multiexit import MultiExit
from branchnet.exits.rules import exit_scores
from branchnet.saved_model import model_outputs

__all__ = ["evaluate_exits", "plot_accuracy_flops", "plot_exit_histogram", "point",
           "time_inference"]


def point(probs: torch.Tensor, answers: torch.Tensor, exits: torch.Tensor,
          exit_flops: list[float], parent_flops: float, y: torch.Tensor | None = None
          ) -> dict[str, Any]:
    """One operating point: accuracy (against ``y``, default the answers of the full exit),
    agreement with the full model, mean FLOPs per input and the share saved against the parent
    alone, inputs per exit."""
    full = probs[:, -1].argmax(1)
    y = full if y is None else y
    flops = float(torch.tensor(exit_flops)[exits].mean())
    return {"accuracy": float((answers == y).float().mean()),
            "agreement": float((answers == full).float().mean()),
            "mean_flops": flops, "flops_saved": 1.0 - flops / parent_flops,
            "exits": torch.bincount(exits, minlength=probs.shape[1]).tolist()}


def evaluate_exits(me: MultiExit, probs: torch.Tensor, y: torch.Tensor, *,
                   fixed: list[float] = (), patience: bool = True, curve_points: int = 60
                   ) -> dict[str, Any]:
    """Metrics of ``me`` on every exit's probabilities ``probs [N, E + 1, C]`` with labels
    ``y``: ``full`` (the parent), ``exits_alone`` (each head on every input), ``calibrated``
    (at the fitted threshold), ``fixed`` (SDN-style thresholds, the same rule), ``patience``
    (PABEE, every patience) and ``curve`` (a sweep of thresholds)."""
    ef, pf = me.exit_flops, me.parent_flops
    full_answer = probs[:, -1].argmax(1)
    n_exits = probs.shape[1] - 1
    out: dict[str, Any] = {
        "n": len(y), "parent_flops": pf, "exit_flops": ef, "exit_names": me.exit_names,
        "full": {"accuracy": float((full_answer == y).float().mean()), "mean_flops": pf},
        "exits_alone": [{"exit": name, "accuracy": float((probs[:, e].argmax(1) == y)
                                                         .float().mean()), "flops": ef[e]}
                        for e, name in enumerate(me.exit_names)],
    }
    thr = me.threshold_
    if thr is not None:
        answers, exits = me.decide(probs, thr)
        out["calibrated"] = {"threshold": thr, **point(probs, answers, exits, ef, pf, y)}
    rows = []
    for t in fixed:
        answers, exits = me.decide(probs, t, rule=me.rule)
        rows.append({"threshold": t, **point(probs, answers, exits, ef, pf, y)})
    out["fixed"] = rows
    if patience:
        out["patience"] = []
        for t in range(1, n_exits + 1):
            answers, exits = me.decide(probs, float(t), rule="patience")
            out["patience"].append({"patience": t, **point(probs, answers, exits, ef, pf, y)})
    scores = exit_scores(probs[:, :-1], me.rule).flatten().numpy()
    grid = np.unique(np.quantile(scores, np.linspace(0, 1, curve_points)))
    out["curve"] = [{"threshold": float(t), **point(probs, *me.decide(probs, float(t)), ef, pf, y)}
                    for t in grid]
    return out


def time_inference(me: MultiExit, x: Any, batch_sizes: list[int], *, repeats: int = 3
                   ) -> list[dict[str, Any]]:
    """Milliseconds per input of staged early-exit inference and of the full parent, side by side
    in one run, at each batch size (the better of ``repeats`` runs each)."""
    memo = getattr(me.parent, "memo", None)
    if memo is not None:  # a text parent's memo of recent batches would time nothing
        me.parent.memo = 0
    rows = []
    try:
        for bs in batch_sizes:
            n = (len(x) // bs) * bs or len(x)
            model_outputs(me.parent, x[:bs], batch_size=bs)  # warm-up: first calls set up
            me.predict(x[:bs], batch_size=bs)
            t_full, t_exit = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model_outputs(me.parent, x[:n], batch_size=bs)
                t_full.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                me.predict(x[:n], batch_size=bs)
                t_exit.append(time.perf_counter() - t0)
            rows.append({"batch_size": bs, "inputs": n, "full_ms": 1e3 * min(t_full) / n,
                         "exits_ms": 1e3 * min(t_exit) / n,
                         "speedup": min(t_full) / min(t_exit)})
    finally:
        if memo is not None:
            me.parent.memo = memo
    return rows


def plot_accuracy_flops(result: dict[str, Any], title: str = "") -> Figure:
    """Accuracy against mean FLOPs per input: the threshold sweep, fixed thresholds, patience,
    each exit alone, the full parent and the calibrated operating point."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    scale = 1e6
    c = result["curve"]
    ax.plot([r["mean_flops"] / scale for r in c], [r["accuracy"] for r in c], "-", color="C0",
            label="threshold sweep")
    if result["fixed"]:
        ax.plot([r["mean_flops"] / scale for r in result["fixed"]],
                [r["accuracy"] for r in result["fixed"]], "s", color="C2",
                label="fixed thresholds (SDN)")
    if result.get("patience"):
        ax.plot([r["mean_flops"] / scale for r in result["patience"]],
                [r["accuracy"] for r in result["patience"]], "^", color="C4", label="patience (PABEE)")
    alone = result["exits_alone"][:-1]
    ax.plot([r["flops"] / scale for r in alone], [r["accuracy"] for r in alone], "x", color="C7",
            label="each exit alone")
    ax.plot([result["full"]["mean_flops"] / scale], [result["full"]["accuracy"]], "o", color="k",
            label="full parent")
    if "calibrated" in result:
        cal = result["calibrated"]
        ax.plot([cal["mean_flops"] / scale], [cal["accuracy"]], "*", color="C3", ms=14,
                label=f"calibrated ({cal['flops_saved']:.0%} FLOPs saved)")
    ax.set_xlabel("mean MFLOPs per input")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "accuracy against compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def plot_exit_histogram(result: dict[str, Any], title: str = "") -> Figure:
    """Share of the test inputs leaving at each exit, at the calibrated threshold."""
    fig = Figure(figsize=(5.4, 3.2), layout="constrained")
    ax = fig.add_subplot()
    names = result["exit_names"]
    counts = np.asarray(result["calibrated"]["exits"], dtype=float)
    ax.bar(range(len(names)), counts / counts.sum(), color="C0")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("share of inputs")
    ax.set_title(title or "where inputs leave (calibrated threshold)")
    ax.grid(alpha=0.3, axis="y")
    return fig
