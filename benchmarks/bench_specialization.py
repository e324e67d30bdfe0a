"""Time of a full specialization report for a CIFAR-10 CNN (target: under 2 minutes on 2 cores).

    python benchmarks/bench_specialization.py [--run RUN_DIR] [--layer conv1]

With ``--run``, analyses a trained classifier run (``branchnet model fit``); without, the
AlexNet-style CNN of configs/specialization-cifar10.yaml at 32x32 with fresh weights on the
CIFAR-10 test images (the analysis costs the same whatever the weights). Times the whole of
``specialization()`` (2,000 samples, 2,000 permutations, t-SNE, ablation of every branch) and
of ``write_report`` (figures and HTML), each in one process.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from branchnet import models
from branchnet.analysis import specialization

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpg.tar.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", type=Path)
    ap.add_argument("--layer", default="conv1")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = ap.parse_args()
    if args.run:
        from branchnet.classifier import ClassifierExperiment
        from branchnet.config import read_yaml
        from branchnet.saved_model import load_model

        model, _ = load_model(args.run)
        cfg = ClassifierExperiment.validate({**read_yaml(args.run / "config.yaml"), "progress": False})
        test, what = ClassifierExperiment(cfg).load_data().test, f"trained run {args.run.name}"
    elif args.data.exists():
        from branchnet.data import load

        torch.manual_seed(0)
        model = models.alexnet(groups=2).eval()
        test, what = load(str(args.data), progress=False).test, "AlexNetSmall on CIFAR-10 test"
    else:
        torch.manual_seed(0)
        model = models.alexnet(groups=2).eval()
        x = torch.randn(10000, 3, 32, 32)
        test, what = (x, torch.arange(10000) % 10), "AlexNetSmall on random 32x32 images"
    t0 = time.perf_counter()
    result = specialization(model, args.layer, test, n_permutations=2000, max_samples=2000)
    t1 = time.perf_counter()
    path = result.write_report(tempfile.mkdtemp(prefix="bench-spec-"))
    t2 = time.perf_counter()
    print(f"{what}; layer {args.layer}; torch threads {torch.get_num_threads()}")
    print()
    print("| step | seconds |")
    print("|---|---|")
    print(f"| specialization() (2,000 samples, 2,000 permutations) | {t1 - t0:.1f} |")
    print(f"| write_report (figures + HTML) | {t2 - t1:.1f} |")
    print(f"| **total** (target < 120 s) | **{t2 - t0:.1f}** |")
    print(f"\nreport: {path}")


if __name__ == "__main__":
    main()
