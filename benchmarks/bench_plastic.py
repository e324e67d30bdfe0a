"""Cost of dynamic sparsity: mask updates during training, and CSR inference of sparse MLPs.

    python benchmarks/bench_plastic.py                      # the issue's numbers (~10 min)
    python benchmarks/bench_plastic.py --sizes 256 128 --steps 60 --epoch-steps 30 --delta-t 10 \\
        --batch 8 --csr-width 256 --csr-batch 16 --repeats 2 --warmup 1 --json out.json   # smoke

Everything runs side by side in ONE process on ``--threads`` CPU threads (default 2).

1. Mask-update share (target: under 5 % of training time at ``delta_t = 100`` for RigL). An MLP
   ``--sizes`` -> 10 (default 3072-1024-512-10, the Neural-Branching seed net on CIFAR-sized
   inputs; random inputs and labels: timings do not depend on the values) is trained with
   ``branchnet.engine.fit`` (Adam, lr 1e-3, batch ``--batch`` = 64, ``--steps`` = 1,400
   optimizer steps in epochs of ``--epoch-steps``) once per configuration: dense (no
   callback) and ``DynamicSparsity(rule, density=0.1, distribution="erk", delta_t=100,
   t_end=0.75)`` for rule static, set, rigl and snfs. With 1,400 steps and t_end = 0.75 the
   dynamic rules update at steps 0, 100, ..., 1,000: 11 updates. Reported per rule: wall time
   of ``fit`` (Lightning set-up and one checkpoint per epoch included, alike for all),
   ``cb.update_seconds`` (time inside mask updates, measured by the callback), ``cb.n_updates``,
   share = update_seconds / fit time, and the wall-time difference to the same training with
   rule static and with no callback (the share alone hides the per-step masking cost that
   every sparse rule pays: zeroing inactive gradients and weights at each step). Medians over
   ``--train-repeats`` rounds after one untimed warm-up epoch of every configuration; each
   round runs every configuration once, order rotated.
2. CSR inference (target: at least 2x faster than dense at 95 % sparsity). A 2048-2048-2048-10
   MLP (``--csr-width``) and, as in REFERENCE 4.8, a single 2048x2048 ``Linear``, with uniform
   random masks at densities 0.1, 0.05 and 0.01 applied to the weights (the "dense" model is
   the masked model run with dense kernels), against ``to_csr(model, masks)`` (every masked
   ``nn.Linear`` becomes a ``CSRLinear``). Batch ``--csr-batch`` = 256; outputs are checked to
   agree (``allclose``) before timing; median ms per forward under ``torch.inference_mode()``
   in eval mode after ``--warmup`` forwards, ``--repeats`` rounds with dense and CSR
   alternating.

Protocol (REFERENCE 4.8): fixed ``torch.set_num_threads``, warm-up, medians; a configuration
that fails is reported in its table row, not raised. ``--json PATH`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from branchnet import models
from branchnet.data.batches import TensorPairs
from branchnet.engine import TrainConfig, fit
from branchnet.plastic.callback import DynamicSparsity
from branchnet.plastic.export import to_csr
from branchnet.plastic.masks import SparseMasks

RULES = ("static", "set", "rigl", "snfs")
CLASSES = 10


def _err(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:160]


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _verdict(name: str, value: float | None, rule: str, ok: bool | None) -> dict[str, Any]:
    return {"target": name, "value": value, "rule": rule,
            "status": "n/a" if ok is None else ("PASS" if ok else "FAIL")}


# ---------------------------------------------------------------- 1. mask-update share


def train_once(config: str, args: argparse.Namespace, ds: TensorPairs, epochs: int | None = None
               ) -> dict[str, Any]:
    torch.manual_seed(0)
    model = models.mlp(args.sizes, CLASSES)
    cb = None if config == "dense" else DynamicSparsity(
        config, density=args.density, distribution=args.distribution, delta_t=args.delta_t,
        t_end=args.t_end)
    cfg = TrainConfig(epochs=epochs or args.steps // args.epoch_steps, batch_size=args.batch, lr=1e-3,
                      progress=False, seed=0)
    workdir = tempfile.mkdtemp(prefix="bench-plastic-")
    try:
        t = time.perf_counter()
        fit(model, ds, None, cfg, workdir=workdir, callbacks=[cb] if cb else None)
        seconds = time.perf_counter() - t
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out: dict[str, Any] = {"seconds": seconds}
    if cb is not None:
        out.update(update_seconds=cb.update_seconds, n_updates=cb.n_updates, steps=cb.step,
                   density=cb.masks.density() if cb.masks is not None else None)
    return out


def update_share(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if args.steps % args.epoch_steps:
        raise SystemExit(f"--steps {args.steps} must be a multiple of --epoch-steps {args.epoch_steps}")
    g = torch.Generator().manual_seed(0)
    n = args.batch * args.epoch_steps
    ds = TensorPairs(torch.randn(n, args.sizes[0], generator=g), torch.randint(0, CLASSES, (n,), generator=g))
    configs = ["dense", *args.rules]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    errors: dict[str, str] = {}
    for c in configs:  # warm-up: one untimed epoch of each (imports, kernels, first-call costs)
        try:
            train_once(c, args, ds, epochs=1)
        except Exception as e:  # report, do not crash
            errors[c] = _err(e)
    for r in range(args.train_repeats):
        for c in configs[r % len(configs):] + configs[:r % len(configs)]:
            if c in errors:
                continue
            try:
                runs[c].append(train_once(c, args, ds))
            except Exception as e:  # report, do not crash
                errors[c] = _err(e)
    res: dict[str, Any] = {}
    for c in configs:
        if c in errors:
            res[c] = {"error": errors[c]}
            continue
        med = {k: statistics.median(float(run[k]) for run in runs[c])
               for k in runs[c][0] if runs[c][0][k] is not None}
        if "update_seconds" in med:
            med["share"] = statistics.median(run["update_seconds"] / run["seconds"] for run in runs[c])
            n_upd = med["n_updates"]
            med["ms_per_update"] = 1e3 * med["update_seconds"] / n_upd if n_upd else None
        res[c] = {**med, "runs": runs[c]}
    ref = {k: res.get(k, {}).get("seconds") for k in ("static", "dense")}
    for c in configs:
        if "seconds" in res[c]:
            for k, base in ref.items():
                res[c][f"minus_{k}_s"] = None if base is None else res[c]["seconds"] - base

    layers = " -> ".join(str(s) for s in [*args.sizes, CLASSES])
    print(f"\n### 1. mask updates during training: MLP {layers}, batch {args.batch}, {args.steps} Adam "
          f"steps, "
          f"density {args.density} {args.distribution}, delta_t {args.delta_t}, t_end {args.t_end}; "
          f"median of {args.train_repeats}\n")
    print("| rule | fit s | ms/step | updates | update s | ms/update | update share | "
          "vs static s (%) | vs dense s (%) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in configs:
        r = res[c]
        if "error" in r:
            print(f"| {c} | failed: {r['error']} |" + " - |" * 7)
            continue

        def diff(k: str, r: dict[str, Any] = r) -> str:
            d, base = r.get(f"minus_{k}_s"), ref[k]
            return "-" if d is None or not base else f"{d:+.2f} ({100 * d / base:+.1f}%)"

        share = r.get("share")
        print(f"| {c} | {r['seconds']:.2f} | {1e3 * r['seconds'] / args.steps:.2f} | "
              f"{_fmt(r.get('n_updates'), '.0f')} | {_fmt(r.get('update_seconds'), '.3f')} | "
              f"{_fmt(r.get('ms_per_update'), '.1f')} | "
              f"{'-' if share is None else f'{100 * share:.2f}%'} | {diff('static')} | {diff('dense')} |")
    rigl = res.get("rigl", {})
    verdicts = [_verdict(f"RigL mask-update share of training time at delta_t={args.delta_t} "
                         f"({_fmt(rigl.get('n_updates'), '.0f')} updates)", rigl.get("share"), "< 0.05",
                         None if rigl.get("share") is None else rigl["share"] < 0.05)]
    if rigl.get("n_updates") is not None and rigl["n_updates"] < 10:
        print(f"\nnote: only {rigl['n_updates']:.0f} RigL updates (< 10); raise --steps")
    return res, verdicts


# ---------------------------------------------------------------- 2. CSR inference


def _median_ms(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        order = list(fns)
        for r in range(repeats):
            for k in order[r % len(order):] + order[:r % len(order)]:
                t = time.perf_counter()
                fns[k]()
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def csr_inference(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    w = args.csr_width
    nets: dict[str, Callable[[], nn.Module]] = {
        f"MLP {w}-{w}-{w}-{CLASSES}": lambda: models.mlp([w, w, w], CLASSES),
        f"Linear {w}x{w}": lambda: nn.Sequential(nn.Linear(w, w)),
    }
    x = torch.randn(args.csr_batch, w, generator=torch.Generator().manual_seed(1))
    res: dict[str, Any] = {}
    print(f"\n### 2. CSR vs dense inference, batch {args.csr_batch}; median of {args.repeats} "
          f"after {args.warmup} warm-up forwards\n")
    print("| model | density | sparsity | outputs agree (max abs diff) | dense ms | CSR ms | CSR speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, make in nets.items():
        res[name] = {}
        for d in args.csr_densities:
            row: dict[str, Any] = {}
            try:
                torch.manual_seed(0)
                dense = make().eval()
                masks = SparseMasks.from_model(dense, d, "uniform", seed=0)
                masks.apply(dense)
                csr = to_csr(dense, masks).eval()
                with torch.inference_mode():
                    a, b = dense(x), csr(x)
                row["max_abs_diff"] = float((a - b).abs().max())
                row["allclose"] = bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max())))
                row["density"] = masks.density()
                if row["allclose"]:
                    ms = _median_ms({"dense": lambda m=dense: m(x), "csr": lambda m=csr: m(x)},
                                    args.warmup, args.repeats)
                    row.update(dense_ms=ms["dense"], csr_ms=ms["csr"], speedup=ms["dense"] / ms["csr"])
            except Exception as e:  # report, do not crash
                row["error"] = _err(e)
            res[name][f"{d:g}"] = row
            if "error" in row:
                print(f"| {name} | {d:g} | {1 - d:.0%} | failed: {row['error']} | - | - | - |")
                continue
            agree = f"{'yes' if row['allclose'] else 'NO, not timed'} ({row['max_abs_diff']:.1e})"
            sp = row.get("speedup")
            print(f"| {name} | {row['density']:.4f} | {1 - d:.0%} | {agree} | "
                  f"{_fmt(row.get('dense_ms'), '.2f')} | {_fmt(row.get('csr_ms'), '.2f')} | "
                  f"{'-' if sp is None else f'{sp:.2f}x'} |")
    verdicts = []
    for name in nets:
        row = res[name].get(f"{0.05:g}")
        if row is None:
            continue
        sp = row.get("speedup")
        verdicts.append(_verdict(f"CSR speed-up over dense, {name}, 95% sparse", sp, ">= 2",
                                 None if sp is None else sp >= 2))
    return res, verdicts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", nargs="+", choices=("train", "csr"), default=["train", "csr"])
    g = ap.add_argument_group("1. mask-update share")
    g.add_argument("--sizes", type=int, nargs="+", default=[3072, 1024, 512],
                   help="MLP input and hidden sizes (10 classes follow)")
    g.add_argument("--batch", type=int, default=64)
    g.add_argument("--steps", type=int, default=1400, help="optimizer steps per training run")
    g.add_argument("--epoch-steps", type=int, default=350, help="steps per epoch (sets the data size)")
    g.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    g.add_argument("--density", type=float, default=0.1)
    g.add_argument("--distribution", default="erk")
    g.add_argument("--delta-t", type=int, default=100)
    g.add_argument("--t-end", type=float, default=0.75)
    g.add_argument("--train-repeats", type=int, default=3)
    g = ap.add_argument_group("2. CSR inference")
    g.add_argument("--csr-width", type=int, default=2048)
    g.add_argument("--csr-batch", type=int, default=256)
    g.add_argument("--csr-densities", type=float, nargs="+", default=[0.1, 0.05, 0.01])
    g.add_argument("--warmup", type=int, default=3)
    g.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    out: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "json"},
                           "torch": torch.__version__}
    verdicts: list[dict[str, Any]] = []
    if "train" in args.parts:
        out["update_share"], v = update_share(args)
        verdicts += v
    if "csr" in args.parts:
        out["csr"], v = csr_inference(args)
        verdicts += v
    out["threads_at_end"] = torch.get_num_threads()
    print("\n### verdicts\n")
    for v in verdicts:
        val = "-" if v["value"] is None else f"{v['value']:.4f}"
        print(f"- {v['status']}: {v['target']} = {val} (target {v['rule']})")
    out["verdicts"] = verdicts
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
