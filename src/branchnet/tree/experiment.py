"""A tree experiment from a YAML config: data, parent, branches, calibration, report.

This is what ``branchnet tree fit CONFIG`` and ``branchnet demo`` run. The config is merged
into :data:`DEFAULTS` (unknown keys are errors), written resolved into the run folder, and
the run can be resumed after an interruption.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from branchnet import metrics, models
from branchnet.config import DATA_DEFAULTS, load_config, load_data, resolve_paths
from branchnet.data import Data, Split
from branchnet.data.batches import TensorPairs
from branchnet.data.hierarchy import Hierarchy
from branchnet.engine import TrainConfig, fit
from branchnet.report import Report, plot_training_curves
from branchnet.runs import Run
from branchnet.tree.evaluate import evaluate, summary_rows
from branchnet.tree.tree import HEAD_TRAIN_DEFAULTS, BranchTree, TreeError

DEFAULTS: dict[str, Any] = {
    "name": "tree",
    "seed": 0,
    "data": DATA_DEFAULTS,
    "hierarchy": None,
    "parent": {
        "model": {"kind": "mlp", "sizes": ["auto", 256, 128], "dropout": 0.0},
        "tap": "hidden.1",
        "labels": "fine",
        "weights": None,
        "train": {**TrainConfig().to_dict(), "epochs": 20},
    },
    "tree": {
        "router": "parent", "node_input": "parent", "branch_tap": "hidden.0", "policy": "hard",
        "score": "msp", "backoff": False, "head": {"hidden": 256, "dropout": 0.5},
        "head_train": {**TrainConfig().to_dict(), **HEAD_TRAIN_DEFAULTS},
        "cache_dir": None, "cache_dtype": "float16",
    },
    "calibration": {"method": "risk", "target_risk": 0.05, "delta": 0.05, "coverage": None,
                    "threshold": 0.96, "fraction": 0.5},
    "baselines": False,
    "progress": True,
}

def load_tree_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A tree experiment's YAML config merged into :data:`DEFAULTS`."""
    return load_config(path, overrides, DEFAULTS)


def resolve_hierarchy(spec: Any, classes: list[str], config_dir: Path | None) -> Hierarchy:
    if spec is None:
        return Hierarchy.flat(classes)
    if isinstance(spec, dict):
        return Hierarchy.from_dict(spec).bind(classes)
    if isinstance(spec, str) and spec in ("cifar10", "cifar100"):
        full = Hierarchy.builtin(spec)
        return _restrict(full, classes)
    path = Path(spec)
    if not path.exists() and config_dir is not None:
        path = config_dir / spec
    return Hierarchy.from_yaml(path).bind(classes)


def _restrict(h: Hierarchy, classes: list[str]) -> Hierarchy:
    """A built-in hierarchy cut down to the classes present (empty groups dropped)."""
    def prune(node: str) -> list[Any]:
        out: list[Any] = []
        for kid in h.children(node):
            if h.is_leaf(kid):
                if kid in classes:
                    out.append(kid)
            else:
                sub = prune(kid)
                if sub:
                    out.append({kid: sub})
        return out
    return Hierarchy.from_dict({"root": prune("root")}).bind(classes)


def build_parent(cfg: dict[str, Any], data: Data, hier: Hierarchy) -> torch.nn.Module:
    spec = dict(cfg["parent"]["model"])
    if spec.get("kind") not in ("mlp", "cnn"):
        raise TreeError(f"parent.model.kind must be 'mlp' or 'cnn', got {spec.get('kind')!r}")
    n_out = len(data.classes) if cfg["parent"]["labels"] == "fine" else len(hier.children("root"))
    spec["num_classes"] = n_out
    if spec.get("kind") == "mlp":
        sizes = list(spec["sizes"])
        if sizes and sizes[0] == "auto":
            sizes[0] = int(np.prod(data.input_shape))
        spec["sizes"] = sizes
    elif spec.get("kind") == "cnn":
        spec.setdefault("in_channels", data.input_shape[0])
        spec.setdefault("widths", [32, 64, 128])
        spec.setdefault("hidden", 256)
    with torch.random.fork_rng():
        torch.manual_seed(cfg["seed"])
        parent = models.build(spec)
    weights = cfg["parent"]["weights"]
    if weights:
        parent.load_state_dict(load_file(str(weights)))
    return parent


def make_tree(cfg: dict[str, Any], parent: torch.nn.Module, run: Run) -> BranchTree:
    t, seed = cfg["tree"], cfg["seed"]
    head_cfg = t["head"]

    def head(n_in: int, n_out: int) -> torch.nn.Module:
        return models.branch_head(n_in, n_out, hidden=head_cfg["hidden"],
                                  dropout=head_cfg["dropout"])

    return BranchTree(
        parent, cfg["parent"]["tap"], router=t["router"], node_input=t["node_input"],
        branch_tap=t["branch_tap"], head=head, policy=t["policy"], score=t["score"],
        backoff=t["backoff"], train_parent=not cfg["parent"]["weights"],
        parent_train={**cfg["parent"]["train"], "seed": seed, "progress": cfg["progress"]},
        parent_labels=cfg["parent"]["labels"],
        head_train={**t["head_train"], "seed": seed, "progress": cfg["progress"]},
        workdir=run.work, cache_dir=t["cache_dir"], cache_dtype=t["cache_dtype"],
        progress=cfg["progress"],
    )


