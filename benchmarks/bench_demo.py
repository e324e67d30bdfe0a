"""Wall-clock time of ``branchnet demo`` (fresh process each time, imports included).

    python benchmarks/bench_demo.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    exe = shutil.which("branchnet") or f"{sys.executable} -m branchnet.cli"
    times = []
    for _ in range(args.repeats):
        out = tempfile.mkdtemp(prefix="bench-demo-")
        env = {**os.environ, "BRANCHNET_CACHE_DIR": tempfile.mkdtemp(prefix="bench-demo-cache-")}
        t = time.perf_counter()
        subprocess.run([*exe.split(), "demo", "--out", out], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    print(f"| command | median of {args.repeats} | min | max | target |")
    print("|---|---|---|---|---|")
    print(f"| `branchnet demo` | {statistics.median(times):.1f} s | {min(times):.1f} s | "
          f"{max(times):.1f} s | < 60 s |")


if __name__ == "__main__":
    main()
