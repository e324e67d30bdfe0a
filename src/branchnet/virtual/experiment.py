"""The ``vbranch`` run kind: one virtual-branch ensemble from a YAML config.

What ``branchnet vbranch fit CONFIG`` runs. Two tasks:

- ``task: classify``: a K-branch classifier (``model.kind`` mlp, cnn, resnet, resnet18 or
  densenet, with ``branches`` and ``shared_frac``) on any dataset of :func:`branchnet.data.load`;
  each branch trains on its own minibatches, drawn from its own bag (``bagging``); evaluation
  reports every branch, both merges (mean of logits, mean of probabilities) and the diversity
  of the branches (Breiman's strength and correlation, disagreement, Q, double fault, MI).
- ``task: embed``: a K-branch embedding network on Omniglot (:mod:`.embedding_experiment`).

The run folder::

    RUN/config.yaml  RUN/run.json  RUN/metrics.json  RUN/report.html  RUN/figures/*.png
    RUN/model/weights.safetensors  RUN/model/model.json   the trained network (safetensors + JSON)
    RUN/predictions.safetensors    test outputs per branch (N, K, C) and labels (classify)
    RUN/work/model/                checkpoints (resumable) and metrics.csv
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from pydantic import Field
from safetensors.torch import save_file
from torch import nn

from branchnet import zoo
from branchnet.analysis.diversity import ensemble_report
from branchnet.config import check_file
from branchnet.data.batches import TensorPairs
from branchnet.engine import fit
from branchnet.errors import BranchnetError, ConfigError
from branchnet.fileio import atomic_write
from branchnet.protocol import Experiment, fit_record
from branchnet.report import Report
from branchnet.runs import Run
from branchnet.saved_model import load_model, model_outputs, save_model
from branchnet.schema import PositiveInt, Section, Seed, SharedSplitData, TrainSection
from branchnet.virtual import embedding_experiment as embed_task
from branchnet.virtual.bagging import BAG_MODES, BaggedPairs, BranchBags
from branchnet.virtual.compare import compare_runs, summary_row
from branchnet.virtual.merge import (
    MERGES,
    branch_probs,
    check_merge,
    ensemble_score,
    merge_probs,
    per_branch_loss,
)

__all__ = ["VBRANCH_MODELS", "VBranchConfig", "VBranchError", "VBranchExperiment",
           "evaluate_outputs", "load_vrun_model"]

#: a vbranch config's model kinds, by the names it uses
VBRANCH_MODELS = {"mlp": "vmlp", "cnn": "vcnn", "resnet": "vresnet", "resnet18": "vresnet18",
                  "densenet": "vdensenet_bc"}


class VBranchError(BranchnetError, ValueError):
    """A virtual-branch run folder is invalid."""


class BaggingSection(Section):
    mode: Literal[BAG_MODES] = "none"  # type: ignore[valid-type]
    frac: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0


class EmbeddingSection(Section):
    train: list[str] = Field(default_factory=list)
    held_out: list[str] = Field(default_factory=list)
    image_size: PositiveInt = 28
    dim: PositiveInt = 64
    P: Annotated[int, Field(ge=2)] = 8
    K: Annotated[int, Field(ge=2)] = 4
    steps_per_epoch: PositiveInt = 100
    margin: Literal["soft"] | Annotated[float, Field(ge=0, allow_inf_nan=False)] = "soft"
    within_groups: bool = True
    disjoint_groups: bool = False
    runs: str | None = None
    n_runs: PositiveInt = 20
    ways: Annotated[int, Field(ge=2)] = 20


class VBranchConfig(Section):
    name: str = "vbranch"
    seed: Seed = 0
    task: Literal["classify", "embed"] = "classify"
    data: SharedSplitData = Field(default_factory=SharedSplitData)  # type: ignore[valid-type]
    #: free-form: {kind: mlp | cnn | resnet | resnet18 | densenet, branches: K, shared_frac: s,
    #: ...the model's own arguments}; classes and input shape come from the data
    model: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "mlp", "branches": 4, "shared_frac": 0.5})
    bagging: BaggingSection = Field(default_factory=BaggingSection)
    merge: Literal[MERGES] = "before_mean"  # type: ignore[valid-type]
    train: TrainSection = Field(default_factory=TrainSection)
    embedding: EmbeddingSection = Field(default_factory=EmbeddingSection)
    progress: bool = True


def evaluate_outputs(out: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Per-branch and ensemble metrics for both merges, and the branches' diversity, of
    per-branch outputs ``(N, K, C)``."""
    probs = branch_probs(out)
    result: dict[str, Any] = {"n": len(y)}
    for how in ("before_mean", "after_mean"):
        result[how] = ensemble_report(probs, y, merge_probs(out, how))
    return result


