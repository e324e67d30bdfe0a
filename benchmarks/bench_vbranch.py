"""Fused virtual branches vs a loop of separate networks, one dense network and torch.func vmap.

Side by side in ONE process, on ``--threads`` CPU threads (default 2), K = 4 CIFAR ResNet-20s
(width 16, 32x32 images, 10 classes):

    python benchmarks/bench_vbranch.py                      # the issue's numbers (~3 min)
    python benchmarks/bench_vbranch.py --repeats 2 --warmup 1 --batch 8 --json out.json  # smoke

Variants (each built from the same seed; weights differ between variants, which does not
change the cost):

- ``fused s=S`` (one per ``--shared`` value, default 0 and 0.5): ``vresnet(depth, branches=K,
  shared_frac=S)``. Training: per-branch minibatches ``(B, K, 3, 32, 32)``, loss
  ``per_branch_loss`` (sum over branches of each branch's mean cross-entropy). Inference: one
  batch ``(B, 3, 32, 32)`` broadcast to every branch (how an ensemble predicts).
- ``loop``: K separate ``vresnet(depth, branches=1)``; training: each model forward + backward
  on its own batch ``(B, 3, 32, 32)`` (one backward per model, so only one model's activations
  are alive at a time; ``--loop-backward once`` sums the K losses and runs one backward, which
  keeps all K graphs alive as the fused model must), then ONE Adam over all K models'
  parameters steps (Adam is per-tensor, so one optimizer or K optimizers do the same work).
  Inference: every model in turn on the same batch.
- ``dense``: one ``vresnet(depth, branches=1, width=plain_width(16, K))`` (width 32 for K = 4) on
  a batch of B: about the FLOPs of K branches of width 16 on B each. The FLOPs of every variant
  are counted with ``torch.utils.flop_counter.FlopCounterMode`` (training: forward + backward of
  one step; inference: one forward) and printed, so the "same FLOPs" claim is checked. (Torch's
  formula for ``convolution_backward`` ignores ``groups`` in the weight gradient; this script
  passes a corrected one, else the fused and vmapped models' backward would count K times.)
- ``vmap``: ``torch.func.stack_module_state`` over K ``branches=1`` ResNets, forward by
  ``torch.func.functional_call`` under ``torch.func.vmap`` (in_dims 0 for stacked parameters,
  buffers and per-model batches ``(K, B, 3, 32, 32)``; inference broadcasts the batch with
  in_dims None), backward by ordinary autograd through the vmapped forward into the stacked
  leaf parameters, one Adam over them. BatchNorm: the models' BN layers are branchnet's
  ``VBatchNorm2d`` (``F.batch_norm`` with running statistics); the running-stat buffers are
  stacked too (in_dims 0), so vmap updates every model's own statistics in place in training
  mode and no ``replace_all_batch_norm_modules_`` is needed (it would not touch these modules
  anyway; it handles ``torch.nn`` BatchNorm only).
- ``vmap+grad`` (training only): ``vmap(torch.func.grad(loss))`` over the same stacked state;
  the per-model gradients are assigned to ``.grad`` and the same Adam steps.

Every training step is ``zero_grad(set_to_none=True)``, forward, loss, backward and
``Adam(lr=1e-3).step()``, in train mode; inference is a forward under ``torch.inference_mode()``
in eval mode. Protocol (REFERENCE 4.8): fixed ``torch.set_num_threads``, ``--warmup`` untimed
steps per variant, then ``--repeats`` rounds in which every variant runs one timed step (the
order rotates each round, so load drifts hit all variants alike); the table gives the median.
A variant that cannot be built or run is reported as failed in the table, not raised.

Peak memory: each variant runs again in a FRESH subprocess (this script with ``--only``). The
child builds its inputs, warms torch's kernels up on a tiny unrelated conv net (so one-time
library allocations are not charged), then notes its resident set size (``VmRSS``) and resets
the kernel's peak-RSS counter (writing ``5`` to ``/proc/self/clear_refs``; Linux >= 4.0),
builds the variant's model(s) and optimizer and runs ``--warmup + --mem-steps`` steps. Peak
memory = ``VmHWM`` (peak RSS since the reset) minus that baseline: parameters, gradients, Adam
state, activations and workspace of the variant. Where ``clear_refs`` is not writable, a
thread samples ``VmRSS`` every millisecond instead (it can miss short peaks; the table says
which method ran). RSS is used rather than ``torch.profiler`` because the CPU profiler's
memory view does not track oneDNN workspace and allocator caching.

Verdicts (targets of the issue, computed from the measurements): fused training step >= 2x
faster than the loop; fused <= 1.3x the dense network's time; the same for inference; fused
peak memory <= the loop's.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from branchnet.virtual.layers import VConv2d
from branchnet.virtual.merge import per_branch_loss
from branchnet.virtual.models import count_parameters, plain_width, vresnet

MODES = ("train", "infer")
IMAGE = (3, 32, 32)
CLASSES = 10


# ---------------------------------------------------------------- variants


class Runner:
    """One variant in one mode: ``run()`` does one training step or one inference forward."""

    def __init__(self, run: Callable[[], Any], params: int, count: Callable[[], Any] | None = None):
        self.run, self.params, self.count = run, params, count


def variant_keys(args: argparse.Namespace) -> list[str]:
    keys = [f"fused:{s:g}" for s in args.shared] + [f"split:{args.shared[0]:g}", "loop", "dense",
                                                       "vmap", "vmap+grad"]
    return [k for k in keys if not args.variants or k.split(":")[0] in args.variants or k in args.variants]


def label(key: str, args: argparse.Namespace) -> str:
    if key.startswith("fused:"):
        return f"fused K={args.branches} s={key.split(':')[1]}"
    if key.startswith("split:"):
        return f"fused K={args.branches} s={key.split(':')[1]}, one conv per branch (conv_impl='split')"
    once = " (one backward)" if args.loop_backward == "once" else ""
    return {"loop": f"loop over {args.branches} ResNet-{args.depth}s{once}",
            "dense": f"dense width {plain_width(args.width, args.branches)} (same FLOPs)",
            "vmap": "torch.func vmap (training: + autograd)",
            "vmap+grad": "torch.func vmap(grad)"}[key]


def make_inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    K, B = args.branches, args.batch
    x = torch.randn(K, B, *IMAGE, generator=g)  # model k's own minibatch
    y = torch.randint(0, CLASSES, (K, B), generator=g)
    return {"x_kb": x, "y_kb": y, "x_bk": x.transpose(0, 1).contiguous(), "y_bk": y.t().contiguous(),
            "x": x[0].clone(), "y": y[0].clone()}


def _models(args: argparse.Namespace, n: int, **kw: Any) -> list[nn.Module]:
    torch.manual_seed(0)
    return [vresnet(args.depth, CLASSES, input_shape=IMAGE, **kw) for _ in range(n)]


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(list(params), lr=1e-3)


def _step_of(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
             y: torch.Tensor) -> Callable[[], Any]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        per_branch_loss(model(x), y).backward()
        opt.step()
    return step


def _conv_backward_flops(grad_out_shape: Any, x_shape: Any, w_shape: Any, _bias: Any, _stride: Any,
                         _padding: Any, _dilation: Any, transposed: bool, _output_padding: Any, groups: int,
                         output_mask: Any, out_shape: Any = None, **_: Any) -> int:
    """``aten.convolution_backward`` FLOPs with groups: torch's own formula (2.13) counts the
    weight gradient of a grouped convolution as if it were dense, ``groups`` times too much,
    which would inflate the fused (``groups=K``) and vmapped models' backward."""
    def t(shape: Any) -> list[int]:
        return [shape[1], shape[0], *shape[2:]]

    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:
        a, b = (grad_out_shape, x_shape) if transposed else (x_shape, grad_out_shape)
        flops += conv_flop_count(t(a), t(b), t(out_shape[1]), transposed=False) // groups
    return flops


