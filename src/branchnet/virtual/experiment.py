"""Train one virtual-branch ensemble from a YAML config into a run folder.

What ``branchnet vbranch fit CONFIG`` runs. Two tasks:

- ``task: classify``: a K-branch classifier (``model.kind`` mlp, cnn, resnet, resnet18 or
  densenet, with ``branches`` and ``shared_frac``) on any dataset of :func:`branchnet.data.load`;
  each branch trains on its own minibatches, drawn from its own bag (``bagging``); evaluation
  reports every branch, both merges (mean of logits, mean of probabilities) and the diversity
  of the branches (Breiman's strength and correlation, disagreement, Q, double fault, MI).
- ``task: embed``: a K-branch embedding network trained with batch-hard soft-margin triplets
  on P x K batches of Omniglot characters, evaluated by 20-way one-shot accuracy on held-out
  alphabets (the usual ``runNN`` layout) and by retrieval (precision@1, mAP); the ensemble's
  embedding is the concatenation of the branches'.

The run folder::

    RUN/config.yaml  RUN/metrics.json  RUN/report.html  RUN/figures/*.png
    RUN/model/weights.safetensors  RUN/model/model.json   the trained network (safetensors + JSON)
    RUN/predictions.safetensors    test outputs per branch (N, K, C) and labels (classify)
    RUN/work/model/                checkpoints (resumable) and metrics.csv
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
from matplotlib.figure import Figure
from safetensors.torch import save_file
from torch import nn

from branchnet import metrics
from branchnet.analysis.diversity import ensemble_report
from branchnet.checkpoint import save_weights
from branchnet.classifier import load_model
from branchnet.classifier import model_outputs as outputs_of
from branchnet.config import DATA_DEFAULTS, ConfigError, load_config, load_data, merge_config, resolve_paths
from branchnet.data.batches import TensorPairs
from branchnet.engine import TrainConfig, fit
from branchnet.errors import BranchnetError
from branchnet.report import Report, plot_training_curves
from branchnet.runs import Run
from branchnet.virtual import models as vmodels
from branchnet.virtual.bagging import BaggedPairs, BranchBags
from branchnet.virtual.merge import branch_probs, check_merge, ensemble_score, merge_probs, per_branch_loss

__all__ = ["DEFAULTS", "VBranchError", "build_vmodel_for", "evaluate_classifier", "load_vbranch_config",
           "load_vrun_model", "run_vbranch"]

DEFAULTS: dict[str, Any] = {
    "name": "vbranch",
    "seed": 0,
    "task": "classify",
    # one split for every seed, so that single-branch runs of different seeds form
    # independent ensembles on the same test set
    "data": {**DATA_DEFAULTS, "split_seed": 0},
    # free-form: {kind: mlp | cnn | resnet | resnet18 | densenet, branches: K, shared_frac: s,
    # ...the model's own arguments}; classes and input shape come from the data
    "model": {"kind": "mlp", "branches": 4, "shared_frac": 0.5},
    "bagging": {"mode": "none", "frac": 1.0},
    "merge": "before_mean",
    "train": TrainConfig().to_dict(),
    "embedding": {
        "train": [], "held_out": [], "image_size": 28, "dim": 64, "P": 8, "K": 4,
        "steps_per_epoch": 100, "margin": "soft", "within_groups": True,
        "disjoint_groups": False, "runs": None, "n_runs": 20, "ways": 20,
    },
    "progress": True,
}

TASKS = ("classify", "embed")

# model kind -> builder in branchnet.virtual.models
_BUILDERS: dict[str, str] = {"mlp": "vmlp", "cnn": "vcnn", "resnet": "vresnet",
                             "resnet18": "vresnet18", "densenet": "vdensenet_bc"}


class VBranchError(BranchnetError, ValueError):
    """A virtual-branch config or run folder is invalid."""


def load_vbranch_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a vbranch YAML config, apply ``key.sub=value`` overrides, merge into the defaults."""
    cfg = load_config(path, overrides, defaults=DEFAULTS)
    check_config(cfg)
    return cfg


def check_config(cfg: dict[str, Any]) -> None:
    if cfg["task"] not in TASKS:
        raise ConfigError(f"task must be one of {list(TASKS)}, got {cfg['task']!r}")
    try:
        check_merge(cfg["merge"], "embedding" if cfg["task"] == "embed" else "classifier")
    except ValueError as e:
        raise ConfigError(str(e)) from e


