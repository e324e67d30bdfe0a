"""The ``branchnet`` command line.

::

    branchnet demo                           the tree story on digits, in under a minute
    branchnet tree fit CONFIG [--set k=v]    fit, calibrate, evaluate, report -> a new run folder
    branchnet tree fit --resume RUN          continue an interrupted run where it stopped
    branchnet tree eval RUN [--split test]   re-evaluate a saved tree
    branchnet tree predict RUN INPUT         route images / arrays through a saved tree
    branchnet tree compare RUN [RUN ...]     mean ± std of finished runs, as markdown
    branchnet model fit CONFIG [--set k=v]   train one classifier -> a new run folder
    branchnet model fit --resume RUN         continue an interrupted classifier run
    branchnet model eval RUN [--split test]  re-evaluate a run's saved classifier
    branchnet vbranch fit CONFIG [--set k=v] train a K-branch virtual ensemble -> a run folder
    branchnet vbranch eval RUN [--split test] re-evaluate a run's saved ensemble
    branchnet vbranch oneshot --runs DIR --run RUN   20-way one-shot accuracy of an embedding run
    branchnet vbranch sweep CONFIG ...       K x shared_frac x bagging x seeds, then compare
    branchnet vbranch compare RUN [RUN ...]  mean ± std per setting, with independent ensembles
    branchnet plastic fit CONFIG [--set k=v] dynamic sparse training or plastic residual paths
    branchnet plastic compare RUN [RUN ...]  mean ± std per rule and density (or path mode)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

DEMO_CONFIG: dict[str, Any] = {
    "name": "demo-digits",
    "seed": 0,
    "data": {"source": "digits", "val_fraction": 0.5, "test_fraction": 0.2},
    "hierarchy": {"round": ["0", "6", "8", "9"], "straight": ["1", "4", "7"],
                  "curly": ["2", "3", "5"]},
    "parent": {"model": {"kind": "mlp", "sizes": [64, 256, 128], "dropout": 0.1},
               "tap": "hidden.1", "train": {"epochs": 30, "batch_size": 32, "lr": 1e-3,
                                            "patience": 8}},
    "tree": {"head": {"hidden": 128, "dropout": 0.3},
             "head_train": {"epochs": 60, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.0,
                            "patience": 8}},
    "calibration": {"method": "risk", "target_risk": 0.05, "delta": 0.1},
    "progress": False,
}


def _print_result(result: dict[str, Any], run_path: Path) -> None:
    from branchnet.metrics import format_table
    from branchnet.tree.evaluate import summary_rows

    print()
    print(format_table(summary_rows(result)))
    cal = result["calibration"]
    if cal.get("method") == "risk" and not cal.get("feasible"):
        print(f"\nno threshold reaches selective risk <= {cal['target_risk']} with probability "
              f">= {1 - cal['delta']:.2f} on {cal['n_calibration']} calibration inputs: the tree "
              "abstains on everything (use more calibration data or a larger target risk)")
    elif cal.get("method") == "risk":
        print(f"\ncalibrated threshold {cal['threshold']:.4f}: selective risk <= "
              f"{cal['target_risk']} with probability >= {1 - cal['delta']:.2f} "
              f"(bound {cal['risk_bound']:.4f} on {cal['n_calibration']} held-out calibration inputs)")
    acc = result["accuracy_on_accepted"]
    print(f"test: accuracy {result['accuracy']:.4f}; accepted {result['accepted']}/"
          f"{result['n_test']} ({result['coverage']:.1%}), accuracy on accepted "
          + (f"{acc:.4f}" if acc is not None else "n/a")
          + f"; hF {result['hierarchical']['hF']:.4f}")
    print(f"\nrun folder: {run_path}  (report.html, metrics.json, figures/, tree/)")


def cmd_demo(args: argparse.Namespace) -> int:
    from branchnet.config import merge_config
    from branchnet.runs import Run
    from branchnet.tree.experiment import DEFAULTS, run_experiment

    t0 = time.perf_counter()
    cfg = merge_config(DEFAULTS, DEMO_CONFIG)
    cfg["seed"] = args.seed
    run = Run.create(args.out, cfg["name"])
    print("branchnet demo: a parent MLP on digits, one branch per group of digits, routed and "
          "calibrated to abstain when unsure\n")
    result = run_experiment(cfg, run)
    _print_result(result, run.path)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def _open_or_create_run(args: argparse.Namespace, load: Any,
                        command: str) -> tuple[Any, dict[str, Any], Path | None]:
    """``fit CONFIG`` makes a new run folder; ``fit --resume RUN`` reopens one with its config."""
    from branchnet.runs import Run

    if args.resume:
        run = Run.open(args.resume)
        cfg = load(run.path / "config.yaml", args.set)
        config_dir = Path(args.config).resolve().parent if args.config else None
    else:
        if not args.config:
            raise SystemExit(f"branchnet {command} fit: give a CONFIG file, or --resume RUN")
        cfg = load(args.config, args.set)
        if args.seed is not None:
            cfg["seed"] = args.seed
        config_dir = Path(args.config).resolve().parent
        run = Run.create(args.out, cfg["name"] + f"-s{cfg['seed']}")
    if args.no_progress:
        cfg["progress"] = False
    print(f"run folder: {run.path}")
    return run, cfg, config_dir


def cmd_tree_fit(args: argparse.Namespace) -> int:
    from branchnet.tree.experiment import load_tree_config, run_experiment

    run, cfg, config_dir = _open_or_create_run(args, load_tree_config, "tree")
    if args.devices:
        cfg["parent"]["train"]["devices"] = args.devices
    result = run_experiment(cfg, run, resume=bool(args.resume), config_dir=config_dir)
    _print_result(result, run.path)
    return 0


def _load_run_tree(run_dir: str) -> tuple[Any, Any]:
    from branchnet.runs import Run
    from branchnet.tree.tree import BranchTree

    run = Run.open(run_dir)
    if not (run.path / "tree" / "tree.json").is_file():
        raise SystemExit(f"{run.path} has no saved tree yet (the run did not finish); "
                         f"resume it with: branchnet tree fit --resume {run.path}")
    return run, BranchTree.load(run.path / "tree")


def cmd_tree_eval(args: argparse.Namespace) -> int:
    from branchnet.config import load_data
    from branchnet.tree.evaluate import evaluate
    from branchnet.tree.experiment import load_tree_config

    run, tree = _load_run_tree(args.run)
    cfg = load_tree_config(run.path / "config.yaml")
    cfg["progress"] = False
    data = load_data(cfg)
    split = data.splits()[args.split]
    result, figures = evaluate(tree, split)
    name = f"eval-{args.split}-{time.strftime('%Y%m%d-%H%M%S')}"
    run.write_metrics(result, f"{name}.json")
    for fig_name, fig in figures.items():
        run.save_figure(fig, f"{name}-{fig_name}")
    _print_result(result, run.path)
    print(f"metrics written to {run.path / (name + '.json')}")
    return 0


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def read_inputs(path: Path, preprocessing: dict[str, Any]) -> tuple[Any, list[str]]:
    """Raw inputs from an image, a folder of images, or a .npy / .npz array, prepared like the
    training data. Returns (tensor, names)."""
    from branchnet.data import DataError, apply_preprocessing, read_image_files

    if not path.exists():
        raise DataError(f"input {path} does not exist")
    if path.suffix in (".npy", ".npz"):
        arr = np.load(path, allow_pickle=False)
        if path.suffix == ".npz":
            arr = arr["x"] if "x" in arr.files else arr[arr.files[0]]
        return apply_preprocessing(arr, preprocessing), [f"{path.name}[{i}]" for i in range(len(arr))]
    files = (sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
             if path.is_dir() else [path])
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {path}")
    size = preprocessing.get("image_size") or preprocessing.get("input_shape", [None] * 3)[1:]
    # digits and uint8 arrays record no image mode: read files like apply_preprocessing does
    mode = preprocessing.get("image_mode") or ("L" if preprocessing.get("channels") == 1 else "RGB")
    raw = read_image_files(files, size=tuple(size) if size and all(size) else None, mode=mode)
    return apply_preprocessing(raw, preprocessing), [str(f) for f in files]


def cmd_tree_predict(args: argparse.Namespace) -> int:
    from branchnet.metrics import format_table

    _, tree = _load_run_tree(args.run)
    x, names = read_inputs(Path(args.input), tree.preprocessing)
    pred = tree.predict(x)
    records = pred.to_records(k=args.top)
    if args.json:
        for name, rec in zip(names, records, strict=True):
            print(json.dumps({"input": name, **rec}))
    else:
        rows = [{"input": n, "prediction": r["prediction"] or "(abstain)",
                 "path": " > ".join(r["path"]), "confidence": r["confidence"], "why": r["why"]}
                for n, r in zip(names, records, strict=True)]
        print(format_table(rows))
    return 0


def cmd_tree_compare(args: argparse.Namespace) -> int:
    from branchnet.tree.experiment import compare_runs

    print(compare_runs(args.runs))
    return 0


def _print_model_result(result: dict[str, Any], run_path: Path | None) -> None:
    from branchnet.classifier import summary_rows
    from branchnet.metrics import format_table

    print()
    print(format_table(summary_rows(result)))
    print()
    print(format_table([{k: r[k] for k in ("class", "support", "accuracy")}
                        for r in result["per_class"]]))
    if run_path is not None:
        print(f"\nrun folder: {run_path}  (report.html, metrics.json, figures/, model/)")


def cmd_model_fit(args: argparse.Namespace) -> int:
    from branchnet.classifier import load_classifier_config, run_classifier

    run, cfg, config_dir = _open_or_create_run(args, load_classifier_config, "model")
    result = run_classifier(cfg, run, resume=bool(args.resume), config_dir=config_dir)
    _print_model_result(result, run.path)
    return 0


def cmd_model_eval(args: argparse.Namespace) -> int:
    from branchnet.classifier import evaluate_model, load_classifier_config, load_model
    from branchnet.config import load_data
    from branchnet.runs import Run

    run = Run.open(args.run)
    model, meta = load_model(run.path)
    cfg = load_classifier_config(run.path / "config.yaml")
    cfg["progress"] = False
    data = load_data(cfg)
    if data.classes != meta["classes"]:
        raise SystemExit(f"branchnet model eval: the data's classes {data.classes} differ from the "
                         f"saved model's {meta['classes']}")
    result = evaluate_model(model, data.splits()[args.split], data.classes)
    result = {"split": args.split, "n_test": result.pop("n"), **result}
    name = f"eval-{args.split}-{time.strftime('%Y%m%d-%H%M%S')}"
    run.write_metrics(result, f"{name}.json")
    _print_model_result(result, None)
    print(f"\n{args.split}: accuracy {result['accuracy']:.4f}, NLL {result['nll']:.4f}, "
          f"ECE {result['ece']:.4f} on {result['n_test']} inputs")
    print(f"metrics written to {run.path / (name + '.json')}")
    return 0


def _analysis_target(run_dir: str) -> tuple[Any, Any, str | None]:
    """(model, data, default layer) of a classifier run or of a tree run (its parent)."""
    from branchnet.config import load_data
    from branchnet.runs import Run

    run = Run.open(run_dir)
    if (run.path / "tree" / "tree.json").is_file():
        from branchnet.tree.experiment import load_tree_config

        _, tree = _load_run_tree(run_dir)
        cfg = load_tree_config(run.path / "config.yaml")
        cfg["progress"] = False
        return tree, load_data(cfg), tree.tap
    meta_path = run.path / "model" / "model.json"
    if meta_path.is_file() and "task" in json.loads(meta_path.read_text()):  # a vbranch run
        from branchnet.analysis import AnalysisError
        from branchnet.virtual.experiment import load_vbranch_config, load_vrun_model

        model, meta = load_vrun_model(run.path)
        if meta["task"] != "classify":
            raise AnalysisError(f"{run.path} is an embedding run: specialization needs class logits")
        cfg = load_vbranch_config(run.path / "config.yaml")
        cfg["progress"] = False
        return model, load_data(cfg), _VIRTUAL_FIRST_LAYER.get(model.spec["kind"])
    from branchnet.classifier import load_classifier_config, load_model

    model, _ = load_model(run.path)
    cfg = load_classifier_config(run.path / "config.yaml")
    cfg["progress"] = False
    return model, load_data(cfg), None


# the first weight layer of each virtual model: the default layer to analyse
_VIRTUAL_FIRST_LAYER = {"vmlp": "hidden.0.linear", "vcnn": "features.0.0.conv", "vresnet": "stem.conv",
                        "vresnet18": "stem.conv", "vdensenet_bc": "conv0"}


def cmd_analyze_specialization(args: argparse.Namespace) -> int:
    from branchnet.analysis import AnalysisError, Partition, specialization
    from branchnet.runs import Run
    from branchnet.tree.tree import BranchTree

    target, data, default_layer = _analysis_target(args.run)
    split = data.splits()[args.split]
    if isinstance(target, BranchTree):
        from branchnet.analysis.tree_branches import tree_specialization

        result = tree_specialization(target, split, seed=args.seed)
        folder = Run.open(args.run).path / "specialization-tree"
        path = result.write_report(folder)
        print(result.summary_text())
        print(f"\nreport: {path}")
        return 0
    layer = args.layer or default_layer
    if not layer:
        from branchnet.taps import layer_names

        raise AnalysisError(f"give --layer NAME; the model's layers are {layer_names(target)}")
    partition = None
    if args.partition != "auto":  # the controls: the same halves as two groups, or random halves
        from branchnet.analysis.partitions import _get_module, virtual_layout

        layout = virtual_layout(target, layer)
        n_units = (layout.branches * layout.units if layout is not None
                   else _get_module(target, layer).weight.shape[0])
        sizes = [n_units // 2, n_units - n_units // 2]
        partition = (Partition.random(sizes, seed=args.seed) if args.partition == "random"
                     else Partition.from_sizes(sizes))
    result = specialization(target, layer, split, partition=partition,
                            n_permutations=args.permutations, seed=args.seed,
                            max_samples=args.max_samples)
    suffix = {"auto": "", "halves": "-halves", "random": f"-random{args.seed}"}[args.partition]
    folder = Run.open(args.run).path / f"specialization-{layer}{suffix}"
    path = result.write_report(folder)
    from branchnet.metrics import format_table

    print(format_table(result.branches) if isinstance(result.branches, list) else result.branches)
    for name, test in result.tests.items():
        print(f"permutation test of {name}: observed {test.observed:.4f}, p = {test.p_value:.4g}")
    print(f"\nreport: {path}")
    return 0


def cmd_analyze_compare(args: argparse.Namespace) -> int:
    from branchnet.analysis.specialization import compare_reports

    print(compare_reports(args.folders))
    return 0


def cmd_vbranch_fit(args: argparse.Namespace) -> int:
    from branchnet.virtual.experiment import load_vbranch_config, run_vbranch

    run, cfg, config_dir = _open_or_create_run(args, load_vbranch_config, "vbranch")
    run_vbranch(cfg, run, resume=bool(args.resume), config_dir=config_dir)
    print(f"\nrun folder: {run.path}  (report.html, metrics.json, figures/, model/)")
    return 0


def cmd_vbranch_eval(args: argparse.Namespace) -> int:
    from branchnet.config import load_data
    from branchnet.runs import Run
    from branchnet.virtual.experiment import (
        evaluate_classifier,
        load_vbranch_config,
        load_vrun_model,
        summary_text,
    )

    run = Run.open(args.run)
    model, meta = load_vrun_model(run.path)
    cfg = load_vbranch_config(run.path / "config.yaml")
    if cfg["task"] != "classify":
        raise SystemExit("branchnet vbranch eval: an embedding run is evaluated with "
                         f"branchnet vbranch oneshot --runs DIR --run {run.path}")
    cfg["progress"] = False
    data = load_data(cfg)
    if data.classes != meta["classes"]:
        raise SystemExit(f"branchnet vbranch eval: the data's classes {data.classes} differ from "
                         f"the saved model's {meta['classes']}")
    split = data.splits()[args.split]
    test = evaluate_classifier(model, split.x, split.y)
    result = {"task": "classify", "split": args.split, "branches": model.spec["branches"],
              "shared_frac": model.spec.get("shared_frac"), "merge": cfg["merge"],
              "bagging": cfg["bagging"], "parameters": meta.get("parameters"), "test": test}
    name = f"eval-{args.split}-{time.strftime('%Y%m%d-%H%M%S')}"
    run.write_metrics(result, f"{name}.json")
    print(summary_text(result))
    print(f"metrics written to {run.path / (name + '.json')}")
    return 0


def cmd_vbranch_oneshot(args: argparse.Namespace) -> int:
    from branchnet.metrics import format_table
    from branchnet.virtual.embedding_experiment import oneshot_of_run

    res = oneshot_of_run(args.run, args.runs)
    rows = [{"embedding": "ensemble (concatenated)", "accuracy": res["ensemble"]["accuracy"]}]
    rows += [{"embedding": f"branch {k}", "accuracy": a["accuracy"]}
             for k, a in enumerate(res["branches"])]
    print(format_table(rows))
    print(f"\n{res['ways']}-way one-shot accuracy {res['ensemble']['accuracy']:.4f} over "
          f"{res['ensemble']['n_trials']} trials in {res['n_runs']} runs")
    return 0


def cmd_vbranch_sweep(args: argparse.Namespace) -> int:
    from branchnet.runs import Run
    from branchnet.virtual.compare import compare_vruns, sweep_grid
    from branchnet.virtual.experiment import load_vbranch_config, run_vbranch

    base = load_vbranch_config(args.config, args.set)
    config_dir = Path(args.config).resolve().parent
    root = Path(args.out) / base["name"]
    done = []
    grid = sweep_grid(args.branches, args.shared, args.bagging, args.seeds)
    for i, g in enumerate(grid):
        cfg = copy.deepcopy(base)
        cfg["model"].update(branches=g["branches"], shared_frac=g["shared_frac"])
        cfg["bagging"]["mode"] = g["bagging"]
        cfg["seed"] = g["seed"]
        cfg["progress"] = False
        name = f"K{g['branches']}-s{g['shared_frac']}-{g['bagging']}-seed{g['seed']}"
        path = root / name
        if (path / "metrics.json").is_file():
            done.append(path)
            continue
        print(f"[{i + 1}/{len(grid)}] {name}", flush=True)
        resume = (path / "config.yaml").is_file()
        run = Run.open(path) if resume else Run(path)
        path.mkdir(parents=True, exist_ok=True)
        run_vbranch(cfg, run, resume=resume, config_dir=config_dir, quiet=True)
        done.append(path)
    print(compare_vruns(done))
    return 0


def cmd_vbranch_compare(args: argparse.Namespace) -> int:
    from branchnet.virtual.compare import compare_vruns

    print(compare_vruns(args.runs))
    return 0


def cmd_plastic_fit(args: argparse.Namespace) -> int:
    from branchnet.plastic.experiment import load_plastic_config, run_plastic

    run, cfg, config_dir = _open_or_create_run(args, load_plastic_config, "plastic")
    run_plastic(cfg, run, resume=bool(args.resume), config_dir=config_dir)
    print(f"\nrun folder: {run.path}  (report.html, metrics.json, figures/, model/)")
    return 0


def cmd_plastic_compare(args: argparse.Namespace) -> int:
    from branchnet.plastic.experiment import compare_plastic

    print(compare_plastic(args.runs))
    return 0


def _add_fit_arguments(p: argparse.ArgumentParser, config_help: str, set_example: str) -> None:
    """The arguments every ``... fit`` command shares (see :func:`_open_or_create_run`)."""
    p.add_argument("config", nargs="?", help=config_help)
    p.add_argument("--out", default="runs", help="folder for run folders (default: runs)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run folder")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value, e.g. --set {set_example}")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="branchnet", description="Branched neural networks on PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the whole tree story on digits, in under a minute")
    d.add_argument("--out", default="runs", help="folder for run folders (default: runs)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("tree", help="hierarchical branching").add_subparsers(dest="tree_cmd",
                                                                            required=True)
    f = t.add_parser("fit", help="fit a tree from a YAML config into a new run folder")
    _add_fit_arguments(f, "experiment YAML (see configs/)", "parent.train.epochs=5")
    f.add_argument("--devices", type=int, help="train the parent with DDP on N CPU processes")
    f.set_defaults(func=cmd_tree_fit)

    e = t.add_parser("eval", help="evaluate a run's saved tree")
    e.add_argument("run")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.set_defaults(func=cmd_tree_eval)

    pr = t.add_parser("predict", help="route inputs through a run's saved tree")
    pr.add_argument("run")
    pr.add_argument("input", help="an image, a folder of images, or a .npy/.npz array")
    pr.add_argument("--top", type=int, default=1, help="also list the k most probable classes")
    pr.add_argument("--json", action="store_true", help="one JSON object per input")
    pr.set_defaults(func=cmd_tree_predict)

    c = t.add_parser("compare", help="mean ± std of finished runs (e.g. seeds), as markdown")
    c.add_argument("runs", nargs="+")
    c.set_defaults(func=cmd_tree_compare)

    m = sub.add_parser("model", help="train and evaluate one plain classifier").add_subparsers(
        dest="model_cmd", required=True)
    mf = m.add_parser("fit", help="train a classifier from a YAML config into a new run folder")
    _add_fit_arguments(mf, "classifier YAML (e.g. configs/specialization-cifar10.yaml)",
                       "model.groups=1")
    mf.set_defaults(func=cmd_model_fit)

    me = m.add_parser("eval", help="evaluate a run's saved classifier")
    me.add_argument("run")
    me.add_argument("--split", default="test", choices=["train", "val", "test"])
    me.set_defaults(func=cmd_model_eval)

    v = sub.add_parser("vbranch", help="virtual branching: K-branch ensembles in one network"
                       ).add_subparsers(dest="vbranch_cmd", required=True)
    vf = v.add_parser("fit", help="train a virtual-branch ensemble from a YAML config")
    _add_fit_arguments(vf, "vbranch YAML (see configs/vbranch-*.yaml)", "model.shared_frac=0.25")
    vf.set_defaults(func=cmd_vbranch_fit)
    ve = v.add_parser("eval", help="evaluate a run's saved ensemble (every branch, both merges)")
    ve.add_argument("run")
    ve.add_argument("--split", default="test", choices=["train", "val", "test"])
    ve.set_defaults(func=cmd_vbranch_eval)
    vo = v.add_parser("oneshot", help="20-way one-shot accuracy of a trained embedding run")
    vo.add_argument("--runs", required=True,
                    help="folder of one-shot runs (run01/class_labels.txt, training/, test/)")
    vo.add_argument("--run", required=True, help="an embedding run (task: embed)")
    vo.set_defaults(func=cmd_vbranch_oneshot)
    vs = v.add_parser("sweep", help="a grid of branches x shared_frac x bagging x seeds, then "
                                     "the comparison table (finished runs are reused)")
    vs.add_argument("config")
    vs.add_argument("--out", default="runs")
    vs.add_argument("--branches", type=int, nargs="+", default=[1, 2, 4])
    vs.add_argument("--shared", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    vs.add_argument("--bagging", nargs="+", default=["none", "bootstrap"])
    vs.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    vs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    vs.set_defaults(func=cmd_vbranch_sweep)
    vc = v.add_parser("compare", help="mean ± std per setting over finished runs, with "
                                      "independent ensembles built from single-branch runs")
    vc.add_argument("runs", nargs="+")
    vc.set_defaults(func=cmd_vbranch_compare)

    pl = sub.add_parser("plastic", help="plasticity: dynamic sparse training, plastic paths"
                        ).add_subparsers(dest="plastic_cmd", required=True)
    pf = pl.add_parser("fit", help="train one sparse or path-plastic network from a YAML config")
    _add_fit_arguments(pf, "plastic YAML (see configs/plastic-*.yaml)", "sparsity.density=0.05")
    pf.set_defaults(func=cmd_plastic_fit)
    pc = pl.add_parser("compare", help="mean ± std per rule and density (or path mode)")
    pc.add_argument("runs", nargs="+")
    pc.set_defaults(func=cmd_plastic_compare)

    an = sub.add_parser("analyze", help="analyses of trained runs").add_subparsers(
        dest="analyze_cmd", required=True)
    sp = an.add_parser("specialization",
                       help="how the units of a branched layer organise themselves by branch")
    sp.add_argument("run", help="a classifier run (branchnet model fit) or a tree run")
    sp.add_argument("--layer", help="the layer to analyse (default for trees: the tapped layer)")
    sp.add_argument("--partition", default="auto", choices=["auto", "halves", "random"],
                    help="auto: from grouped convolutions; controls: halves (first and second "
                         "half of the units) or random (a random halving, seeded by --seed)")
    sp.add_argument("--permutations", type=int, default=2000)
    sp.add_argument("--max-samples", type=int, default=2000)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--split", default="test", choices=["train", "val", "test"])
    sp.set_defaults(func=cmd_analyze_specialization)
    cp = an.add_parser("compare", help="one row per specialization report folder, as markdown")
    cp.add_argument("folders", nargs="+", help="RUN/specialization-LAYER folders")
    cp.set_defaults(func=cmd_analyze_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the command line reports an infeasible risk target itself, in its summary
    warnings.filterwarnings("ignore", message="no threshold reaches selective risk")
    from branchnet.analysis import AnalysisError
    from branchnet.cache import CacheError
    from branchnet.checkpoint import CheckpointError
    from branchnet.classifier import ClassifierError
    from branchnet.config import ConfigError
    from branchnet.data import DataError
    from branchnet.engine import TrainingError
    from branchnet.plastic.masks import SparsityError
    from branchnet.runs import RunError
    from branchnet.taps import TapError
    from branchnet.tree.tree import TreeError
    from branchnet.virtual.experiment import VBranchError

    try:
        return int(args.func(args) or 0)
    except (DataError, TreeError, TrainingError, CheckpointError, CacheError, RunError,
            TapError, ClassifierError, AnalysisError, ConfigError, VBranchError,
            SparsityError) as e:
        print(f"branchnet: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