def _counter_of(fn: Callable[[], Any]) -> Callable[[], Any]:
    """FLOPs of ``fn()``: forward (and backward when it calls it) of one step, optimizer excluded."""
    def count() -> int:
        with FlopCounterMode(display=False, custom_mapping={
                torch.ops.aten.convolution_backward: _conv_backward_flops}) as fc:
            fn()
        return int(fc.get_total_flops())
    return count


def build(key: str, mode: str, args: argparse.Namespace, data: dict[str, torch.Tensor]) -> Runner:
    """The model(s), optimizer and one-step closure of variant ``key`` in ``mode``."""
    K, train = args.branches, mode == "train"
    x, y = data["x"], data["y"]
    if key.startswith(("fused:", "split:")) or key == "dense":
        if key == "dense":
            (model,) = _models(args, 1, branches=1, width=plain_width(args.width, K))
            xt, yt = x, y
        else:
            (model,) = _models(args, 1, branches=K, shared_frac=float(key.split(":")[1]), width=args.width)
            xt, yt = data["x_bk"], data["y_bk"]
            if key.startswith("split:"):  # K dense convs per layer instead of one grouped conv
                for m in model.modules():
                    if isinstance(m, VConv2d):
                        m.conv_impl = "split"
        params = count_parameters(model)
        if not train:
            model.eval()
            return Runner(lambda: model(x), params, _counter_of(lambda: model(x)))
        model.train()
        return Runner(_step_of(model, _adam(model.parameters()), xt, yt), params,
                      _counter_of(lambda: per_branch_loss(model(xt), yt).backward()))

    models = _models(args, K, branches=1, width=args.width)
    params = sum(count_parameters(m) for m in models)
    if key == "loop":
        xs, ys = list(data["x_kb"].unbind(0)), list(data["y_kb"].unbind(0))
        if not train:
            for m in models:
                m.eval()
            return Runner(lambda: torch.stack([m(x) for m in models], 1), params,
                          _counter_of(lambda: [m(x) for m in models]))
        opt = _adam(p for m in models for p in m.parameters())

        def loop_step() -> None:
            opt.zero_grad(set_to_none=True)
            if args.loop_backward == "once":  # all K graphs alive, like the fused model's
                sum(per_branch_loss(m(xk), yk) for m, xk, yk in zip(models, xs, ys, strict=True)).backward()
            else:
                for m, xk, yk in zip(models, xs, ys, strict=True):
                    per_branch_loss(m(xk), yk).backward()
            opt.step()

        def loop_count() -> None:
            for m, xk, yk in zip(models, xs, ys, strict=True):
                per_branch_loss(m(xk), yk).backward()

        return Runner(loop_step, params, _counter_of(loop_count))

    # vmap / vmap+grad over stacked state of K plain models
    from torch.func import functional_call, grad, stack_module_state, vmap

    for m in models:
        m.train(train)
    stacked, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    base.train(train)
    models.clear()  # the stacked copies are the weights from here on
    xk, yk = data["x_kb"], data["y_kb"]

    def fwd(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (xb,))

    if not train:
        if key == "vmap+grad":
            raise RuntimeError("inference is the same as vmap (no gradient)")
        infer = vmap(fwd, in_dims=(0, 0, None))
        return Runner(lambda: infer(stacked, buffers, x), params,
                      _counter_of(lambda: infer(stacked, buffers, x)))
    opt = _adam(stacked.values())

    def models_loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # out (K, B, 1, C), t (K, B)
        ce = F.cross_entropy(out.reshape(-1, CLASSES), t.reshape(-1), reduction="none")
        return ce.view(t.shape).mean(1).sum()

    if key == "vmap":
        vfwd = vmap(fwd)

        def vmap_step() -> None:
            opt.zero_grad(set_to_none=True)
            models_loss(vfwd(stacked, buffers, xk), yk).backward()
            opt.step()

        return Runner(vmap_step, params,
                      _counter_of(lambda: models_loss(vfwd(stacked, buffers, xk), yk).backward()))

    def one_loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xb: torch.Tensor,
                 yb: torch.Tensor) -> torch.Tensor:
        return per_branch_loss(fwd(p, b, xb), yb)

    vgrad = vmap(grad(one_loss))
    names = list(stacked)

    def vgrad_step() -> None:
        opt.zero_grad(set_to_none=True)
        grads = vgrad(stacked, buffers, xk, yk)
        for n in names:
            stacked[n].grad = grads[n]
        opt.step()

    return Runner(vgrad_step, params, _counter_of(lambda: vgrad(stacked, buffers, xk, yk)))


