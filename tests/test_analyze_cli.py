"""`branchnet analyze specialization` on classifier and tree runs, and the tree-sibling analysis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from branchnet import models
from branchnet.analysis import AnalysisError
from branchnet.analysis.tree_branches import top_overlap_pvalue, tree_specialization
from branchnet.data.dataset import Split
from branchnet.tree import BranchTree
from cli_helpers import DIGITS_CONFIG, run_cli, write_config

ALEX = {
    "name": "alex", "seed": 0,
    "data": {"source": "digits", "val_fraction": 0.25, "test_fraction": 0.3, "max_per_class": 60},
    "model": {"kind": "alexnet", "groups": 2, "widths": [8, 12, 16], "hidden": 16},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.01},
    "progress": False,
}



def fit_run(tmp_path: Path, kind: str, cfg: dict[str, Any]) -> Path:
    path = write_config(tmp_path / f"{cfg['name']}.yaml", cfg)
    code, _, err = run_cli([kind, "fit", str(path), "--out", str(tmp_path / "runs")])
    assert code == 0, err
    return next((tmp_path / "runs").glob(f"{cfg['name']}-s0-*"))


@pytest.mark.slow
def test_analyze_a_branched_classifier_run(tmp_path: Path) -> None:
    run = fit_run(tmp_path, "model", ALEX)
    code, out, err = run_cli(["analyze", "specialization", str(run), "--layer", "conv1",
                              "--permutations", "200", "--max-samples", "300"])
    assert code == 0, err
    assert "permutation test of colourfulness" not in out  # digits are grey: one input channel
    report = run / "specialization-conv1" / "report.html"
    assert "data:image/png;base64" in report.read_text()
    summary = json.loads((run / "specialization-conv1" / "specialization.json").read_text())
    assert summary["partition"] == {"branch 0": [0, 1, 2, 3], "branch 1": [4, 5, 6, 7]}
    # a random halving as the control writes beside it, never over it
    code, _, err = run_cli(["analyze", "specialization", str(run), "--layer", "conv1",
                            "--partition", "random", "--permutations", "200",
                            "--max-samples", "300", "--seed", "3"])
    assert code == 0, err
    assert (run / "specialization-conv1-random3" / "report.html").is_file()
    assert report.is_file()
    code, _, err = run_cli(["analyze", "specialization", str(run), "--layer", "conv1",
                            "--partition", "halves", "--permutations", "200",
                            "--max-samples", "300"])
    assert code == 0, err
    halves = json.loads((run / "specialization-conv1-halves" / "specialization.json").read_text())
    assert halves["partition"] == summary["partition"]  # the same blocks, chosen by hand
    code, out, err = run_cli(["analyze", "compare", str(run / "specialization-conv1"),
                              str(run / "specialization-conv1-random3")])
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith(f"| {run.name}/")]
    assert len(rows) == 2 and "specialization-conv1-random3" in rows[1]


def test_analyze_errors_are_clear(tmp_path: Path) -> None:
    code, _, err = run_cli(["analyze", "specialization", str(tmp_path)])
    assert code == 2 and "not a branchnet run folder" in err


@pytest.mark.slow
def test_analyze_a_tree_run(tmp_path: Path) -> None:
    run = fit_run(tmp_path, "tree", DIGITS_CONFIG)
    code, out, err = run_cli(["analyze", "specialization", str(run)])
    assert code == 0, err
    assert "round vs straight" in out and "zeroing round's top units" in out
    folder = run / "specialization-tree"
    data = json.loads((folder / "specialization.json").read_text())
    assert data["heads"] == ["round", "straight", "curly"] and len(data["pairs"]) == 3
    assert sum(data["units_per_head"]) == 32
    assert "data:image/png;base64" in (folder / "report.html").read_text()


def test_top_overlap_pvalue() -> None:
    a = np.arange(10.0)
    assert top_overlap_pvalue(a, a, 3)[0] == 3
    overlap, k, expected, p = top_overlap_pvalue(a, -a, 3)
    assert (overlap, k) == (0, 3) and expected == pytest.approx(0.9)
    assert p == pytest.approx(35 / 120)  # C(7,3) / C(10,3): no overlap by chance


def split_blobs(n: int, seed: int) -> Split:
    """Classes 0/1 differ only in features 0-2, classes 2/3 only in features 3-5."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    means = torch.tensor([[3.0, -3, 3, 0, 0, 0], [-3, 3, -3, 0, 0, 0],
                          [0, 0, 0, 3, -3, 3], [0, 0, 0, -3, 3, -3]])
    return Split(means[y] + torch.randn(n, 6, generator=g), y)


def test_sibling_heads_read_different_units_and_ablation_is_asymmetric(tmp_path: Path) -> None:
    parent = models.mlp([6, 6], 4)  # the tapped layer passes the 6 features through
    with torch.no_grad():
        parent.hidden[0].linear.weight.copy_(torch.eye(6))
        parent.hidden[0].linear.bias.zero_()
    tree = BranchTree(parent, "hidden.0.linear", router="learned", train_parent=False,
                      head=lambda n_in, n_out: models.mlp([n_in, 8], n_out),
                      head_train={"epochs": 40, "lr": 0.01, "weight_decay": 0.01,
                                  "progress": False},
                      workdir=tmp_path, progress=False)
    tree.fit(split_blobs(600, 0), classes=["0", "1", "2", "3"],
             hierarchy={"a": ["0", "1"], "b": ["2", "3"]})
    result = tree_specialization(tree, split_blobs(400, 1), top_fraction=0.5)
    assert result.heads == ["root", "a", "b"]
    pair = next(p for p in result.pairs if {p["a"], p["b"]} == {"a", "b"})
    assert pair["overlap"] <= 1 and pair["p_low"] < 0.5
    drop = result.ablation["drop"]
    assert drop["a"]["a"] < drop["a"]["b"] - 0.2  # zeroing a's units hurts a, not b
    assert drop["b"]["b"] < drop["b"]["a"] - 0.2
    assert result.partition is not None and sum(result.partition.sizes) == 6


def test_tree_specialization_needs_two_heads(tmp_path: Path) -> None:
    tree = BranchTree(models.mlp([6, 8], 4), "hidden.0", parent_train={"epochs": 1},
                      head_train={"epochs": 1}, workdir=tmp_path, progress=False)
    tree.fit(split_blobs(200, 0), classes=["0", "1", "2", "3"])  # flat: the parent's own root
    with pytest.raises(AnalysisError, match="at least two learned heads"):
        tree_specialization(tree, split_blobs(50, 1))


def test_analyze_compare_needs_report_folders(tmp_path: Path) -> None:
    code, _, err = run_cli(["analyze", "compare", str(tmp_path)])
    assert code == 2 and "specialization.json does not exist" in err
