"""A BranchTree on a frozen text parent: probe trained on the cache, branches on another layer,
one pass for several taps, self-check branch, save / load, predict on texts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from branchnet.cache import ActivationCache
from branchnet.data import Split, Texts
from branchnet.text import TextParent
from branchnet.tree import BranchTree, TreeError
from branchnet.tree.evaluate import evaluate
from cli_helpers import run_cli, write_config

#: four classes in two groups, each class writing with its own letters
LETTERS = {"a": "abcdef", "b": "ghijkl", "c": "mnopqr", "d": "stuvwx"}
HIER = {"first": ["a", "b"], "second": ["c", "d"]}
FAST = {"epochs": 15, "batch_size": 32, "lr": 3e-3, "progress": False}


def texts_of(n: int, seed: int) -> Split:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        c = i % 4
        letters = LETTERS["abcd"[c]] + "yz"  # shared letters make it less trivial
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 6)))
                 for _ in range(rng.randint(2, 8))]
        texts.append(" ".join(words))
        labels.append(c)
    return Split(Texts(texts), torch.tensor(labels))


def make_tree(tmp_path: Path, **kwargs) -> BranchTree:
    parent = TextParent.tiny(num_classes=4, probe_layer="layer.1", max_length=24)
    return BranchTree(parent, "layer.0", hierarchy=HIER, parent_train=FAST, head_train=FAST,
                      cache_dir=tmp_path / "cache", **kwargs)


@pytest.fixture(scope="module")
def splits() -> tuple[Split, Split, Split]:
    return texts_of(240, 0), texts_of(80, 1), texts_of(80, 2)


def test_tree_on_texts_end_to_end(tmp_path: Path, splits, monkeypatch) -> None:
    train, val, test = splits
    tree = make_tree(tmp_path)
    calls = []
    backbone = tree.parent.backbone
    monkeypatch.setattr(backbone, "forward", _counting(backbone.forward, calls))
    tree.fit(train, val=val, classes=list("abcd"))
    # one transformer pass per batch for both taps (the probe's layer.1 and the branches' layer.0)
    n_batches = sum(-(-len(s) // 32) for s in (train, val))
    assert len(calls) <= n_batches + 2  # + the 2-text output check
    assert {e.layer for e in ActivationCache(tmp_path / "cache").entries()} == {"layer.0", "layer.1"}
    assert tree.fit_summary_["parent"]["probe_layer"] == "layer.1"
    assert tree.fit_summary_["truncation"]["train"]["max_length"] == 24
    assert tree.score(test.x, test.y) > 0.6  # chance is 0.25
    pred = tree.predict(["abc fed", "stu vwx xx"])  # a plain list of strings
    assert pred.label.shape == (2,)
    tree.calibrate(texts_of(80, 3), method="coverage", coverage=0.8)
    saved = tree.save(tmp_path / "tree")
    assert (saved / "weights.safetensors").stat().st_size < 200_000  # the probe, not the model
    loaded = BranchTree.load(saved)
    torch.testing.assert_close(loaded.predict_proba(test.x), tree.predict_proba(test.x))
    result, _ = evaluate(loaded, test)
    assert 0 <= result["balanced_accuracy"] <= 1
    with pytest.raises(TreeError, match=r"got inputs of shape .* fitted on texts"):
        loaded.predict(torch.zeros(3, 5))
    with pytest.raises(TreeError, match="cannot be traced"):
        loaded.to_torchscript()


def test_probe_key_does_not_change_the_cache(tmp_path: Path, splits) -> None:
    """The cached taps do not depend on the probe: a second fit reads the first one's."""
    train, val, _ = splits
    tree = make_tree(tmp_path).fit(train, val=val, classes=list("abcd"))
    cache = ActivationCache(tmp_path / "cache")
    assert cache.has(tree.parent, "layer.0", train, preprocessing={})  # the probe is no key


def test_selfcheck_branch(tmp_path: Path, splits) -> None:
    train, val, test = splits
    tree = make_tree(tmp_path, confidence="selfcheck",
                     selfcheck={"fraction": 0.25, "hidden": 16, "train": {"epochs": 5}})
    tree.fit(train, val=val, classes=list("abcd"))
    info = tree.fit_summary_["selfcheck"]
    assert info["target"] == "tcp" and info["n_train"] + info["n_val"] == 60
    scores = tree.confidence_scores(test.x)
    assert set(scores) == {"msp", "margin", "entropy", "selfcheck"}
    assert ((scores["selfcheck"] >= 0) & (scores["selfcheck"] <= 1)).all()
    torch.testing.assert_close(tree.predict(test.x).confidence, scores["selfcheck"])
    loaded = BranchTree.load(tree.save(tmp_path / "tree"))
    torch.testing.assert_close(loaded.confidence_scores(test.x)["selfcheck"], scores["selfcheck"])
    with pytest.raises(TreeError, match="60 of 60 calibration inputs were used"):  # self-check's
        tree.calibrate(train.split(0.25, seed=0)[1], method="coverage", coverage=0.8)
    result, _ = evaluate(loaded, test, calibration=texts_of(80, 3))
    assert set(result["scores"]) == set(scores)
    assert "coverage" in result["scores"]["selfcheck"]


def test_bad_selfcheck_options(tmp_path: Path) -> None:
    with pytest.raises(TreeError, match="unknown selfcheck option"):
        make_tree(tmp_path, selfcheck={"fractoin": 0.2})
    with pytest.raises(TreeError, match="selfcheck fraction must be a number in"):
        make_tree(tmp_path, selfcheck={"fraction": 1.5})


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapped


