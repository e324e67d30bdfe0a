"""Every bad input a user can give the command line, with the one-line error it gets.

Each case runs the real command (in-process) and must end with exit status 2, one line on
stderr starting with ``branchnet: error:`` (besides notes on skipped runs), no traceback, and
no run folder left behind. The
table of all cases is ``docs/errors.md``, and the reference of every config key is
``docs/config.md``: this test writes both, and fails when a committed file differs from what the
code now says (then commit the regenerated file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from branchnet.runs import Run
from cli_helpers import DIGITS_CONFIG, run_cli, write_config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"

TINY_TRAIN = {"epochs": 1, "batch_size": 32}
CONFIGS: dict[str, dict[str, Any]] = {
    "tree": {**DIGITS_CONFIG, "parent": {**DIGITS_CONFIG["parent"], "train": TINY_TRAIN}},
    "model": {"name": "clf", "data": {"source": "digits", "max_per_class": 30},
              "model": {"kind": "mlp", "sizes": ["auto", 16]}, "train": TINY_TRAIN,
              "progress": False},
    "vbranch": {"name": "vb", "data": {"source": "digits", "max_per_class": 30},
                "model": {"kind": "mlp", "sizes": ["auto", 16], "branches": 2, "shared_frac": 0.5},
                "train": TINY_TRAIN, "progress": False},
    "tree-text": {"name": "text", "data": {"source": "train.jsonl", "test_source": "test.jsonl",
                                          "group_column": "group", "val_fraction": 0.4},
                  "hierarchy": "groups",
                  "parent": {"model": {"kind": "transformer", "source": "tiny"}, "tap": "layer.0",
                             "train": TINY_TRAIN},
                  "tree": {"head_train": TINY_TRAIN}, "progress": False},
    "probe": {"name": "probe", "data": {"source": "train.jsonl", "test_source": "test.jsonl"},
              "parent": {"model": {"kind": "transformer", "source": "tiny"}}, "progress": False},
    "exits": {"name": "ex", "data": {"source": "digits", "max_per_class": 30},
              "parent": {"model": {"kind": "mlp", "sizes": ["auto", 16, 16]}, "train": TINY_TRAIN},
              "exits": {"taps": ["hidden.0", "hidden.1"], "head_train": TINY_TRAIN},
              "progress": False},
    "plastic": {"name": "pl", "data": {"source": "digits", "max_per_class": 30},
                "model": {"kind": "mlp", "sizes": ["auto", 16]},
                "sparsity": {"rule": "rigl", "density": 0.2}, "train": TINY_TRAIN,
                "progress": False},
}

# (kind, what the user did: --set overrides or a whole-section change, expected message part)
FIT_CASES: list[tuple[str, list[str], str]] = [
    ("tree", ["parent.train.lr=nan"], "parent.train.lr must be a positive number, got 'nan'"),
    ("tree", ["parent.train.epochs=ten"], "parent.train.epochs must be a positive whole number, got 'ten'"),
    ("tree", ["calibration.delta=0"], "calibration.delta must be a number in (0, 1), got 0"),
    ("tree", ["calibration.target_risk=1.5"], "calibration.target_risk must be a number in (0, 1)"),
    ("tree", ["--seed", "99999999999999999999"], "seed must be a whole number in [0, 4294967295]"),
    ("tree", ["data=3", "data.source=x"], "cannot set data.source=x: data is 3, not a mapping"),
    ("tree", ["parnet.tap=x"], "unknown config key 'parnet'; valid keys here"),
    ("tree", ["tree.polcy=soft"], "unknown config key 'tree.polcy'"),
    ("tree", ["tree.policy=greedy"], "tree.policy must be one of ['hard', 'threshold', 'soft', 'topk']"),
    ("tree", ["tree.score=confidence"], "must be one of ['msp', 'margin', 'entropy', 'selfcheck']"),
    ("tree", ["parent.tap=hidden.7"], "parent.tap must be a layer of the parent, got 'hidden.7'"),
    ("tree", ["parent.model.kind=alexnet"], "kind must be one of ['cnn', 'mlp', 'resnet', 'transformer']"),
    ("tree", ["parent.model={kind: transformer, source: tiny}"], "kind 'transformer' needs text"),
    ("tree", ["parent.model.widht=3"], "parent.model: unknown option(s) ['widht']"),
    ("tree", ["parent.model={kind: mlp, sizes: [auto, 0]}"], "parent.model: cannot build mlp"),
    ("tree", ["parent.weights=missing.safetensors"], "parent.weights must be an existing"),
    ("tree", ["data.source=nowhere.npz"], "data.source must be 'digits' or an existing file"),
    ("tree", ["hierarchy=missing.yaml"], "hierarchy must be an existing YAML file"),
    ("tree", ["hierarchy={a: ['0', '1'], b: ['2']}"], "the hierarchy does not cover classes"),
    ("tree", ["calibration={method: coverage}"], "calibration.coverage must be a number in (0, 1]"),
    ("tree", ["calibration.fraction=1"], "calibration.fraction must be a number in (0, 1), got 1"),
    ("tree", ["data.val_fraction=1.5"], "data.val_fraction must be a number in [0, 1), got 1.5"),
    ("tree", ["tree.head.dropout=1"], "tree.head.dropout must be a number in [0, 1), got 1"),
    ("tree", ["parent.train.optimizer=rmsprop"], "must be one of ['adam', 'adamw', 'sgd']"),
    ("tree", ["parent.train.batch_size=0"], "parent.train.batch_size must be a positive whole number"),
    ("tree", ["parent.train.patience=0"], "parent.train.patience must be a positive whole number"),
    ("tree", ["parent.train.lr_schedule=linear"], "must be one of ['cosine', 'step', 'onecycle'] or null"),
    ("tree", ["tree.cache_dtype=int8"], "tree.cache_dtype must be one of ['float16', 'float32']"),
    ("tree", ["parent.labels=medium"], "parent.labels must be one of ['fine', 'coarse']"),
    ("tree", ["data.normalize=zscore"], "data.normalize must be one of"),
    ("tree", ["data.image_size=[8]"], "data.image_size must be"),
    ("tree", ["data.classes=['3', '99']"], "99"),
    ("tree", ["seed=-1"], "seed must be a whole number in [0, 4294967295], got -1"),
    ("tree", ["parent.train.lr"], "override 'parent.train.lr' must look like key.sub=value"),
    ("tree", ["baselines=maybe"], "baselines must be true or false, got 'maybe'"),
    ("tree", ["hierarchy={induce: confusion, groups: 12}"],
     "hierarchy.groups must be at most the number of classes (10), got 12"),
    ("tree", ["hierarchy={induce: spectral}"], "hierarchy induce='spectral' is not allowed"),
    ("tree", ["hierarchy={induce: weights, group: 3}"], "unknown hierarchy induction option(s)"),
    ("tree", ["hierarchy={induce: weights}", "parent.labels=coarse"],
     "an induced hierarchy needs a parent trained on the fine classes"),
    ("tree", ["novelty={classes: ['3']}"], "novelty.classes must be classes the tree does not know"),
    ("tree", ["novelty={score: odin}"], "novelty.score must be one of"),
    ("tree", ["novelty={source: missing.jsonl}"], "novelty.source must be an existing"),
    ("model", ["model.kind=vresnet"], "model.kind must be one of ['alexnet', 'cnn', 'mlp', 'resnet']"),
    ("model", ["model={kind: alexnet, widht: [8, 8, 8]}"], "unknown option(s) ['widht']"),
    ("model", ["model=3"], "model must be a mapping"),
    ("model", ["train.momentum=1.5"], "train.momentum must be a number in [0, 1), got 1.5"),
    ("model", ["train.epoch=3"], "unknown config key 'train.epoch'"),
    ("vbranch", ["model.shared_frac=1.5"], "shared"),
    ("vbranch", ["model.branches=0"], "branches"),
    ("vbranch", ["merge=concat"], "does not match a classifier head"),
    ("vbranch", ["task=regress"], "task must be one of ['classify', 'embed'], got 'regress'"),
    ("vbranch", ["bagging.mode=jackknife"], "bagging.mode must be one of"),
    ("vbranch", ["bagging.frac=0"], "bagging.frac must be a number in (0, 1], got 0"),
    ("vbranch", ["task=embed", "merge=concat"], "embedding.train must list Omniglot"),
    ("vbranch", ["embedding.P=1"], "embedding.P must be a whole number >= 2, got 1"),
    ("plastic", ["sparsity.density=0"], "sparsity.density must be a number in (0, 1], got 0"),
    ("plastic", ["sparsity.rule=magic"], "sparsity.rule must be one of"),
    ("plastic", ["sparsity.t_end=1.5"], "sparsity.t_end must be a number in (0, 1] or a whole number"),
    ("plastic", ["sparsity.t_end=100000"], "sparsity.t_end must be at most the"),
    ("plastic", ["sparsity.distribution=lognormal"], "sparsity.distribution must be one of"),
    ("plastic", ["paths.mode=dynamic"], "paths.mode must be one of"),
    ("plastic", ["task=paths", "paths.widths=[4, 0]"], "paths.widths[1] must be a positive whole"),
    # on texts (files written by _text_files in the config's folder)
    ("tree-text", ["parent.model.source=nowhere"], "source must be an existing Hugging Face model"),
    ("tree-text", ["parent.model.source=pickled-model"], "has only pickled weights (pytorch_model.bin)"),
    ("tree-text", ["parent.model.source=no-tokenizer"], "has no tokenizer"),
    ("tree-text", ["parent.tap=layer.9"], "'layer.9'; its layers are ['embeddings', 'layer.0', 'layer.1']"),
    ("tree-text", ["parent.model.pooling=max"], "must be one of ['cls', 'mean', 'last'], got 'max'"),
    ("tree-text", ["parent.model.max_length=1000"], "max_length must be an integer in [2, 256]"),
    ("tree-text", ["parent.model={kind: mlp}"], "kind 'mlp' needs tensor inputs, but the data is text"),
    ("tree-text", ["data.label_column=section"], "no column 'section'; the row has columns"),
    ("tree-text", ["data.source=empty-text.jsonl"], "line 1: column 'text' is empty"),
    ("tree-text", ["data.source=number-text.jsonl"], "not a string"),
    ("tree-text", ["data.group_column=null"], "hierarchy: groups needs data with a group column"),
    ("tree-text", ["data.test_source=missing.jsonl"], "data.test_source must be an existing file"),
    ("tree-text", ["parent.weights=train.jsonl"], "parent.weights must be null for a transformer parent"),
    ("tree-text", ["tree.selfcheck.fraction=1"], "tree.selfcheck.fraction must be a number in (0, 1)"),
    ("exits", ["exits.taps=[hidden.1, hidden.0]"], "taps must be in the order the parent runs them"),
    ("exits", ["exits.taps=[head.x]"], "taps must be layers of the parent, got ['head.x']"),
    ("exits", ["exits.taps=[]"], "taps must name at least one layer of the parent, got []"),
    ("exits", ["calibration.epsilon=0"], "calibration.epsilon must be a number in (0, 1), got 0"),
    ("exits", ["calibration.delta=1"], "calibration.delta must be a number in (0, 1), got 1"),
    ("exits", ["calibration.kind=speed"], "calibration.kind must be one of ['consistency', 'accuracy',"),
    ("exits", ["exits.rule=fast"], "exits.rule must be one of ['msp', 'margin', 'entropy', 'patience']"),
    ("exits", ["calibration.threshold=[0.5]"], "calibration.threshold must be one number or one per exit"),
    ("probe", ["layers=[layer.9]"], "layers must be taps of the parent, got ['layer.9']"),
    ("probe", ["targets=[sections]"], "targets"),
]


def _text_files(folder: Path) -> None:
    """The data and model folders the text cases name, in the folder of their config."""
    rows = [{"text": f"text number {i}", "label": "ab"[i % 2], "group": "g"} for i in range(20)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    (folder / "empty-text.jsonl").write_text(json.dumps({"text": " ", "label": "a", "group": "g"}) + "\n")
    (folder / "number-text.jsonl").write_text(json.dumps({"text": 7, "label": "a", "group": "g"}) + "\n")
    for name, files in (("pickled-model", ["config.json", "pytorch_model.bin", "vocab.txt"]),
                        ("no-tokenizer", ["config.json", "model.safetensors"])):
        (folder / name).mkdir()
        for f in files:
            (folder / name / f).write_text("{}")


def _fit_argv(kind: str, change: list[str], config: Path, out: Path) -> list[str]:
    argv = [kind.split("-")[0], "fit", str(config), "--out", str(out)]
    if change[0] == "--seed":
        return argv + change
    for item in change:
        argv += ["--set", item]
    return argv


@pytest.fixture(scope="module")
def finished_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    code, _, err = run_cli(["tree", "fit", str(write_config(tmp / "t.yaml", CONFIGS["tree"])),
                            "--out", str(tmp / "runs")])
    assert code == 0, err
    return next((tmp / "runs").iterdir())


def _other_cases(tmp: Path, finished: Path, unfinished: Run) -> list[tuple[str, list[str], str]]:
    """Commands other than fit: (what, argv, expected message part)."""
    unfinished.write_config(CONFIGS["tree"])
    np.save(tmp / "bad.npy", np.zeros((3, 5, 5, 5)))
    (tmp / "list.yaml").write_text("- a\n- b\n")
    (tmp / "broken.yaml").write_text("name: [unclosed\n")
    return [
        ("tree fit, no config", ["tree", "fit"], "give a CONFIG file, or --resume RUN"),
        ("config file missing", ["tree", "fit", str(tmp / "missing.yaml")], "does not exist"),
        ("config file not a mapping", ["tree", "fit", str(tmp / "list.yaml")],
         "must hold a mapping of keys, got list"),
        ("config file not YAML", ["tree", "fit", str(tmp / "broken.yaml")], "is not valid YAML"),
        ("resume a folder that is no run", ["tree", "fit", "--resume", str(tmp)],
         "is not a branchnet run folder (no config.yaml)"),
        ("resume a run of another kind", ["model", "fit", "--resume", str(finished)],
         "is a tree run; resume it with: branchnet tree fit --resume"),
        ("eval a folder that is no run", ["tree", "eval", str(tmp)], "is not a branchnet run folder"),
        ("eval an unfinished run", ["tree", "eval", str(unfinished.path)], "has no saved tree yet"),
        ("eval a run of another kind", ["model", "eval", str(finished)], "is a tree run, not a model run"),
        ("predict a missing input", ["tree", "predict", str(finished), str(tmp / "missing.npy")],
         "does not exist"),
        ("predict inputs of the wrong shape", ["tree", "predict", str(finished), str(tmp / "bad.npy")],
         "expected images shaped"),
        ("compare runs none of which finished", ["tree", "compare", str(unfinished.path)],
         "none of the 1 run(s) has finished"),
        ("one-shot accuracy of a run that is no embedding run",
         ["vbranch", "oneshot", "--runs", str(tmp), "--run", str(finished)],
         "is a tree run; one-shot evaluation needs a vbranch run"),
        ("analyze an unfinished run", ["analyze", "specialization", str(unfinished.path)],
         "has no saved tree yet"),
    ]


def _normalise(text: str, *folders: Path) -> str:
    """The message with the test's folders as DIR and RUN (run folder names hold the time)."""
    for path, name in zip(folders, ("UNFINISHED", "RUN", "DIR"), strict=False):
        text = text.replace(str(path), name)
    return text.replace(str(ROOT), ".").strip()


