"""The ``plastic`` run kind: a plasticity experiment from a YAML config (``branchnet plastic fit``).

Two tasks in one harness (same data, optimizer, schedule, batch and epochs for every rule):

- ``task: sparse``: weight-level dynamic sparse training. ``sparsity.rule`` is ``dense`` (the
  baseline), ``static``, ``set``, ``rigl`` or ``snfs`` at ``sparsity.density`` with a uniform,
  ER or ERK layer distribution (:class:`branchnet.plastic.callback.DynamicSparsity`). ``model``
  is a plain classifier (``mlp``, ``cnn``, ``alexnet``) or a virtual-branch model (``vmlp``,
  ``vcnn``, ``resnet``, ``resnet18``, ``densenet``; ``branches: 1`` is the plain network).
  ``resnet`` without ``branches`` is the plain CIFAR ResNet of model runs (``nn.Conv2d``
  layers, which train channels-last: faster on a CPU than the virtual one at K = 1).
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
import math
import time
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from safetensors.torch import save_file
from torch import nn

from branchnet import metrics, zoo
from branchnet.data.batches import TensorPairs
from branchnet.engine import fit
from branchnet.errors import ConfigError
from branchnet.fileio import atomic_write
from branchnet.plastic.callback import DynamicSparsity
from branchnet.plastic.masks import DISTRIBUTIONS
from branchnet.plastic.path_stats import plot_path_lengths
from branchnet.plastic.paths import CRITERIA, PathPlasticity, PlasticResNet, path_length_distribution
from branchnet.plastic.resnet_paths import BLOCK_KINDS, CANDIDATE_PATTERNS, MODES
from branchnet.plastic.rules import ALPHA_SCHEDULES
from branchnet.protocol import Experiment, fit_record
from branchnet.report import Report
from branchnet.runs import Run, finished_runs
from branchnet.saved_model import model_outputs, save_model
from branchnet.schema import PositiveInt, Section, Seed, SharedSplitData, TrainSection
from branchnet.virtual.merge import ensemble_score, merge_probs, per_branch_loss

__all__ = ["PlasticConfig", "PlasticExperiment", "summary_row"]

SPARSE_RULES = ("dense", "static", "set", "rigl", "snfs")
#: the model kinds of ``task: sparse``: plain classifiers and virtual-branch models
PLASTIC_MODELS = {"mlp": "mlp", "cnn": "cnn", "alexnet": "alexnet", "vmlp": "vmlp",
                  "vcnn": "vcnn", "resnet": "vresnet", "resnet18": "vresnet18",
                  "densenet": "vdensenet_bc"}


def model_aliases(spec: dict[str, Any]) -> dict[str, str]:
    """The kinds a sparse model spec may name: ``resnet`` without ``branches`` is the plain
    CIFAR ResNet, with ``branches`` the virtual-branch one."""
    plain = isinstance(spec, dict) and spec.get("kind") == "resnet" and "branches" not in spec
    return {**PLASTIC_MODELS, "resnet": "resnet"} if plain else PLASTIC_MODELS


#: ``t_end``: a fraction of training in (0, 1], or a step count
TEnd = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False, strict=True)] | Annotated[int, Field(ge=0)]


class SparsitySection(Section):
    rule: Literal[SPARSE_RULES] = "rigl"  # type: ignore[valid-type]
    density: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.1
    distribution: Literal[DISTRIBUTIONS] = "erk"  # type: ignore[valid-type]
    dense_first: bool = False
    dense_last: bool = False
    delta_t: PositiveInt = 100
    t_end: TEnd = 0.75
    alpha: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.3
    alpha_schedule: Literal[ALPHA_SCHEDULES] = "cosine"  # type: ignore[valid-type]


class PathsSection(Section):
    mode: Literal[MODES] = "plastic"  # type: ignore[valid-type]
    widths: list[PositiveInt] = Field(default_factory=lambda: [16, 32, 64])
    blocks_per_stage: PositiveInt = 3
    candidates: Literal[CANDIDATE_PATTERNS] | list[list[int]] = "skip2"  # type: ignore[valid-type]
    max_active: PositiveInt | None = None
    candidate_block: Literal[BLOCK_KINDS] = "basic"  # type: ignore[valid-type]
    every: PositiveInt = 100
    n_swap: PositiveInt = 1
    criterion: Literal[CRITERIA] = "gradient"  # type: ignore[valid-type]
    t_end: TEnd = 0.75
    survival_last: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.5


class PlasticConfig(Section):
    name: str = "plastic"
    seed: Seed = 0
    task: Literal["sparse", "paths"] = "sparse"
    data: SharedSplitData = Field(default_factory=SharedSplitData)  # type: ignore[valid-type]
    #: free-form: {kind: one of PLASTIC_MODELS, ...the model's own arguments}
    model: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "mlp", "sizes": ["auto", 256, 128]})
    sparsity: SparsitySection = Field(default_factory=SparsitySection)
    paths: PathsSection = Field(default_factory=PathsSection)
    train: TrainSection = Field(default_factory=TrainSection)
    progress: bool = True


def _test_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, virtual: bool) -> dict[str, Any]:
    out = model_outputs(model, x)
    probs = merge_probs(out, "before_mean") if virtual else torch.softmax(out, dim=-1)
    return {"accuracy": metrics.accuracy(probs.argmax(1), y), "nll": metrics.nll(probs, y),
            "ece": metrics.ece(probs, y), "brier": metrics.brier(probs, y), "n_test": len(y)}


class PlasticExperiment(Experiment):
    kind = "plastic"
    schema = PlasticConfig
    captions: ClassVar[dict[str, str]] = {"training": "training curves",
                                          "path_lengths": "path lengths"}

    @classmethod
    def check(cls, cfg: dict[str, Any]) -> None:
        super().check(cfg)
        if cfg["task"] == "sparse":
            zoo.check_spec(cfg["model"], model_aliases(cfg["model"]))

    def setup(self) -> None:
        super().setup()
        cfg, data = self.cfg, self.data
        assert data is not None
        self.callbacks: list[Any] = []
        self.virtual = False
        if cfg["task"] == "sparse":
            spec = dict(cfg["model"])
            aliases = model_aliases(spec)
            self.virtual = zoo.MODELS[aliases[spec["kind"]]].virtual
            if self.virtual:
                spec.setdefault("branches", 1)
            self.model = zoo.build(spec, num_classes=data.num_classes, input_shape=data.input_shape,
                                   seed=cfg["seed"], aliases=aliases)
            s, t = cfg["sparsity"], cfg["train"]
            steps = t["epochs"] * math.ceil(len(data.train) / t["batch_size"])
            if s["rule"] in ("set", "rigl", "snfs") and isinstance(s["t_end"], int) and s["t_end"] > steps:
                raise ConfigError(f"sparsity.t_end must be at most the {steps} optimizer steps of "
                                  f"training, got {s['t_end']} (or give a fraction in (0, 1])")
            if s["rule"] != "dense":
                self.callbacks.append(_sparsity_callback(cfg, data.train.x[:1]))
            self.what = f"{cfg['sparsity']['rule']} at density {cfg['sparsity']['density']}"
        else:
            self.model, controller = _build_paths(cfg, data)
            self.callbacks.append(controller)
            self.what = f"paths ({cfg['paths']['mode']})"
        self.say(f"model      {getattr(self.model, 'spec', type(self.model).__name__)} "
                 f"({zoo.num_parameters(self.model):,} parameters), {self.what}")

    def fit(self, run: Run, resume: bool) -> dict[str, Any]:
        cfg, data, model, callbacks = self.cfg, self.data, self.model, self.callbacks
        assert data is not None
        val = TensorPairs(data.val.x, data.val.y) if len(data.val) else None
        loss_fn, score_fn = (per_branch_loss, ensemble_score) if self.virtual else (None, None)
        t_train = time.perf_counter()
        res = fit(model, TensorPairs(data.train.x, data.train.y), val,
                  self.train_config(cfg["train"]), workdir=run.work / "model", resume=resume,
                  loss_fn=loss_fn, score_fn=score_fn, callbacks=callbacks,
                  description=self.what)
        train_seconds = time.perf_counter() - t_train
        result: dict[str, Any] = {
            "task": cfg["task"], **_test_metrics(model, data.test.x, data.test.y, self.virtual),
            "parameters": zoo.num_parameters(model), "train_seconds": train_seconds,
            "fit": fit_record(res), "data": {"summary": data.summary(), "classes": data.classes}}
        model_dir = run.path / "model"
        save_model(model, model_dir, {"task": cfg["task"], "classes": data.classes,
                                      "input_shape": list(data.input_shape)})
        if cfg["task"] == "sparse":
            s = cfg["sparsity"]
            result.update(rule=s["rule"], density=float(s["density"]) if s["rule"] != "dense"
                          else 1.0, distribution=s["distribution"])
            if callbacks:
                cb = callbacks[0]
                if res.best_checkpoint:  # fit restored the best epoch's weights: and its masks
                    cb.masks = cb.load_masks(res.best_checkpoint)
                result["sparsity"] = _sparsity_summary(cb, train_seconds)
                masks = {n: m.to(torch.uint8) for n, m in cb.masks.items()}
                atomic_write(model_dir / "masks.safetensors", lambda tmp: save_file(masks, tmp))
        else:
            result.update(mode=cfg["paths"]["mode"], paths=_paths_summary(model, callbacks[0]))
            if callbacks[0].epochs:
                plot_path_lengths(callbacks[0].history, run.figures / "path_lengths.png")
        return result

    def report(self, rep: Report, run: Run, result: dict[str, Any]) -> None:
        sp = result.get("sparsity")
        if sp:
            rep.add_heading("Sparsity")
            rep.add_table([{"layer": k, "density": v} for k, v in sp["layer_densities"].items()])
            if sp.get("flops"):
                rep.add_pre(json.dumps({k: v for k, v in sp["flops"].items()
                                        if not isinstance(v, dict)}, indent=1))
        if result.get("paths"):
            rep.add_heading("Paths")
            rep.add_pre(json.dumps({k: v for k, v in result["paths"].items() if k != "history"}))

    @classmethod
    def summary_rows(cls, result: dict[str, Any]) -> list[dict[str, Any]]:
        return [summary_row(result)]

    @classmethod
    def compare(cls, runs: list[Run]) -> str:
        return compare_runs([r.path for r in runs])


def _sparsity_callback(cfg: dict[str, Any], example: torch.Tensor) -> Any:
    s = cfg["sparsity"]
    return DynamicSparsity(
        s["rule"], density=float(s["density"]), distribution=s["distribution"],
        dense_first=s["dense_first"], dense_last=s["dense_last"], delta_t=int(s["delta_t"]),
        t_end=s["t_end"], alpha=s["alpha"],
        alpha_schedule=s["alpha_schedule"], seed=cfg["seed"], example_input=example)


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


def compare_runs(run_dirs: list[Any]) -> str:
    """Mean ± std per (task, rule or mode, density) over finished runs, as a table."""
    rows = [summary_row(run.read_metrics()) for run in finished_runs(run_dirs)]
    keys = ("rule", "density") if rows and "rule" in rows[0] else ("mode",)
    table = metrics.mean_std_rows([r for r in rows if all(k in r for k in keys)], keys)
    return metrics.format_table(table) if table else "no finished runs"
