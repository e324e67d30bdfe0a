"""Tables over many virtual-branch runs: mean ± std over seeds, and independent ensembles.

``branchnet vbranch compare RUN ...`` groups finished runs by (branches, shared_frac,
bagging) and prints mean ± std of every summary column. Single-branch runs (K = 1, the plain
baseline) of different seeds are also combined into **independent ensembles** of each K that
appears among the runs: their saved test outputs (``predictions.safetensors``) are merged
exactly like a virtual ensemble's, so both kinds of ensemble are scored by the same code.
Seeds are taken in order, ``K`` at a time, without reuse: 12 single runs give three
independent 4-ensembles.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from branchnet.analysis.diversity import ensemble_report
from branchnet.metrics import format_table, mean_std_rows
from branchnet.runs import finished_runs
from branchnet.virtual.merge import branch_probs, merge_probs

__all__ = ["compare_runs", "independent_ensembles", "summary_row", "sweep_grid"]

_KEYS = ("branches", "shared_frac", "bagging")


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    """One table row: ensemble and mean-branch accuracy, NLL, ECE, diversity, parameters."""
    if result.get("task") == "embed":
        return {"branches": result["branches"], "shared_frac": result["shared_frac"],
                "oneshot": result["oneshot"]["ensemble"]["accuracy"],
                "oneshot_branch_mean": result["oneshot"]["branch_mean"],
                "precision_at_1": result["retrieval"]["ensemble"]["precision_at_1"],
                "mAP": result["retrieval"]["ensemble"]["mAP"], "parameters": result["parameters"]}
    rep = result["test"][result["merge"]]
    return {"branches": result["branches"], "shared_frac": result["shared_frac"],
            "bagging": result["bagging"]["mode"], "accuracy": rep["ensemble"]["accuracy"],
            "branch_accuracy": rep["branch_mean"]["accuracy"], "nll": rep["ensemble"]["nll"],
            "ece": rep["ensemble"]["ece"], "strength": rep["diversity"]["strength"],
            "correlation": rep["diversity"]["correlation"],
            "disagreement": rep["diversity"]["disagreement"], "parameters": result["parameters"]}


def independent_ensembles(singles: list[tuple[dict[str, Any], Path]], sizes: list[int],
                          merge: str = "before_mean") -> list[dict[str, Any]]:
    """Rows for independent ensembles of each size in ``sizes``, built from single-branch runs
    (``(metrics, run path)`` pairs) taken ``K`` at a time in seed order."""
    singles = sorted(singles, key=lambda s: s[0].get("seed", 0))
    preds = []
    for result, path in singles:
        f = path / "predictions.safetensors"
        if f.is_file():
            preds.append((result, load_file(str(f))))
    rows = []
    for k in sorted(set(sizes)):
        if k < 2:
            continue
        for i in range(len(preds) // k):
            group = preds[i * k:(i + 1) * k]
            ys = [g[1]["y"] for g in group]
            if any(not (y == ys[0]).all() for y in ys[1:]):
                continue  # different test splits: not comparable
            out = torch.cat([g[1]["outputs"] for g in group], dim=1)  # (N, K, C)
            rep = ensemble_report(branch_probs(out), ys[0], merge_probs(out, merge))
            rows.append({"branches": k, "shared_frac": "independent", "bagging": "none",
                         "accuracy": rep["ensemble"]["accuracy"],
                         "branch_accuracy": rep["branch_mean"]["accuracy"],
                         "nll": rep["ensemble"]["nll"], "ece": rep["ensemble"]["ece"],
                         "strength": rep["diversity"]["strength"],
                         "correlation": rep["diversity"]["correlation"],
                         "disagreement": rep["diversity"]["disagreement"],
                         "parameters": sum(g[0]["parameters"] for g in group)})
    return rows


def compare_runs(run_dirs: list[str | Path]) -> str:
    """A markdown table of mean ± std per (branches, shared_frac, bagging), with independent
    ensembles made of the single-branch runs."""
    rows, singles = [], []
    for run in finished_runs(run_dirs):
        result = run.read_metrics()
        rows.append(summary_row(result))
        if result.get("task") == "classify" and result["branches"] == 1:
            singles.append(({**result, "seed": run.read_config().get("seed", 0)}, run.path))
    ks = sorted({r["branches"] for r in rows if r["branches"] > 1})
    rows += independent_ensembles(singles, ks)
    table = mean_std_rows(rows, _KEYS)
    return format_table(table, floatfmt=".4f") if table else "no finished runs"


def sweep_grid(branches: list[int], shared: list[float], bagging: list[str],
               seeds: list[int]) -> list[dict[str, Any]]:
    """The settings of a sweep: every (K, s, bagging, seed) with K > 1, and for K = 1 (where s
    and bagging do not matter) enough seeds to form independent ensembles of every K."""
    grid = [{"branches": k, "shared_frac": s, "bagging": b, "seed": seed}
            for k, s, b, seed in itertools.product(branches, shared, bagging, seeds) if k > 1]
    if 1 in branches:
        n_single = max(branches) * len(seeds)
        grid = [{"branches": 1, "shared_frac": 0.0, "bagging": "none", "seed": s}
                for s in range(n_single)] + grid
    return grid
