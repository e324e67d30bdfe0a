"""The ``probe`` run kind: a linear probe on every tapped layer of a frozen parent, the
*probing curve* that says which layer a branch should read (``branchnet probe fit``).

For each layer, a logistic regression (scikit-learn, on standardised features) is fitted on
the cached activations of the training and validation splits and scored on the test split:
accuracy and balanced accuracy (the mean per-class recall, for imbalanced classes), for the
classes and, with ``targets: [classes, groups]``, for the data's groups. All layers are cached
in one pass over the data (:meth:`~branchnet.cache.ActivationCache.get_many`), so the cost is
one forward pass of the parent per split.

Example:
    >>> from branchnet.data import load
    >>> data = load("digits", seed=0, progress=False)
    >>> from branchnet import models
    >>> import tempfile
    >>> rows = probing_curve(models.mlp([64, 32], 10), data, ["flatten", "hidden.0"],
    ...                      cache_dir=tempfile.mkdtemp(), progress=False)
    >>> [r["layer"] for r in rows], rows[0]["accuracy"] > 0.9
    (['flatten', 'hidden.0'], True)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from pydantic import Field
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm import tqdm

from branchnet import metrics, zoo
from branchnet.cache import ActivationCache
from branchnet.config import check_file
from branchnet.data import Data
from branchnet.data.imagefolder import default_cache_dir
from branchnet.errors import ConfigError
from branchnet.protocol import Experiment
from branchnet.report import Report
from branchnet.runs import Run
from branchnet.schema import DataSection, PositiveFloat, PositiveInt, Section, Seed
from branchnet.taps import layer_names

__all__ = ["ProbeConfig", "ProbeExperiment", "plot_probing_curve", "probing_curve"]

TARGETS = ("classes", "groups")


def _targets(data: Data, target: str) -> tuple[list[str], np.ndarray]:
    """(names, lookup from class index to target index) for ``classes`` or ``groups``."""
    if target == "classes":
        return list(data.classes), np.arange(data.num_classes)
    if not data.groups:
        raise ConfigError("targets: groups needs data with a group column (data.group_column)")
    names = list(data.groups)
    lut = np.full(data.num_classes, -1)
    for g, members in enumerate(data.groups.values()):
        for c in members:
            lut[data.classes.index(c)] = g
    return names, lut


def probing_curve(parent: nn.Module, data: Data, layers: list[str], *,
                  targets: tuple[str, ...] | list[str] = ("classes",), C: float = 1.0,
                  max_iter: int = 2000, cache_dir: str | Path | None = None,
                  progress: bool = True) -> list[dict[str, Any]]:
    """One row per (layer, target): the test accuracy and balanced accuracy of a logistic
    regression fitted on the layer's activations of ``data.train`` and ``data.val``."""
    cache = ActivationCache(cache_dir or default_cache_dir() / "activations")
    acts = {name: cache.get_many(parent, layers, split, preprocessing=data.preprocessing,
                                 progress=progress)
            for name, split in data.splits().items()}
    y_fit = torch.cat([data.train.y, data.val.y]).numpy()
    y_test = data.test.y.numpy()
    rows = []
    with tqdm(total=len(layers) * len(targets), desc="probes", unit="probe",
              disable=not progress) as bar:
        for layer in layers:  # each layer's features read once, for every target
            x_fit = torch.cat([acts["train"][layer].as_tensor(),
                               acts["val"][layer].as_tensor()]).flatten(1).numpy()
            x_test = acts["test"][layer].as_tensor().flatten(1).numpy()
            for target in targets:
                names, lut = _targets(data, target)
                clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
                clf.fit(x_fit, lut[y_fit])
                pred = clf.predict(x_test)
                rows.append({"layer": layer, "target": target, "n_classes": len(names),
                             "features": int(x_fit.shape[1]),
                             "accuracy": float(np.mean(pred == lut[y_test])),
                             "balanced_accuracy": float(balanced_accuracy_score(lut[y_test],
                                                                                pred))})
                bar.update()
    return rows


