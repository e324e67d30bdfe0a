"""A frozen MiniLM parent: branch training on cached features vs re-running the transformer every
epoch, and feature extraction with length-sorted dynamic padding vs padding to ``max_length``.

Side by side in one process, on the Debian package descriptions, with 2 threads:

1. **Training a branch** (linear 384 -> 16, Adam, batch 64) for one epoch over ``--texts``
   training texts: reading the cached ``layer.5`` features (:class:`ActivationCache`), or running
   MiniLM on every batch first (what a branch costs without the cache). The one-time cost of
   filling the cache is reported separately.
2. **Extraction** in texts per second (all 7 pooled hidden states): sorted by length and padded
   per batch to its longest text (``dynamic_padding=True``, the default) vs every batch padded
   to ``max_length``, at ``max_length`` 128 and 256. The parent's memo is off, so every call
   really runs the transformer.

    python benchmarks/bench_text.py [--texts 512]
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from branchnet.cache import ActivationCache
from branchnet.data import Split, Texts
from branchnet.text import TextParent

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
MODEL = SHARED / "minilm" / "model.zip"
TRAIN = SHARED / "text" / "debian-packages-train.jsonl.gz"
LAYER = "layer.5"


def read_split(n: int) -> Split:
    with gzip.open(TRAIN, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f, strict=False)]
    labels = sorted({r["label"] for r in rows})
    return Split(Texts(r["text"] for r in rows), torch.tensor([labels.index(r["label"])
                                                               for r in rows]))


def train_epoch(head: nn.Module, opt: torch.optim.Optimizer, batches) -> float:
    """One epoch of Adam steps over ``batches`` (an iterable of (features, labels)); seconds."""
    t0 = time.perf_counter()
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    return time.perf_counter() - t0


def bench_training(parent: TextParent, split: Split, batch: int = 64) -> dict[str, float]:
    n = len(split)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    chunks = [order[i:i + batch] for i in range(0, n, batch)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        acts = ActivationCache(tmp).get(parent, LAYER, split, progress=False)
        fill = time.perf_counter() - t0
        head = nn.Linear(384, 16)
        opt = torch.optim.Adam(head.parameters(), 1e-3)
        epochs = 20
        cached = sum(train_epoch(head, opt, ((acts[idx], split.y[idx]) for idx in chunks))
                     for _ in range(epochs)) / epochs

    def rerun_batches():
        for idx in chunks:
            with torch.inference_mode():
                states = parent.hidden_states(split.x[idx])
            yield states[-1].clone(), split.y[idx]

    rerun = train_epoch(head, opt, rerun_batches())
    return {"texts": n, "cache_fill_s": fill, "epoch_cached_s": cached, "epoch_rerun_s": rerun,
            "speedup": rerun / cached}


def bench_padding(parent: TextParent, texts: Texts, max_length: int) -> dict[str, float]:
    parent.max_length = max_length
    out: dict[str, float] = {"max_length": max_length}
    for dynamic in (True, False):
        parent.dynamic_padding = dynamic
        parent.hidden_states(texts[:32])  # warm up
        t0 = time.perf_counter()
        parent.hidden_states(texts)
        out["dynamic" if dynamic else "padded"] = len(texts) / (time.perf_counter() - t0)
    out["speedup"] = out["dynamic"] / out["padded"]
    out["truncated"] = parent.truncation(texts)["fraction"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=512)
    args = ap.parse_args()
    if not MODEL.is_file() or not TRAIN.is_file():
        raise SystemExit(f"needs {MODEL} and {TRAIN}")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    parent = TextParent.from_pretrained(MODEL, max_length=128, memo=0)
    split = read_split(args.texts)
    tr = bench_training(parent, split)
    print(f"## branch training, {tr['texts']} texts, one epoch (linear 384 -> 16, batch 64)\n")
    print("| | seconds per epoch |\n|---|---|")
    print(f"| cached {LAYER} features | {tr['epoch_cached_s']:.4f} |")
    print(f"| MiniLM re-run every batch | {tr['epoch_rerun_s']:.2f} |")
    print(f"| **speed-up** | **{tr['speedup']:.0f}x** |")
    print(f"\none-time cache fill: {tr['cache_fill_s']:.1f} s\n")
    print(f"## feature extraction, {args.texts} texts, texts per second (2 threads)\n")
    print("| max_length | truncated | length-sorted, dynamic padding | padded to max_length | "
          "speed-up |\n|---|---|---|---|---|")
    for m in (128, 256):
        r = bench_padding(parent, split.x, m)
        print(f"| {m} | {r['truncated']:.1%} | {r['dynamic']:.1f} | {r['padded']:.1f} | "
              f"**{r['speedup']:.2f}x** |")


if __name__ == "__main__":
    main()
