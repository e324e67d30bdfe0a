"""The ``model`` run kind: one plain classifier from a YAML config (``branchnet model fit``).

The model (``model: {kind: mlp | cnn | alexnet, ...}``, see :mod:`branchnet.zoo`) is trained
with :func:`branchnet.engine.fit` (resumable), evaluated on the test split and saved::

    RUN/config.yaml  RUN/run.json  RUN/metrics.json  RUN/report.html
    RUN/figures/*.png                training curves, confusion matrix
    RUN/model/weights.safetensors    the trained weights
    RUN/model/model.json             spec, classes, preprocessing, tap-able layer names
    RUN/work/model/                  checkpoints and per-epoch metrics.csv

:func:`branchnet.saved_model.load_model` rebuilds the trained network from ``RUN/model`` alone.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from matplotlib.figure import Figure
from pydantic import Field
from torch import nn

from branchnet import metrics, zoo
from branchnet.data import Split
from branchnet.data.batches import TensorPairs
from branchnet.engine import fit
from branchnet.errors import ConfigError
from branchnet.protocol import Experiment, fit_record
from branchnet.report import Report, plot_time_curve
from branchnet.runs import Run
from branchnet.saved_model import load_model, predict_proba, save_model
from branchnet.schema import DataSection, Section, Seed, TrainSection

__all__ = ["ClassifierConfig", "ClassifierExperiment", "evaluate_model"]

#: the model kinds a classifier run accepts
PLAIN_MODELS = {"mlp": "mlp", "cnn": "cnn", "alexnet": "alexnet", "resnet": "resnet"}


class ClassifierConfig(Section):
    name: str = "model"
    seed: Seed = 0
    data: DataSection = Field(default_factory=DataSection)
    #: free-form: {kind: mlp | cnn | alexnet, ...the model's own arguments}; the number of
    #: classes and the input size come from the data
    model: dict[str, Any] = Field(default_factory=lambda: {"kind": "alexnet"})
    train: TrainSection = Field(default_factory=TrainSection)
    #: evaluate the test split after every epoch, for the time curve only (never for stopping)
    monitor_test: bool = False
    #: test-time augmentation: average each test image's probabilities with its mirror image's
    test_flip: bool = False
    progress: bool = True


def evaluate_model(model: nn.Module, split: Split, classes: list[str],
                   flip: bool = False) -> dict[str, Any]:
    """Accuracy, NLL, ECE, Brier, per-class accuracy and the confusion matrix on ``split``;
    with ``flip`` (images only), the probabilities are the mean over each image and its mirror
    image (test-time augmentation), and ``accuracy_single_view`` is the plain one."""
    probs = predict_proba(model, split.x)
    extra: dict[str, Any] = {}
    if flip:
        if split.x.ndim != 4:
            raise ConfigError(f"test_flip needs image inputs [N, C, H, W], got inputs of shape "
                              f"{tuple(split.x.shape)}")
        extra["accuracy_single_view"] = metrics.accuracy(probs.argmax(1), split.y)
        probs = (probs + predict_proba(model, split.x.flip(-1))) / 2
    pred = probs.argmax(1)
    return {**extra,
        "n_test": len(split), "accuracy": metrics.accuracy(pred, split.y),
        "nll": metrics.nll(probs, split.y), "ece": metrics.ece(probs, split.y),
        "brier": metrics.brier(probs, split.y),
        "per_class": [{k: r[k] for k in ("class", "support", "accuracy", "mean_confidence")}
                      for r in metrics.per_class_table(pred, split.y, classes, probs.max(1).values)],
        "confusion": metrics.confusion_matrix(pred, split.y, len(classes)).tolist(),
    }


def parameters_per_layer(model: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        out[layer] = out.get(layer, 0) + p.numel()
    return out


class ClassifierExperiment(Experiment):
    kind = "model"
    schema = ClassifierConfig
    captions: ClassVar[dict[str, str]] = {"training": "training curves (validation)",
                                          "confusion": "confusion matrix (test)",
                                          "time_curve": "accuracy over training time"}

    @classmethod
    def check(cls, cfg: dict[str, Any]) -> None:
        super().check(cfg)
        zoo.check_spec(cfg["model"], PLAIN_MODELS)

    def setup(self) -> None:
        super().setup()
        data = self.data
        assert data is not None
        if self.cfg["test_flip"] and len(data.input_shape) != 3:
            raise ConfigError(f"test_flip needs image inputs (C, H, W), got inputs of shape "
                              f"{tuple(data.input_shape)}")
        self.model = zoo.build(self.cfg["model"], num_classes=data.num_classes,
                               input_shape=data.input_shape, seed=self.cfg["seed"],
                               aliases=PLAIN_MODELS)
        self.say(f"model      {zoo.spec_of(self.model)} "
                 f"({zoo.num_parameters(self.model):,} parameters)")

    def fit(self, run: Run, resume: bool) -> dict[str, Any]:
        data, model, cfg = self.data, self.model, self.cfg
        assert data is not None
        spec = zoo.spec_of(model)
        val = TensorPairs(data.val.x, data.val.y) if len(data.val) else None
        res = fit(model, TensorPairs(data.train.x, data.train.y), val,
                  self.train_config(cfg["train"]), workdir=run.work / "model", resume=resume,
                  description=f"{cfg['model']['kind']} classifier",
                  monitor=TensorPairs(data.test.x, data.test.y) if cfg["monitor_test"] else None)
        result: dict[str, Any] = {
            **evaluate_model(model, data.test, data.classes, flip=cfg["test_flip"]),
            "model": {"spec": spec, "parameters": zoo.num_parameters(model),
                      "parameters_per_layer": parameters_per_layer(model)},
            "fit": fit_record(res),
            "data": {"summary": data.summary(), "classes": data.classes},
        }
        save_model(model, run.path / "model", {
            "classes": data.classes, "preprocessing": data.preprocessing,
            "input_shape": list(data.input_shape), "name": cfg["name"], "seed": cfg["seed"],
        })
        return result

    def figures(self, run: Run, result: dict[str, Any]) -> dict[str, Figure]:
        figs = {"confusion": metrics.plot_confusion(result["confusion"],
                                                    result["data"]["classes"], title="test")}
        fit_info = result["fit"]
        if any("monitor_acc" in r for r in fit_info["history"]):
            figs["time_curve"] = plot_time_curve(
                fit_info["history"], fit_info["epoch_seconds"],
                title=f"{result['model']['spec']['kind']}: accuracy over training time")
        return figs

    def report(self, rep: Report, run: Run, result: dict[str, Any]) -> None:
        rep.add_heading("Per class")
        rep.add_table(result["per_class"])
        rep.add_heading("Model")
        rep.add_pre(json.dumps(result["model"]["spec"]))
        rep.add_table([{"layer": k, "parameters": v}
                       for k, v in result["model"]["parameters_per_layer"].items()])

    @classmethod
    def summary_rows(cls, result: dict[str, Any]) -> list[dict[str, Any]]:
        fit_info = result.get("fit", {})
        single = ({"accuracy_single_view": result["accuracy_single_view"]}
                  if "accuracy_single_view" in result else {})
        return [{"accuracy": result["accuracy"], **single, "nll": result["nll"], "ece": result["ece"],
                 "brier": result["brier"], "n_test": result["n_test"],
                 "epochs": fit_info.get("epochs_run"), "best_epoch": fit_info.get("best_epoch"),
                 "train_minutes": (fit_info.get("epoch_seconds") or [0.0])[-1] / 60,
                 "parameters": result.get("model", {}).get("parameters")}]

    @classmethod
    def summary_text(cls, result: dict[str, Any]) -> str:
        per_class = [{k: r[k] for k in ("class", "support", "accuracy")} for r in result["per_class"]]
        return (f"\n{metrics.format_table(cls.summary_rows(result))}\n\n"
                f"{metrics.format_table(per_class)}")

    def evaluate(self, run: Run, split: str) -> tuple[dict[str, Any], dict[str, Figure]]:
        model, meta = load_model(run.path)
        data = self.load_data()
        if data.classes != meta["classes"]:
            raise ConfigError(f"the data's classes {data.classes} differ from the saved model's "
                              f"{meta['classes']}")
        return {"split": split, **evaluate_model(model, data.splits()[split], data.classes,
                                                 flip=self.cfg["test_flip"])}, {}
