"""The ``task: embed`` of the ``vbranch`` kind: a K-branch embedding network on Omniglot,
judged by 20-way one-shot accuracy.

Omniglot's alphabets are split: the ``held_out`` alphabets never appear in training; the
one-shot runs (Lake's ``runNN`` layout) are written from them into ``RUN/oneshot-runs`` unless
``embedding.runs`` names a folder of runs. Each branch trains on its own P x K batches (P
characters of one alphabet, K drawings each) with the batch-hard soft-margin triplet loss; the
ensemble's embedding is the concatenation of the L2-normalised branch embeddings. Reported:
one-shot accuracy and retrieval (precision@1, mAP, MAP@R on the held-out alphabets) of the
ensemble and of every branch.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from matplotlib.figure import Figure

from branchnet import zoo
from branchnet.data.omniglot import load_omniglot, make_oneshot_runs, split_by_alphabet
from branchnet.engine import fit as fit_model
from branchnet.errors import ConfigError
from branchnet.protocol import fit_record, read_manifest
from branchnet.runs import Run
from branchnet.saved_model import load_model, save_model
from branchnet.virtual.embedding import (
    BranchTripletLoss,
    PKBatches,
    embed,
    embedding_score,
    ensemble_embedding,
)
from branchnet.virtual.oneshot import oneshot_accuracy, read_oneshot_runs, retrieval_metrics

__all__ = ["fit", "oneshot_of_model", "oneshot_of_run", "plot_oneshot", "setup"]


def oneshot_of_model(model: Any, runs: list[Any]) -> dict[str, Any]:
    """One-shot accuracy of the concatenated ensemble embedding and of every branch."""
    K = int(model.spec["branches"])
    # embed every image once, (n, K, D); the ensemble and each branch read their part of it
    embedded = [replace(r, train_x=embed(model, r.train_x), test_x=embed(model, r.test_x)) for r in runs]
    ens = oneshot_accuracy(ensemble_embedding, embedded)
    branches = [oneshot_accuracy(lambda e, k=k: F.normalize(e[:, k], dim=-1), embedded)
                for k in range(K)]
    return {"ensemble": ens, "branches": branches, "n_runs": len(runs),
            "ways": len(runs[0].train_x) if runs else 0,
            "branch_mean": float(np.mean([b["accuracy"] for b in branches]))}


def oneshot_of_run(run_dir: str | Path, runs_dir: str | Path) -> dict[str, Any]:
    """20-way one-shot accuracy of a finished embedding run on the runs in ``runs_dir``."""
    kind = read_manifest(Run.open(run_dir)).get("kind", "vbranch")
    if kind != "vbranch":
        raise ConfigError(f"{run_dir} is a {kind} run; one-shot evaluation needs a vbranch run "
                          "of a config with task: embed")
    model, meta = load_model(run_dir, command="vbranch")
    if meta.get("task") != "embed":
        raise ConfigError(f"{run_dir} is not an embedding run (task {meta.get('task')!r}); one-shot "
                           "evaluation needs a run of a config with task: embed")
    return oneshot_of_model(model, read_oneshot_runs(runs_dir, image_size=meta["image_size"]))


def setup(exp: Any) -> None:
    """Read Omniglot, split off the held-out alphabets, build the embedding network."""
    cfg, e = exp.cfg, exp.cfg["embedding"]
    size = int(e["image_size"])
    full = load_omniglot(e["train"], image_size=size, cache_dir=cfg["data"]["cache_dir"])
    exp.background, exp.held = split_by_alphabet(full, e["held_out"]) if e["held_out"] else (full, None)
    held = exp.held
    if held is not None and not e["runs"]:  # the one-shot runs written in fit must be possible
        counts = {name: len(np.unique(held.character[held.alphabet == a]))
                  for a, name in enumerate(held.alphabets)}
        if max(counts.values()) < e["ways"]:
            raise ConfigError(f"embedding.ways must be at most the characters of a held-out "
                              f"alphabet, got {e['ways']}: no alphabet has {e['ways']} characters "
                              f"(characters per alphabet: {counts})")
    exp.say(f"data       Omniglot {size}x{size}: training on {len(exp.background.alphabets)} "
            f"alphabets ({len(exp.background.characters)} characters, {len(exp.background)} images)")
    exp.model = zoo.build(cfg["model"], num_classes=int(e["dim"]), input_shape=(1, size, size),
                          seed=cfg["seed"], aliases=exp.aliases)
    exp.say(f"model      {exp.model.spec} ({zoo.num_parameters(exp.model):,} parameters)")
    bg = exp.background
    try:
        exp.train_set = PKBatches(bg.x, bg.character, int(exp.model.spec["branches"]), e["P"],
                                  e["K"], e["steps_per_epoch"],
                                  groups=bg.alphabet if e["within_groups"] else None,
                                  disjoint_groups=e["disjoint_groups"], seed=cfg["seed"])
    except ValueError as err:
        raise ConfigError(f"embedding: {err}") from None


def fit(exp: Any, run: Run, resume: bool) -> dict[str, Any]:
    """Train on P x K batches, then one-shot accuracy and retrieval; returns the metrics."""
    cfg, e, model, held = exp.cfg, exp.cfg["embedding"], exp.model, exp.held
    size = int(e["image_size"])
    runs_dir = Path(e["runs"]) if e["runs"] else run.path / "oneshot-runs"
    if not e["runs"] and not (runs_dir / "runs.json").is_file():
        make_oneshot_runs(held, runs_dir, n_runs=e["n_runs"], ways=e["ways"], seed=cfg["seed"],
                          overwrite=True)
    runs = read_oneshot_runs(runs_dir, image_size=size)
    K = int(model.spec["branches"])
    train_cfg = exp.train_config({**cfg["train"], "batch_size": e["P"] * e["K"]})  # one P x K batch a step
    res = fit_model(model, exp.train_set, None, train_cfg, workdir=run.work / "model",
                    resume=resume, loss_fn=BranchTripletLoss(e["margin"]),
                    score_fn=embedding_score, description=f"{K}-branch embedding")
    shot = oneshot_of_model(model, runs)
    retrieval: dict[str, Any] = {}
    if held is not None:
        emb = embed(model, held.x)
        retrieval["ensemble"] = retrieval_metrics(ensemble_embedding(emb), held.character)
        retrieval["branches"] = [retrieval_metrics(emb[:, k], held.character) for k in range(K)]
    n_params = zoo.num_parameters(model)
    bg = exp.background
    result: dict[str, Any] = {
        "task": "embed", "branches": K, "shared_frac": model.spec.get("shared_frac"),
        "parameters": n_params, "oneshot": shot, "retrieval": retrieval,
        "oneshot_runs": str(runs_dir),
        "model": {"spec": model.spec, "parameters": n_params},
        "fit": fit_record(res),
        "data": {"summary": f"Omniglot {size}x{size}, background alphabets {bg.alphabets}, "
                            f"held out {held.alphabets if held is not None else []}"},
    }
    save_model(model, run.path / "model", {"task": "embed", "image_size": size,
                                           "name": cfg["name"], "seed": cfg["seed"],
                                           "dim": int(e["dim"])})
    return result


def plot_oneshot(shot: dict[str, Any]) -> Figure:
    """One-shot accuracy per branch and of the concatenated ensemble."""
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    accs = [b["accuracy"] for b in shot["branches"]]
    ax.bar([f"branch {k}" for k in range(len(accs))] + ["ensemble"],
           [*accs, shot["ensemble"]["accuracy"]], color=["#8aa6c1"] * len(accs) + ["#1f4e79"])
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"{shot['ways']}-way one-shot accuracy")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig
