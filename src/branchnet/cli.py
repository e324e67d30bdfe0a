"""The ``branchnet`` command line.

::

    branchnet demo                           the tree story on digits, in under a minute
    branchnet KIND fit CONFIG [--set k=v]    fit, evaluate, report -> a new run folder
    branchnet KIND fit --resume RUN          continue an interrupted run where it stopped
    branchnet KIND eval RUN [--split test]   re-evaluate a run's saved model
    branchnet KIND compare RUN [RUN ...]     mean ± std of finished runs (e.g. seeds)
    branchnet tree predict RUN INPUT         route images / arrays / texts through a saved tree
    branchnet tree grow RUN CLASS:NODE ...   add classes to a saved tree, retraining one branch
    branchnet exits predict RUN INPUT        answer inputs with early exits (each stops early)
    branchnet vbranch oneshot --runs DIR --run RUN   20-way one-shot accuracy of an embedding run
    branchnet vbranch sweep CONFIG ...       K x shared_frac x bagging x seeds, then compare
    branchnet analyze specialization RUN     how a branched layer's units organise by branch

KIND is one of the registered run kinds (:mod:`branchnet.kinds`): ``tree``, ``model``,
``vbranch``, ``plastic``, ``probe``, ``exits``. A user's mistake (a bad config value, a
missing file, a damaged checkpoint) is one line, ``branchnet: error: ...``, exit status 2,
before any work starts; ``--debug`` shows its traceback too.
"""

from __future__ import annotations

import argparse
import copy
import errno
import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from branchnet.errors import BranchnetError, ConfigError
from branchnet.kinds import KINDS

_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)

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


def cmd_demo(args: argparse.Namespace) -> int:
    from branchnet import kinds, protocol

    t0 = time.perf_counter()
    exp = kinds.get("tree")
    print("branchnet demo: a parent MLP on digits, one branch per group of digits, routed and "
          "calibrated to abstain when unsure\n")
    run, result = protocol.run(exp, {**DEMO_CONFIG, "seed": args.seed}, out=args.out)
    print(exp.summary_text(result))
    print(f"\nrun folder: {run.path}  ({exp.contents})")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


# ------------------------------------------------------------------ fit / eval / compare
def cmd_fit(args: argparse.Namespace) -> int:
    """``KIND fit CONFIG`` makes a new run folder; ``KIND fit --resume RUN`` continues one."""
    from branchnet import kinds, protocol
    from branchnet.config import read_yaml
    from branchnet.runs import Run

    exp = kinds.get(args.kind)
    run = None
    if args.resume:
        run = Run.open(args.resume)
        kind = protocol.read_manifest(run).get("kind", args.kind)
        if kind != args.kind:
            raise ConfigError(f"{run.path} is a {kind} run; resume it with: branchnet {kind} fit "
                              f"--resume {run.path}")
        cfg = read_yaml(run.path / "config.yaml", args.set)
        config_dir = None  # the run's config holds absolute paths
    elif not args.config:
        raise ConfigError(f"branchnet {args.kind} fit: give a CONFIG file, or --resume RUN")
    else:
        cfg = read_yaml(args.config, args.set)
        config_dir = Path(args.config).resolve().parent
        if args.seed is not None:
            cfg["seed"] = args.seed
    if args.no_progress:
        cfg["progress"] = False
    if getattr(args, "devices", None):
        cfg.setdefault("parent", {}).setdefault("train", {})["devices"] = args.devices
    run, result = protocol.run(exp, cfg, out=args.out, run_folder=run, resume=bool(args.resume),
                               config_dir=config_dir,
                               on_folder=lambda r: print(f"run folder: {r.path}", flush=True))
    print(exp.summary_text(result))
    print(f"\nrun folder: {run.path}  ({exp.contents})")
    return 0


