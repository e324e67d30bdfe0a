"""Tree inference: path-only routing (only the heads on each input's path) vs every head.

Side by side in ONE process, on ``--threads`` CPU threads (default 2), for trees shaped like
the Debian text tree (configs/text-debian.yaml): tap features of dim 384 (MiniLM's), heads
``branch_head(384 -> 256 -> children)`` (``head: {hidden: 256}``), the root decision from the
parent (``router: parent``), hard routing with calibrated thresholds. To isolate the heads the
parent is cheap: ``Sequential(features=Identity(), out=Linear(384, C))`` on 384-d inputs,
tapped at ``features``. Each tree is fitted briefly (a few epochs) on synthetic clustered
features (a centre per group, one per class around it, Gaussian noise), so that inputs spread
over the groups as real data would.

Shapes (``--shapes``, groups x classes per group, or three levels ``a x b x c``): ``4x4`` (the
Debian tree: 4 groups x 4 sections, 16 leaves, 4 group heads), ``8x8`` (8 group heads, 64
leaves) and ``4x4x4`` (20 heads below the root, 64 leaves; a path runs 2 of them).

Timed (``TreeRouter`` under ``torch.inference_mode``, eval mode, the same fitted tree):

* ``all heads``: ``router(x)``, what ``BranchTree.predict`` ran before (and still runs for
  soft/topk, ``predict_proba`` and TorchScript): every head on every input;
* ``path only``: ``router.forward_paths(x)``, what ``predict`` runs now for hard/threshold.

Also ``BranchTree.predict(x)`` itself on ``--inputs`` inputs (its own chunks of 1,024; the
lazily computed ``leaf_probs`` are not read) vs ``predict(x, all_heads=True)``.

Batch 1 over ``--batch1-inputs`` inputs (one call per input) and batch ``--batch`` over
``--inputs`` inputs. Protocol: one untimed warm-up pass per variant, then ``--repeats`` rounds,
each timing both variants (in alternating order); the table gives the median time per input.
Before timing, the outputs of both are compared on all inputs (leaf, path_nodes, stop_level
exactly; path_conf's largest difference). Also printed: head rows per input (how many rows the
heads process per input, a FLOP proxy).

    python benchmarks/bench_tree_paths.py                       # ~1 minute on 2 cores
    python benchmarks/bench_tree_paths.py --shapes 4x4 --repeats 2 --batch1-inputs 32  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from branchnet import models
from branchnet.data import Data, Split
from branchnet.tree import BranchTree, TreeRouter

DIM, HIDDEN = 384, 256
FIT: dict[str, Any] = {"epochs": 3, "lr": 3e-3, "batch_size": 64, "progress": False,
                       "patience": None}


def parse_shape(text: str) -> list[int]:
    sizes = [int(s) for s in text.lower().split("x")]
    if not 2 <= len(sizes) <= 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"shape must be AxB or AxBxC, got {text!r}")
    return sizes


def hierarchy(sizes: list[int]) -> tuple[dict[str, Any], list[str]]:
    """Nested groups ``g0, g0.1, ...`` over classes ``c0, c1, ...`` (depth-first order)."""
    classes: list[str] = []

    def grow(prefix: str, rest: list[int]) -> Any:
        if len(rest) == 1:
            names = [f"c{len(classes) + k}" for k in range(rest[0])]
            classes.extend(names)
            return names
        return {f"{prefix}{k}": grow(f"{prefix}{k}.", rest[1:]) for k in range(rest[0])}

    return grow("g", sizes), classes


def clustered(sizes: list[int], n: int, seed: int) -> Split:
    """``n`` 384-d inputs: for each level a random offset per node on the path, plus noise."""
    g = torch.Generator().manual_seed(seed)
    n_classes = math.prod(sizes)
    y = torch.randint(n_classes, (n,), generator=g)
    x = torch.randn(n, DIM, generator=g)  # noise
    block = n_classes
    for level, size in enumerate(sizes):
        block //= size
        offsets = torch.randn(n_classes // block, DIM,
                              generator=torch.Generator().manual_seed(1000 + level)) * 1.2
        x += offsets[y // block]
    return Split(x, y)


def fit_tree(sizes: list[int], workdir: Path, seed: int) -> BranchTree:
    hier, classes = hierarchy(sizes)
    torch.manual_seed(seed)
    parent = nn.Sequential(OrderedDict(features=nn.Identity(), out=nn.Linear(DIM, len(classes))))
    n_train = 40 * len(classes)
    data = Data(clustered(sizes, n_train, seed), clustered(sizes, n_train // 4, seed + 1),
                clustered(sizes, 8, seed + 2), classes, name="clustered")
    tree = BranchTree(parent, "features", hierarchy=hier, router="parent", policy="hard",
                      head=lambda n_in, n_out: models.branch_head(n_in, n_out, HIDDEN, 0.3),
                      parent_train=FIT, head_train={**FIT, "weight_decay": 0.01},
                      workdir=workdir, cache_dir=workdir / "cache", cache_dtype="float32")
    tree.fit(data)
    tree.calibrate(clustered(sizes, 1024, seed + 3), method="coverage", coverage=0.9)
    return tree


def batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def run_all(router: TreeRouter, parts: list[torch.Tensor]) -> list[Any]:
    return [router(p) for p in parts]


def run_paths(router: TreeRouter, parts: list[torch.Tensor]) -> list[Any]:
    return [router.forward_paths(p) for p in parts]


def compare(router: TreeRouter, x: torch.Tensor) -> dict[str, Any]:
    with torch.inference_mode():
        full, paths = router(x), router.forward_paths(x)
    conf_a, conf_b = full[2].nan_to_num(-7.0), paths[2].nan_to_num(-7.0)
    return {"leaf": bool(torch.equal(full[0], paths[0])),
            "path_nodes": bool(torch.equal(full[1], paths[1])),
            "stop_level": bool(torch.equal(full[3], paths[3])),
            "path_conf_max_diff": float((conf_a - conf_b).abs().max()),
            "abstained": float((full[3] >= 0).float().mean())}


def head_rows(router: TreeRouter, x: torch.Tensor, run: Callable[..., Any]) -> float:
    """Rows the heads process per input (pre-hooks count each head call's batch)."""
    rows = [0]
    handles = [h.register_forward_pre_hook(lambda m, a: rows.__setitem__(0, rows[0] + len(a[0])))
               for h in router.heads.values()]
    try:
        with torch.inference_mode():
            run(router, [x])
    finally:
        for h in handles:
            h.remove()
    return rows[0] / len(x)


def time_pair(router: TreeRouter, parts: list[torch.Tensor], repeats: int) -> dict[str, float]:
    """Median seconds per input of both variants over ``repeats`` alternating rounds."""
    variants = {"all": run_all, "paths": run_paths}
    n = sum(len(p) for p in parts)
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for run in variants.values():
            run(router, parts[:4])  # warm-up
        for r in range(repeats):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for k in order:
                t0 = time.perf_counter()
                variants[k](router, parts)
                times[k].append((time.perf_counter() - t0) / n)
    return {k: statistics.median(v) for k, v in times.items()}


def time_predict(tree: BranchTree, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """``BranchTree.predict(x)`` (path only; its ``leaf_probs`` are not read) vs
    ``predict(x, all_heads=True)``: median microseconds per input."""
    times: dict[str, list[float]] = {"all": [], "paths": []}
    tree.predict(x[:64])
    tree.predict(x[:64], all_heads=True)
    for r in range(repeats):
        for k in (("all", "paths") if r % 2 == 0 else ("paths", "all")):
            t0 = time.perf_counter()
            tree.predict(x, all_heads=k == "all")
            times[k].append((time.perf_counter() - t0) / len(x) * 1e6)
    out = {f"{k}_us": statistics.median(v) for k, v in times.items()}
    return {**out, "speedup": out["all_us"] / out["paths_us"]}


def bench_shape(sizes: list[int], args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-tree-") as tmp:
        t0 = time.perf_counter()
        tree = fit_tree(sizes, Path(tmp), args.seed)
        fit_s = time.perf_counter() - t0
    router = tree.router_
    test = clustered(sizes, args.inputs, args.seed + 4)
    x = test.x
    res: dict[str, Any] = {
        "shape": "x".join(map(str, sizes)), "leaves": math.prod(sizes),
        "heads": len(router.heads), "fit_s": fit_s, "check": compare(router, x),
        "head_rows_per_input": {"all": head_rows(router, x, run_all),
                                "paths": head_rows(router, x, run_paths)},
        "accuracy": tree.score(x, test.y),
    }
    res["predict"] = time_predict(tree, x, args.repeats)
    for batch, parts in ((1, batches(x[:args.batch1_inputs], 1)),
                         (args.batch, batches(x, args.batch))):
        t = time_pair(router, parts, args.repeats)
        res[f"batch{batch}"] = {"inputs": sum(len(p) for p in parts), "all_us": t["all"] * 1e6,
                                "paths_us": t["paths"] * 1e6, "speedup": t["all"] / t["paths"]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=["4x4", "8x8", "4x4x4"])
    ap.add_argument("--inputs", type=int, default=4096, help="inputs timed at --batch")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--batch1-inputs", type=int, default=256, help="inputs timed at batch 1")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    args.shapes = [parse_shape(s) if isinstance(s, str) else s for s in args.shapes]
    torch.set_num_threads(args.threads)
    results = [bench_shape(s, args) for s in args.shapes]

    print(f"torch {torch.__version__}, {args.threads} threads; median of {args.repeats}; "
          "microseconds per input\n")
    print("| tree | leaves | heads | head rows / input (all -> path) | batch | inputs | all heads "
          "µs | path only µs | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rows = r["head_rows_per_input"]
        for batch in (1, args.batch):
            b = r[f"batch{batch}"]
            print(f"| {r['shape']} | {r['leaves']} | {r['heads']} | {rows['all']:.0f} -> "
                  f"{rows['paths']:.2f} | {batch} | {b['inputs']} | {b['all_us']:.1f} | "
                  f"{b['paths_us']:.1f} | **{b['speedup']:.2f}x** |")
    print(f"\n`BranchTree.predict` on {args.inputs} inputs (chunks of 1024), µs per input:\n")
    print("| tree | predict(x, all_heads=True) | predict(x) | speed-up |\n|---|---|---|---|")
    for r in results:
        p = r["predict"]
        print(f"| {r['shape']} | {p['all_us']:.1f} | {p['paths_us']:.1f} | "
              f"**{p['speedup']:.2f}x** |")
    print("\n| tree | leaf equal | path_nodes equal | stop_level equal | path_conf max diff | "
          "abstained | accuracy | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        c = r["check"]
        print(f"| {r['shape']} | {c['leaf']} | {c['path_nodes']} | {c['stop_level']} | "
              f"{c['path_conf_max_diff']:.1e} | {c['abstained']:.1%} | {r['accuracy']:.3f} | "
              f"{r['fit_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
