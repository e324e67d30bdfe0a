"""Early exits against the full parent, side by side in one process (2 threads): FLOPs per
input at the calibrated operating point, and wall-clock time of staged inference (the parent
stops at each input's exit) against the whole parent, at batch 1 and batch 64.

It reads finished ``exits`` runs (``branchnet exits fit configs/exits-*.yaml``): their saved
exits and calibrated threshold, and the first ``--inputs`` texts / images of their test split.
Timing alternates the two ways ``--repeats`` times and keeps each one's best; a text parent's
memo is off, so every call really runs the transformer.

    python benchmarks/bench_exits.py RUN [RUN ...] [--inputs 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json

import torch

from branchnet.exits.evaluate import time_inference
from branchnet.exits.experiment import ExitsExperiment, load_run_exits
from branchnet.metrics import format_table
from branchnet.protocol import read_config
from branchnet.runs import Run


def bench(run_dir: str, inputs: int, repeats: int, batch_sizes: list[int]) -> list[dict]:
    run = Run.open(run_dir)
    me = load_run_exits(run)
    exp = ExitsExperiment(read_config(ExitsExperiment, run.path / "config.yaml"), quiet=True)
    test = exp.load_data().test
    x = test.x[:inputs]
    pred = me.predict(x)
    saved = 1 - float(pred.flops.mean()) / me.parent_flops
    rows = []
    for t in time_inference(me, x, batch_sizes, repeats=repeats):
        rows.append({"run": run.path.name[:28], "batch": t["batch_size"], "inputs": t["inputs"],
                     "flops_saved": saved, "full_ms": t["full_ms"], "exits_ms": t["exits_ms"],
                     "speedup": t["speedup"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--inputs", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = [r for run in args.runs for r in bench(run, args.inputs, args.repeats,
                                                  args.batch_sizes)]
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
