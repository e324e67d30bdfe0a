"""Train one plain classifier from a YAML config into a run folder.

This is what ``branchnet model fit CONFIG`` runs: the config is merged into :data:`DEFAULTS`
(unknown keys are errors; ``model`` is a free-form model spec, see :func:`branchnet.models.build`),
written resolved into the run folder, the model is trained with :func:`branchnet.engine.fit`
(resumable), evaluated on the test split and saved as safetensors + JSON::

    RUN/config.yaml                  the resolved configuration
    RUN/metrics.json                 test accuracy, NLL, ECE, Brier, per-class accuracy, history
    RUN/figures/*.png                training curves, confusion matrix
    RUN/report.html                  self-contained report
    RUN/model/weights.safetensors    the trained weights
    RUN/model/model.json             spec, classes, preprocessing, tap-able layer names
    RUN/work/model/                  checkpoints and per-epoch metrics.csv

:func:`load_model` rebuilds the trained network from ``RUN/model`` alone.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from branchnet import metrics, models
from branchnet.checkpoint import CheckpointError, load_weights, save_weights
from branchnet.config import DATA_DEFAULTS, load_config, load_data, merge_config, resolve_paths
from branchnet.data import Data, Split
from branchnet.data.batches import TensorPairs
from branchnet.engine import TrainConfig, fit
from branchnet.errors import BranchnetError
from branchnet.report import Report, plot_training_curves
from branchnet.runs import Run
from branchnet.taps import layer_names

__all__ = ["DEFAULTS", "ClassifierError", "build_model", "evaluate_model", "load_classifier_config",
           "load_model", "run_classifier"]

DEFAULTS: dict[str, Any] = {
    "name": "model",
    "seed": 0,
    "data": DATA_DEFAULTS,
    # free-form: {kind: mlp | cnn | alexnet, ...the model's own arguments}; num_classes and the
    # input size (mlp sizes[0] "auto", cnn / alexnet in_channels, alexnet image_size) come from
    # the data
    "model": {"kind": "alexnet"},
    "train": TrainConfig().to_dict(),
    "progress": True,
}

# the classes behind each model kind, to check a spec's keys against their arguments
_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "mlp": models.MLP, "cnn": models.SmallCNN, "alexnet": models.AlexNetSmall,
}


class ClassifierError(BranchnetError, ValueError):
    """A classifier config or saved model is invalid."""


def load_classifier_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a classifier YAML config, apply ``key.sub=value`` overrides, merge into the defaults."""
    return load_config(path, overrides, defaults=DEFAULTS)


def build_model(spec: dict[str, Any], data: Data, seed: int) -> nn.Module:
    """The model of ``spec`` sized for ``data`` (classes, input shape), initialised with ``seed``."""
    if not isinstance(spec, dict):
        raise ClassifierError(f"model must be a mapping like {{kind: alexnet}}, got {spec!r}")
    spec = dict(spec)
    kind = spec.get("kind")
    if kind not in _MODEL_CLASSES:
        raise ClassifierError(
            f"unknown model kind {kind!r}; known kinds are {sorted(_MODEL_CLASSES)}")
    allowed = set(inspect.signature(_MODEL_CLASSES[kind]).parameters) | {"kind"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ClassifierError(f"unknown option(s) {unknown} for model kind {kind!r}; "
                              f"valid options: {sorted(allowed - {'num_classes'})}")
    shape = data.input_shape
    spec["num_classes"] = data.num_classes
    if kind == "mlp":
        sizes = list(spec.get("sizes", ["auto", 256]))
        if not sizes or sizes[0] == "auto":
            sizes[:1] = [int(np.prod(shape))]
        spec["sizes"] = sizes
    else:
        if len(shape) != 3:
            raise ClassifierError(f"model kind {kind!r} needs images [C, H, W], but the data's "
                                  f"inputs have shape {tuple(shape)}")
        spec["in_channels"] = shape[0]
        if kind == "alexnet":
            spec["image_size"] = list(shape[1:])
    defaults = {k: p.default for k, p in inspect.signature(_MODEL_CLASSES[kind]).parameters.items()
                if p.default is not inspect.Parameter.empty}
    spec = {**defaults, **spec}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            return models.build(spec)
        except (ValueError, TypeError) as e:
            raise ClassifierError(f"cannot build model {spec}: {e}") from e


@torch.inference_mode()
def model_outputs(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The outputs of ``model`` (put in eval mode) for ``x``, in batches, as float32."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])


def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Class probabilities of ``model`` (put in eval mode) for ``x``, in batches."""
    return torch.softmax(model_outputs(model, x, batch_size), dim=1) if len(x) else torch.zeros(0)


def evaluate_model(model: nn.Module, split: Split, classes: list[str]) -> dict[str, Any]:
    """Accuracy, NLL, ECE, Brier, per-class accuracy and the confusion matrix on ``split``."""
    probs = predict_proba(model, split.x)
    pred = probs.argmax(1)
    return {
        "n": len(split), "accuracy": metrics.accuracy(pred, split.y),
        "nll": metrics.nll(probs, split.y), "ece": metrics.ece(probs, split.y),
        "brier": metrics.brier(probs, split.y),
        "per_class": [{k: r[k] for k in ("class", "support", "accuracy", "mean_confidence")}
                      for r in metrics.per_class_table(pred, split.y, classes, probs.max(1).values)],
        "confusion": metrics.confusion_matrix(pred, split.y, len(classes)).tolist(),
    }


def save_model(model: nn.Module, path: Path, meta: dict[str, Any]) -> Path:
    """``path/weights.safetensors`` + ``path/model.json`` (the spec and ``meta``)."""
    spec = models.spec_of(model)
    if spec is None:
        raise ClassifierError(f"cannot save {type(model).__name__}: only branchnet models "
                              "(mlp, cnn, alexnet) can be rebuilt from a spec")
    path.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), path / "weights.safetensors")
    full = {"spec": spec, **meta, "layers": layer_names(model),
            "parameters": models.num_parameters(model)}
    tmp = path / ".model.json.tmp"
    tmp.write_text(json.dumps(full, indent=1))
    tmp.replace(path / "model.json")
    return path


def load_model(run_dir: str | Path, build: Any = None,
               command: str = "model") -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a run folder (or of its ``model/`` folder), in eval mode, and its
    metadata (``spec``, ``classes``, ``preprocessing``, ``input_shape``, ``layers``, ...).
    ``build(spec) -> nn.Module`` rebuilds the network (default :func:`branchnet.models.build`);
    ``command`` names the ``branchnet COMMAND fit --resume`` that finishes an interrupted run."""
    build = build or models.build
    path = Path(run_dir)
    if not (path / "model.json").is_file():
        path = path / "model"
    meta_path = path / "model.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{run_dir} has no saved model (no model/model.json); if the run was "
                              f"interrupted, resume it with: branchnet {command} fit --resume {run_dir}")
    try:
        meta = json.loads(meta_path.read_text())
        model = build(meta["spec"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path} is damaged ({type(e).__name__}: {e})") from e
    weights, _ = load_weights(path / "weights.safetensors")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path / 'weights.safetensors'} does not match the model in "
                              f"{meta_path}: {e}") from e
    return model.eval(), meta