def open_run(run_dir: str, kind: str | None = None, quiet: bool = True) -> tuple[Any, Any]:
    """(the run, its Experiment set up from its own config) of a run folder; the kind comes
    from the manifest, else from ``kind``, else from what the folder holds."""
    from branchnet import kinds, protocol
    from branchnet.config import read_yaml
    from branchnet.runs import Run

    run = Run.open(run_dir)
    user = read_yaml(run.path / "config.yaml")
    # a run folder written before manifests: tell the kind by its config's sections
    found = protocol.read_manifest(run).get("kind") or kind or next(
        (k for key, k in (("parent", "tree"), ("merge", "vbranch"), ("sparsity", "plastic"))
         if key in user), "model")
    if kind is not None and found != kind:
        raise ConfigError(f"{run.path} is a {found} run, not a {kind} run; use branchnet {found} ...")
    exp_cls = kinds.get(found)
    cfg = exp_cls.validate(user)
    cfg["progress"] = False
    return run, exp_cls(cfg, quiet=quiet)


def cmd_eval(args: argparse.Namespace) -> int:
    run, exp = open_run(args.run, args.kind)
    result, figures = exp.evaluate(run, args.split)
    name = f"eval-{args.split}-{time.strftime('%Y%m%d-%H%M%S')}"
    run.write_metrics(result, f"{name}.json")
    for fig_name, fig in figures.items():
        run.save_figure(fig, f"{name}-{fig_name}")
    print(type(exp).summary_text(result))
    print(f"\nmetrics written to {run.path / (name + '.json')}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from branchnet import kinds
    from branchnet.runs import finished_runs

    exp = kinds.get(args.kind)
    runs = finished_runs(args.runs)
    if not runs:
        raise ConfigError(f"none of the {len(args.runs)} run(s) has finished")
    print(exp.compare(runs))
    return 0


# ----------------------------------------------------------------------------- extras
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def read_texts(arg: str, preprocessing: dict[str, Any]) -> tuple[Any, list[str]]:
    """Texts for a text tree: a .txt file (one text per line), a JSON-lines or CSV file (its
    text column), or else the argument itself as one text. Returns (Texts, names)."""
    from branchnet.data import Texts
    from branchnet.data.text import is_text_file
    from branchnet.data.text import read_texts as read_column

    path = Path(arg)
    if path.is_file() and path.suffix == ".txt":
        texts = Texts([t for t in path.read_text(encoding="utf-8").splitlines() if t.strip()],
                      where=str(path))
    elif path.is_file() and is_text_file(path):
        texts = read_column(path, preprocessing.get("text_column", "text"))
    else:
        return Texts([arg]), [arg if len(arg) <= 40 else arg[:37] + "..."]
    return texts, [f"{path.name}:{i + 1}" for i in range(len(texts))]


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


def _predict_inputs(arg: str, preprocessing: dict[str, Any]) -> tuple[Any, list[str]]:
    """A predict command's INPUT: texts for a model on texts, else images or arrays."""
    if preprocessing.get("layout") == "text":
        return read_texts(arg, preprocessing)
    return read_inputs(Path(arg), preprocessing)


def _print_predictions(names: list[str], records: list[dict[str, Any]], as_json: bool,
                       table: Any = None) -> None:
    """One JSON object per input, or a table (``table(name, record)`` makes its row)."""
    from branchnet.metrics import format_table

    if as_json:
        for name, rec in zip(names, records, strict=True):
            print(json.dumps({"input": name, **rec}))
        return
    make = table or (lambda n, r: {"input": n, **r})
    print(format_table([make(n, r) for n, r in zip(names, records, strict=True)]))


def cmd_tree_predict(args: argparse.Namespace) -> int:
    from branchnet.runs import Run
    from branchnet.tree.experiment import load_run_tree

    tree = load_run_tree(Run.open(args.run))
    x, names = _predict_inputs(args.input, tree.preprocessing_)
    records = tree.predict(x).to_records(k=args.top)
    _print_predictions(names, records, args.json, lambda n, r: {
        "input": n, "prediction": r["prediction"] or "(abstain)", "path": " > ".join(r["path"]),
        "confidence": r["confidence"], "why": r["why"]})
    return 0


def cmd_tree_grow(args: argparse.Namespace) -> int:
    from branchnet.metrics import format_table
    from branchnet.tree.experiment import grow_run

    additions: dict[str, list[str]] = {}
    for item in args.additions:
        cls, sep, node = item.partition(":")
        if not sep or not cls or not node:
            raise ConfigError(f"each addition must be CLASS:NODE (e.g. truck:vehicles), got "
                              f"{item!r}")
        additions.setdefault(node, []).append(cls)
    run, exp = open_run(args.run, "tree", quiet=False)
    result = grow_run(run, exp, additions, group=args.group,
                      out=Path(args.out) if args.out else None)
    print(format_table([{"branch": n, "accuracy before": b["before"],
                         "accuracy after": b["after"], "retrained": b["retrained"]}
                        for n, b in result["branches"].items()]))
    print(f"old classes: accuracy {result['accuracy_old_before']:.4f} before, "
          f"{result['accuracy_old_after']:.4f} after; new classes "
          + ", ".join(f"{c} {a:.4f}" for c, a in result["per_class_new"].items())
          + f"; all classes {result['accuracy_all']:.4f}")
    print(f"grown tree: {result['saved']}/tree (grow.json beside it); calibrate it again "
          "before relying on its abstention")
    return 0


def cmd_exits_predict(args: argparse.Namespace) -> int:
    from branchnet.exits.experiment import load_run_exits
    from branchnet.runs import Run

    me = load_run_exits(Run.open(args.run))
    x, names = _predict_inputs(args.input, me.preprocessing_)
    _print_predictions(names, me.predict(x, batch_size=args.batch_size).rows(), args.json)
    return 0


def _analysis_target(run_dir: str) -> tuple[Any, Any, str | None]:
    """(model, data, default layer) of a classifier run or of a tree run (its parent)."""
    from branchnet import zoo
    from branchnet.analysis import AnalysisError
    from branchnet.saved_model import load_model

    run, exp = open_run(run_dir)
    if exp.kind == "tree":
        from branchnet.tree.experiment import load_run_tree

        tree = load_run_tree(run)
        return tree, exp.load_data(), tree.tap
    if exp.kind not in ("model", "vbranch"):
        raise AnalysisError(f"{run.path} is a {exp.kind} run: specialization reads tree, model "
                            "and vbranch runs")
    model, meta = load_model(run.path, command=exp.kind)
    if meta.get("task", "classify") != "classify":
        raise AnalysisError(f"{run.path} is an embedding run: specialization needs class logits")
    return model, exp.load_data(), zoo.MODELS[model.spec["kind"]].first_layer


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
    from branchnet import kinds, protocol
    from branchnet.runs import Run
    from branchnet.virtual.compare import compare_runs, sweep_grid

    exp = kinds.get("vbranch")
    base = protocol.read_config(exp, args.config, args.set)
    root = Path(args.out) / base["name"]
    grid = sweep_grid(args.branches, args.shared, args.bagging, args.seeds)
    configs = []
    for g in grid:  # every setting is validated before the first run starts
        cfg = copy.deepcopy(base)
        cfg["model"].update(branches=g["branches"], shared_frac=g["shared_frac"])
        cfg["bagging"]["mode"] = g["bagging"]
        cfg["seed"], cfg["progress"] = g["seed"], False
        name = f"K{g['branches']}-s{g['shared_frac']}-{g['bagging']}-seed{g['seed']}"
        configs.append((name, exp.validate(cfg)))
    done = []
    for i, (name, cfg) in enumerate(configs):
        path = root / name
        if not (path / "metrics.json").is_file():
            print(f"[{i + 1}/{len(configs)}] {name}", flush=True)
            protocol.run(exp, cfg, run_folder=Run(path), resume=(path / "config.yaml").is_file(),
                         quiet=True)
        done.append(path)
    print(compare_runs(done))
    return 0


# ----------------------------------------------------------------------------- parser
def _add_fit_arguments(p: argparse.ArgumentParser, config_help: str, set_example: str) -> None:
    p.add_argument("config", nargs="?", help=config_help)
    p.add_argument("--out", default="runs", help="folder for run folders (default: runs)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run folder")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value, e.g. --set {set_example}")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_kind(sub: Any, kind: str) -> Any:
    """``branchnet KIND fit / eval / compare`` of a registered run kind."""
    entry = KINDS[kind]
    group = sub.add_parser(kind, help=entry.help).add_subparsers(dest=f"{kind}_cmd", required=True)
    f = group.add_parser("fit", help="fit from a YAML config into a new run folder")
    _add_fit_arguments(f, entry.config_help, entry.set_example)
    f.set_defaults(func=cmd_fit, kind=kind)
    e = group.add_parser("eval", help="evaluate a run's saved model on one split")
    e.add_argument("run")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.set_defaults(func=cmd_eval, kind=kind)
    c = group.add_parser("compare", help="mean ± std of finished runs (e.g. seeds)")
    c.add_argument("runs", nargs="+")
    c.set_defaults(func=cmd_compare, kind=kind)
    return group


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="branchnet", description="Branched neural networks on PyTorch.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the whole tree story on digits, in under a minute")
    d.add_argument("--out", default="runs", help="folder for run folders (default: runs)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    groups = {kind: _add_kind(sub, kind) for kind in KINDS}
    tree = groups["tree"]
    tree.choices["fit"].add_argument("--devices", type=int,
                                     help="train the parent with DDP on N CPU processes")
    pr = tree.add_parser("predict", help="route inputs through a run's saved tree")
    pr.add_argument("run")
    pr.add_argument("input", help="an image, a folder of images, or a .npy/.npz array; for a "
                    "tree on texts: a text, a .txt file (one per line), a .jsonl or .csv file")
    pr.add_argument("--top", type=int, default=1, help="also list the k most probable classes")
    pr.add_argument("--json", action="store_true", help="one JSON object per input")
    pr.set_defaults(func=cmd_tree_predict)

    gr = tree.add_parser("grow", help="add classes to a run's saved tree (only the branch they "
                         "join trains)")
    gr.add_argument("run")
    gr.add_argument("additions", nargs="+", metavar="CLASS:NODE",
                    help="a class of the run's data source and the internal node it goes under")
    gr.add_argument("--group", help="add the classes as a new branch of this name instead of "
                    "as leaves")
    gr.add_argument("--out", help="folder for the grown tree (default RUN/grown)")
    gr.set_defaults(func=cmd_tree_grow)

    ep = groups["exits"].add_parser("predict", help="answer inputs with a run's early exits "
                                    "(each input stops at its exit)")
    ep.add_argument("run")
    ep.add_argument("input", help="an image, a folder of images, or a .npy/.npz array; for "
                    "texts: a text, a .txt file (one per line), a .jsonl or .csv file")
    ep.add_argument("--batch-size", type=int, default=64)
    ep.add_argument("--json", action="store_true", help="one JSON object per input")
    ep.set_defaults(func=cmd_exits_predict)

    v = groups["vbranch"]
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

    an = sub.add_parser("analyze", help="analyses of trained runs").add_subparsers(
        dest="analyze_cmd", required=True)
    sp = an.add_parser("specialization",
                       help="how the units of a branched layer organise themselves by branch")
    sp.add_argument("run", help="a classifier, vbranch or tree run")
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
    try:
        return int(args.func(args) or 0)
    except (BranchnetError, OSError) as e:
        # a full disk or a read-only folder is the machine's state, not a bug: one line too
        if isinstance(e, OSError) and not isinstance(e, BranchnetError) and e.errno not in _DISK_ERRORS:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"branchnet: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