def build_vmodel_for(spec: dict[str, Any], num_classes: int, input_shape: tuple[int, ...],
                     seed: int) -> nn.Module:
    """The virtual model of ``spec`` sized for ``num_classes`` outputs and ``input_shape``."""
    if not isinstance(spec, dict) or spec.get("kind") not in _BUILDERS:
        raise VBranchError(f"model.kind must be one of {sorted(_BUILDERS)}, got "
                           f"{spec.get('kind') if isinstance(spec, dict) else spec!r}")
    spec = dict(spec)
    builder = getattr(vmodels, _BUILDERS[spec.pop("kind")])
    params = inspect.signature(builder).parameters
    unknown = sorted(set(spec) - set(params))
    if unknown:
        raise VBranchError(f"unknown option(s) {unknown} for model kind; valid options: "
                           f"{sorted(set(params) - {'num_classes', 'input_shape'})}")
    spec["num_classes"] = num_classes
    if "input_shape" in params:
        spec["input_shape"] = tuple(input_shape)
    if "sizes" in params:
        sizes = list(spec.get("sizes", ["auto", 512]))
        if not sizes or sizes[0] == "auto":
            sizes[:1] = [int(np.prod(input_shape))]
        spec["sizes"] = sizes
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            return builder(**spec)
        except (ValueError, TypeError) as e:
            raise VBranchError(f"cannot build virtual model {spec}: {e}") from e


def evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Per-branch and ensemble metrics for both merges, and the branches' diversity."""
    return evaluate_outputs(outputs_of(model, x), y)


def evaluate_outputs(out: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """:func:`evaluate_classifier` of per-branch outputs ``(N, K, C)`` already computed."""
    probs = branch_probs(out)
    result: dict[str, Any] = {"n": len(y)}
    for how in ("before_mean", "after_mean"):
        result[how] = ensemble_report(probs, y, merge_probs(out, how))
    return result


def oob_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 bags: BranchBags) -> list[float | None]:
    """Each branch's accuracy on the training rows outside its bag (None when it saw all)."""
    out = outputs_of(model, x)
    accs: list[float | None] = []
    for k, oob in enumerate(bags.oob):
        accs.append(float((out[oob, k].argmax(-1) == y[oob]).float().mean()) if oob.any() else None)
    return accs


def _train_config(cfg: dict[str, Any]) -> TrainConfig:
    return TrainConfig.from_dict({**cfg["train"], "seed": cfg["seed"], "progress": cfg["progress"]})


