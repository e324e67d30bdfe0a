"""``branchnet plastic fit / compare`` on tiny digits runs: dynamic sparse training (every rule,
plain and virtual models) and plastic residual paths, resuming, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from branchnet.checkpoint import load_weights
from cli_helpers import run_cli, write_config

# mlp 64 -> 40 -> 10: both layers hold a multiple of 5 weights (2560 and 400), so with the uniform
# distribution density 0.2 is met exactly by every layer and by the whole model
SPARSE_CONFIG: dict[str, Any] = {
    "name": "tinypl",
    "seed": 0,
    "task": "sparse",
    "data": {"source": "digits", "val_fraction": 0.2, "test_fraction": 0.3, "max_per_class": 40},
    "model": {"kind": "mlp", "sizes": ["auto", 40]},
    "sparsity": {"rule": "rigl", "density": 0.2, "distribution": "uniform", "delta_t": 3,
                 "t_end": 0.75},
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.01, "optimizer": "adam"},
    "progress": False,
}

PATHS_CONFIG: dict[str, Any] = {
    "name": "tinypaths",
    "seed": 0,
    "task": "paths",
    "data": {"source": "digits", "val_fraction": 0.2, "test_fraction": 0.3, "max_per_class": 40},
    "paths": {"widths": [4, 8], "blocks_per_stage": 2, "candidates": "skip1", "max_active": 2,
              "every": 3, "mode": "plastic", "t_end": 1.0},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.01, "optimizer": "adam"},
    "progress": False,
}


def with_changes(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """``base`` with some keys of its sections replaced (``sparsity={"rule": "set"}``)."""
    cfg = json.loads(json.dumps(base))
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def fit_run(tmp: Path, cfg: dict[str, Any], *extra: str) -> tuple[Path, str]:
    """``branchnet plastic fit`` of ``cfg`` (must succeed): (run folder, stdout)."""
    path = write_config(tmp / f"{cfg['name']}.yaml", cfg)
    code, out, err = run_cli(["plastic", "fit", str(path), "--out", str(tmp / "runs"), *extra])
    assert code == 0, err
    runs = sorted((tmp / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    return runs[-1], out


def metrics_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def rigl_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return fit_run(tmp_path_factory.mktemp("rigl"), SPARSE_CONFIG)


# --- task: sparse ------------------------------------------------------------------------------


def test_rigl_fit_writes_a_complete_run(rigl_run: tuple[Path, str]) -> None:
    run_dir, out = rigl_run
    for name in ("config.yaml", "metrics.json", "report.html", "model/weights.safetensors",
                 "model/masks.safetensors", "model/model.json", "figures/training.png"):
        assert (run_dir / name).is_file(), name
    m = metrics_of(run_dir)
    assert m["task"] == "sparse" and m["rule"] == "rigl" and m["density"] == 0.2
    assert m["accuracy"] > 0.3  # 10 classes: well above chance
    sp = m["sparsity"]
    assert sp["overall_density"] == 0.2  # exactly: 512 of 2560 and 80 of 400 weights
    assert sp["layer_densities"] == {"hidden.0.linear.weight": 0.2, "head.weight": 0.2}
    assert sp["flops"]["inference_ratio"] == pytest.approx(0.2, abs=0.02)  # biases stay dense
    assert 0.2 < sp["flops"]["train_ratio"] < 1.0
    # 3 epochs x 10 steps, updates every 3 steps before step 22: steps 0, 3, ..., 21
    assert sp["n_updates"] == 8
    assert "rigl" in out and "0.2000" in out


def test_saved_weights_are_zero_where_the_saved_mask_is(rigl_run: tuple[Path, str]) -> None:
    run_dir, _ = rigl_run
    weights, _ = load_weights(run_dir / "model" / "weights.safetensors")
    masks = load_file(str(run_dir / "model" / "masks.safetensors"))
    assert set(masks) == {"hidden.0.linear.weight", "head.weight"}
    for name, mask in masks.items():
        assert mask.dtype == torch.uint8 and mask.shape == weights[name].shape
        assert int(mask.sum()) == mask.numel() // 5
        assert torch.all(weights[name][mask == 0] == 0), name
        assert int((weights[name][mask == 1] != 0).sum()) > 0.9 * int(mask.sum())


def test_rigl_changed_the_initial_mask(rigl_run: tuple[Path, str], tmp_path: Path) -> None:
    """The static rule draws the same seeded initial mask and keeps it: RigL's final mask differs."""
    run_dir, _ = rigl_run
    static_dir, _ = fit_run(tmp_path, with_changes(SPARSE_CONFIG, sparsity={"rule": "static"},
                                                   train={"epochs": 1}))
    m = metrics_of(static_dir)
    assert m["rule"] == "static" and m["sparsity"]["n_updates"] == 0
    assert m["sparsity"]["overall_density"] == 0.2
    a = load_file(str(static_dir / "model" / "masks.safetensors"))
    b = load_file(str(run_dir / "model" / "masks.safetensors"))
    assert not torch.equal(a["hidden.0.linear.weight"], b["hidden.0.linear.weight"])
    weights, _ = load_weights(static_dir / "model" / "weights.safetensors")
    for name, mask in a.items():
        assert torch.all(weights[name][mask == 0] == 0), name


