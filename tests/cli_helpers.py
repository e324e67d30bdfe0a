"""Helpers shared by the command-line tests."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import yaml

from branchnet.cli import main


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