def call(runner: Runner, mode: str) -> None:
    if mode == "infer":
        with torch.inference_mode():
            runner.run()
    else:
        runner.run()


# ---------------------------------------------------------------- peak memory (child process)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _warm_kernels() -> None:
    """One tiny conv + BN + linear training step and inference, so oneDNN, the thread pool and
    autograd allocate their one-time state before the baseline."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, CLASSES))
    opt = _adam(net.parameters())
    xb = torch.randn(4, *IMAGE)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(net(xb), torch.zeros(4, dtype=torch.long)).backward()
        opt.step()
    with torch.inference_mode():
        net.eval()(xb)


def measure_memory(key: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    data = make_inputs(args)
    _warm_kernels()
    gc.collect()
    base_kb = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        method, sampler = "VmHWM after clear_refs", None
    except OSError:
        method, peak, done = "VmRSS sampled every 1 ms", [base_kb], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _status_kb("VmRSS"))
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    runner = build(key, mode, args, data)
    for _ in range(args.warmup + args.mem_steps):
        call(runner, mode)
    if sampler is None:
        peak_kb = _status_kb("VmHWM")
    else:
        done.set()
        sampler.join()
        peak_kb = peak[0]
    return {"peak_mb": (peak_kb - base_kb) / 1024, "method": method}


def memory_in_child(key: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--only", key, "--mode", mode, "--threads", str(args.threads),
           "--batch", str(args.batch), "--branches", str(args.branches), "--depth", str(args.depth),
           "--width", str(args.width), "--loop-backward", args.loop_backward,
           "--warmup", str(args.warmup), "--mem-steps", str(args.mem_steps)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode or not lines:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:160]}
    return json.loads(lines[-1])


# ---------------------------------------------------------------- timing (this process)


def time_all(keys: list[str], mode: str, args: argparse.Namespace,
             data: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    res: dict[str, dict[str, Any]] = {}
    runners: dict[str, Runner] = {}
    for key in keys:
        try:
            runner = build(key, mode, args, data)
            flops = runner.count() if runner.count else None
            for _ in range(args.warmup):
                call(runner, mode)
        except Exception as e:  # report, do not crash: a variant may not support this mode
            res[key] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:160]}
            continue
        runners[key] = runner
        res[key] = {"params": runner.params, "flops": flops, "times_ms": []}
    order = list(runners)
    for r in range(args.repeats):
        rot = order[r % len(order):] + order[:r % len(order)] if order else []
        for key in rot:
            t = time.perf_counter()
            call(runners[key], mode)
            res[key]["times_ms"].append((time.perf_counter() - t) * 1e3)
    for key in runners:
        res[key]["median_ms"] = statistics.median(res[key]["times_ms"])
    return res


def check_vmap_matches_loop(args: argparse.Namespace, data: dict[str, torch.Tensor]) -> str:
    """vmap over stacked copies of the loop's models must give the loop's eval outputs."""
    try:
        loop, vm = build("loop", "infer", args, data), build("vmap", "infer", args, data)
        with torch.inference_mode():
            a, b = loop.run(), vm.run()  # (B, K, 1, C) and (K, B, 1, C)
        ok = torch.allclose(a.transpose(0, 1), b, atol=1e-4, rtol=1e-4)
        return "vmap inference outputs == loop outputs: " + ("yes" if ok else "NO (max diff "
                                                             f"{(a.transpose(0, 1) - b).abs().max():.2e})")
    except Exception as e:
        return f"vmap vs loop output check failed: {type(e).__name__}: {e}".splitlines()[0]


# ---------------------------------------------------------------- report


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(mode: str, res: dict[str, dict[str, Any]], keys: list[str], args: argparse.Namespace) -> None:
    fused = [k for k in keys if k.startswith("fused:") and "median_ms" in res.get(k, {})]
    what = "training step (fwd+bwd+Adam)" if mode == "train" else "inference forward"
    flops_what = "GFLOPs fwd+bwd" if mode == "train" else "GFLOPs fwd"
    head = ["variant", "params", flops_what, "median ms",
            *[f"time / fused s={k.split(':')[1]}" for k in fused], "peak MB"]
    print(f"\n### {what}, batch {args.batch} per branch/model\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key in keys:
        r = res.get(key)
        if r is None:
            continue
        mem = r.get("memory", {})
        peak = mem.get("peak_mb")
        peak_s = _fmt(peak, ".1f") if "error" not in mem else f"failed ({mem['error']})"
        if "error" in r:
            print(f"| {label(key, args)} | - | - | failed: {r['error']} |" + " - |" * len(fused)
                  + f" {peak_s} |")
            continue
        ratios = [f"{r['median_ms'] / res[f]['median_ms']:.2f}x" for f in fused]
        gfl = None if r["flops"] is None else r["flops"] / 1e9
        print(f"| {label(key, args)} | {r['params']:,} | {_fmt(gfl, '.3f')} | {r['median_ms']:.1f} | "
              + " | ".join(ratios) + (" | " if ratios else "") + f"{peak_s} |")


def verdicts(results: dict[str, dict[str, dict[str, Any]]], keys: list[str]) -> list[dict[str, Any]]:
    out = []

    def add(name: str, value: float | None, target: str, ok: bool | None) -> None:
        status = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        out.append({"target": name, "value": value, "rule": target, "status": status})

    for mode, res in results.items():
        ms = {k: r.get("median_ms") for k, r in res.items()}
        for f in (k for k in keys if k.startswith("fused:")):
            s = f.split(":")[1]
            fm, lm, dm = ms.get(f), ms.get("loop"), ms.get("dense")
            sp = lm / fm if fm and lm else None
            add(f"{mode}: loop time / fused s={s} time", sp, ">= 2", None if sp is None else sp >= 2)
            rd = fm / dm if fm and dm else None
            add(f"{mode}: fused s={s} time / dense time", rd, "<= 1.3", None if rd is None else rd <= 1.3)
            fp = res.get(f, {}).get("memory", {}).get("peak_mb")
            lp = res.get("loop", {}).get("memory", {}).get("peak_mb")
            mr = fp / lp if fp is not None and lp else None
            add(f"{mode}: peak memory fused s={s} / loop ({_fmt(fp, '.1f')} / {_fmt(lp, '.1f')} MB)", mr,
                "<= 1", None if mr is None else mr <= 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="minibatch per branch / per model")
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--shared", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--loop-backward", choices=("each", "once"), default="each",
                    help="loop: backward after each model (default; lowest memory) or once on the sum")
    ap.add_argument("--variants", nargs="*", default=None,
                    help="subset of: fused split loop dense vmap vmap+grad (default: all)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--mem-steps", type=int, default=3, help="steps after warm-up in the memory child")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.only:  # peak-memory child
        print(json.dumps(measure_memory(args.only, args.mode, args)))
        return

    keys = variant_keys(args)
    data = make_inputs(args)
    print(f"K={args.branches} ResNet-{args.depth} (width {args.width}), 3x32x32 inputs, batch {args.batch}; "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; warm-up {args.warmup}, "
          f"median of {args.repeats}")
    if "vmap" in keys and "loop" in keys:
        print(check_vmap_matches_loop(args, data))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for mode in args.modes:
        keys_m = [k for k in keys if not (mode == "infer" and k == "vmap+grad")]
        results[mode] = time_all(keys_m, mode, args, data)
        if not args.no_memory:
            for key in keys_m:
                if "error" not in results[mode][key]:
                    results[mode][key]["memory"] = memory_in_child(key, mode, args)
        table(mode, results[mode], keys_m, args)
    methods = {r["memory"]["method"] for res in results.values() for r in res.values()
               if "method" in r.get("memory", {})}
    if methods:
        print(f"\npeak MB: RSS high-water mark above the RSS before building the variant, fresh process "
              f"each ({', '.join(sorted(methods))}); {args.warmup} + {args.mem_steps} steps")
    print()
    for mode, fl in results.items():
        f0 = next((k for k in keys if k.startswith("fused:") and fl.get(k, {}).get("flops")), None)
        for other in ("dense", "loop"):
            if f0 and fl.get(other, {}).get("flops"):
                ratio = fl[other]["flops"] / fl[f0]["flops"]
                print(f"FLOPs check ({mode}): {other} / {label(f0, args)} = {ratio:.3f}")
    ver = verdicts(results, keys)
    print("\n### verdicts\n")
    for v in ver:
        val = "-" if v["value"] is None else f"{v['value']:.2f}"
        print(f"- {v['status']}: {v['target']} = {val} (target {v['rule']})")
    if args.json:
        cfg = {k: v for k, v in vars(args).items() if k not in ("json", "only", "mode")}
        args.json.write_text(json.dumps({"config": cfg, "torch": torch.__version__, "results": results,
                                         "verdicts": ver}, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