def test_dense_rule_has_no_masks(tmp_path: Path) -> None:
    run_dir, out = fit_run(tmp_path, with_changes(SPARSE_CONFIG, sparsity={"rule": "dense"},
                                                  train={"epochs": 2}))
    m = metrics_of(run_dir)
    assert m["rule"] == "dense" and m["density"] == 1.0 and "sparsity" not in m
    assert not (run_dir / "model" / "masks.safetensors").exists()
    assert (run_dir / "model" / "weights.safetensors").is_file()
    assert 0.0 <= m["accuracy"] <= 1.0 and "dense" in out


def test_virtual_mlp_with_rigl(tmp_path: Path) -> None:
    cfg = with_changes(SPARSE_CONFIG, name="tinyvpl", train={"epochs": 2},
                       model={"kind": "vmlp", "sizes": ["auto", 32], "branches": 2,
                              "shared_frac": 0.5})
    run_dir, _ = fit_run(tmp_path, cfg)
    m = metrics_of(run_dir)
    assert m["rule"] == "rigl" and 0.0 <= m["accuracy"] <= 1.0
    assert m["sparsity"]["n_updates"] > 0
    assert m["sparsity"]["overall_density"] == pytest.approx(0.2, abs=0.005)
    spec = json.loads((run_dir / "model" / "model.json").read_text())["spec"]
    assert spec["branches"] == 2 and spec["shared_frac"] == 0.5
    weights, _ = load_weights(run_dir / "model" / "weights.safetensors")
    masks = load_file(str(run_dir / "model" / "masks.safetensors"))
    assert masks and any(w.ndim == 3 for w in masks.values())  # a branched (K, out, in) block
    for name, mask in masks.items():
        assert torch.all(weights[name][mask == 0] == 0), name


@pytest.mark.parametrize(("model", "kind"), [
    ({"kind": "resnet", "depth": 8, "width": 4}, "resnet"),  # the plain CIFAR ResNet
    ({"kind": "resnet", "depth": 8, "width": 4, "branches": 1}, "vresnet"),
])
def test_resnet_is_plain_unless_given_branches(tmp_path: Path, model: dict[str, Any],
                                               kind: str) -> None:
    cfg = with_changes(SPARSE_CONFIG, name=f"tiny{kind}", train={"epochs": 1, "batch_size": 64},
                       sparsity={"rule": "set", "distribution": "erk", "dense_first": True})
    cfg["model"] = model
    run_dir, _ = fit_run(tmp_path, cfg)
    m = metrics_of(run_dir)
    assert json.loads((run_dir / "model" / "model.json").read_text())["spec"]["kind"] == kind
    assert m["sparsity"]["n_updates"] > 0 and 0.15 < m["sparsity"]["overall_density"] < 0.3
    weights, _ = load_weights(run_dir / "model" / "weights.safetensors")
    masks = load_file(str(run_dir / "model" / "masks.safetensors"))
    assert {w.ndim for w in masks.values()} >= {4 if kind == "resnet" else 5}
    for name, mask in masks.items():
        assert torch.all(weights[name][mask == 0] == 0), name


def test_compare_prints_a_row_per_rule(rigl_run: tuple[Path, str]) -> None:
    run_dir, _ = rigl_run
    code, out, err = run_cli(["plastic", "compare", str(run_dir), str(run_dir)])
    assert code == 0, err
    assert "rule" in out and "rigl" in out and "0.2" in out
    acc = metrics_of(run_dir)["accuracy"]
    assert f"{acc:.4f}" in out  # the mean of two identical runs


def test_resume_of_a_finished_run_reuses_it(rigl_run: tuple[Path, str]) -> None:
    run_dir, _ = rigl_run
    before = metrics_of(run_dir)
    code, _, err = run_cli(["plastic", "fit", "--resume", str(run_dir)])
    assert code == 0, err
    after = metrics_of(run_dir)
    assert after["accuracy"] == before["accuracy"]
    assert after["sparsity"]["overall_density"] == before["sparsity"]["overall_density"]


def test_resume_of_a_finished_run_keeps_the_sparsity_record(tmp_path: Path) -> None:
    run_dir, _ = fit_run(tmp_path, with_changes(SPARSE_CONFIG, train={"epochs": 1}))
    before = metrics_of(run_dir)["sparsity"]
    code, _, err = run_cli(["plastic", "fit", "--resume", str(run_dir)])
    assert code == 0, err
    after = metrics_of(run_dir)["sparsity"]
    assert after["n_updates"] == before["n_updates"] > 0
    assert after["flops"] == before["flops"]
    assert after["history"] == before["history"]


