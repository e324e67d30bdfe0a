"""``branchnet vbranch fit`` with ``task: embed`` and ``branchnet vbranch oneshot`` on a tiny
synthetic Omniglot archive (and, marked realdata, on the real one)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from branchnet.virtual.embedding_experiment import oneshot_of_run
from cli_helpers import run_cli, write_config
from test_omniglot import write_omniglot

REPO = Path(__file__).resolve().parents[1]
REAL_OMNIGLOT = REPO / ".." / "shared" / "data" / "omniglot"

#: two training alphabets (P = 3 characters of one alphabet per batch) and one held-out alphabet
#: with 5 characters for 5-way one-shot runs; 3 drawers, so every run has two distinct ones
ALPHABETS = {"Alpha": 4, "Beta": 4, "Held": 5}


def embed_config(zip_name: str, cache_dir: Path) -> dict[str, Any]:
    return {
        "name": "tinyemb",
        "seed": 0,
        "task": "embed",
        "merge": "concat",
        "data": {"cache_dir": str(cache_dir)},
        "model": {"kind": "cnn", "widths": [8, 16], "branches": 2, "shared_frac": 0.5},
        "embedding": {"train": [zip_name], "held_out": ["Held"], "image_size": 16, "dim": 8,
                      "P": 3, "K": 2, "steps_per_epoch": 5, "n_runs": 3, "ways": 5},
        "train": {"epochs": 1, "lr": 0.001, "optimizer": "adam"},
        "progress": False,
    }


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``omni.zip`` (20 x 20 drawings, resized to 16 x 16 by the config) and
    ``embed.yaml`` naming it relative to the config file."""
    tmp = tmp_path_factory.mktemp("omni")
    write_omniglot(tmp, ALPHABETS, drawers=3, size=20)
    write_config(tmp / "embed.yaml", embed_config("omni.zip", tmp / "cache"))
    return tmp


@pytest.fixture(scope="module")
def fitted(omniglot: Path) -> tuple[Path, str]:
    code, out, err = run_cli(["vbranch", "fit", str(omniglot / "embed.yaml"),
                              "--out", str(omniglot / "runs")])
    assert code == 0, err
    return next((omniglot / "runs").iterdir()), out


def test_fit_writes_an_embedding_run(fitted: tuple[Path, str]) -> None:
    run_dir, out = fitted
    for name in ("config.yaml", "metrics.json", "report.html", "model/weights.safetensors",
                 "model/model.json", "figures/oneshot.png", "oneshot-runs/runs.json"):
        assert (run_dir / name).is_file(), name
    for r in ("run01", "run02", "run03"):
        assert (run_dir / "oneshot-runs" / r / "class_labels.txt").is_file(), r
        assert len(list((run_dir / "oneshot-runs" / r / "training").glob("*.png"))) == 5
    assert not (run_dir / "oneshot-runs" / "run04").exists()
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["task"] == "embed" and m["branches"] == 2 and m["shared_frac"] == 0.5
    shot = m["oneshot"]
    assert shot["ways"] == 5 and shot["n_runs"] == 3
    assert 0.0 <= shot["ensemble"]["accuracy"] <= 1.0 and shot["ensemble"]["n_trials"] == 15
    assert len(shot["branches"]) == 2
    assert all(0.0 <= b["accuracy"] <= 1.0 for b in shot["branches"])
    assert shot["branch_mean"] == pytest.approx(sum(b["accuracy"] for b in shot["branches"]) / 2)
    ret = m["retrieval"]
    assert len(ret["branches"]) == 2
    for r in (ret["ensemble"], *ret["branches"]):
        assert 0.0 <= r["precision_at_1"] <= 1.0 and 0.0 <= r["mAP"] <= 1.0
        assert r["n_queries"] == 15  # the held-out alphabet: 5 characters x 3 drawers
    # the model's spec: an embedding of `dim` per branch from a 1-channel S x S input
    meta = json.loads((run_dir / "model" / "model.json").read_text())
    assert "Held" not in m["data"]["summary"].split("held out")[0]
    assert meta["spec"]["num_classes"] == 8 and meta["spec"]["input_shape"] == [1, 16, 16]
    assert "oneshot" in out and "precision_at_1" in out


def test_oneshot_command_reports_the_saved_accuracy(fitted: tuple[Path, str]) -> None:
    run_dir, _ = fitted
    shot = json.loads((run_dir / "metrics.json").read_text())["oneshot"]
    code, out, err = run_cli(["vbranch", "oneshot", "--runs", str(run_dir / "oneshot-runs"),
                              "--run", str(run_dir)])
    assert code == 0, err
    acc = shot["ensemble"]["accuracy"]
    assert f"5-way one-shot accuracy {acc:.4f} over 15 trials in 3 runs" in out
    for k, b in enumerate(shot["branches"]):
        line = next(s for s in out.splitlines() if s.startswith(f"branch {k}"))
        assert line.split()[-1] == f"{b['accuracy']:.4f}"
    # the library call behind it reproduces metrics.json exactly
    again = oneshot_of_run(run_dir, run_dir / "oneshot-runs")
    assert again["ensemble"] == shot["ensemble"] and again["branches"] == shot["branches"]