def oob_accuracy(out: torch.Tensor, y: torch.Tensor, bags: BranchBags) -> list[float | None]:
    """Each branch's accuracy on the training rows outside its bag (None when it saw all),
    from its outputs ``(N, K, C)`` on the training split."""
    return [float((out[oob, k].argmax(-1) == y[oob]).float().mean()) if oob.any() else None
            for k, oob in enumerate(bags.oob)]


def load_vrun_model(run_dir: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The trained virtual model of a run folder, in eval mode, and its metadata."""
    return load_model(run_dir, command="vbranch")


class VBranchExperiment(Experiment):
    kind = "vbranch"
    schema = VBranchConfig
    aliases = VBRANCH_MODELS
    captions: ClassVar[dict[str, str]] = {"training": "training curves", "branches": "branches",
                                          "pairwise": "pairwise disagreement",
                                          "oneshot": "one-shot accuracy"}

    @classmethod
    def check(cls, cfg: dict[str, Any]) -> None:
        head = "embedding" if cfg["task"] == "embed" else "classifier"
        try:
            check_merge(cfg["merge"], head)
        except ValueError as e:
            raise ConfigError(f"merge: {e}") from None
        zoo.check_spec(cfg["model"], VBRANCH_MODELS)
        if cfg["task"] == "classify":
            super().check(cfg)
            return
        e = cfg["embedding"]
        if not e["train"]:
            raise ConfigError("embedding.train must list Omniglot zip archives or folders, got []")
        for i, path in enumerate(e["train"]):
            check_file(path, f"embedding.train[{i}]", "Omniglot zip archive or folder")
        check_file(e["runs"], "embedding.runs", "folder of one-shot runs")
        if not e["runs"] and not e["held_out"]:
            raise ConfigError("give embedding.held_out alphabets (to write one-shot runs from) "
                              "or embedding.runs (a folder of runNN one-shot runs)")

    def setup(self) -> None:
        if self.cfg["task"] == "embed":
            embed_task.setup(self)
            return
        super().setup()
        cfg, data = self.cfg, self.data
        assert data is not None
        self.model = zoo.build(cfg["model"], num_classes=data.num_classes,
                               input_shape=data.input_shape, seed=cfg["seed"],
                               aliases=self.aliases)
        self.say(f"model      {self.model.spec} ({zoo.num_parameters(self.model):,} parameters)")
        bag = cfg["bagging"]
        self.bags = BranchBags.make(len(data.train), int(self.model.spec["branches"]),
                                    mode=bag["mode"], frac=bag["frac"], seed=cfg["seed"])
        self.say(f"bagging    {bag['mode']} (frac {bag['frac']}): unique rows per branch "
                 + ", ".join(f"{u:.1%}" for u in self.bags.unique_fraction()))

    def fit(self, run: Run, resume: bool) -> dict[str, Any]:
        if self.cfg["task"] == "embed":
            return embed_task.fit(self, run, resume)
        cfg, data, model = self.cfg, self.data, self.model
        assert data is not None
        K = int(model.spec["branches"])
        val = TensorPairs(data.val.x, data.val.y) if len(data.val) else None
        res = fit(model, BaggedPairs(data.train.x, data.train.y, self.bags), val,
                  self.train_config(cfg["train"]), workdir=run.work / "model", resume=resume,
                  loss_fn=per_branch_loss, score_fn=ensemble_score,
                  description=f"{K}-branch {model.spec['kind']}")
        out = model_outputs(model, data.test.x)
        test = evaluate_outputs(out, data.test.y)
        main = test[cfg["merge"]]
        n_params = zoo.num_parameters(model)
        result: dict[str, Any] = {
            "task": "classify", "branches": K, "shared_frac": model.spec.get("shared_frac"),
            "bagging": cfg["bagging"], "merge": cfg["merge"], "n_test": test["n"],
            "accuracy": main["ensemble"]["accuracy"], "nll": main["ensemble"]["nll"],
            "ece": main["ensemble"]["ece"], "brier": main["ensemble"]["brier"],
            "parameters": n_params, "test": test,
            "oob_accuracy": oob_accuracy(model_outputs(model, data.train.x), data.train.y,
                                         self.bags),
            "model": {"spec": model.spec, "parameters": n_params},
            "fit": fit_record(res),
            "data": {"summary": data.summary(), "classes": data.classes},
        }
        tensors = {"outputs": out.contiguous(), "y": data.test.y.contiguous()}
        atomic_write(run.path / "predictions.safetensors", lambda tmp: save_file(tensors, tmp))
        save_model(model, run.path / "model", {
            "classes": data.classes, "preprocessing": data.preprocessing,
            "input_shape": list(data.input_shape), "name": cfg["name"], "seed": cfg["seed"],
            "task": "classify"})
        return result

    def figures(self, run: Run, result: dict[str, Any]) -> dict[str, Figure]:
        if result["task"] == "embed":
            return {"oneshot": embed_task.plot_oneshot(result["oneshot"])}
        main = result["test"][result["merge"]]
        return {"branches": plot_branches(main), "pairwise": plot_pairwise(main)}

    def report(self, rep: Report, run: Run, result: dict[str, Any]) -> None:
        if result["task"] == "classify":
            for how in ("before_mean", "after_mean"):
                r = result["test"][how]
                rep.add_heading(f"Test split, {how.replace('_', ' ')} merge")
                rows = [{"member": f"branch {k}", **b} for k, b in enumerate(r["branches"])]
                rows.append({"member": "ensemble", **r["ensemble"]})
                rep.add_table(rows)
                rep.add_table([{k: v for k, v in r["diversity"].items()
                                if not k.endswith("matrix")}])
        rep.add_heading("Model")
        rep.add_pre(json.dumps(result["model"]["spec"]))

    @classmethod
    def summary_rows(cls, result: dict[str, Any]) -> list[dict[str, Any]]:
        return [summary_row(result)]

    def evaluate(self, run: Run, split: str) -> tuple[dict[str, Any], dict[str, Figure]]:
        if self.cfg["task"] != "classify":
            raise VBranchError("an embedding run is evaluated with branchnet vbranch oneshot "
                               f"--runs DIR --run {run.path}")
        model, meta = load_vrun_model(run.path)
        data = self.load_data()
        if data.classes != meta["classes"]:
            raise VBranchError(f"the data's classes {data.classes} differ from the saved "
                               f"model's {meta['classes']}")
        part = data.splits()[split]
        test = evaluate_outputs(model_outputs(model, part.x), part.y)
        main = test[self.cfg["merge"]]["ensemble"]
        return {"task": "classify", "split": split, "branches": model.spec["branches"],
                "shared_frac": model.spec.get("shared_frac"), "merge": self.cfg["merge"],
                "bagging": self.cfg["bagging"], "parameters": meta.get("parameters"),
                "accuracy": main["accuracy"], "nll": main["nll"], "ece": main["ece"],
                "brier": main["brier"], "test": test}, {}

    @classmethod
    def compare(cls, runs: list[Run]) -> str:
        return compare_runs([r.path for r in runs])


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