def plot_probing_curve(rows: list[dict[str, Any]], title: str = "") -> Figure:
    """Balanced accuracy (solid) and accuracy (dashed) of the probe at each layer, per target."""
    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.add_subplot()
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    for target in dict.fromkeys(r["target"] for r in rows):
        sel = {r["layer"]: r for r in rows if r["target"] == target}
        line, = ax.plot(range(len(layers)), [sel[la]["balanced_accuracy"] for la in layers],
                        marker="o", label=f"{target}: balanced accuracy")
        ax.plot(range(len(layers)), [sel[la]["accuracy"] for la in layers], ls="--",
                color=line.get_color(), alpha=0.6, label=f"{target}: accuracy")
    ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right")
    ax.set_ylabel("test score of a linear probe")
    ax.set_title(title or "probing curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


class ProbeParent(Section):
    #: {kind: transformer | mlp | cnn, ...}; see branchnet.zoo
    model: dict[str, Any] = Field(default_factory=lambda: {"kind": "transformer",
                                                           "source": "tiny"})
    weights: str | None = None


class ProbeConfig(Section):
    name: str = "probe"
    seed: Seed = 0
    data: DataSection = Field(default_factory=DataSection)
    parent: ProbeParent = Field(default_factory=ProbeParent)
    #: the taps to probe; null: every tap of a text parent (other parents must list them)
    layers: list[str] | None = None
    targets: list[Literal[TARGETS]] = Field(default_factory=lambda: ["classes"])  # type: ignore[valid-type]
    C: PositiveFloat = 1.0
    max_iter: PositiveInt = 2000
    cache_dir: str | None = None
    progress: bool = True


class ProbeExperiment(Experiment):
    kind = "probe"
    schema = ProbeConfig
    contents = "report.html, metrics.json, figures/"
    captions: ClassVar[dict[str, str]] = {"probing_curve": "linear probe at each layer (test)"}

    @classmethod
    def check(cls, cfg: dict[str, Any]) -> None:
        super().check(cfg)
        zoo.check_spec(cfg["parent"]["model"], where="parent.model")
        check_file(cfg["parent"]["weights"], "parent.weights", "safetensors file")

    def setup(self) -> None:
        super().setup()
        data, cfg = self.data, self.cfg
        assert data is not None
        from branchnet.tree.parent import load_parent_weights

        self.parent = zoo.build(cfg["parent"]["model"], num_classes=data.num_classes,
                                input_shape=data.input_shape, seed=cfg["seed"],
                                where="parent.model")
        load_parent_weights(self.parent, cfg["parent"])
        names = layer_names(self.parent)
        layers = cfg["layers"]
        if layers is None and not hasattr(self.parent, "tap_names"):
            raise ConfigError("layers must list the taps to probe for this parent, got None; "
                              f"its layers are {names}")
        self.layers = list(layers or names)
        unknown = [la for la in self.layers if la not in names]
        if unknown:
            raise ConfigError(f"layers must be taps of the parent, got {unknown}; its layers "
                              f"are {names}")
        if "groups" in cfg["targets"]:
            _targets(data, "groups")

    def fit(self, run: Run, resume: bool) -> dict[str, Any]:
        cfg, data = self.cfg, self.data
        assert data is not None
        rows = probing_curve(self.parent, data, self.layers, targets=cfg["targets"], C=cfg["C"],
                             max_iter=cfg["max_iter"], cache_dir=cfg["cache_dir"],
                             progress=cfg["progress"])
        result: dict[str, Any] = {"probes": rows,
                                  "data": {"summary": data.summary(), "classes": data.classes,
                                           "groups": data.groups}}
        if hasattr(self.parent, "truncation"):
            result["truncation"] = {name: self.parent.truncation(split.x)
                                    for name, split in data.splits().items()}
        return result

    def histories(self, run: Run) -> dict[str, Path]:
        return {}  # logistic regressions, no training curves

    def figures(self, run: Run, result: dict[str, Any]) -> dict[str, Figure]:
        return {"probing_curve": plot_probing_curve(result["probes"], self.cfg["name"])}

    def report(self, rep: Report, run: Run, result: dict[str, Any]) -> None:
        rep.add_heading("Linear probes")
        rep.add_table(result["probes"])
        if "truncation" in result:
            rep.add_heading("Texts truncated at max_length")
            rep.add_table([{"split": k, **v} for k, v in result["truncation"].items()])

    @classmethod
    def summary_rows(cls, result: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: r[k] for k in ("layer", "target", "accuracy", "balanced_accuracy")}
                for r in result["probes"]]

    def evaluate(self, run: Run, split: str) -> tuple[dict[str, Any], dict[str, Figure]]:
        raise ConfigError("a probe run has no saved model to evaluate: its metrics.json holds "
                          "the test scores; run it again on other data instead")

    @classmethod
    def compare(cls, runs: list[Run]) -> str:
        rows = [r for run in runs for r in cls.summary_rows(run.read_metrics())]
        return metrics.format_table(metrics.mean_std_rows(rows, ["target", "layer"]))
