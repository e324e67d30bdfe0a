"""A plasticity experiment from a YAML config: ``branchnet plastic fit CONFIG``.

Two tasks in one harness (same data, optimizer, schedule, batch and epochs for every rule):

- ``task: sparse``: weight-level dynamic sparse training. ``sparsity.rule`` is ``dense`` (the
  baseline), ``static``, ``set``, ``rigl`` or ``snfs`` at ``sparsity.density`` with a uniform,
  ER or ERK layer distribution (:class:`branchnet.plastic.callback.DynamicSparsity`). ``model``
  is a plain classifier (``mlp``, ``cnn``, ``alexnet``) or a virtual-branch model (``vmlp``,
  ``vcnn``, ``resnet``, ``resnet18``, ``densenet``; ``branches: 1`` is the plain network).
- ``task: paths``: path-level plasticity in a residual network with gated candidate paths
  (:class:`branchnet.plastic.paths.PlasticResNet`), ``paths.mode`` ``plastic`` (drop and grow
  paths every ``paths.every`` steps), ``static`` (the same number of active paths, never
  changed) or ``stochastic_depth``.

The run folder holds ``config.yaml``, ``metrics.json`` (test accuracy, NLL, ECE; densities,
inference and training FLOPs, time spent updating masks; path-length statistics and swaps),
``figures/``, ``report.html`` and ``model/`` (weights and masks as safetensors, spec as JSON).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from branchnet import metrics
from branchnet.checkpoint import save_weights
from branchnet.classifier import build_model, model_outputs
from branchnet.config import DATA_DEFAULTS, ConfigError, load_config, load_data, merge_config, resolve_paths
from branchnet.data.batches import TensorPairs
from branchnet.engine import TrainConfig, fit
from branchnet.report import Report, plot_training_curves
from branchnet.runs import Run, finished_runs

__all__ = ["DEFAULTS", "load_plastic_config", "run_plastic", "summary_row"]

DEFAULTS: dict[str, Any] = {
    "name": "plastic",
    "seed": 0,
    "task": "sparse",
    "data": {**DATA_DEFAULTS, "split_seed": 0},
    "model": {"kind": "mlp", "sizes": ["auto", 256, 128]},
    "sparsity": {"rule": "rigl", "density": 0.1, "distribution": "erk", "dense_first": False,
                 "dense_last": False, "delta_t": 100, "t_end": 0.75, "alpha": 0.3,
                 "alpha_schedule": "cosine"},
    "paths": {"mode": "plastic", "widths": [16, 32, 64], "blocks_per_stage": 3,
              "candidates": "skip2", "max_active": None, "candidate_block": "basic",
              "every": 100, "n_swap": 1, "criterion": "gradient", "t_end": 0.75,
              "survival_last": 0.5},
    "train": TrainConfig().to_dict(),
    "progress": True,
}

TASKS = ("sparse", "paths")
SPARSE_RULES = ("dense", "static", "set", "rigl", "snfs")
_PLAIN = ("mlp", "cnn", "alexnet")


def load_plastic_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a plasticity YAML config, apply ``key.sub=value`` overrides, merge into the defaults."""
    cfg = load_config(path, overrides, defaults=DEFAULTS)
    check_config(cfg)
    return cfg


def check_config(cfg: dict[str, Any]) -> None:
    if cfg["task"] not in TASKS:
        raise ConfigError(f"task must be one of {list(TASKS)}, got {cfg['task']!r}")
    if cfg["task"] == "sparse" and cfg["sparsity"]["rule"] not in SPARSE_RULES:
        raise ConfigError(f"sparsity.rule must be one of {list(SPARSE_RULES)}, "
                          f"got {cfg['sparsity']['rule']!r}")


def _build_sparse_model(cfg: dict[str, Any], data: Any) -> tuple[nn.Module, bool]:
    """(model, is_virtual) for ``task: sparse``."""
    kind = cfg["model"].get("kind")
    if kind in _PLAIN:
        return build_model(cfg["model"], data, cfg["seed"]), False
    from branchnet.virtual.experiment import build_vmodel_for

    spec = dict(cfg["model"])
    spec["kind"] = {"vmlp": "mlp", "vcnn": "cnn"}.get(kind, kind)
    spec.setdefault("branches", 1)
    return build_vmodel_for(spec, data.num_classes, tuple(data.input_shape), cfg["seed"]), True


def _sparsity_callback(cfg: dict[str, Any], example: torch.Tensor) -> Any:
    from branchnet.plastic.callback import DynamicSparsity

    s = cfg["sparsity"]
    return DynamicSparsity(
        s["rule"], density=float(s["density"]), distribution=s["distribution"],
        dense_first=s["dense_first"], dense_last=s["dense_last"], delta_t=int(s["delta_t"]),
        t_end=s["t_end"], alpha=s["alpha"],
        alpha_schedule=s["alpha_schedule"], seed=cfg["seed"], example_input=example)


