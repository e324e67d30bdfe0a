"""End-to-end tests of the ``branchnet`` command line (branchnet.cli.main): ``tree fit`` into a
run folder (config, metrics, figures, self-contained report, saved tree), ``tree eval``,
``tree predict`` on arrays and image folders, ``tree fit --resume``, the error messages and
exit codes, and ``demo``."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn.datasets import load_digits

import branchnet.engine as engine
from branchnet.cli import main
from branchnet.runs import Run
from branchnet.tree import BranchTree
from cli_helpers import DIGITS_CONFIG, run_cli, write_config

COLORS = {"red": (220, 30, 30), "yellow": (230, 220, 40), "blue": (30, 40, 220),
          "green": (30, 200, 40)}




def only_run(out: Path, prefix: str) -> Path:
    runs = sorted(out.glob(f"{prefix}-*"))
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished ``tree fit`` run on digits, and what it printed."""
    root = tmp_path_factory.mktemp("digits")
    cfg = write_config(root / "tiny.yaml", DIGITS_CONFIG)
    code, out, err = run_cli(["tree", "fit", str(cfg), "--out", str(root / "runs"),
                              "--set", "parent.train.epochs=3", "--no-progress"])
    assert code == 0, err
    return only_run(root / "runs", "tiny-s0"), out


def color_image(rgb: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    arr = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 25, (8, 8, 3)), 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished run on a tiny ImageFolder of coloured 8x8 PNGs (warm / cool colours), and a
    folder of new PNGs to predict on."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, rgb in COLORS.items():
        (root / "folder" / name).mkdir(parents=True)
        for i in range(15):
            color_image(rgb, rng).save(root / "folder" / name / f"{i}.png")
    new = root / "new"
    (new / "sub").mkdir(parents=True)
    for name, rgb in COLORS.items():
        color_image(rgb, rng).save(new / f"{name}.png")
        color_image(rgb, rng).save(new / "sub" / f"{name}2.png")
    (new / "notes.txt").write_text("not an image")
    (root / "hierarchy.yaml").write_text("warm: [red, yellow]\ncool: [blue, green]\n")
    assert not Path("folder").exists() and not Path("hierarchy.yaml").exists()
    cfg = {**DIGITS_CONFIG, "name": "colors",
           # paths relative to the config file (not to the working directory)
           "data": {"source": "folder", "val_fraction": 0.2, "test_fraction": 0.2,
                    "cache_dir": str(root / "decoded")},
           "hierarchy": "hierarchy.yaml",
           "parent": {**DIGITS_CONFIG["parent"], "train": {"epochs": 6, "batch_size": 16,
                                                           "lr": 0.01}}}
    code, _, err = run_cli(["tree", "fit", str(write_config(root / "colors.yaml", cfg)),
                            "--out", str(root / "runs")])
    assert code == 0, err
    return only_run(root / "runs", "colors-s0"), new


# ---------------------------------------------------------------- tree fit


def test_fit_creates_a_complete_run_folder(digits_run: tuple[Path, str]) -> None:
    run, out = digits_run
    assert f"run folder: {run}" in out
    assert "tree (end to end)" in out and "accepted" in out
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["parent"]["train"]["epochs"] == 3  # the --set override
    assert cfg["tree"]["head"]["hidden"] == 32 and cfg["tree"]["router"] == "parent"  # defaults
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_test"] > 0 and 0.5 < metrics["accuracy"] <= 1
    assert 0.6 < metrics["coverage"] < 1
    assert set(metrics["branches"]) == {"root", "round", "straight", "curly"}
    assert metrics["fit"]["parent"]["epochs_run"] == 3
    figures = {p.stem for p in (run / "figures").glob("*.png")}
    assert figures >= {"training", "risk_coverage", "confusion", "branches"}
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert 'src="figures' not in html and "<link" not in html  # self-contained
    assert "curly" in html
    assert (run / "tree" / "tree.json").is_file()
    assert (run / "tree" / "weights.safetensors").is_file()
    tree = BranchTree.load(run / "tree")
    assert tree.classes_ == [str(i) for i in range(10)]
    assert tree.calibration_["method"] == "coverage"


def test_fit_seed_option_and_bad_training_option(tmp_path: Path) -> None:
    # a misspelt training option stops the run before any folder or training exists
    cfg = write_config(tmp_path / "c.yaml", {**DIGITS_CONFIG, "parent": {
        **DIGITS_CONFIG["parent"], "train": {"epochz": 1}}})
    code, _, err = run_cli(["tree", "fit", str(cfg), "--seed", "3", "--out", str(tmp_path)])
    assert code == 2
    assert "unknown config key 'parent.train.epochz'" in err and "'epochs'" in err
    assert not list(tmp_path.glob("tiny-s3-*"))