def run_classifier(cfg: dict[str, Any], run: Run, resume: bool = False,
                   config_dir: Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train, evaluate, save and report one classifier into ``run``; returns its metrics."""
    t0 = time.perf_counter()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    cfg = resolve_paths(merge_config(DEFAULTS, cfg), config_dir)
    run.write_config(cfg)
    data = load_data(cfg, config_dir)
    say(f"data       {data.summary()}")
    seed = cfg["seed"]
    model = build_model(cfg["model"], data, seed)
    spec = models.spec_of(model)
    say(f"model      {spec} ({models.num_parameters(model):,} parameters)")
    train_cfg = TrainConfig.from_dict({**cfg["train"], "seed": seed, "progress": cfg["progress"]})
    val = TensorPairs(data.val.x, data.val.y) if len(data.val) else None
    res = fit(model, TensorPairs(data.train.x, data.train.y), val, train_cfg,
              workdir=run.work / "model", resume=resume, description=f"{spec['kind']} classifier")
    test = evaluate_model(model, data.test, data.classes)
    result: dict[str, Any] = {
        "accuracy": test["accuracy"], "nll": test["nll"], "ece": test["ece"],
        "brier": test["brier"], "n_test": test["n"], "per_class": test["per_class"],
        "confusion": test["confusion"],
        "model": {"spec": spec, "parameters": models.num_parameters(model),
                  "parameters_per_layer": _parameters_per_layer(model)},
        "fit": {k: v for k, v in res.to_dict().items() if k != "best_checkpoint"},
        "data": {"summary": data.summary(), "classes": data.classes},
    }
    save_model(model, run.path / "model", {
        "classes": data.classes, "preprocessing": data.preprocessing,
        "input_shape": list(data.input_shape), "name": cfg["name"], "seed": seed,
    })
    result["seconds"] = time.perf_counter() - t0
    run.write_metrics(result)
    run.save_figure(plot_training_curves({"model": run.work / "model" / "metrics.csv"}), "training")
    run.save_figure(metrics.plot_confusion(test["confusion"], data.classes, title="test"),
                    "confusion")
    write_report(run, cfg, result)
    return result


def _parameters_per_layer(model: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        out[layer] = out.get(layer, 0) + p.numel()
    return out


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    fit_info = result.get("fit", {})
    return [{"accuracy": result["accuracy"], "nll": result["nll"], "ece": result["ece"],
             "brier": result["brier"], "n_test": result["n_test"],
             "epochs": fit_info.get("epochs_run"), "best_epoch": fit_info.get("best_epoch"),
             "parameters": result.get("model", {}).get("parameters")}]


def write_report(run: Run, cfg: dict[str, Any], result: dict[str, Any]) -> Path:
    rep = Report(f"branchnet model: {cfg['name']}")
    rep.add_text(result["data"]["summary"])
    rep.add_heading("Test split")
    rep.add_table(summary_rows(result))
    rep.add_heading("Figures")
    for name, caption in (("training", "training curves (validation)"),
                          ("confusion", "confusion matrix (test)")):
        p = run.figures / f"{name}.png"
        if p.is_file():
            rep.add_figure(p, caption)
    rep.add_heading("Per class")
    rep.add_table(result["per_class"])
    rep.add_heading("Model")
    rep.add_pre(json.dumps(result["model"]["spec"]))
    rep.add_table([{"layer": k, "parameters": v}
                   for k, v in result["model"]["parameters_per_layer"].items()])
    rep.add_heading("Configuration")
    rep.add_pre(yaml.safe_dump(cfg, sort_keys=False))
    return rep.write(run.path / "report.html")
