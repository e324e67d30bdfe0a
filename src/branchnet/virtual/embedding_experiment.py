"""``task: embed``: a K-branch embedding network on Omniglot, judged by 20-way one-shot accuracy.

Omniglot's alphabets are split: the ``held_out`` alphabets never appear in training; the
one-shot runs (Lake's ``runNN`` layout) are written from them into ``RUN/oneshot-runs`` unless
``embedding.runs`` names a folder of runs. Each branch trains on its own P x K batches (P
characters of one alphabet, K drawings each) with the batch-hard soft-margin triplet loss; the
ensemble's embedding is the concatenation of the L2-normalised branch embeddings. Reported:
one-shot accuracy and retrieval (precision@1, mAP, MAP@R on the held-out alphabets) of the
ensemble and of every branch.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from matplotlib.figure import Figure

from branchnet.data.omniglot import load_omniglot, make_oneshot_runs, split_by_alphabet
from branchnet.engine import fit
from branchnet.report import plot_training_curves
from branchnet.runs import Run
from branchnet.virtual import models as vmodels
from branchnet.virtual.embedding import (
    BranchTripletLoss,
    PKBatches,
    embed,
    embedding_score,
    ensemble_embedding,
)
from branchnet.virtual.oneshot import oneshot_accuracy, read_oneshot_runs, retrieval_metrics

__all__ = ["oneshot_of_model", "oneshot_of_run", "run_embedding"]


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
    from branchnet.virtual.experiment import VBranchError, load_vrun_model

    model, meta = load_vrun_model(run_dir)
    if meta.get("task") != "embed":
        raise VBranchError(f"{run_dir} is not an embedding run (task {meta.get('task')!r}); one-shot "
                           "evaluation needs a run of a config with task: embed")
    return oneshot_of_model(model, read_oneshot_runs(runs_dir, image_size=meta["image_size"]))


def run_embedding(cfg: dict[str, Any], run: Run, resume: bool = False,
                  quiet: bool = False) -> dict[str, Any]:
    from branchnet.virtual.experiment import (
        VBranchError,
        _train_config,
        build_vmodel_for,
        save_vmodel,
        summary_text,
        write_report,
    )

    t0 = time.perf_counter()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    e = cfg["embedding"]
    if not e["train"]:
        raise VBranchError("embedding.train must list Omniglot zip archives or folders")
    size = int(e["image_size"])
    full = load_omniglot(e["train"], image_size=size, cache_dir=cfg["data"].get("cache_dir"))
    if e["held_out"]:
        background, held = split_by_alphabet(full, e["held_out"])
    else:
        background, held = full, None
    say(f"data       Omniglot {size}x{size}: training on {len(background.alphabets)} alphabets "
        f"({len(background.characters)} characters, {len(background)} images)")
    runs_dir = Path(e["runs"]) if e["runs"] else run.path / "oneshot-runs"
    if not e["runs"] and not (runs_dir / "runs.json").is_file():
        if held is None:
            raise VBranchError("give embedding.held_out alphabets (to write one-shot runs from) "
                               "or embedding.runs (a folder of runNN one-shot runs)")
        make_oneshot_runs(held, runs_dir, n_runs=e["n_runs"], ways=e["ways"], seed=cfg["seed"],
                          overwrite=True)
    runs = read_oneshot_runs(runs_dir, image_size=size)
    seed = cfg["seed"]
    model = build_vmodel_for(cfg["model"], int(e["dim"]), (1, size, size), seed)
    K = int(model.spec["branches"])
    n_params = vmodels.count_parameters(model)
    say(f"model      {model.spec} ({n_params:,} parameters)")
    train_cfg = _train_config(cfg)
    if train_cfg.batch_size != e["P"] * e["K"]:
        train_cfg.batch_size = e["P"] * e["K"]  # one P x K batch per step
    try:
        train = PKBatches(background.x, background.character, K, e["P"], e["K"],
                          e["steps_per_epoch"],
                          groups=background.alphabet if e["within_groups"] else None,
                          disjoint_groups=e["disjoint_groups"], seed=seed)
    except ValueError as err:
        raise VBranchError(f"embedding: {err}") from err
    res = fit(model, train, None, train_cfg, workdir=run.work / "model", resume=resume,
              loss_fn=BranchTripletLoss(e["margin"]), score_fn=embedding_score,
              description=f"{K}-branch embedding")
    shot = oneshot_of_model(model, runs)
    retrieval: dict[str, Any] = {}
    if held is not None:
        emb = embed(model, held.x)
        retrieval["ensemble"] = retrieval_metrics(ensemble_embedding(emb), held.character)
        retrieval["branches"] = [retrieval_metrics(emb[:, k], held.character) for k in range(K)]
    result: dict[str, Any] = {
        "task": "embed", "branches": K, "shared_frac": model.spec.get("shared_frac"),
        "parameters": n_params, "oneshot": shot, "retrieval": retrieval,
        "oneshot_runs": str(runs_dir),
        "model": {"spec": model.spec, "parameters": n_params},
        "fit": {k: v for k, v in res.to_dict().items() if k != "best_checkpoint"},
        "data": {"summary": f"Omniglot {size}x{size}, background alphabets {background.alphabets}, "
                            f"held out {held.alphabets if held is not None else []}"},
    }
    save_vmodel(model, run.path / "model", {"task": "embed", "image_size": size, "name": cfg["name"],
                                            "seed": seed, "dim": int(e["dim"])})
    result["seconds"] = time.perf_counter() - t0
    run.write_metrics(result)
    run.save_figure(plot_oneshot(shot), "oneshot")
    run.save_figure(plot_training_curves({"model": run.work / "model" / "metrics.csv"}), "training")
    write_report(run, cfg, result)
    say(summary_text(result))
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