def test_fit_resume_of_a_finished_run(digits_run: tuple[Path, str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = digits_run
    trainers: list[int] = []
    real = engine.L.Trainer

    def counting(*args: Any, **kwargs: Any) -> Any:
        trainers.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.L, "Trainer", counting)
    before = json.loads((run / "metrics.json").read_text())
    t0 = time.perf_counter()
    code, out, err = run_cli(["tree", "fit", "--resume", str(run)])
    assert code == 0, err
    assert time.perf_counter() - t0 < 30
    assert trainers == []  # nothing was trained again
    assert f"run folder: {run}" in out
    after = json.loads((run / "metrics.json").read_text())
    for key in ("accuracy", "coverage", "accepted", "aurc", "calibration"):
        assert after[key] == before[key], key
    # a run interrupted after training, before its results were written, is completed
    shutil.rmtree(run / "tree")
    (run / "metrics.json").unlink()
    (run / "report.html").unlink()
    code, out, err = run_cli(["tree", "fit", "--resume", str(run), "--no-progress"])
    assert code == 0, err
    assert trainers == []
    assert (run / "tree" / "tree.json").is_file() and (run / "report.html").is_file()
    assert json.loads((run / "metrics.json").read_text())["accuracy"] == before["accuracy"]


# ---------------------------------------------------------------- tree eval


def test_eval_writes_a_new_json(digits_run: tuple[Path, str]) -> None:
    run, _ = digits_run
    metrics_before = (run / "metrics.json").read_bytes()
    code, out, err = run_cli(["tree", "eval", str(run)])
    assert code == 0, err
    assert (run / "metrics.json").read_bytes() == metrics_before
    evals = sorted(run.glob("eval-test-*.json"))
    assert len(evals) == 1 and f"metrics written to {evals[0]}" in out
    result = json.loads(evals[0].read_text())
    assert result["accuracy"] == pytest.approx(json.loads(metrics_before)["accuracy"])
    assert "tree (end to end)" in out
    code, out, err = run_cli(["tree", "eval", str(run), "--split", "val"])
    assert code == 0, err
    assert len(list(run.glob("eval-val-*.json"))) == 1
    assert (run / "metrics.json").read_bytes() == metrics_before


# ---------------------------------------------------------------- tree predict


@pytest.mark.parametrize("shape", ["n88", "n188", "flat", "npz"])
def test_predict_on_raw_digits(digits_run: tuple[Path, str], tmp_path: Path, shape: str) -> None:
    run, _ = digits_run
    d = load_digits()
    raw, y = d.images[-60:].astype(np.float32), d.target[-60:]  # values 0..16, [N, 8, 8]
    path = tmp_path / "x.npy"
    if shape == "n188":
        raw = raw[:, None]
    elif shape == "flat":
        raw = raw.reshape(60, 64)
    if shape == "npz":
        path = tmp_path / "x.npz"
        np.savez(path, x=raw)
    else:
        np.save(path, raw)
    code, out, err = run_cli(["tree", "predict", str(run), str(path)])
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 + 60  # header, rule, one row per input
    assert f"{path.name}[0] " in out and f"{path.name}[59] " in out
    code, out, err = run_cli(["tree", "predict", str(run), str(path), "--json", "--top", "2"])
    assert code == 0, err
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["input"] for r in records] == [f"{path.name}[{i}]" for i in range(60)]
    assert all(len(r["top"]) == 2 and r["path"][0] == "root" for r in records)
    assert all((r["prediction"] is None) == r["abstained"] for r in records)
    # prepared like the training data: the routed classes are mostly right
    reached = np.array([int(r["path"][-1]) for r in records])
    assert (reached == y).mean() > 0.6


def test_predict_on_image_folder(image_run: tuple[Path, Path]) -> None:
    run, new = image_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.8
    code, out, err = run_cli(["tree", "predict", str(run), str(new)])
    assert code == 0, err
    rows = out.strip().splitlines()[2:]
    assert len(rows) == 8  # the PNGs, sub-folders included; notes.txt skipped
    code, out, err = run_cli(["tree", "predict", str(run), str(new), "--json"])
    assert code == 0, err
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert len(records) == 8
    right = [Path(r["input"]).stem.rstrip("2") == r["path"][-1] for r in records]
    assert sum(right) >= 6
    warm = {"red", "yellow"}
    for r in records:
        assert r["path"][1] == ("warm" if r["path"][-1] in warm else "cool")
    # one image file
    code, out, err = run_cli(["tree", "predict", str(run), str(new / "red.png"), "--json"])
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1


