"""Helpers shared by the command-line tests."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import yaml

from branchnet.cli import main

#: a tiny tree experiment on digits: three groups, a few epochs
DIGITS_CONFIG: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "data": {"source": "digits", "val_fraction": 0.3, "test_fraction": 0.2, "max_per_class": 60},
    "hierarchy": {"round": ["0", "6", "8", "9"], "straight": ["1", "4", "7"],
                  "curly": ["2", "3", "5"]},
    "parent": {"model": {"kind": "mlp", "sizes": ["auto", 48, 32]}, "tap": "hidden.1",
               "train": {"epochs": 4, "batch_size": 32, "lr": 0.01}},
    "tree": {"head": {"hidden": 32, "dropout": 0.0},
             "head_train": {"epochs": 4, "batch_size": 32, "lr": 0.01, "patience": None}},
    "calibration": {"method": "coverage", "coverage": 0.8},
    "progress": False,
}


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """main(args) with stdout and stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    """Write ``cfg`` as YAML, keys in the given order."""
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
