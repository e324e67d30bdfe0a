"""The ``exits`` run kind: a frozen parent with early exits, calibrated and measured
(``branchnet exits fit / eval / predict``).

The parent is loaded (``parent.weights``), trained here (a network of branchnet's with no
weights), or, for a transformer, a frozen backbone whose probe trains on cached features. Exit
heads train on the cached taps (early stopping on one part of the validation split); the
other part, ``calibration.fraction`` of it, only calibrates the threshold, so the guarantee's
assumption (calibration data independent of the fitted exits) holds. The test split gives the
accuracy-FLOPs curve, the calibrated operating point against the full parent, SDN-style fixed
thresholds and PABEE patience; a staged pass over the test split checks that real inference
takes the exits the cached simulation says, and a timing subset measures the wall-clock
speed-up at each batch size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from matplotlib.figure import Figure
from pydantic import Field

from branchnet import metrics, zoo
from branchnet.config import check_file
from branchnet.data.batches import TensorPairs
from branchnet.engine import fit
from branchnet.errors import ConfigError
from branchnet.exits.calibrate import KINDS
from branchnet.exits.evaluate import (
    evaluate_exits,
    plot_accuracy_flops,
    plot_exit_histogram,
    point,
    time_inference,
)
from branchnet.exits.multiexit import HEAD_TRAIN_DEFAULTS, MultiExit
from branchnet.exits.rules import RULES
from branchnet.exits.stages import StageError
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
from branchnet.tree.experiment import ParentTrain
from branchnet.tree.parent import load_parent_weights

__all__ = ["ExitsConfig", "ExitsExperiment"]

HeadTrain = with_defaults(TrainSection, **HEAD_TRAIN_DEFAULTS)


class ExitsParent(Section):
    model: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "mlp", "sizes": ["auto", 128, 128, 64]})
    #: a safetensors file; null: train the parent here (a transformer: its probe, on the cache)
    weights: str | None = None
    train: ParentTrain = Field(default_factory=ParentTrain)  # type: ignore[valid-type]


class ExitHeadSection(Section):
    hidden: Annotated[int, Field(ge=0)] = 0
    pool: PositiveInt = 2
    dropout: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.0


class ExitsSection(Section):
    taps: list[str] = Field(default_factory=lambda: ["hidden.0", "hidden.1"])
    rule: Literal[RULES] = "msp"  # type: ignore[valid-type]
    head: ExitHeadSection = Field(default_factory=ExitHeadSection)
    head_train: HeadTrain = Field(default_factory=HeadTrain)  # type: ignore[valid-type]
    cache_dir: str | None = None


class ExitCalibrationSection(Section):
    method: Literal["calibrated", "fixed"] = "calibrated"
    kind: Literal[KINDS] = "consistency"  # type: ignore[valid-type]
    epsilon: OpenFraction = 0.01
    delta: OpenFraction = 0.1
    #: with method fixed: one threshold, or one per exit
    threshold: float | list[float] = 0.9
    fraction: OpenFraction = 0.5


class BaselineSection(Section):
    #: SDN-style fixed thresholds of the same rule, beside the calibrated one
    thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    patience: bool = True


class TimingSection(Section):
    batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 64])
    #: test inputs timed (0: no timing)
    inputs: Annotated[int, Field(ge=0)] = 256


class ExitsConfig(Section):
    name: str = "exits"
    seed: Seed = 0
    data: DataSection = Field(default_factory=DataSection)
    parent: ExitsParent = Field(default_factory=ExitsParent)
    exits: ExitsSection = Field(default_factory=ExitsSection)
    calibration: ExitCalibrationSection = Field(default_factory=ExitCalibrationSection)
    baselines: BaselineSection = Field(default_factory=BaselineSection)
    timing: TimingSection = Field(default_factory=TimingSection)
    progress: bool = True


class ExitsExperiment(Experiment):
    kind = "exits"
    schema = ExitsConfig
    contents = "report.html, metrics.json, figures/, exits/"
    captions: ClassVar[dict[str, str]] = {
        "training": "training curves (validation)",
        "accuracy_flops": "accuracy against mean FLOPs per input (test)",
        "exit_histogram": "where test inputs leave at the calibrated threshold"}

    @classmethod
    def check(cls, cfg: dict[str, Any]) -> None:
        super().check(cfg)
        zoo.check_spec(cfg["parent"]["model"], where="parent.model")
        check_file(cfg["parent"]["weights"], "parent.weights", "safetensors file")
        if cfg["parent"]["model"].get("kind") == "transformer" and cfg["parent"]["weights"]:
            raise ConfigError("parent.weights must be null for a transformer parent (its "
                              f"probe is trained here), got {cfg['parent']['weights']!r}")
        thr = cfg["calibration"]["threshold"]
        if isinstance(thr, list) and len(thr) != len(cfg["exits"]["taps"]):
            raise ConfigError(f"calibration.threshold must be one number or one per exit "
                              f"({len(cfg['exits']['taps'])} taps), got {thr}")

    def setup(self) -> None:
        super().setup()
        cfg, data = self.cfg, self.data
        assert data is not None
        p = cfg["parent"]
        self.parent = zoo.build(p["model"], num_classes=data.num_classes,
                                input_shape=data.input_shape, seed=cfg["seed"],
                                where="parent.model")
        load_parent_weights(self.parent, p)
        self.text = p["model"].get("kind") == "transformer"
        self.select, self.calibration = data.val.split(cfg["calibration"]["fraction"],
                                                       seed=cfg["seed"])
        self.say(f"validation {len(self.select)} inputs for early stopping, "
                 f"{len(self.calibration)} held out for calibration only")
        try:  # bad taps fail here, before the run folder exists
            self.exits = self.make_exits()
        except StageError as e:
            raise ConfigError(f"exits.{e}") from e
        if not self.exits.stages_.splittable:
            self.say(f"warning    {self.exits.stages_.reason}: no compute is saved")

    def make_exits(self, workdir: Path | None = None) -> MultiExit:
        e = self.cfg["exits"]
        return MultiExit(self.parent, e["taps"], head=e["head"], rule=e["rule"],
                         threshold=self.cfg["calibration"]["threshold"], train_probe=self.text,
                         head_train=self.train_config(e["head_train"]),
                         probe_train=self.train_config(self.cfg["parent"]["train"]), workdir=workdir,
                         cache_dir=e["cache_dir"], progress=self.cfg["progress"])

    def fit(self, run: Run, resume: bool) -> dict[str, Any]:
        cfg, data = self.cfg, self.data
        assert data is not None
        result: dict[str, Any] = {"data": {"summary": data.summary(), "classes": data.classes}}
        if not self.text and not cfg["parent"]["weights"]:
            self.parent.train().requires_grad_(True)
            res = fit(self.parent, TensorPairs(data.train.x, data.train.y),
                      TensorPairs(self.select.x, self.select.y),
                      self.train_config(cfg["parent"]["train"]), workdir=run.work / "parent",
                      resume=resume, description="parent")
            result["parent_fit"] = {"epochs_run": res.epochs_run, "best_epoch": res.best_epoch}
        self.parent.eval().requires_grad_(False)
        me = self.make_exits(run.work)
        me.fit(data.train, val=self.select, classes=data.classes,
               preprocessing=data.preprocessing, resume=resume)
        c = cfg["calibration"]
        if c["method"] == "calibrated":
            me.calibrate(self.calibration, epsilon=c["epsilon"], delta=c["delta"],
                         kind=c["kind"])
            if not me.calibration_["feasible"]:
                self.say(f"warning    no threshold meets {c['kind']} risk <= {c['epsilon']} "
                         f"with probability >= {1 - c['delta']:.2f} on {len(self.calibration)} "
                         "calibration inputs: every input runs the full parent")
        me.save(run.path / "exits")
        result.update(self.measure(me, data.test, self.calibration))
        result["fit"] = me.fit_summary_
        result["splittable"] = {"splittable": me.stages_.splittable, "reason": me.stages_.reason,
                                "stages": type(me.stages_).__name__}
        return result

    def measure(self, me: MultiExit, split: Any, calibration: Any) -> dict[str, Any]:
        """Metrics on ``split`` from the cache (with the operating point every calibration
        kind picks on ``calibration`` at the config's ε and δ), the staged check, the timing."""
        cfg, c = self.cfg, self.cfg["calibration"]
        b = cfg["baselines"]
        probs = me.exit_probs(split)
        result = evaluate_exits(me, probs, split.y, fixed=b["thresholds"], patience=b["patience"])
        result["calibration"] = me.calibration_ or {"method": "fixed", "threshold": me.threshold}
        cprobs = me.exit_probs(calibration)
        result["by_kind"] = []
        for kind in KINDS:
            cal = me.threshold_for(cprobs, calibration.y, epsilon=c["epsilon"], delta=c["delta"],
                                   kind=kind)
            answers, exits = me.decide(probs, cal.threshold)
            result["by_kind"].append({"kind": kind, "threshold": cal.threshold,
                                      "feasible": cal.feasible,
                                      **point(probs, answers, exits, me.exit_flops,
                                              me.parent_flops, split.y)})
        self.say(f"staged     inference over {len(split)} test inputs, stopping at the exits")
        pred = me.predict(split.x)
        _, sim_exits = me.decide(probs)
        result["staged"] = {"exit_agreement": float((pred.exits == sim_exits).float().mean()),
                            "accuracy": float((pred.labels == split.y).float().mean()),
                            "mean_flops": float(pred.flops.mean())}
        n = cfg["timing"]["inputs"]
        if n:
            self.say(f"timing     {n} test inputs, batch sizes {cfg['timing']['batch_sizes']}")
            result["timing"] = time_inference(me, split.x[:n], cfg["timing"]["batch_sizes"])
        self._figures = {"accuracy_flops": plot_accuracy_flops(result, cfg["name"])}
        if "calibrated" in result:
            self._figures["exit_histogram"] = plot_exit_histogram(result, cfg["name"])
        return result

    def histories(self, run: Run) -> dict[str, Path]:
        out = {"parent": run.work / "parent" / "metrics.csv",
               "probe": run.work / "probe" / "metrics.csv"}
        out.update({f"exit {p.name}": p / "metrics.csv"
                    for p in sorted((run.work / "heads").glob("*")) if p.is_dir()})
        return {k: v for k, v in out.items() if v.is_file()}

    def figures(self, run: Run, result: dict[str, Any]) -> dict[str, Figure]:
        return self._figures

    def report(self, rep: Report, run: Run, result: dict[str, Any]) -> None:
        rep.add_text(f"calibration: {result['calibration']}", muted=True)
        if not result["splittable"]["splittable"]:
            rep.add_text(f"the parent could not be cut at the taps ({result['splittable']['reason']}):"
                         " every input ran the whole parent", muted=True)
        rep.add_heading(f"Calibrated operating points at ε = {self.cfg['calibration']['epsilon']}"
                        f", δ = {self.cfg['calibration']['delta']}, by risk")
        rep.add_table([_point_row(r) for r in result["by_kind"]])
        rep.add_heading("Each exit alone")
        rep.add_table(result["exits_alone"])
        rep.add_heading("Fixed thresholds (SDN-style)")
        rep.add_table([_point_row(r) for r in result["fixed"]])
        if result.get("patience"):
            rep.add_heading("Patience (PABEE)")
            rep.add_table([_point_row(r) for r in result["patience"]])
        rep.add_heading("Staged inference (the parent stops at the exit)")
        rep.add_table([result["staged"]])
        if result.get("timing"):
            rep.add_heading("Wall-clock time per input")
            rep.add_table(result["timing"])

    @classmethod
    def summary_rows(cls, result: dict[str, Any]) -> list[dict[str, Any]]:
        def row(model: str, r: dict[str, Any]) -> dict[str, Any]:
            return {"model": model, "accuracy": r["accuracy"], "mflops": r["mean_flops"] / 1e6,
                    "flops_saved": r.get("flops_saved", 0.0), "agreement": r.get("agreement", 1.0)}

        rows = [row("full parent", result["full"])]
        if "calibrated" in result:
            rows.append(row("calibrated exits", result["calibrated"]))
        rows += [row(f"calibrated, {r['kind']}", r) for r in result.get("by_kind", [])]
        rows += [row(f"fixed {r['threshold']:g}", r) for r in result["fixed"]]
        rows += [row(f"patience {r['patience']}", r) for r in result.get("patience", [])]
        return rows

    @classmethod
    def summary_text(cls, result: dict[str, Any]) -> str:
        lines = [super().summary_text(result)]
        cal = result["calibration"]
        if "feasible" in cal and not cal["feasible"]:
            lines.append(f"\nno threshold meets {cal['kind']} risk <= {cal['epsilon']} with "
                         f"probability >= {1 - cal['delta']:.2f} on {cal['n']} calibration "
                         "inputs: every input runs the full parent")
        elif "calibrated" in result:
            c = result["calibrated"]
            what = "disagreement with the full parent" if cal.get("kind") == "consistency" \
                else "accuracy drop"
            lines.append(f"\ncalibrated threshold {c['threshold']:.4f}: {what} <= "
                         f"{cal.get('epsilon')} with probability >= {1 - cal.get('delta', 0):.2f}; "
                         f"test accuracy {c['accuracy']:.4f} (full parent "
                         f"{result['full']['accuracy']:.4f}), {c['flops_saved']:.1%} of the "
                         "parent's FLOPs saved")
        for t in result.get("timing", []):
            lines.append(f"batch {t['batch_size']}: {t['exits_ms']:.3f} ms per input with "
                         f"exits, {t['full_ms']:.3f} ms the full parent ({t['speedup']:.2f}x)")
        return "\n".join(lines)

    def evaluate(self, run: Run, split: str) -> tuple[dict[str, Any], dict[str, Figure]]:
        self.setup()  # the same data and calibration split as the run
        me = MultiExit.load(run.path / "exits", self.parent, cache_dir=self.cfg["exits"]["cache_dir"],
                            progress=self.cfg["progress"])
        result = self.measure(me, self.data.splits()[split], self.calibration)
        return result, {f"eval-{split}-{k}": v for k, v in self._figures.items()}

    @classmethod
    def compare(cls, runs: list[Run]) -> str:
        rows = [r for run in runs for r in cls.summary_rows(run.read_metrics())]
        return metrics.format_table(metrics.mean_std_rows(rows, ["model"])) if rows \
            else "no finished runs"


def _point_row(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "exits"} | {"exits": " / ".join(map(str, r["exits"]))}


def load_run_exits(run: Run, progress: bool = False) -> MultiExit:
    """The saved MultiExit of a finished exits run (its parent rebuilt from the saved spec)."""
    if not (run.path / "exits" / "exits.json").is_file():
        raise ConfigError(f"{run.path} has no saved exits yet (the run did not finish); resume "
                          f"it with: branchnet exits fit --resume {run.path}")
    cache_dir = run.read_config().get("exits", {}).get("cache_dir")
    return MultiExit.load(run.path / "exits", cache_dir=cache_dir, progress=progress)
