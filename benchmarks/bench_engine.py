"""``engine.fit`` against a plain PyTorch training loop; augmentation's share; step options.

Side by side in ONE process on ``--threads`` CPU threads (default 2), CIFAR ResNet-20 (width 16,
0.27 M parameters) on 32 x 32 images, batch 128, SGD with momentum 0.9:

    python benchmarks/bench_engine.py                          # the issue's numbers (~8 min)
    python benchmarks/bench_engine.py --images 512 --epochs 2 --rounds 1 --no-compile  # smoke

1. **engine vs plain loop**, two settings, each a fresh ``resnet(20)`` from the same seed on
   the same ``--images`` random images (float32, channel-normalised range) and labels:

   - ``fp32``: float32, contiguous memory, no augmentation, constant lr: the least the engine
     adds to ``forward, cross-entropy, backward, step``.
   - ``recipe``: the fast CIFAR-10 recipe (``configs/model-cifar10-resnet20-fast.yaml``):
     bfloat16 autocast, channels-last, flip-and-crop (pad 4) on each batch, Nesterov,
     label smoothing 0.1, one-cycle lr set every step, weight decay 5e-4.

   The plain loop is what one writes by hand: a ``randperm`` per epoch, ``x[idx]`` slices,
   ``zero_grad(set_to_none=True)``, forward, loss, backward, ``step``. The engine is
   ``branchnet.engine.fit`` with no validation split (Lightning Trainer, checkpoint every
   epoch, the per-epoch sums it logs). Both run ``--epochs`` epochs; images per second are
   measured over epochs 2..E (epoch 1 warms kernels and allocators up): the engine's from
   ``FitResult.epoch_seconds``, the loop's from its own clock. ``--rounds`` rounds alternate
   the order (engine first, then loop first); the table gives the median.

2. **augmentation's share of a step**: ``augment_batch(x, "flip-crop", 4)`` on a float32 and
   a uint8 batch of 128 (median of 200 calls) against the recipe's training step.

3. **step options** (plain steps, median of ``--steps`` after 3 warm-up steps): float32
   contiguous, channels-last, bf16, bf16 + channels-last, and ``torch.compile`` (inductor)
   with channels-last in fp32 and bf16; the compile time is the wall time of the first step
   (tracing, code generation and the C++ compiler), reported beside the speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from branchnet.data.augment import augment_batch
from branchnet.data.batches import TensorPairs
from branchnet.engine import TrainConfig, fit, memory_format
from branchnet.models import resnet

BATCH = 128
RECIPE = dict(optimizer="sgd", lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
              lr_schedule="onecycle", warmup_epochs=1, label_smoothing=0.1, augment="flip-crop",
              crop_padding=4, precision="bf16", channels_last=True)
FP32 = dict(optimizer="sgd", lr=0.05, momentum=0.9, precision="32", channels_last=False)


def make_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def engine_rate(x: torch.Tensor, y: torch.Tensor, epochs: int, opts: dict) -> float:
    torch.manual_seed(0)
    model = resnet(20)
    cfg = TrainConfig(epochs=epochs, batch_size=BATCH, progress=False, **opts)
    with tempfile.TemporaryDirectory() as work:
        result = fit(model, TensorPairs(x, y), None, cfg, workdir=work)
    s = result.epoch_seconds
    return len(y) * (epochs - 1) / (s[-1] - s[0])


def plain_rate(x: torch.Tensor, y: torch.Tensor, epochs: int, opts: dict) -> float:
    torch.manual_seed(0)
    model = resnet(20)
    cfg = TrainConfig(epochs=epochs, batch_size=BATCH, progress=False, **opts)
    cl = cfg.channels_last
    if cl:
        memory_format(model, torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    loss_fn = partial(F.cross_entropy, label_smoothing=cfg.label_smoothing)
    steps = (len(y) + BATCH - 1) // BATCH
    stamps = []
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(steps):
            idx = perm[i * BATCH:(i + 1) * BATCH]
            xb, yb = x[idx], y[idx]
            if cfg.augment:
                xb = augment_batch(xb, cfg.augment, cfg.crop_padding)
            if cl:
                xb = xb.contiguous(memory_format=torch.channels_last)
            if cfg.lr_schedule:
                for group in opt.param_groups:
                    group["lr"] = cfg.lr_at(epoch + i / steps)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        stamps.append(time.perf_counter())
    return len(y) * (epochs - 1) / (stamps[-1] - stamps[0])


def step_rate(cl: bool, bf16: bool, compiled: bool, steps: int) -> tuple[float, float, float]:
    """(images/s, seconds of one step, seconds of the first step) of a plain training step."""
    torch.manual_seed(0)
    model = resnet(20)
    x, y = make_data(BATCH, seed=1)
    if cl:
        memory_format(model, torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    net = torch.compile(model) if compiled else model

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    return BATCH / dt, dt, first


def augment_seconds(dtype: torch.dtype, calls: int = 200) -> float:
    x = make_data(BATCH)[0]
    if dtype == torch.uint8:
        x = (x.clamp(-2, 2) * 60 + 128).to(torch.uint8)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        augment_batch(x, "flip-crop", 4)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=5120, help="images per epoch (default 40 "
                   "batches)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per measurement (>= 2)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=15, help="timed steps per step option")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.epochs < 2:
        p.error(f"--epochs must be at least 2 (epoch 1 is warm-up), got {a.epochs}")
    torch.set_num_threads(a.threads)
    x, y = make_data(a.images)
    out: dict = {"threads": a.threads, "images": a.images, "epochs": a.epochs,
                 "torch": torch.__version__, "fit": {}, "steps": {}}

    print(f"## engine.fit vs a plain loop: ResNet-20, {a.images} images x {a.epochs} epochs, "
          f"batch {BATCH}, {a.threads} threads, median of {a.rounds} rounds\n")
    print("| setting | plain loop img/s | engine.fit img/s | engine / plain |")
    print("|---|---:|---:|---:|")
    for name, opts in (("fp32", FP32), ("recipe", RECIPE)):
        eng, pl = [], []
        for r in range(a.rounds):
            order = [("engine", engine_rate, eng), ("plain", plain_rate, pl)]
            for _, f, acc in order if r % 2 == 0 else order[::-1]:
                acc.append(f(x, y, a.epochs, opts))
        e, q = statistics.median(eng), statistics.median(pl)
        out["fit"][name] = {"engine": e, "plain": q, "ratio": e / q, "engine_all": eng,
                            "plain_all": pl}
        print(f"| {name} | {q:.0f} | {e:.0f} | {e / q:.3f} |", flush=True)

    print("\n## step options: one training step, batch 128\n")
    print("| step | img/s | vs fp32 contiguous | first step (s) |")
    print("|---|---:|---:|---:|")
    options = [("fp32", False, False, False), ("channels_last", True, False, False),
               ("bf16", False, True, False), ("bf16 + channels_last", True, True, False)]
    if not a.no_compile:
        options += [("compile + channels_last", True, False, True),
                    ("compile + bf16 + channels_last", True, True, True)]
    base = None
    for name, cl, bf, comp in options:
        try:
            rate, dt, first = step_rate(cl, bf, comp, a.steps)
        except Exception as e:  # a compiler that cannot build is a result, not a crash
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:80]} | | |", flush=True)
            continue
        base = base or rate
        out["steps"][name] = {"img_s": rate, "step_s": dt, "first_s": first}
        print(f"| {name} | {rate:.0f} | {rate / base:.2f} | {first:.1f} |", flush=True)

    recipe_step = BATCH / out["steps"].get("bf16 + channels_last", {"img_s": 1e9})["img_s"]
    print("\n## augmentation: flip-crop (pad 4) on a batch of 128, median of 200 calls\n")
    print("| batch dtype | ms per batch | share of the recipe's step |")
    print("|---|---:|---:|")
    for dtype in (torch.float32, torch.uint8):
        s = augment_seconds(dtype)
        share = s / (s + recipe_step)
        out[f"augment_{dtype}".replace("torch.", "")] = {"s": s, "share": share}
        print(f"| {str(dtype).replace('torch.', '')} | {s * 1e3:.2f} | {100 * share:.1f} % |")

    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
