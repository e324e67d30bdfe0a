"""Resident memory a 50,000 x 512 activation cache adds while a branch trains on it.

A child process fills the cache (float16, memory-mapped safetensors shards); a second, fresh
process warms Lightning up on a tiny in-memory dataset, notes its resident set size (RSS), then
trains a branch head for two epochs over all 50,000 cached rows while a thread samples RSS
every 5 ms. The peak increase is what the cache costs in memory; for reference, the same
activations held as a float32 tensor would take 102.4 MB.

    python benchmarks/bench_cache_memory.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROWS, WIDTH = 50_000, 512


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def build(root: str) -> None:
    import torch

    from branchnet.cache import ActivationCache

    torch.manual_seed(0)
    parent = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH))
    x = torch.randn(ROWS, WIDTH)
    acts = ActivationCache(root).get(parent, "0", x, progress=False)
    print(acts.path if hasattr(acts, "path") else acts)


def measure(root: str) -> None:
    import torch

    from branchnet import models
    from branchnet.cache import ActivationCache
    from branchnet.data.batches import TensorPairs
    from branchnet.engine import TrainConfig, fit

    cfg = TrainConfig(epochs=2, batch_size=64, progress=False)
    y = torch.randint(0, 3, (ROWS,))
    warm = TensorPairs(torch.randn(1000, WIDTH), torch.randint(0, 3, (1000,)))
    fit(models.branch_head(WIDTH, 3), warm, None, cfg, workdir=tempfile.mkdtemp())
    entries = ActivationCache(root).entries()
    acts = ActivationCache(root).open(entries[0].key)
    base = rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    fit(models.branch_head(WIDTH, 3), acts.dataset(y), None, cfg,
        workdir=tempfile.mkdtemp())
    seconds = time.perf_counter() - t
    done.set()
    th.join()
    print(f"cache: {ROWS} x {WIDTH} {acts.dtype}, {acts.nbytes / 1e6:.1f} MB on disk")
    print()
    print("| measure | MB |")
    print("|---|---|")
    print(f"| RSS before training (Lightning warmed up) | {base:.1f} |")
    print(f"| peak RSS while training 2 epochs on the cache | {peak[0]:.1f} |")
    print(f"| **added by the cache** | **{peak[0] - base:.1f}** |")
    print(f"| same activations as an in-memory float32 tensor | {ROWS * WIDTH * 4 / 1e6:.1f} |")
    print(f"\n2 epochs took {seconds:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--build", help=argparse.SUPPRESS)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        return build(args.build)
    if args.measure:
        return measure(args.measure)
    root = tempfile.mkdtemp(prefix="bench-cache-mem-")
    subprocess.run([sys.executable, __file__, "--build", root], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, __file__, "--measure", root], check=True)


if __name__ == "__main__":
    main()