def test_image_run_eval_and_resume_from_another_directory(
        image_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the config named its data and hierarchy relative to itself; the run folder must still
    # work from anywhere
    run, _ = image_run
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["tree", "eval", str(run)])
    assert code == 0, err
    code, _, err = run_cli(["tree", "fit", "--resume", str(run)])
    assert code == 0, err


def test_predict_on_pngs_for_a_digits_tree(digits_run: tuple[Path, str], tmp_path: Path) -> None:
    # digits record no image mode: grey PNGs are read as 1-channel images
    run, _ = digits_run
    for i in range(3):
        Image.fromarray((load_digits().images[i] * 15).astype(np.uint8), "L").save(
            tmp_path / f"{i}.png")
    code, out, err = run_cli(["tree", "predict", str(run), str(tmp_path), "--json"])
    assert code == 0, err
    assert len(out.strip().splitlines()) == 3


# ---------------------------------------------------------------- errors


def test_error_missing_config(tmp_path: Path) -> None:
    code, _, err = run_cli(["tree", "fit", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)])
    assert code == 2
    assert "branchnet: error: config file" in err and "does not exist" in err
    assert list(tmp_path.iterdir()) == []  # no run folder was created


def test_error_unknown_config_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", {**DIGITS_CONFIG, "parnet": {}})
    code, _, err = run_cli(["tree", "fit", str(cfg), "--out", str(tmp_path / "runs")])
    assert code == 2
    assert "unknown config key 'parnet'" in err
    assert "'parent'" in err and "'calibration'" in err  # the valid keys are listed
    nested = write_config(tmp_path / "n.yaml", {"tree": {"polcy": "soft"}})
    code, _, err = run_cli(["tree", "fit", str(nested), "--out", str(tmp_path / "runs")])
    assert code == 2 and "'tree.polcy'" in err and "'policy'" in err


def test_error_bad_set_syntax(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", DIGITS_CONFIG)
    code, _, err = run_cli(["tree", "fit", str(cfg), "--set", "parent.train.epochs",
                            "--out", str(tmp_path / "runs")])
    assert code == 2 and "must look like key.sub=value" in err
    code, _, err = run_cli(["tree", "fit", str(cfg), "--set", "parent.bogus=1",
                            "--out", str(tmp_path / "runs")])
    assert code == 2 and "unknown config key 'parent.bogus'" in err
    assert not (tmp_path / "runs").exists()


def test_error_not_a_run(tmp_path: Path) -> None:
    for cmd in (["tree", "eval", str(tmp_path)], ["tree", "predict", str(tmp_path), "x.npy"],
                ["tree", "fit", "--resume", str(tmp_path)]):
        code, _, err = run_cli(cmd)
        assert code == 2, cmd
        assert "is not a branchnet run folder (no config.yaml)" in err
    # a run folder that never finished has no tree
    run = Run.create(tmp_path / "runs", "unfinished")
    run.write_config(DIGITS_CONFIG)
    code, _, err = run_cli(["tree", "eval", str(run.path)])
    assert code == 2 and "has no saved tree yet" in err and "--resume" in err


def test_error_bad_predict_input(digits_run: tuple[Path, str], tmp_path: Path) -> None:
    run, _ = digits_run
    code, _, err = run_cli(["tree", "predict", str(run), str(tmp_path / "missing.npy")])
    assert code == 2 and "does not exist" in err
    np.save(tmp_path / "bad.npy", np.zeros((3, 5, 5, 5)))
    code, _, err = run_cli(["tree", "predict", str(run), str(tmp_path / "bad.npy")])
    assert code == 2 and "expected images shaped" in err
    np.save(tmp_path / "small.npy", np.zeros((3, 7)))  # one 3x7 grey image
    code, _, err = run_cli(["tree", "predict", str(run), str(tmp_path / "small.npy")])
    assert code == 2 and "resize them to 8x8" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["tree", "predict", str(run), str(tmp_path / "empty")])
    assert code == 2 and "no images" in err


def test_error_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["tree", "fit"])
    assert code == 2 and "give a CONFIG file" in err
    with pytest.raises(SystemExit) as e:
        main(["tree", "bogus"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.perf_counter()
    assert main(["demo", "--out", str(tmp_path)]) == 0
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert "branchnet demo" in out and "run folder:" in out and "done in" in out
    run = only_run(tmp_path, "demo-digits")
    assert (run / "report.html").is_file() and (run / "tree" / "tree.json").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.9
    assert elapsed < 60, f"the demo took {elapsed:.0f} s"
