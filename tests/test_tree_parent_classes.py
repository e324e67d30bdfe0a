"""A tree on some of its parent's classes: ``parent.classes`` (a 10-class parent under a 6-class
tree), the output layer cut to the data's rows, and the splits kept as the parent's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from branchnet import models
from branchnet.checkpoint import load_weights
from branchnet.data.load import load
from branchnet.errors import ConfigError
from branchnet.tree import BranchTree
from branchnet.tree.experiment import TreeExperiment
from branchnet.tree.parent import restrict_outputs
from cli_helpers import run_cli, write_config

ALL = [str(d) for d in range(10)]
SIX = ["5", "0", "3", "1", "2", "4"]  # any order: the cut follows the data's classes
DATA = {"source": "digits", "val_fraction": 0.3, "test_fraction": 0.2, "split_seed": 0}
MLP = {"kind": "mlp", "sizes": ["auto", 32, 24]}


def test_restrict_outputs_keeps_the_chosen_logits_of_a_resnet() -> None:
    torch.manual_seed(0)
    net = models.ResNet(depth=8, width=4, num_classes=10).eval()
    x = torch.randn(2, 3, 8, 8)
    full = net(x)
    assert restrict_outputs(net, [8, 0, 2]) == "head"
    assert torch.allclose(net(x), full[:, [8, 0, 2]])
    assert net.spec["num_classes"] == 3
    assert models.build(net.spec).head.out_features == 3  # what a saved tree rebuilds


def test_restrict_outputs_rejects_rows_the_layer_lacks() -> None:
    with pytest.raises(ConfigError, match=r"output rows \[3, 12\] .* 'head' \(10 outputs\)"):
        restrict_outputs(models.MLP([4, 8], num_classes=10), [3, 12])
    with pytest.raises(ConfigError, match=r"output layer is an nn\.Linear; Conv2d has none"):
        restrict_outputs(torch.nn.Conv2d(1, 2, 3), [0])


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model run on all ten digits, its rows split with split_seed 0."""
    tmp = tmp_path_factory.mktemp("parent")
    cfg = {"name": "p10", "seed": 0, "data": DATA, "model": MLP,
           "train": {"epochs": 3, "batch_size": 64, "lr": 0.01}, "progress": False}
    code, _, err = run_cli(["model", "fit", str(write_config(tmp / "p.yaml", cfg)),
                            "--out", str(tmp / "runs")])
    assert code == 0, err
    return next((tmp / "runs").glob("p10-s0-*"))


def tree_config(parent_run: Path, **parent: Any) -> dict[str, Any]:
    return {"name": "t6", "seed": 0, "data": {**DATA, "classes": SIX},
            "hierarchy": {"low": ["0", "1", "2"], "high": ["3", "4", "5"]},
            "parent": {"model": MLP, "tap": "hidden.1",
                       "weights": str(parent_run / "model" / "weights.safetensors"), **parent},
            "tree": {"head": {"hidden": 16, "dropout": 0.0},
                     "head_train": {"epochs": 3, "batch_size": 32, "lr": 0.01, "patience": None}},
            "calibration": {"method": "coverage", "coverage": 0.8}, "progress": False}


def test_a_tree_on_six_of_the_parents_ten_classes(parent_run: Path, tmp_path: Path) -> None:
    cfg = tree_config(parent_run, classes=ALL)
    exp = TreeExperiment(TreeExperiment.validate(cfg), quiet=True)
    exp.setup()
    # the parent's own splits, cut to the six: nothing it trained on is validated or tested on
    parents = load("digits", val_fraction=0.3, test_fraction=0.2, seed=0)
    seen = {tuple(r.flatten().tolist()) for r in parents.train.x}
    for split in (exp.data.val, exp.data.test):
        assert not seen & {tuple(r.flatten().tolist()) for r in split.x}
    assert exp.data.classes == SIX and len(exp.data.val) == len(parents.select_classes(SIX).val)
    # the parent's outputs are its logits of the six, in the data's order
    full = models.MLP([64, 32, 24], num_classes=10)
    full.load_state_dict(load_weights(parent_run / "model" / "weights.safetensors")[0])
    x = exp.data.test.x[:20]
    rows = [ALL.index(c) for c in SIX]
    assert torch.allclose(exp.parent.eval()(x), full.eval()(x)[:, rows])

    code, _, err = run_cli(["tree", "fit", str(write_config(tmp_path / "t.yaml", cfg)),
                            "--out", str(tmp_path / "runs")])
    assert code == 0, err
    run = next((tmp_path / "runs").glob("t6-s0-*"))
    tree = BranchTree.load(run / "tree")
    assert tree.classes_ == SIX and tree.parent.head.out_features == 6
    assert json.loads((run / "metrics.json").read_text())["n_test"] == len(exp.data.test)


def test_a_parent_of_other_classes_is_refused_by_name(parent_run: Path) -> None:
    exp = TreeExperiment(TreeExperiment.validate(tree_config(parent_run)), quiet=True)
    with pytest.raises(ConfigError, match=r"were trained on classes \['0', '1'.*set "
                                          r"parent.classes to the parent's classes"):
        exp.setup()


@pytest.mark.parametrize(("parent", "message"), [
    ({"classes": ["0", "1", "2", "3", "4"]}, r"data.classes must be classes of parent.classes; "
                                              r"\['5'\] is not in"),
    ({"classes": [*ALL, "0"]}, "parent.classes names a class twice"),
    ({"classes": ALL, "labels": "coarse"}, "parent.classes applies to a parent of fine labels"),
])
def test_bad_parent_classes_fail_before_work(parent_run: Path, parent: dict[str, Any],
                                             message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TreeExperiment.validate(tree_config(parent_run, **parent))