def write_jsonl(path: Path, split: Split, classes: str = "abcd") -> Path:
    groups = {c: g for g, members in HIER.items() for c in members}
    with path.open("w") as f:
        for text, y in zip(split.x, split.y.tolist(), strict=True):
            f.write(json.dumps({"text": text, "label": classes[y], "group": groups[classes[y]]})
                    + "\n")
    return path


#: a tree config on the tiny text parent (data files written by :func:`text_config`)
TEXT_CONFIG: dict = {
    "name": "text", "seed": 0,
    "data": {"source": "train.jsonl", "test_source": "test.jsonl", "group_column": "group",
             "val_fraction": 0.4, "split_seed": 0},
    "hierarchy": "groups",
    "parent": {"model": {"kind": "transformer", "source": "tiny", "probe_layer": "layer.1",
                         "max_length": 24},
               "tap": "layer.0", "train": {**FAST, "epochs": 10}},
    "tree": {"head": {"hidden": 16, "dropout": 0.0}, "head_train": {**FAST, "epochs": 10},
             "selfcheck": {"hidden": 8}},
    "calibration": {"method": "coverage", "coverage": 0.8},
    "baselines": True, "progress": False,
}


def text_config(folder: Path) -> Path:
    """Small train / test JSON-lines files and :data:`TEXT_CONFIG` beside them."""
    write_jsonl(folder / "train.jsonl", texts_of(200, 0))
    write_jsonl(folder / "test.jsonl", texts_of(60, 1))
    return write_config(folder / "text.yaml", TEXT_CONFIG)


def test_cli_fit_eval_predict_on_texts(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BRANCHNET_CACHE_DIR", str(tmp_path / "cache"))
    code, out, err = run_cli(["tree", "fit", str(text_config(tmp_path)), "--out",
                              str(tmp_path / "runs")])
    assert code == 0, err
    assert "balanced" in out
    run = next((tmp_path / "runs").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"msp", "margin", "entropy", "selfcheck"} <= set(metrics["scores"])
    assert "parent_flat_balanced_accuracy" in metrics["baselines"]
    assert metrics["fit"]["truncation"]["train"]["texts"] > 0
    code, out, err = run_cli(["tree", "predict", str(run), "abc def fed", "--json"])
    assert code == 0, err
    assert json.loads(out.splitlines()[0])["input"] == "abc def fed"
    (tmp_path / "in.txt").write_text("abc fed\n\nstu vwx\n")
    code, out, err = run_cli(["tree", "predict", str(run), str(tmp_path / "in.txt"), "--json"])
    assert code == 0, err
    assert [json.loads(line)["input"] for line in out.splitlines()] == ["in.txt:1", "in.txt:2"]
    code, out, err = run_cli(["tree", "predict", str(run), str(tmp_path / "test.jsonl")])
    assert code == 0 and out.count("test.jsonl:") == 60, err
    code, out, err = run_cli(["tree", "eval", str(run)])
    assert code == 0, err


def test_cli_probe_curve(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BRANCHNET_CACHE_DIR", str(tmp_path / "cache"))
    text_config(tmp_path)
    cfg = {"name": "probe", "data": TEXT_CONFIG["data"], "targets": ["classes", "groups"],
           "parent": {"model": {"kind": "transformer", "source": "tiny", "max_length": 24}},
           "progress": False}
    code, out, err = run_cli(["probe", "fit", str(write_config(tmp_path / "p.yaml", cfg)),
                              "--out", str(tmp_path / "runs")])
    assert code == 0, err
    run = next((tmp_path / "runs").iterdir())
    probes = json.loads((run / "metrics.json").read_text())["probes"]
    assert [(p["layer"], p["target"]) for p in probes] == [
        (la, t) for la in ("embeddings", "layer.0", "layer.1") for t in ("classes", "groups")]
    assert all(p["balanced_accuracy"] > 0.5 for p in probes)  # chance: 0.25 / 0.5
    assert [f.name for f in (run / "figures").iterdir()] == ["probing_curve.png"]
    code, out, err = run_cli(["probe", "compare", str(run)])
    assert code == 0 and "layer.1" in out, err


SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.mark.slow
@pytest.mark.realdata
def test_minilm_tree_on_debian_subset(tmp_path: Path, monkeypatch) -> None:
    """configs/text-debian.yaml on 6 sections in 3 groups, 40 training texts each: MiniLM end
    to end through the CLI."""
    config = Path(__file__).resolve().parents[1] / "configs" / "text-debian.yaml"
    if not ((SHARED / "minilm" / "model.zip").is_file()
            and (SHARED / "text" / "debian-packages-train.jsonl.gz").is_file()):
        pytest.skip(f"MiniLM or the Debian texts not found under {SHARED.resolve()}")
    monkeypatch.setenv("BRANCHNET_CACHE_DIR", str(tmp_path / "cache"))
    code, out, err = run_cli(["tree", "fit", str(config), "--out", str(tmp_path / "runs"),
                              "--set", "data.classes=[mail, comm, hamradio, electronics, vcs, "
                              "database]", "--set", "data.max_per_class=40",
                              "--set", "progress=false",
                              "--set", "parent.train.epochs=30", "--set",
                              "tree.head_train.epochs=30", "--set", "calibration.target_risk=0.5"])
    assert code == 0, err
    run = next((tmp_path / "runs").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_test"] == 242 and metrics["balanced_accuracy"] > 0.5  # chance: 1/6
    assert metrics["fit"]["truncation"]["train"]["truncated"] > 0
    code, out, err = run_cli(["tree", "predict", str(run), "an email client with IMAP support"])
    assert code == 0 and "mail" in out, (out, err)