def run_vbranch(cfg: dict[str, Any], run: Run, resume: bool = False,
                config_dir: Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train, evaluate, save and report one virtual-branch run; returns its metrics."""
    cfg = resolve_paths(merge_config(DEFAULTS, cfg), config_dir)
    check_config(cfg)
    if resume and (run.path / "metrics.json").is_file():  # finished: nothing to do again
        return run.read_metrics()
    run.write_config(cfg)
    if cfg["task"] == "embed":
        from branchnet.virtual.embedding_experiment import run_embedding

        return run_embedding(cfg, run, resume=resume, quiet=quiet)
    return _run_classify(cfg, run, resume, config_dir, quiet)


def _run_classify(cfg: dict[str, Any], run: Run, resume: bool, config_dir: Path | None,
                  quiet: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    data = load_data(cfg, config_dir)
    say(f"data       {data.summary()}")
    seed = cfg["seed"]
    model = build_vmodel_for(cfg["model"], data.num_classes, tuple(data.input_shape), seed)
    K = int(model.spec["branches"])
    n_params = vmodels.count_parameters(model)
    say(f"model      {model.spec} ({n_params:,} parameters)")
    bag = cfg["bagging"]
    try:
        bags = BranchBags.make(len(data.train), K, mode=bag["mode"], frac=bag["frac"], seed=seed)
    except ValueError as e:
        raise VBranchError(f"bagging: {e}") from e
    say(f"bagging    {bag['mode']} (frac {bag['frac']}): unique rows per branch "
        + ", ".join(f"{u:.1%}" for u in bags.unique_fraction()))
    val = TensorPairs(data.val.x, data.val.y) if len(data.val) else None
    res = fit(model, BaggedPairs(data.train.x, data.train.y, bags), val, _train_config(cfg),
              workdir=run.work / "model", resume=resume, loss_fn=per_branch_loss,
              score_fn=ensemble_score, description=f"{K}-branch {model.spec['kind']}")
    out = outputs_of(model, data.test.x)
    test = evaluate_outputs(out, data.test.y)
    main = test[cfg["merge"]]
    result: dict[str, Any] = {
        "task": "classify", "branches": K, "shared_frac": model.spec.get("shared_frac"),
        "bagging": bag, "merge": cfg["merge"], "n_test": test["n"],
        "accuracy": main["ensemble"]["accuracy"], "nll": main["ensemble"]["nll"],
        "ece": main["ensemble"]["ece"], "brier": main["ensemble"]["brier"],
        "parameters": n_params, "test": test,
        "oob_accuracy": oob_accuracy(model, data.train.x, data.train.y, bags),
        "model": {"spec": model.spec, "parameters": n_params},
        "fit": {k: v for k, v in res.to_dict().items() if k != "best_checkpoint"},
        "data": {"summary": data.summary(), "classes": data.classes},
    }
    save_file({"outputs": out.contiguous(), "y": data.test.y.contiguous()},
              str(run.path / "predictions.safetensors"))
    save_vmodel(model, run.path / "model", {
        "classes": data.classes, "preprocessing": data.preprocessing,
        "input_shape": list(data.input_shape), "name": cfg["name"], "seed": seed, "task": "classify",
    })
    result["seconds"] = time.perf_counter() - t0
    run.write_metrics(result)
    run.save_figure(plot_training_curves({"model": run.work / "model" / "metrics.csv"}), "training")
    run.save_figure(plot_branches(main), "branches")
    run.save_figure(plot_pairwise(main), "pairwise")
    write_report(run, cfg, result)
    say(summary_text(result))
    return result


def save_vmodel(model: nn.Module, path: Path, meta: dict[str, Any]) -> Path:
    """``path/weights.safetensors`` + ``path/model.json`` (spec and ``meta``)."""
    path.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), path / "weights.safetensors")
    tmp = path / ".model.json.tmp"
    tmp.write_text(json.dumps({"spec": model.spec, **meta,
                               "parameters": vmodels.count_parameters(model)}, indent=1))
    tmp.replace(path / "model.json")
    return path


def load_vrun_model(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The trained virtual model of a run folder, in eval mode, and its metadata."""
    return load_model(run_dir, vmodels.build_vmodel, command="vbranch")


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    """One table row: ensemble and mean-branch accuracy, NLL, ECE, diversity, parameters."""
    if result.get("task") == "embed":
        return {"branches": result["branches"], "shared_frac": result["shared_frac"],
                "oneshot": result["oneshot"]["ensemble"]["accuracy"],
                "oneshot_branch_mean": result["oneshot"]["branch_mean"],
                "precision_at_1": result["retrieval"]["ensemble"]["precision_at_1"],
                "mAP": result["retrieval"]["ensemble"]["mAP"], "parameters": result["parameters"]}
    rep = result["test"][result["merge"]]
    return {"branches": result["branches"], "shared_frac": result["shared_frac"],
            "bagging": result["bagging"]["mode"], "accuracy": rep["ensemble"]["accuracy"],
            "branch_accuracy": rep["branch_mean"]["accuracy"], "nll": rep["ensemble"]["nll"],
            "ece": rep["ensemble"]["ece"], "strength": rep["diversity"]["strength"],
            "correlation": rep["diversity"]["correlation"],
            "disagreement": rep["diversity"]["disagreement"], "parameters": result["parameters"]}


def summary_text(result: dict[str, Any]) -> str:
    return "\n" + metrics.format_table([summary_row(result)])


def plot_branches(rep: dict[str, Any]) -> Figure:
    """Accuracy of every branch next to the ensemble's."""
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    accs = [b["accuracy"] for b in rep["branches"]]
    labels = [f"branch {k}" for k in range(len(accs))] + ["ensemble"]
    ax.bar(labels, [*accs, rep["ensemble"]["accuracy"]],
           color=["#8aa6c1"] * len(accs) + ["#1f4e79"])
    lo = min([*accs, rep["ensemble"]["accuracy"]])
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_ylabel("test accuracy")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def plot_pairwise(rep: dict[str, Any]) -> Figure:
    """Pairwise disagreement between branches (a K x K heatmap)."""
    mat = np.asarray(rep["diversity"].get("disagreement_matrix", [[0.0]]), dtype=float)
    fig = Figure(figsize=(3.8, 3.2))
    ax = fig.subplots()
    im = ax.imshow(mat, cmap="viridis", vmin=0)
    ax.set_title("pairwise disagreement")
    ax.set_xlabel("branch")
    ax.set_ylabel("branch")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def write_report(run: Run, cfg: dict[str, Any], result: dict[str, Any]) -> Path:
    rep = Report(f"branchnet vbranch: {cfg['name']}")
    rep.add_text(result.get("data", {}).get("summary", ""))
    rep.add_heading("Summary")
    rep.add_table([summary_row(result)])
    if result.get("task") == "classify":
        for how in ("before_mean", "after_mean"):
            r = result["test"][how]
            rep.add_heading(f"Test split, {how.replace('_', ' ')} merge")
            rows = [{"member": f"branch {k}", **b} for k, b in enumerate(r["branches"])]
            rows.append({"member": "ensemble", **r["ensemble"]})
            rep.add_table(rows)
            rep.add_table([{k: v for k, v in r["diversity"].items() if not k.endswith("matrix")}])
    rep.add_heading("Figures")
    for name in ("training", "branches", "pairwise", "oneshot"):
        p = run.figures / f"{name}.png"
        if p.is_file():
            rep.add_figure(p, name)
    rep.add_heading("Model")
    rep.add_pre(json.dumps(result["model"]["spec"]))
    rep.add_heading("Configuration")
    rep.add_pre(yaml.safe_dump(cfg, sort_keys=False))
    return rep.write(run.path / "report.html")