def split_validation(data: Data, cfg: dict[str, Any]) -> tuple[Split, Split]:
    """Split the validation set: one part selects models (early stopping), the other,
    ``calibration.fraction`` of it, is used only to calibrate thresholds, so the guarantee's
    assumption (calibration data independent of the fitted model) holds."""
    frac = cfg["calibration"]["fraction"]
    if not 0 < frac < 1:
        raise TreeError(f"calibration.fraction must be in (0, 1), got {frac}")
    return data.val.split(frac, seed=cfg["seed"])


def run_baselines(cfg: dict[str, Any], tree: BranchTree, data: Data, select: Split,
                  run: Run) -> dict[str, Any]:
    """Per branch: an MLP of the branch's size on raw inputs, and the flat parent on the same
    classes (its probabilities summed per child group), both on the branch's test inputs."""
    lay = tree._require_fit()
    out: dict[str, Any] = {}
    head_cfg, seed = cfg["tree"]["head"], cfg["seed"]
    train_cfg = TrainConfig.from_dict({**cfg["tree"]["head_train"], "seed": seed,
                                       "progress": cfg["progress"]})
    with torch.inference_mode():
        parent_probs = torch.softmax(tree.parent(data.test.x), dim=1)
    if cfg["parent"]["labels"] == "fine":
        out["parent_flat_accuracy"] = metrics.accuracy(parent_probs.argmax(1), data.test.y)
    for i, node in enumerate(lay.nodes):
        if i == 0 or lay.n_children[i] < 2:
            continue
        part = {}
        for name, split in (("train", data.train), ("val", select), ("test", data.test)):
            slots = lay.slot_of_label(node, split.y)
            rows = torch.nonzero(slots >= 0).flatten()
            part[name] = (rows, split.x[rows], slots[rows])
        torch.manual_seed(seed)
        raw = models.mlp([int(np.prod(data.input_shape)), head_cfg["hidden"]], lay.n_children[i],
                         dropout=head_cfg["dropout"])
        fit(raw, TensorPairs(*part["train"][1:]), TensorPairs(*part["val"][1:]), train_cfg,
            workdir=run.work / "baselines" / f"raw-{i:02d}", resume=True,
            description=f"raw-input MLP for {node!r}")
        rows_te, x_te, s_te = part["test"]
        with torch.inference_mode():
            raw_acc = metrics.accuracy(raw.eval()(x_te).argmax(1), s_te)
        rec: dict[str, Any] = {"raw_mlp_accuracy": raw_acc,
                               "raw_mlp_parameters": models.num_parameters(raw)}
        if cfg["parent"]["labels"] == "fine":
            # the parent's class probabilities summed per child of this node
            groups = torch.zeros(len(lay.classes), lay.n_children[i])
            slots_all = lay.slot_of_label(node, torch.arange(len(lay.classes)))
            for c, slot in enumerate(slots_all.tolist()):
                if slot >= 0:
                    groups[c, slot] = 1.0
            p_te = parent_probs[rows_te]
            rec["parent_restricted_accuracy"] = metrics.accuracy((p_te @ groups).argmax(1), s_te)
            rec["parent_flat_accuracy_on_these"] = metrics.accuracy(
                p_te.argmax(1), data.test.y[rows_te])
        out[node] = rec
    return out