def test_oneshot_on_runs_with_a_missing_file_exits_with_code_2(fitted: tuple[Path, str],
                                                               tmp_path: Path) -> None:
    run_dir, _ = fitted
    runs = shutil.copytree(run_dir / "oneshot-runs", tmp_path / "runs")
    (runs / "run02" / "class_labels.txt").unlink()
    code, _, err = run_cli(["vbranch", "oneshot", "--runs", str(runs), "--run", str(run_dir)])
    assert code == 2, err
    assert "run02/class_labels.txt is missing" in err

    runs = shutil.copytree(run_dir / "oneshot-runs", tmp_path / "runs2")
    (runs / "run03" / "test" / "item04.png").unlink()
    code, _, err = run_cli(["vbranch", "oneshot", "--runs", str(runs), "--run", str(run_dir)])
    assert code == 2, err
    assert "run03/test/item04.png is missing" in err

    code, _, err = run_cli(["vbranch", "oneshot", "--runs", str(tmp_path / "nowhere"),
                            "--run", str(run_dir)])
    assert code == 2 and "nowhere does not exist" in err


def test_oneshot_of_a_classification_run_exits_with_code_2(fitted: tuple[Path, str],
                                                           tmp_path: Path) -> None:
    run_dir, _ = fitted
    cfg = write_config(tmp_path / "cls.yaml", {
        "name": "tinycls", "seed": 0,
        "data": {"source": "digits", "val_fraction": 0.2, "test_fraction": 0.3, "max_per_class": 20},
        "model": {"kind": "mlp", "sizes": ["auto", 16], "branches": 2, "shared_frac": 0.5},
        "train": {"epochs": 1, "batch_size": 32}, "progress": False})
    code, _, err = run_cli(["vbranch", "fit", str(cfg), "--out", str(tmp_path / "runs")])
    assert code == 0, err
    cls_run = next((tmp_path / "runs").iterdir())
    code, _, err = run_cli(["vbranch", "oneshot", "--runs", str(run_dir / "oneshot-runs"),
                            "--run", str(cls_run)])
    assert code == 2, err
    assert "is not an embedding run" in err and "'classify'" in err


@pytest.mark.parametrize("override, message", [
    ("embedding.held_out=[Klingon]", "unknown alphabet(s) ['Klingon']"),
    ("embedding.ways=6", "no alphabet has 6 characters"),
    ("embedding.train=[]", "embedding.train must list"),
    ("embedding.train=[nothere.zip]", "embedding.train[0] must be an existing Omniglot zip archive "
     "or folder, got 'nothere.zip'"),
    ("merge=before_mean", "does not match an embedding head"),
])
def test_bad_embedding_configs_exit_with_code_2(omniglot: Path, tmp_path: Path, override: str,
                                                message: str) -> None:
    code, _, err = run_cli(["vbranch", "fit", str(omniglot / "embed.yaml"), "--out",
                            str(tmp_path / "runs"), "--set", override])
    assert code == 2, err
    assert message in err


def test_batches_larger_than_an_alphabet_exit_with_code_2(omniglot: Path, tmp_path: Path) -> None:
    try:
        code, _, err = run_cli(["vbranch", "fit", str(omniglot / "embed.yaml"), "--out",
                                str(tmp_path / "runs"), "--set", "embedding.P=10"])
    except ValueError as e:  # escapes main(): the bug
        pytest.fail(f"main() raised {type(e).__name__}: {e}")
    assert code == 2, err
    assert "P=10" in err


@pytest.mark.slow
@pytest.mark.realdata
def test_real_omniglot_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not REAL_OMNIGLOT.is_dir():
        pytest.skip(f"real Omniglot not found at {REAL_OMNIGLOT.resolve()} (../shared/data/omniglot "
                    "is absent)")
    monkeypatch.chdir(REPO)  # the config names its archives relative to the repository root
    code, out, err = run_cli([
        "vbranch", "fit", "configs/vbranch-omniglot.yaml", "--out", str(tmp_path / "runs"),
        "--no-progress", "--set", "train.epochs=1", "--set", "embedding.steps_per_epoch=5",
        "--set", "model.branches=2", "--set", "embedding.n_runs=4"])
    assert code == 0, err
    run_dir = next((tmp_path / "runs").iterdir())
    m = json.loads((run_dir / "metrics.json").read_text())
    shot = m["oneshot"]
    assert shot["ways"] == 20 and shot["n_runs"] == 4 and shot["ensemble"]["n_trials"] == 80
    assert 0.0 <= shot["ensemble"]["accuracy"] <= 1.0 and len(shot["branches"]) == 2
    assert 0.0 <= m["retrieval"]["ensemble"]["precision_at_1"] <= 1.0
    assert 0.0 <= m["retrieval"]["ensemble"]["mAP"] <= 1.0
    for r in range(1, 5):
        assert (run_dir / "oneshot-runs" / f"run{r:02d}" / "class_labels.txt").is_file()
    held = {"Japanese_(katakana)", "Sanskrit", "Korean"}  # the config's held_out alphabets
    manifest = json.loads((run_dir / "oneshot-runs" / "runs.json").read_text())
    assert {r["alphabet"] for r in manifest["runs"]} <= held
    assert not held & set(m["data"]["summary"].split("held out")[0].split("'"))  # never trained on
    assert "20-way" in out or "oneshot" in out
