"""The ``tree`` run kind: data, parent, branches, calibration, report (``branchnet tree fit``).

This is what ``branchnet tree fit CONFIG`` and ``branchnet demo`` run through the one runner
(:func:`branchnet.protocol.run`). The validation split is divided once: one part selects models
(early stopping), the other, ``calibration.fraction`` of it, only calibrates the abstention
threshold, so the guarantee's assumption (calibration data independent of the fitted tree)
holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from pydantic import Field
from sklearn.metrics import balanced_accuracy_score

from branchnet import metrics, models, zoo
from branchnet.config import check_file
from branchnet.data import Data, Split
from branchnet.data.batches import TensorPairs
from branchnet.data.dataset import concat_splits
from branchnet.data.hierarchy import Hierarchy
from branchnet.engine import TrainConfig, fit
from branchnet.errors import ConfigError
from branchnet.novelty import SCORERS
from branchnet.protocol import Experiment
from branchnet.report import Report
from branchnet.runs import Run
from branchnet.schema import (
    DataSection,
    OpenFraction,
    PositiveInt,
    Section,
    Seed,
    TrainSection,
    with_defaults,
)
from branchnet.taps import layer_names
from branchnet.tree.evaluate import evaluate, summary_rows
from branchnet.tree.evaluate_open_world import evaluate_open_world, score_options
from branchnet.tree.parent import load_parent_weights, restrict_outputs, trained_classes
from branchnet.tree.router import POLICIES, SCORES
from branchnet.tree.tree import HEAD_TRAIN_DEFAULTS, BranchTree, TreeError, induce_spec

__all__ = ["TreeConfig", "TreeExperiment", "compare_runs", "resolve_hierarchy"]

#: the parent networks a tree config may name
PARENT_MODELS = {"mlp": "mlp", "cnn": "cnn", "resnet": "resnet", "transformer": "transformer"}
#: hierarchies named by a word: built-in class trees, or ``groups`` (the data's group column)
BUILTIN_HIERARCHIES = ("cifar10", "cifar100", "groups")


ParentTrain = with_defaults(TrainSection, epochs=20)
HeadTrain = with_defaults(TrainSection, **HEAD_TRAIN_DEFAULTS)


class ParentSection(Section):
    model: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "mlp", "sizes": ["auto", 256, 128], "dropout": 0.0})
    tap: str = "hidden.1"
    labels: Literal["fine", "coarse"] = "fine"
    weights: str | None = None
    #: the classes of the parent's outputs, in order, when it was trained on more than the
    #: data's classes (null: the data's): the data is split as the parent's was, over these
    #: classes, then cut to the data's, and the parent's output layer to their rows
    classes: list[str] | None = None
    train: ParentTrain = Field(default_factory=ParentTrain)  # type: ignore[valid-type]


class HeadSection(Section):
    hidden: PositiveInt = 256
    dropout: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.5


class SelfCheckSection(Section):
    target: Literal["tcp", "correct"] = "tcp"
    fraction: OpenFraction = 0.2
    hidden: Annotated[int, Field(ge=0)] = 128
    dropout: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.1


class TreeSection(Section):
    router: Literal["parent", "learned"] = "parent"
    node_input: Literal["parent", "branch"] = "parent"
    branch_tap: str = "hidden.0"
    policy: Literal[POLICIES] = "hard"  # type: ignore[valid-type]
    score: Literal[SCORES] = "msp"  # type: ignore[valid-type]
    backoff: bool = False
    head: HeadSection = Field(default_factory=HeadSection)
    head_train: HeadTrain = Field(default_factory=HeadTrain)  # type: ignore[valid-type]
    cache_dir: str | None = None
    cache_dtype: Literal["float16", "float32"] = "float16"
    #: a self-check branch (needed by score: selfcheck); null for none
    selfcheck: SelfCheckSection | None = None


class CalibrationSection(Section):
    method: Literal["risk", "coverage", "fixed"] = "risk"
    target_risk: OpenFraction = 0.05
    delta: OpenFraction = 0.05
    coverage: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    threshold: float | dict[str, float] = 0.96
    fraction: OpenFraction = 0.5


class NoveltySection(Section):
    """Open-world rejection and its evaluation against inputs of classes no branch knows."""
    #: the score the tree rejects with
    score: Literal[tuple(SCORERS)] = "mahalanobis"  # type: ignore[valid-type]
    #: the scores compared in the evaluation (the tree's own among them)
    compare: list[Literal[tuple(SCORERS)]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["msp", "energy", "mahalanobis", "knn"])
    #: KNN's k: a number, or auto (k = 50 per 50,000 training rows, Sun et al.'s scaling)
    knn_k: PositiveInt | Literal["auto"] = "auto"
    target_frr: OpenFraction = 0.05
    delta: OpenFraction = 0.1
    #: where the novel inputs come from: a data source (default: data.source) and its classes
    #: (default: all of them); none of them may be a class of the data
    source: str | None = None
    classes: list[str | int] | None = None
    #: the novel source's test split only (for a source that also holds known classes' training
    #: images), or all its rows (a file of novel classes only)
    split: Literal["test", "all"] = "test"


class TreeConfig(Section):
    name: str = "tree"
    seed: Seed = 0
    data: DataSection = Field(default_factory=DataSection)
    #: free-form: null (flat), a mapping {group: [classes or subgroups]}, a YAML file, or a
    #: built-in name (cifar10, cifar100)
    hierarchy: str | dict[str, Any] | None = None
    #: a hierarchy to compare an induced one with (adjusted Rand index of the top-level groups)
    reference_hierarchy: str | dict[str, Any] | None = None
    parent: ParentSection = Field(default_factory=ParentSection)
    tree: TreeSection = Field(default_factory=TreeSection)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    baselines: bool = False
    #: open-world rejection (null: none)
    novelty: NoveltySection | None = None
    progress: bool = True


def resolve_hierarchy(spec: Any, classes: list[str],
                      groups: dict[str, list[str]] | None = None) -> Hierarchy:
    """The hierarchy a config names, bound to the data's classes (``groups``: the data's
    group column, for ``hierarchy: groups``)."""
    if spec is None:
        return Hierarchy.flat(classes)
    if spec == "groups":
        if not groups:
            raise ConfigError("hierarchy: groups needs data with a group column "
                              "(data.group_column), but this data has none")
        return Hierarchy.from_groups(groups).bind(classes)
    if isinstance(spec, dict):
        return Hierarchy.from_dict(spec).bind(classes)
    if spec in BUILTIN_HIERARCHIES:
        return _restrict(Hierarchy.builtin(spec), classes)
    return Hierarchy.from_yaml(Path(spec)).bind(classes)


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


class TreeExperiment(Experiment):
    kind = "tree"
    schema = TreeConfig
    contents = "report.html, metrics.json, figures/, tree/"
    captions: ClassVar[dict[str, str]] = {
        "training": "training curves (validation)", "risk_coverage": "risk-coverage curve",
        "confusion": "confusion matrix", "branches": "branches on their own classes",
        "novelty": "novelty scores on the tapped layer: known test inputs against novel ones",
        "novelty_tree": "the tree's novelty statistic (largest node rank along the path)"}

    @classmethod
    def check(cls, cfg: dict[str, Any]) -> None:
        super().check(cfg)
        zoo.check_spec(cfg["parent"]["model"], PARENT_MODELS, where="parent.model")
        check_file(cfg["parent"]["weights"], "parent.weights", "safetensors file")
        if cfg["parent"]["model"].get("kind") == "transformer" and cfg["parent"]["weights"]:
            raise ConfigError("parent.weights must be null for a transformer parent (its "
                              f"probe is trained here), got {cfg['parent']['weights']!r}")
        for key in ("hierarchy", "reference_hierarchy"):
            h = cfg[key]
            if isinstance(h, str) and h not in BUILTIN_HIERARCHIES:
                check_file(h, key, f"YAML file or one of {list(BUILTIN_HIERARCHIES)}")
        try:
            induce_spec(cfg["hierarchy"], cfg["parent"]["labels"])
        except TreeError as e:
            raise ConfigError(str(e)) from e
        nov = cfg["novelty"]
        if nov and nov["source"]:
            check_file(nov["source"], "novelty.source", "data source")
        p, data_classes = cfg["parent"], cfg["data"]["classes"]
        if p["classes"] is not None:
            if p["labels"] != "fine":
                raise ConfigError("parent.classes applies to a parent of fine labels, got "
                                  f"parent.labels {p['labels']!r}")
            if len(set(p["classes"])) != len(p["classes"]):
                raise ConfigError(f"parent.classes names a class twice: {p['classes']}")
            extra = [c for c in data_classes or () if isinstance(c, str) and c not in p["classes"]]
            if extra:
                raise ConfigError(f"data.classes must be classes of parent.classes; {extra} "
                                  f"{'are' if len(extra) > 1 else 'is'} not in {p['classes']}")
        c = cfg["calibration"]
        if c["method"] == "coverage" and c["coverage"] is None:
            raise ConfigError("calibration.coverage must be a number in (0, 1] when "
                              "calibration.method is 'coverage', got None")

    def load_data(self) -> Data:
        """The data; with ``parent.classes``, split over the parent's classes (as the parent's
        own run split them, so no image it trained on reaches validation or test), then cut to
        the data's classes."""
        d, classes = self.cfg["data"], self.cfg["parent"]["classes"]
        if classes is None:
            return super().load_data()
        self.data = self._load({**d, "classes": classes}).select_classes(d["classes"] or classes)
        return self.data

    def setup(self) -> None:
        super().setup()
        cfg, data = self.cfg, self.data
        assert data is not None
        self.induce = induce_spec(cfg["hierarchy"], cfg["parent"]["labels"])
        if self.induce:
            if self.induce["groups"] > len(data.classes):
                raise ConfigError(f"hierarchy.groups must be at most the number of classes "
                                  f"({len(data.classes)}), got {self.induce['groups']}")
            self.hierarchy = Hierarchy.flat(data.classes)  # until the parent is trained
            self.say(f"hierarchy  induced from the parent ({self.induce['induce']}, "
                     f"{self.induce['groups']} groups, depth {self.induce['depth']})")
        else:
            self.hierarchy = resolve_hierarchy(cfg["hierarchy"], data.classes, data.groups)
            self.say("hierarchy  " + self.hierarchy.render().replace("\n", "\n           "))
        ref = cfg["reference_hierarchy"]
        self.reference = (None if ref is None
                          else resolve_hierarchy(ref, data.classes, data.groups))
        self.novel = self.load_novel() if cfg["novelty"] else None
        self.parent = self.build_parent(data)
        tap = cfg["parent"]["tap"]
        if tap not in layer_names(self.parent):
            raise ConfigError(f"parent.tap must be a layer of the parent, got {tap!r}; its layers "
                              f"are {layer_names(self.parent)}")
        self.select, self.calibration = data.val.split(cfg["calibration"]["fraction"],
                                                       seed=cfg["seed"])
        self.say(f"validation {len(self.select)} inputs for early stopping, {len(self.calibration)} "
                 "held out for calibration only")

    def load_novel(self) -> Split:
        """The novel inputs of ``novelty``: classes none of the data's, prepared like it."""
        nov, data = self.cfg["novelty"], self.data
        assert data is not None
        changes: dict[str, Any] = {"classes": nov["classes"], "max_per_class": None}
        if nov["split"] == "all":  # no split cut off: every row is a novel input
            changes.update(val_fraction=0.0, test_fraction=0.0)
        if nov["source"]:
            changes.update(source=nov["source"], test_source=None, group_column=None)
        novel = self.load_more(**changes)
        overlap = sorted(set(novel.classes) & set(data.classes))
        if overlap:
            raise ConfigError(f"novelty.classes must be classes the tree does not know, but "
                              f"{overlap} are classes of the data")
        split = (novel.test if nov["split"] == "test"
                 else concat_splits([novel.train, novel.val, novel.test]))
        self.say(f"novel      {len(split)} inputs of {len(novel.classes)} classes none of the "
                 f"branches knows ({', '.join(novel.classes)})")
        return split

    def build_parent(self, data: Data) -> torch.nn.Module:
        p = self.cfg["parent"]
        outputs = list(p["classes"] or data.classes)
        n_out = len(outputs) if p["labels"] == "fine" else len(self.hierarchy.children("root"))
        parent = zoo.build(p["model"], num_classes=n_out, input_shape=data.input_shape,
                           seed=self.cfg["seed"], aliases=PARENT_MODELS, where="parent.model")
        trained = trained_classes(p["weights"])
        if p["labels"] == "fine" and trained is not None and trained != outputs:
            raise ConfigError(
                f"parent.weights {p['weights']} were trained on classes {trained}, but the run's "
                f"parent outputs are {outputs}; set parent.classes to the parent's classes "
                "in their order (the data's classes may be any of them)")
        load_parent_weights(parent, p)
        if p["classes"] is not None:
            layer = restrict_outputs(parent, [p["classes"].index(c) for c in data.classes])
            self.say(f"parent     output layer {layer!r} cut from {len(p['classes'])} classes to "
                     f"the data's {len(data.classes)}")
        return parent

    def make_tree(self, run: Run) -> BranchTree:
        cfg, t = self.cfg, self.cfg["tree"]
        head_cfg = t["head"]

        def head(n_in: int, n_out: int) -> torch.nn.Module:
            return models.branch_head(n_in, n_out, hidden=head_cfg["hidden"],
                                      dropout=head_cfg["dropout"])

        return BranchTree(
            self.parent, cfg["parent"]["tap"], router=t["router"], node_input=t["node_input"],
            branch_tap=t["branch_tap"], head=head, policy=t["policy"], confidence=t["score"],
            backoff=t["backoff"], train_parent=not cfg["parent"]["weights"],
            parent_train=self.train_config(cfg["parent"]["train"]),
            parent_labels=cfg["parent"]["labels"],
            head_train=self.train_config(t["head_train"]),
            workdir=run.work, cache_dir=t["cache_dir"], cache_dtype=t["cache_dtype"],
            selfcheck=None if t["selfcheck"] is None else {
                **t["selfcheck"], "train": {"seed": cfg["seed"]}},
            novelty=None if not cfg["novelty"] else {
                "score": cfg["novelty"]["score"],
                **score_options(cfg["novelty"]["score"], cfg["novelty"]["knn_k"])},
            progress=cfg["progress"],
        )

    def fit(self, run: Run, resume: bool) -> dict[str, Any]:
        cfg, data = self.cfg, self.data
        assert data is not None
        tree = self.make_tree(run)
        tree.fit(data.train, val=self.select, hierarchy=self.induce or self.hierarchy,
                 classes=data.classes, preprocessing=data.preprocessing, resume=resume)
        self.hierarchy = tree.hierarchy_
        c, nov = cfg["calibration"], cfg["novelty"]
        tree.calibrate(self.calibration, method=c["method"], target_risk=c["target_risk"],
                       delta=c["delta"], coverage=c["coverage"], threshold=c["threshold"])
        if nov:
            tree.calibrate_novelty(self.calibration, target_frr=nov["target_frr"],
                                   delta=nov["delta"])
        result, self._figures = evaluate(tree, data.test, calibration=self.calibration)
        result["hierarchy"] = self.hierarchy_record(tree)
        if nov:
            self.say(f"open world {len(data.test)} known test inputs against {len(self.novel)} "
                     "novel ones")
            result["open_world"], figs = evaluate_open_world(
                tree, data.test, self.novel, self.calibration, list(nov["compare"]),
                target_frr=nov["target_frr"], delta=nov["delta"], knn_k=nov["knn_k"])
            self._figures.update(figs)
        result["fit"] = tree.fit_summary_
        result["data"] = {"summary": data.summary(), "classes": data.classes}
        if cfg["baselines"]:
            self.say("baselines  raw-input MLPs of each branch's size, flat parent on the same "
                     "classes")
            result["baselines"] = run_baselines(cfg, tree, data, self.select, run,
                                                self.train_config(cfg["tree"]["head_train"]))
        tree.save(run.path / "tree")
        return result

    def hierarchy_record(self, tree: BranchTree) -> dict[str, Any]:
        """The tree's hierarchy as fitted (induced or given), and its agreement with the
        reference hierarchy."""
        rec: dict[str, Any] = {"tree": tree.hierarchy_.to_dict(),
                               "groups": tree.hierarchy_.top_groups(),
                               "induced": self.induce}
        if self.reference is not None:
            rec["reference"] = self.reference.to_dict()
            rec["ari_vs_reference"] = tree.hierarchy_.agreement(self.reference)
        return rec

    def histories(self, run: Run) -> dict[str, Path]:
        out = {"parent": run.work / "parent" / "metrics.csv"}
        out.update({f"branch {p.name[3:]}": p / "metrics.csv"
                    for p in sorted((run.work / "nodes").glob("*")) if p.is_dir()})
        return out

    def figures(self, run: Run, result: dict[str, Any]) -> dict[str, Figure]:
        return self._figures

    def report(self, rep: Report, run: Run, result: dict[str, Any]) -> None:
        rep.add_text(f"calibration: {result['calibration']}", muted=True)
        if "truncation" in result["fit"]:
            tr = result["fit"]["truncation"]["train"]
            rep.add_text(f"texts longer than max_length {tr['max_length']} tokens, truncated: "
                         f"{tr['truncated']} of {tr['texts']} training texts "
                         f"({tr['fraction']:.1%}; the longest has {tr['longest']})")
        rep.add_heading("Confidence scores on the tree's answers")
        rep.add_table([{"score": k, **v} for k, v in result["scores"].items()])
        rep.add_heading("Hierarchy")
        h = result.get("hierarchy", {})
        if h.get("induced"):
            ind = h["induced"]
            rep.add_text(f"induced from the trained parent: {ind['induce']}, {ind['groups']} "
                         f"groups, depth {ind['depth']}")
        if "ari_vs_reference" in h:
            rep.add_text(f"agreement with the reference hierarchy (adjusted Rand index of the "
                         f"top-level groups): {h['ari_vs_reference']:.3f}")
        rep.add_pre((Hierarchy.from_dict(h["tree"]) if "tree" in h else self.hierarchy).render())
        if "open_world" in result:
            ow = result["open_world"]
            rep.add_heading("Open world: known classes against novel ones")
            rep.add_text(f"{ow['n_known']} known test inputs, {ow['n_novel']} novel; thresholds "
                         f"calibrated on {ow['n_calibration']} held-out known inputs to a false-"
                         f"rejection rate <= {ow['target_frr']} with probability >= "
                         f"{1 - ow['delta']:.2f}")
            rep.add_table(open_world_rows(ow))
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

    @classmethod
    def summary_rows(cls, result: dict[str, Any]) -> list[dict[str, Any]]:
        return summary_rows(result)

    @classmethod
    def summary_text(cls, result: dict[str, Any]) -> str:
        lines = [super().summary_text(result)]
        cal = result["calibration"]
        if cal.get("method") == "risk" and not cal.get("feasible"):
            lines.append(f"\nno threshold reaches selective risk <= {cal['target_risk']} with "
                         f"probability >= {1 - cal['delta']:.2f} on {cal['n_calibration']} "
                         "calibration inputs: the tree abstains on everything (use more "
                         "calibration data or a larger target risk)")
        elif cal.get("method") == "risk":
            lines.append(f"\ncalibrated threshold {cal['threshold']:.4f}: selective risk <= "
                         f"{cal['target_risk']} with probability >= {1 - cal['delta']:.2f} "
                         f"(bound {cal['risk_bound']:.4f} on {cal['n_calibration']} held-out "
                         "calibration inputs)")
        if "open_world" in result:
            ow = result["open_world"]
            lines.append("open world (AUROC on the tapped layer / in the tree): " + ", ".join(
                f"{k} {v['tap']['auroc']:.3f}/{v['tree']['auroc']:.3f}" if "tap" in v
                else f"{k} –/{v['tree']['auroc']:.3f}" for k, v in ow["scores"].items()))
        acc = result["accuracy_on_accepted"]
        lines.append(f"test: accuracy {result['accuracy']:.4f} (balanced "
                     f"{result['balanced_accuracy']:.4f}); accepted {result['accepted']}/"
                     f"{result['n_test']} ({result['coverage']:.1%}), accuracy on accepted "
                     + (f"{acc:.4f}" if acc is not None else "n/a")
                     + f"; hF {result['hierarchical']['hF']:.4f}")
        return "\n".join(lines)

    def evaluate(self, run: Run, split: str) -> tuple[dict[str, Any], dict[str, Figure]]:
        tree = load_run_tree(run)
        self.setup()  # the same data and calibration split as the run
        return evaluate(tree, self.data.splits()[split], calibration=self.calibration)

    @classmethod
    def compare(cls, runs: list[Run]) -> str:
        return compare_runs([r.path for r in runs])