def _check(argv: list[str], expected: str, out: Path | None = None) -> str:
    code, _, err = run_cli(argv)
    lines = [line for line in err.strip().splitlines() if not line.startswith("skipping ")]
    assert code == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("branchnet: error: "), (argv, err)
    assert expected in lines[0], (argv, lines[0])
    assert "Traceback" not in err
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), f"{argv} left a run folder behind"
    return lines[0][len("branchnet: error: "):]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def test_every_bad_input_is_one_line_before_any_work(tmp_path: Path, finished_tree: Path) -> None:
    rows: dict[str, list[tuple[str, str]]] = {}
    configs = {k: write_config(tmp_path / f"{k}.yaml", c) for k, c in CONFIGS.items()}
    _text_files(tmp_path)
    for i, (kind, change, expected) in enumerate(FIT_CASES):
        out = tmp_path / f"runs-{i}"
        message = _check(_fit_argv(kind, change, configs[kind], out), expected, out)
        what = " ".join(change) if change[0] == "--seed" else " ".join(f"--set {c}" for c in change)
        command, _, variant = kind.partition("-")
        config = f"{variant.upper()}_CONFIG" if variant else "CONFIG"
        rows.setdefault(f"branchnet {command} fit {config}", []).append(
            (f"`{what}`", _normalise(message.replace(str(tmp_path), "DIR"))))
    unfinished = Run.create(tmp_path / "unfinished-runs", "unfinished")
    for what, argv, expected in _other_cases(tmp_path, finished_tree, unfinished):
        message = _check(argv, expected)
        rows.setdefault("other commands", []).append(
            (what, _normalise(message, unfinished.path, finished_tree, tmp_path)))
    n = sum(len(r) for r in rows.values())
    lines = ["# Errors: every bad input and what branchnet says", "",
             "Generated by `tests/test_errors_doc.py` from the code itself (the test fails when "
             "this file is out of date). Every case ends with exit status 2, one line on stderr, "
             "no traceback (`branchnet --debug ...` shows one), and, for `fit`, before any work: no "
             "run folder is created. `DIR`, `RUN` (a finished tree run) and `UNFINISHED` (a run "
             "that never finished) stand for folders of the test. CONFIG is a small valid "
             "config of the kind, TEXT_CONFIG one on a text file with a tiny transformer parent "
             "(`tests/test_errors_doc.py` has them).", "",
             f"{n} cases.", ""]
    for section, items in rows.items():
        lines += [f"## {section}", "", "| input | message |", "|---|---|"]
        lines += [f"| {_cell(a)} | {_cell(b)} |" for a, b in items]
        lines.append("")
    _check_generated(DOC, "\n".join(lines))
    assert n >= 40