def test_resume_of_a_finished_run_without_validation(tmp_path: Path) -> None:
    cfg = with_changes(SPARSE_CONFIG, data={"val_fraction": 0.0}, train={"epochs": 1})
    run_dir, _ = fit_run(tmp_path, cfg)
    before = metrics_of(run_dir)
    code, _, err = run_cli(["plastic", "fit", "--resume", str(run_dir)])
    assert code == 0, err
    assert metrics_of(run_dir)["accuracy"] == before["accuracy"]


# --- task: paths -------------------------------------------------------------------------------


def test_plastic_paths_on_digits(tmp_path: Path) -> None:
    run_dir, out = fit_run(tmp_path, PATHS_CONFIG)
    m = metrics_of(run_dir)
    assert m["task"] == "paths" and m["mode"] == "plastic"
    p = m["paths"]
    assert len(p["active"]) == 2 and len(set(p["active"])) == 2
    assert all(0 <= i < len(p["spans"]) for i in p["active"])
    assert len(p["gates"]) == len(p["spans"]) > 2
    # 20 steps, an update every 3 steps: some active path is always weaker than some candidate
    assert p["n_swaps"] >= 1
    assert 0.0 <= m["accuracy"] <= 1.0
    for name in ("figures/path_lengths.png", "figures/training.png", "report.html",
                 "model/weights.safetensors", "model/model.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "model" / "masks.safetensors").exists()
    assert "paths (plastic)" in out
    assert json.loads((run_dir / "model" / "model.json").read_text())["input_shape"] == [1, 8, 8]
    code, table, err = run_cli(["plastic", "compare", str(run_dir)])
    assert code == 0, err
    assert "mode" in table and "plastic" in table


@pytest.mark.parametrize("mode", ["static", "stochastic_depth"])
def test_path_baselines_run_and_never_swap(tmp_path: Path, mode: str) -> None:
    run_dir, _ = fit_run(tmp_path, with_changes(PATHS_CONFIG, paths={"mode": mode},
                                                train={"epochs": 1}))
    m = metrics_of(run_dir)
    assert m["mode"] == mode and m["paths"]["n_swaps"] == 0
    assert len(m["paths"]["active"]) == 2
    assert (run_dir / "figures" / "path_lengths.png").is_file()


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"sparsity": {"density": 0}}, "sparsity.density must be a number in (0, 1], got 0"),
    ({"sparsity": {"density": 1.5}}, "sparsity.density must be a number in (0, 1], got 1.5"),
    ({"sparsity": {"rule": "magic"}}, "'magic'"),
    ({"sparsity": {"distribution": "lognormal"}}, "'lognormal'"),
    ({"sparsity": {"delta_t": 0}}, "delta_t"),
    ({"sparsity": {"t_end": 100000}}, "sparsity.t_end must be at most the"),
    ({"task": "x"}, "task must be one of"),
    ({"model": {"kind": "transformer"}}, "transformer"),
    ({"sparsity": {"speed": 3}}, "sparsity.speed"),
])
def test_bad_sparse_configs_exit_with_code_2(tmp_path: Path, change: dict[str, Any],
                                             message: str) -> None:
    cfg = write_config(tmp_path / "bad.yaml", with_changes(SPARSE_CONFIG, train={"epochs": 1}, **change))
    code, _, err = run_cli(["plastic", "fit", str(cfg), "--out", str(tmp_path / "runs")])
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_bad_value_given_with_set_exits_with_code_2(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", SPARSE_CONFIG)
    code, _, err = run_cli(["plastic", "fit", str(cfg), "--out", str(tmp_path / "runs"),
                            "--set", "sparsity.rule=magic"])
    assert code == 2 and "sparsity.rule must be one of" in err and "'magic'" in err


def test_paths_on_non_image_data_exits_with_code_2(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "feats.npz", x=rng.normal(size=(60, 6)).astype(np.float32),
             y=np.repeat(np.arange(3), 20))
    cfg = with_changes(PATHS_CONFIG, data={"source": str(tmp_path / "feats.npz"),
                                           "max_per_class": None})
    path = write_config(tmp_path / "paths.yaml", cfg)
    code, _, err = run_cli(["plastic", "fit", str(path), "--out", str(tmp_path / "runs")])
    assert code == 2, err
    assert "task: paths needs images" in err and "(6,)" in err


@pytest.mark.parametrize("change, message", [
    ({"mode": "magic"}, "'magic'"),
    ({"every": 0}, "every"),
])
def test_bad_paths_configs_exit_with_code_2(tmp_path: Path, change: dict[str, Any],
                                            message: str) -> None:
    path = write_config(tmp_path / "bad.yaml", with_changes(PATHS_CONFIG, paths=change))
    try:
        code, _, err = run_cli(["plastic", "fit", str(path), "--out", str(tmp_path / "runs")])
    except ValueError as e:  # escapes main(): the bug
        pytest.fail(f"main() raised {type(e).__name__}: {e}")
    assert code == 2, err
    assert message in err