def open_world_rows(ow: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per novelty score: AUROC / FPR95 on the tap and in the tree, and the joint
    outcome at the calibrated threshold."""
    rows = []
    for name, v in ow["scores"].items():
        t, j = v["tree"], v["tree"]["joint"]
        rows.append({"score": name, "tap_auroc": v.get("tap", {}).get("auroc"),
                     "tap_fpr95": v.get("tap", {}).get("fpr95"), "tree_auroc": t["auroc"],
                     "tree_fpr95": t["fpr95"], "test_frr": t["test_frr"],
                     "known_correct": j["known_correct"], "known_wrong": j["known_wrong"],
                     "known_unsure": j["known_unsure"],
                     "known_rejected": j["known_rejected_novel"],
                     "novel_rejected": j["novel_rejected"], "novel_unsure": j["novel_unsure"],
                     "novel_accepted": j["novel_accepted"]})
    return rows


def grow_run(run: Run, exp: TreeExperiment, additions: dict[str, list[str]],
             group: str | None = None, out: Path | None = None) -> dict[str, Any]:
    """Grow a finished tree run's tree (``branchnet tree grow``): ``additions`` maps each
    internal node to the classes of the run's data source that go under it (as leaves, or as a
    new branch named ``group``). The new classes' data comes from the run's data section with
    those classes, prepared with the run's statistics. Saves the grown tree to ``out`` (default
    ``RUN/grown``) with ``grow.json``: accuracy of the old classes before and after, of the new
    ones, and each branch on its own classes before and after."""
    from branchnet.fileio import write_json
    from branchnet.tree.evaluate import branch_metrics
    from branchnet.tree.grow import check_grow

    tree = load_run_tree(run)
    for node, classes in additions.items():  # every mistake before any work
        check_grow(tree, node, classes, group)
    exp.setup()
    assert exp.data is not None
    old_test, n_old = exp.data.test, len(tree.classes_)
    before = {"accuracy_old": tree.score(old_test.x, old_test.y),
              "branches": branch_metrics(tree, old_test)}
    tests = [old_test]
    for node, classes in additions.items():
        new = exp.load_more(classes=classes)
        exp.say(f"grow       {', '.join(classes)} under {node!r}: {len(new.train)} training "
                f"inputs, {len(new.val)} for early stopping")
        offset = len(tree.classes_)
        tree.grow(new, under=node, group=group)
        tests.append(Split(new.test.x, new.test.y + offset))
    all_test = concat_splits(tests)
    leaf = tree.predict(all_test.x).leaf
    old_rows = all_test.y < n_old
    after_branches = branch_metrics(tree, old_test)
    grown = set(additions) | ({group} if group else set())
    result = {
        "grown": tree.fit_summary_["grown"], "classes": tree.classes_,
        "hierarchy": tree.hierarchy_.to_dict(),
        "accuracy_old_before": before["accuracy_old"],
        "accuracy_old_after": float((leaf[old_rows] == all_test.y[old_rows]).float().mean()),
        "accuracy_new": float((leaf[~old_rows] == all_test.y[~old_rows]).float().mean()),
        "accuracy_all": float((leaf == all_test.y).float().mean()),
        "per_class_new": {tree.classes_[c]: float((leaf[all_test.y == c] == c).float().mean())
                          for c in range(n_old, len(tree.classes_))},
        "branches": {node: {"before": b["overall_accuracy"],
                            "after": after_branches[node]["overall_accuracy"],
                            "retrained": node in grown}
                     for node, b in before["branches"].items() if node in after_branches},
    }
    out = Path(out) if out else run.path / "grown"
    tree.save(out / "tree")
    write_json(out / "grow.json", result)
    result["saved"] = str(out)
    return result


def load_run_tree(run: Run) -> BranchTree:
    """The saved tree of a finished tree run."""
    if not (run.path / "tree" / "tree.json").is_file():
        raise TreeError(f"{run.path} has no saved tree yet (the run did not finish); "
                        f"resume it with: branchnet tree fit --resume {run.path}")
    return BranchTree.load(run.path / "tree")


def run_baselines(cfg: dict[str, Any], tree: BranchTree, data: Data, select: Split, run: Run,
                  train_cfg: TrainConfig) -> dict[str, Any]:
    """Per branch: an MLP of the branch's size on raw inputs (not for texts), and the flat
    parent on the same classes (its probabilities summed per child group), both on the
    branch's test inputs; and the flat parent on all classes (accuracy, balanced accuracy)."""
    lay = tree.layout_
    out: dict[str, Any] = {}
    head_cfg, seed = cfg["tree"]["head"], cfg["seed"]
    with torch.inference_mode():
        parent_probs = torch.softmax(tree.parent(data.test.x), dim=1)
    if cfg["parent"]["labels"] == "fine":
        out["parent_flat_accuracy"] = metrics.accuracy(parent_probs.argmax(1), data.test.y)
        out["parent_flat_balanced_accuracy"] = float(balanced_accuracy_score(
            data.test.y.numpy(), parent_probs.argmax(1).numpy()))
    for i, node in enumerate(lay.nodes):
        if i == 0 or lay.n_children[i] < 2:
            continue
        part = {}
        for name, split in (("train", data.train), ("val", select), ("test", data.test)):
            slots = lay.slot_of_label(node, split.y)
            rows = torch.nonzero(slots >= 0).flatten()
            part[name] = (rows, split.x[rows], slots[rows])
        rows_te, x_te, s_te = part["test"]
        rec: dict[str, Any] = {}
        if not data.train.is_text:
            torch.manual_seed(seed)
            raw = models.mlp([int(np.prod(data.input_shape)), head_cfg["hidden"]],
                             lay.n_children[i], dropout=head_cfg["dropout"])
            fit(raw, TensorPairs(*part["train"][1:]), TensorPairs(*part["val"][1:]), train_cfg,
                workdir=run.work / "baselines" / f"raw-{i:02d}", resume=True,
                description=f"raw-input MLP for {node!r}")
            with torch.inference_mode():
                rec["raw_mlp_accuracy"] = metrics.accuracy(raw.eval()(x_te).argmax(1), s_te)
            rec["raw_mlp_parameters"] = models.num_parameters(raw)
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
                       ("balanced_accuracy", "balanced accuracy (mean per-class recall)"),
                       ("coverage", "coverage at the calibrated threshold"),
                       ("accuracy_on_accepted", "accuracy on accepted"),
                       ("aurc", "AURC"), ("eaurc", "E-AURC")]:
        lines.append(f"| {label} | {_mean_std([r.get(key) for r in results])} |")
    lines.append(f"| hierarchical F1 | {_mean_std([r['hierarchical']['hF'] for r in results])} |")
    if all("baselines" in r for r in results):
        for key, label in (("parent_flat_accuracy", "flat parent accuracy (all classes)"),
                           ("parent_flat_balanced_accuracy", "flat parent balanced accuracy")):
            lines.append(f"| {label} | "
                         f"{_mean_std([r['baselines'].get(key) for r in results])} |")
    lines.append(f"| calibrated threshold | "
                 f"{_mean_std([r['calibration'].get('threshold') for r in results])} |")
    if all("ari_vs_reference" in r.get("hierarchy", {}) for r in results):
        lines.append("| hierarchy agreement with the reference (ARI) | "
                     f"{_mean_std([r['hierarchy']['ari_vs_reference'] for r in results])} |")
    if all("open_world" in r for r in results):
        keys = [("tap_auroc", "AUROC (tap)"), ("tap_fpr95", "FPR95 (tap)"),
                ("tree_auroc", "AUROC (tree)"), ("tree_fpr95", "FPR95 (tree)"),
                ("test_frr", "known rejected as novel"), ("known_correct", "known, right"),
                ("known_wrong", "known, wrong"), ("novel_rejected", "novel, rejected"),
                ("novel_accepted", "novel, accepted")]
        per_run = [{row["score"]: row for row in open_world_rows(r["open_world"])}
                   for r in results]
        lines += ["", "| novelty score | " + " | ".join(label for _, label in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for name in per_run[0]:
            cells = [_mean_std([p[name][k] for p in per_run if name in p]) for k, _ in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    scores = [k for k in results[0].get("scores", {}) if all(k in r.get("scores", {})
                                                             for r in results)]
    if scores:
        lines += ["", "| confidence score | AURC | E-AURC | coverage at the target risk | "
                  "selective risk there |", "|---|---|---|---|---|"]
        for k in scores:
            cells = [_mean_std([r["scores"][k].get(m) for r in results])
                     for m in ("aurc", "eaurc", "coverage", "selective_risk")]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
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