def run_experiment(cfg: dict[str, Any], run: Run, *, resume: bool = False,
                   config_dir: Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Fit, calibrate, evaluate and report one tree experiment into ``run``."""
    t0 = time.perf_counter()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    cfg = resolve_paths(cfg, config_dir)
    run.write_config(cfg)
    data = load_data(cfg, config_dir)
    say(f"data       {data.summary()}")
    hier = resolve_hierarchy(cfg["hierarchy"], data.classes, config_dir)
    say("hierarchy  " + hier.render().replace("\n", "\n           "))
    parent = build_parent(cfg, data, hier)
    tree = make_tree(cfg, parent, run)
    select, calibration = split_validation(data, cfg)
    say(f"validation {len(select)} inputs for early stopping, {len(calibration)} held out for "
        "calibration only")
    tree.fit(data, select, hierarchy=hier, resume=resume)
    c = cfg["calibration"]
    calib = tree.calibrate(calibration, method=c["method"], target_risk=c["target_risk"],
                           delta=c["delta"], coverage=c["coverage"], threshold=c["threshold"])
    result, figures = evaluate(tree, data.test)
    result["fit"] = tree.fit_summary
    result["data"] = {"summary": data.summary(), "classes": data.classes}
    if cfg["baselines"]:
        say("baselines  raw-input MLPs of each branch's size, flat parent on the same classes")
        result["baselines"] = run_baselines(cfg, tree, data, select, run)
    tree.save(run.path / "tree")
    histories = {"parent": run.work / "parent" / "metrics.csv"}
    histories.update({f"branch {p.name[3:]}": p / "metrics.csv"
                      for p in sorted((run.work / "nodes").glob("*")) if p.is_dir()})
    figures["training"] = plot_training_curves(histories)
    result["seconds"] = time.perf_counter() - t0
    run.write_metrics(result)
    for name, fig in figures.items():
        run.save_figure(fig, name)
    write_tree_report(run, cfg, result, hier, calib)
    return result


def write_tree_report(run: Run, cfg: dict[str, Any], result: dict[str, Any], hier: Hierarchy,
                      calib: dict[str, Any]) -> Path:
    rep = Report(f"branchnet tree: {cfg['name']}")
    rep.add_text(result["data"]["summary"])
    rep.add_heading("Summary (test split)")
    rep.add_table(summary_rows(result))
    rep.add_text(f"calibration: {calib}", muted=True)
    rep.add_heading("Hierarchy")
    rep.add_pre(hier.render())
    rep.add_heading("Figures")
    captions = {"training": "training curves (validation)", "risk_coverage": "risk-coverage curve",
                "confusion": "confusion matrix", "branches": "branches on their own classes"}
    for name, caption in captions.items():
        p = run.figures / f"{name}.png"
        if p.is_file():
            rep.add_figure(p, caption)
    rep.add_heading("Branches as Neural-Branching measured them (threshold 0.96)")
    rep.add_table([{"branch": n, "n": b["n_test"], "overall_acc": b["overall_accuracy"],
                    "accepted": b["at_0.96"]["accepted"], "coverage": b["at_0.96"]["coverage"],
                    "acc_on_accepted": b["at_0.96"]["accuracy_on_accepted"], "aurc": b["aurc"]}
                   for n, b in result["branches"].items()])
    if "baselines" in result:
        rep.add_heading("Baselines")
        rep.add_table([{"branch": n, **v} for n, v in result["baselines"].items()
                       if isinstance(v, dict)])
    rep.add_heading("Per class")
    rep.add_table(result["per_class"])
    rep.add_heading("Configuration")
    rep.add_pre(yaml.safe_dump(cfg, sort_keys=False))
    return rep.write(run.path / "report.html")


def _mean_std(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    arr = np.asarray(vals, dtype=float)
    return f"{arr.mean():.4f} ± {arr.std(ddof=1) if len(arr) > 1 else 0.0:.4f}"


def compare_runs(run_dirs: list[str | Path]) -> str:
    """A markdown summary (mean ± std over the runs, e.g. seeds) of finished tree runs."""
    results = [Run.open(p).read_metrics() for p in run_dirs]
    if not results:
        raise TreeError("no runs given")
    n = len(results)
    lines = [f"{n} run(s): " + ", ".join(str(Path(p).name) for p in run_dirs), "",
             "| end to end | mean ± std |", "|---|---|"]
    for key, label in [("accuracy", "accuracy (routed class, all inputs)"),
                       ("coverage", "coverage at the calibrated threshold"),
                       ("accuracy_on_accepted", "accuracy on accepted"),
                       ("aurc", "AURC"), ("eaurc", "E-AURC")]:
        lines.append(f"| {label} | {_mean_std([r.get(key) for r in results])} |")
    lines.append(f"| hierarchical F1 | {_mean_std([r['hierarchical']['hF'] for r in results])} |")
    if all("baselines" in r for r in results):
        lines.append("| flat parent accuracy (all classes) | "
                     f"{_mean_std([r['baselines'].get('parent_flat_accuracy') for r in results])} |")
    lines.append(f"| calibrated threshold | "
                 f"{_mean_std([r['calibration'].get('threshold') for r in results])} |")
    branches = list(results[0]["branches"])
    rows = [("overall accuracy", lambda b, r, n: b["overall_accuracy"]),
            ("accepted at 0.96 (fraction)", lambda b, r, n: b["at_0.96"]["coverage"]),
            ("accuracy on accepted at 0.96", lambda b, r, n: b["at_0.96"]["accuracy_on_accepted"]),
            ("accepted at calibrated threshold", lambda b, r, n: b.get("at_calibrated", {})
             .get("coverage")),
            ("accuracy on accepted, calibrated", lambda b, r, n: b.get("at_calibrated", {})
             .get("accuracy_on_accepted")),
            ("AURC", lambda b, r, n: b["aurc"]),
            ("MLP of the branch's size on raw pixels", lambda b, r, n: r.get("baselines", {})
             .get(n, {}).get("raw_mlp_accuracy")),
            ("flat parent, restricted to these classes", lambda b, r, n: r.get("baselines", {})
             .get(n, {}).get("parent_restricted_accuracy")),
            ("flat parent, all classes, on these inputs", lambda b, r, n: r.get("baselines", {})
             .get(n, {}).get("parent_flat_accuracy_on_these"))]
    lines += ["", "| per branch (its own test inputs) | " + " | ".join(branches) + " |",
              "|---|" + "---|" * len(branches)]
    for label, get in rows:
        cells = [_mean_std([get(r["branches"][b], r, b) if b in r["branches"] else None
                            for r in results]) for b in branches]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