def _test_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, virtual: bool) -> dict[str, Any]:
    out = model_outputs(model, x)
    if virtual:
        from branchnet.virtual.merge import merge_probs

        probs = merge_probs(out, "before_mean")
    else:
        probs = torch.softmax(out, dim=-1)
    return {"accuracy": metrics.accuracy(probs.argmax(1), y), "nll": metrics.nll(probs, y),
            "ece": metrics.ece(probs, y), "brier": metrics.brier(probs, y), "n_test": len(y)}


def run_plastic(cfg: dict[str, Any], run: Run, resume: bool = False,
                config_dir: Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train, evaluate, save and report one plasticity run; returns its metrics."""
    t0 = time.perf_counter()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    cfg = resolve_paths(merge_config(DEFAULTS, cfg), config_dir)
    check_config(cfg)
    if resume and (run.path / "metrics.json").is_file():  # finished: nothing to do again
        return run.read_metrics()
    run.write_config(cfg)
    data = load_data(cfg, config_dir)
    say(f"data       {data.summary()}")
    train_cfg = TrainConfig.from_dict({**cfg["train"], "seed": cfg["seed"],
                                       "progress": cfg["progress"]})
    val = TensorPairs(data.val.x, data.val.y) if len(data.val) else None
    train = TensorPairs(data.train.x, data.train.y)
    callbacks: list[Any] = []
    virtual = False
    loss_fn = score_fn = None
    if cfg["task"] == "sparse":
        model, virtual = _build_sparse_model(cfg, data)
        if virtual:
            from branchnet.virtual.merge import ensemble_score, per_branch_loss

            loss_fn, score_fn = per_branch_loss, ensemble_score
        if cfg["sparsity"]["rule"] != "dense":
            callbacks.append(_sparsity_callback(cfg, data.train.x[:1]))
        what = f"{cfg['sparsity']['rule']} at density {cfg['sparsity']['density']}"
    else:
        model, controller = _build_paths(cfg, data)
        callbacks.append(controller)
        what = f"paths ({cfg['paths']['mode']})"
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model      {getattr(model, 'spec', type(model).__name__)} ({n_params:,} parameters), {what}")
    t_train = time.perf_counter()
    res = fit(model, train, val, train_cfg, workdir=run.work / "model", resume=resume,
              loss_fn=loss_fn, score_fn=score_fn, callbacks=callbacks, description=what)
    train_seconds = time.perf_counter() - t_train
    result: dict[str, Any] = {"task": cfg["task"], **_test_metrics(model, data.test.x, data.test.y, virtual),
                              "parameters": n_params, "train_seconds": train_seconds,
                              "fit": {k: v for k, v in res.to_dict().items() if k != "best_checkpoint"},
                              "data": {"summary": data.summary(), "classes": data.classes}}
    model_dir = run.path / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), model_dir / "weights.safetensors")
    if cfg["task"] == "sparse":
        result.update(rule=cfg["sparsity"]["rule"], density=float(cfg["sparsity"]["density"])
                      if cfg["sparsity"]["rule"] != "dense" else 1.0,
                      distribution=cfg["sparsity"]["distribution"])
        if callbacks:
            cb = callbacks[0]
            if res.best_checkpoint:  # fit restored the best epoch's weights: and its masks
                cb.masks = cb.load_masks(res.best_checkpoint)
            result["sparsity"] = _sparsity_summary(cb, train_seconds)
            save_file({n: m.to(torch.uint8) for n, m in cb.masks.items()},
                      str(model_dir / "masks.safetensors"))
    else:
        result.update(mode=cfg["paths"]["mode"], paths=_paths_summary(model, callbacks[0]))
        from branchnet.plastic.paths import plot_path_lengths

        if callbacks[0].epochs:
            plot_path_lengths(callbacks[0].history, run.figures / "path_lengths.png")
    (model_dir / "model.json").write_text(json.dumps(
        {"spec": getattr(model, "spec", None), "task": cfg["task"], "classes": data.classes,
         "input_shape": list(data.input_shape)}, indent=1))
    result["seconds"] = time.perf_counter() - t0
    run.write_metrics(result)
    run.save_figure(plot_training_curves({"model": run.work / "model" / "metrics.csv"}), "training")
    write_report(run, cfg, result)
    say("\n" + metrics.format_table([summary_row(result)]))
    return result


def _sparsity_summary(cb: Any, train_seconds: float) -> dict[str, Any]:
    dens = cb.masks.densities()
    pruned = sum(m.numel() - int(m.sum()) for _, m in cb.masks.items())
    return {"overall_density": float(cb.masks.density()), "layer_densities": dens,
            "inactive_weights": int(pruned),
            "flops": cb.flops_summary(), "n_updates": cb.n_updates,
            "update_seconds": cb.update_seconds,
            "update_share": cb.update_seconds / train_seconds if train_seconds > 0 else None,
            "history": cb.history}


def _build_paths(cfg: dict[str, Any], data: Any) -> tuple[nn.Module, Any]:
    from branchnet.plastic.paths import PathPlasticity, PlasticResNet

    p = cfg["paths"]
    if len(data.input_shape) != 3:
        raise ConfigError(f"task: paths needs images [C, H, W]; the data's inputs have shape "
                          f"{tuple(data.input_shape)}")
    try:
        with torch.random.fork_rng():
            torch.manual_seed(cfg["seed"])
            model = PlasticResNet(
                data.num_classes, in_channels=data.input_shape[0], widths=tuple(p["widths"]),
                blocks_per_stage=p["blocks_per_stage"], candidates=p["candidates"],
                max_active=p["max_active"], mode=p["mode"], candidate_block=p["candidate_block"],
                survival_last=p["survival_last"], seed=cfg["seed"])
        controller = PathPlasticity(every=int(p["every"]), n_swap=int(p["n_swap"]),
                                    criterion=p["criterion"],
                                    t_end=p["t_end"],
                                    seed=cfg["seed"])
    except (ValueError, TypeError) as e:
        raise ConfigError(f"paths: {e}") from e
    return model, controller


def _paths_summary(model: Any, controller: Any) -> dict[str, Any]:
    from branchnet.plastic.paths import path_length_distribution

    return {"active": model.active_indices(), "spans": [list(s) for s in model.spans],
            "gates": model.gates().tolist(), "n_swaps": len(controller.swaps),
            "path_lengths": path_length_distribution(model).to_dict(),
            "history": controller.history}


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    """One table row of a finished run."""
    row: dict[str, Any] = {}
    if result["task"] == "sparse":
        row.update(rule=result["rule"], density=result["density"])
        flops = (result.get("sparsity") or {}).get("flops") or {}
        row["infer_flops"] = flops.get("inference_ratio", 1.0 if result["rule"] == "dense" else None)
        row["train_flops"] = flops.get("train_ratio", 1.0 if result["rule"] == "dense" else None)
    else:
        row.update(mode=result["mode"], active_paths=len(result["paths"]["active"]),
                   mean_path_length=result["paths"]["path_lengths"].get("mean"))
    row.update(accuracy=result["accuracy"], nll=result["nll"], ece=result["ece"])
    if result["task"] == "sparse":
        row["active_parameters"] = result["parameters"] - (result.get("sparsity") or {}).get(
            "inactive_weights", 0)
    else:  # every candidate path is registered, active or not
        row["parameters"] = result["parameters"]
    row["train_seconds"] = result.get("train_seconds")
    return row


def write_report(run: Run, cfg: dict[str, Any], result: dict[str, Any]) -> Path:
    rep = Report(f"branchnet plastic: {cfg['name']}")
    rep.add_text(result["data"]["summary"])
    rep.add_heading("Test split")
    rep.add_table([summary_row(result)])
    sp = result.get("sparsity")
    if sp:
        rep.add_heading("Sparsity")
        rep.add_table([{"layer": k, "density": v} for k, v in sp["layer_densities"].items()])
        if sp.get("flops"):
            rep.add_pre(json.dumps({k: v for k, v in sp["flops"].items() if not isinstance(v, dict)},
                                   indent=1))
    if result.get("paths"):
        rep.add_heading("Paths")
        rep.add_pre(json.dumps({k: v for k, v in result["paths"].items() if k != "history"}))
    rep.add_heading("Figures")
    for name in ("training", "path_lengths"):
        p = run.figures / f"{name}.png"
        if p.is_file():
            rep.add_figure(p, name)
    rep.add_heading("Configuration")
    rep.add_pre(yaml.safe_dump(cfg, sort_keys=False))
    return rep.write(run.path / "report.html")


def compare_plastic(run_dirs: list[str | Path]) -> str:
    """Mean ± std per (task, rule or mode, density) over finished runs, as a table."""
    from branchnet.metrics import mean_std_rows

    rows = [summary_row(run.read_metrics()) for run in finished_runs(run_dirs)]
    keys = ("rule", "density") if rows and "rule" in rows[0] else ("mode",)
    table = mean_std_rows([r for r in rows if all(k in r for k in keys)], keys)
    return metrics.format_table(table) if table else "no finished runs"
