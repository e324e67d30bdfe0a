"""The ``exits`` run kind end to end: fit / eval / predict / compare on digits and on texts
(tiny random transformer, run layer by layer). Its bad-input messages are cases of
``tests/test_errors_doc.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from branchnet.exits import MultiExit
from branchnet.text import TextParent
from cli_helpers import run_cli, write_config
from test_text_tree import FAST, TEXT_CONFIG, text_config, texts_of

DIGITS: dict = {
    "name": "ex", "data": {"source": "digits"},
    "parent": {"model": {"kind": "mlp", "sizes": ["auto", 64, 64, 32]}, "train": {"epochs": 10}},
    "exits": {"taps": ["hidden.0", "hidden.1"], "head_train": {"epochs": 10}},
    "calibration": {"epsilon": 0.1, "delta": 0.2}, "timing": {"inputs": 64},
    "progress": False,
}


def test_cli_exits_on_digits(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BRANCHNET_CACHE_DIR", str(tmp_path / "cache"))
    cfg = write_config(tmp_path / "ex.yaml", DIGITS)
    code, out, err = run_cli(["exits", "fit", str(cfg), "--out", str(tmp_path / "runs")])
    assert code == 0, err
    assert "calibrated threshold" in out and "batch 64:" in out
    run = next((tmp_path / "runs").iterdir())
    m = json.loads((run / "metrics.json").read_text())
    assert m["staged"]["exit_agreement"] == 1.0  # real inference takes the simulated exits
    assert m["calibrated"]["flops_saved"] > 0 and len(m["curve"]) > 5
    assert {p.name for p in (run / "figures").iterdir()} >= {
        "accuracy_flops.png", "exit_histogram.png", "training.png"}
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((3, 8, 8)) * 16)
    code, out, err = run_cli(["exits", "predict", str(run), str(tmp_path / "x.npy"), "--json"])
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 3 and {r["exit"] for r in rows} <= {"hidden.0", "hidden.1", "full"}
    code, out, err = run_cli(["exits", "eval", str(run)])
    assert code == 0 and "calibrated exits" in out, err
    code, out, err = run_cli(["exits", "compare", str(run)])
    assert code == 0 and "full parent" in out, err


def test_cli_exits_on_texts(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BRANCHNET_CACHE_DIR", str(tmp_path / "cache"))
    text_config(tmp_path)
    cfg = {"name": "tx", "data": TEXT_CONFIG["data"],
           "parent": {"model": TEXT_CONFIG["parent"]["model"]},
           "exits": {"taps": ["embeddings", "layer.0"], "head": {"hidden": 8},
                     "head_train": FAST},
           "calibration": {"kind": "consistency", "epsilon": 0.2, "delta": 0.2},
           "timing": {"inputs": 16, "batch_sizes": [1, 8]}, "progress": False}
    code, out, err = run_cli(["exits", "fit", str(write_config(tmp_path / "t.yaml", cfg)),
                              "--out", str(tmp_path / "runs")])
    assert code == 0, err
    run = next((tmp_path / "runs").iterdir())
    m = json.loads((run / "metrics.json").read_text())
    assert m["splittable"]["stages"] == "TextStages"
    assert m["staged"]["exit_agreement"] > 0.95  # padding differs from the cache's batches
    code, out, err = run_cli(["exits", "predict", str(run), "abc def fed", "--json"])
    assert code == 0 and json.loads(out)["input"] == "abc def fed", err


def test_text_multiexit_staged_equals_cached(tmp_path: Path) -> None:
    parent = TextParent.tiny(num_classes=4, probe_layer="layer.1", max_length=24)
    train, val, test = texts_of(160, 0), texts_of(60, 1), texts_of(60, 2)
    me = MultiExit(parent, ["layer.0"], train_probe=True, head_train=FAST,
                   cache_dir=tmp_path, progress=False).fit(train, val=val)
    probs = me.exit_probs(test)
    thr = float(probs[:, 0].max(1).values.median())  # half the texts leave early
    pred = me.predict(test.x, threshold=thr, batch_size=16)
    _, exits = me.decide(probs, thr)
    assert (pred.exits == exits).float().mean() > 0.95
    assert set(exits.tolist()) == {0, 1}
    full = torch.softmax(parent(test.x), 1)
    torch.testing.assert_close(probs[:, -1], full, atol=1e-4, rtol=1e-3)
