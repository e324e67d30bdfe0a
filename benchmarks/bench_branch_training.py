"""Training a branch on cached activations vs re-running the frozen parent every epoch.

Side by side in one process, same engine (``branchnet.engine.fit``), same head, same data, same
batch size. The parent is the Neural-Branching seed architecture (MLP 3072-1024-512-6, branch
512-256-3 reading the 512-d layer). Per-epoch cost is measured as
``(time of E2 epochs - time of E1 epochs) / (E2 - E1)``, so set-up costs cancel; the one-time
cost of filling the cache is reported separately.

    python benchmarks/bench_branch_training.py [--data ../shared/data/cifar10-jpg.tar.gz]

Uses the six CIFAR-10 classes of configs/cifar10-6class.yaml (the vehicles branch) when the
archive is present, else random images of the same shape (timings do not depend on pixels).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from branchnet import models
from branchnet.cache import ActivationCache
from branchnet.data.batches import TensorPairs
from branchnet.data.dataset import Split
from branchnet.engine import TrainConfig, fit

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpg.tar.gz"
CLASSES = ["airplane", "automobile", "ship", "bird", "cat", "dog"]


class FrozenParentThenHead(nn.Module):
    """The alternative to a cache: every batch goes through the frozen parent, then the head."""

    def __init__(self, parent: nn.Module, tap: str, head: nn.Module):
        super().__init__()
        self.parent, self.head = parent.eval().requires_grad_(False), head
        self._out: list[torch.Tensor] = []
        dict(parent.named_modules())[tap].register_forward_hook(
            lambda m, i, o: self._out.append(o))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.parent.eval()
            self._out.clear()
            self.parent(x)
            feats = self._out.pop()
        return self.head(feats)


def branch_split(data_path: Path) -> tuple[Split, str]:
    if data_path.exists():
        from branchnet.data import load

        data = load(str(data_path), classes=CLASSES, normalize="feature", progress=False)
        keep = data.train.y < 3  # the vehicles branch: airplane, automobile, ship
        return data.train.subset(keep), f"CIFAR-10 vehicles branch ({int(keep.sum())} images)"
    g = torch.Generator().manual_seed(0)
    n = 13500
    return (Split(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)),
            f"random 3x32x32 images ({n}; CIFAR-10 archive not found)")


def timed_fit(model: nn.Module, ds, cfg: TrainConfig) -> float:
    t = time.perf_counter()
    fit(model, ds, None, cfg, workdir=tempfile.mkdtemp(prefix="bench-"))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--epochs", type=int, nargs=2, default=(1, 4), metavar=("E1", "E2"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    split, what = branch_split(args.data)
    parent = models.mlp([3072, 1024, 512], 6, dropout=0.3).eval().requires_grad_(False)
    tap = "hidden.1.linear"

    t = time.perf_counter()
    acts = ActivationCache(tempfile.mkdtemp(prefix="bench-cache-")).get(
        parent, tap, split, progress=False)
    fill = time.perf_counter() - t
    cached_ds = acts.dataset(split.y, flatten=True)
    raw_ds = TensorPairs(split.x, split.y)

    def per_epoch(make_model, ds, batch_size: int) -> float:
        e1, e2 = args.epochs
        cfg = dict(batch_size=batch_size, lr=3e-4, weight_decay=0.01, progress=False)
        times = []
        for _ in range(args.repeats):
            t1 = timed_fit(make_model(), ds, TrainConfig(epochs=e1, **cfg))
            t2 = timed_fit(make_model(), ds, TrainConfig(epochs=e2, **cfg))
            times.append((t2 - t1) / (e2 - e1))
        return statistics.median(times)

    print(f"data: {what}; torch threads {torch.get_num_threads()}; median of {args.repeats}")
    print()
    print("| batch | cached activations (s/epoch) | parent re-run every batch (s/epoch) | speed-up |")
    print("|---|---|---|---|")
    cached_32 = None
    for bs in args.batch_sizes:
        cached = per_epoch(lambda: models.branch_head(512, 3), cached_ds, bs)
        rerun = per_epoch(lambda: FrozenParentThenHead(parent, tap, models.branch_head(512, 3)),
                          raw_ds, bs)
        cached_32 = cached_32 or cached
        print(f"| {bs} | {cached:.3f} | {rerun:.3f} | {rerun / cached:.1f}x |", flush=True)
    print(f"\none-time cache fill ({len(split)} x 512, float16): {fill:.2f} s "
          f"(= {fill / cached_32:.1f} cached epochs at batch {args.batch_sizes[0]})")


if __name__ == "__main__":
    main()
