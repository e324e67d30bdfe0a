"""``branchnet vbranch fit / eval / compare / sweep`` on tiny digits runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from branchnet.runs import Run
from branchnet.saved_model import model_outputs as outputs_of
from branchnet.virtual.experiment import VBranchExperiment, load_vrun_model
from cli_helpers import run_cli, write_config

VB_CONFIG: dict[str, Any] = {
    "name": "tinyvb",
    "seed": 0,
    "data": {"source": "digits", "val_fraction": 0.2, "test_fraction": 0.3, "max_per_class": 40},
    "model": {"kind": "mlp", "sizes": ["auto", 32], "branches": 3, "shared_frac": 0.5},
    "bagging": {"mode": "bootstrap", "frac": 1.0},
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.01},
    "progress": False,
}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    tmp = tmp_path_factory.mktemp("vb")
    cfg = write_config(tmp / "vb.yaml", VB_CONFIG)
    code, out, err = run_cli(["vbranch", "fit", str(cfg), "--out", str(tmp / "runs")])
    assert code == 0, err
    return tmp, next((tmp / "runs").iterdir()), out


def test_fit_writes_a_complete_run(fitted: tuple[Path, Path, str]) -> None:
    _, run_dir, out = fitted
    for name in ("config.yaml", "metrics.json", "report.html", "predictions.safetensors",
                 "model/weights.safetensors", "model/model.json", "figures/branches.png",
                 "figures/pairwise.png", "figures/training.png"):
        assert (run_dir / name).is_file(), name
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["branches"] == 3 and m["shared_frac"] == 0.5
    rep = m["test"]["before_mean"]
    assert len(rep["branches"]) == 3
    assert 0.0 <= rep["diversity"]["strength"] <= 1.0
    assert m["accuracy"] == rep["ensemble"]["accuracy"] > 0.3  # 10 classes: well above chance
    assert all(a is not None for a in m["oob_accuracy"])  # bootstrap leaves rows out of each bag
    assert "strength" in out


def test_saved_model_reproduces_the_saved_predictions(fitted: tuple[Path, Path, str]) -> None:
    _, run_dir, _ = fitted
    model, meta = load_vrun_model(run_dir)
    saved = load_file(str(run_dir / "predictions.safetensors"))
    data = VBranchExperiment(Run.open(run_dir).read_config()).load_data()
    assert meta["classes"] == data.classes
    torch.testing.assert_close(outputs_of(model, data.test.x), saved["outputs"])


def test_eval_and_compare(fitted: tuple[Path, Path, str]) -> None:
    _, run_dir, _ = fitted
    code, out, err = run_cli(["vbranch", "eval", str(run_dir), "--split", "val"])
    assert code == 0, err
    assert "accuracy" in out and list(run_dir.glob("eval-val-*.json"))
    code, out, err = run_cli(["vbranch", "compare", str(run_dir)])
    assert code == 0, err
    assert "0.5" in out and "bootstrap" in out


def test_resume_of_a_finished_run_reuses_it(fitted: tuple[Path, Path, str]) -> None:
    _, run_dir, _ = fitted
    before = json.loads((run_dir / "metrics.json").read_text())["accuracy"]
    code, _, err = run_cli(["vbranch", "fit", "--resume", str(run_dir)])
    assert code == 0, err
    assert json.loads((run_dir / "metrics.json").read_text())["accuracy"] == before


@pytest.mark.slow
def test_sweep_builds_independent_ensembles(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "vb.yaml", {**VB_CONFIG, "train": {**VB_CONFIG["train"],
                                                                     "epochs": 1}})
    code, out, err = run_cli(["vbranch", "sweep", str(cfg), "--out", str(tmp_path / "runs"),
                              "--branches", "1", "2", "--shared", "0", "1", "--bagging", "none",
                              "--seeds", "0"])
    assert code == 0, err
    runs = sorted(p.name for p in (tmp_path / "runs" / "tinyvb").iterdir())
    assert runs == ["K1-s0.0-none-seed0", "K1-s0.0-none-seed1", "K2-s0.0-none-seed0",
                    "K2-s1.0-none-seed0"]
    assert "independent" in out
    # s = 1: the two branches share every weight and differ only in their BatchNorm statistics
    m = {s: Run.open(tmp_path / "runs" / "tinyvb" / f"K2-s{s}-none-seed0").read_metrics()
         for s in ("0.0", "1.0")}
    d = {s: r["test"]["before_mean"]["diversity"]["disagreement"] for s, r in m.items()}
    assert d["1.0"] < 0.05 and d["1.0"] < d["0.0"]
    assert m["1.0"]["parameters"] < m["0.0"]["parameters"]


@pytest.mark.parametrize("change, message", [
    ({"model": {"kind": "mlp", "branches": 2, "shared_frac": 1.5}}, "shared"),
    ({"model": {"kind": "mlp", "branches": 0, "shared_frac": 0.5}}, "branches"),
    ({"model": {"kind": "transformer"}}, "model.kind"),
    ({"merge": "concat"}, "does not match a classifier head"),
    ({"task": "regress"}, "task must be one of"),
    ({"bagging": {"mode": "jackknife"}}, "jackknife"),
])
def test_bad_configs_exit_with_code_2(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    cfg = write_config(tmp_path / "bad.yaml", {**VB_CONFIG, **change})
    code, _, err = run_cli(["vbranch", "fit", str(cfg), "--out", str(tmp_path / "runs")])
    assert code == 2, err
    assert message in err


def test_analyze_specialization_of_a_vbranch_run(fitted: tuple[Path, Path, str]) -> None:
    _, run_dir, _ = fitted
    code, out, err = run_cli(["analyze", "specialization", str(run_dir), "--permutations", "100",
                              "--max-samples", "200"])
    assert code == 0, err
    assert "branch 2" in out  # three branches inferred from the virtual layer
    result = json.loads(next(run_dir.glob("specialization-hidden.0.linear/specialization.json")).read_text())
    assert result["summary"]["virtual"]