def _check_generated(path: Path, text: str) -> None:
    """``path`` holds ``text``; else it is rewritten and the test fails (commit the new file)."""
    old = path.read_text() if path.is_file() else ""
    if old != text:
        path.write_text(text)
        pytest.fail(f"{path} was out of date and has been regenerated: commit it")


def test_config_reference_is_generated_from_the_schemas() -> None:
    from branchnet import kinds
    from branchnet.schema import reference

    lines = ["# Config reference: every key of every run kind", "",
             "Generated by `tests/test_errors_doc.py` from the schemas the code validates with "
             "(the test fails when this file is out of date), so what is allowed here is what "
             "`branchnet KIND fit` accepts. `model` and `hierarchy` are free-form: a model spec is "
             "`{kind: NAME, ...the builder's arguments}` (see `branchnet.zoo.MODELS`; unknown "
             "options are errors), a hierarchy a nested mapping, a YAML file or a built-in name. "
             "The top-level `seed` overrides the `seed` of every `train` section.", ""]
    for kind in kinds.KINDS:
        rows = reference(kinds.get(kind).schema)
        lines += [f"## {kind}", "", f"{kinds.KINDS[kind].help}; `branchnet {kind} fit CONFIG`.", "",
                  "| key | allowed | default |", "|---|---|---|"]
        lines += [f"| `{r['key']}` | {_cell(r['allowed'])} | `{_cell(r['default'])}` |" for r in rows]
        lines.append("")
    _check_generated(ROOT / "docs" / "config.md", "\n".join(lines))


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "t.yaml", CONFIGS["tree"])
    code, _, err = run_cli(["--debug", "tree", "fit", str(cfg), "--set", "parent.tap=nope",
                            "--out", str(tmp_path / "runs")])
    assert code == 2 and "Traceback" in err and err.strip().endswith(
        "branchnet: error: parent.tap must be a layer of the parent, got 'nope'; its layers are "
        "['flatten', 'hidden', 'hidden.0', 'hidden.0.linear', 'hidden.0.act', 'hidden.0.drop', "
        "'hidden.1', 'hidden.1.linear', 'hidden.1.act', 'hidden.1.drop', 'head']")


def test_shipped_configs_pass_their_schema() -> None:
    from branchnet import kinds
    from branchnet.config import read_yaml

    prefixes = {"vbranch": "vbranch", "plastic": "plastic", "specialization": "model",
                "probe": "probe", "exits": "exits", "model": "model"}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        kind = next((k for p, k in prefixes.items() if path.name.startswith(p)), "tree")
        kinds.get(kind).schema.model_validate(read_yaml(path))
