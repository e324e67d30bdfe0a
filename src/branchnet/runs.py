"""Run folders: every run writes its resolved config, metrics, figures and report in one place.

Layout of a run folder::

    RUN/config.yaml      the resolved configuration (re-runnable with ``tree fit``)
    RUN/metrics.json     every number the run measured
    RUN/figures/*.png    plots
    RUN/report.html      a self-contained report (figures embedded)
    RUN/work/            checkpoints, per-model metrics.csv, activation cache
    RUN/tree/            the fitted model (safetensors + JSON)

Example:
    >>> import tempfile
    >>> run = Run.create(tempfile.mkdtemp(), "demo")
    >>> _ = run.write_config({"seed": 0}); _ = run.write_metrics({"accuracy": 0.9})
    >>> Run.open(run.path).read_metrics()["accuracy"]
    0.9
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from branchnet.errors import BranchnetError
from branchnet.fileio import atomic_write, atomic_write_text, jsonable, read_json, write_json


class RunError(BranchnetError, FileNotFoundError):
    """A run folder is missing or incomplete."""


class Run:
    """A run folder (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def create(cls, root: str | Path, name: str) -> Run:
        """A new, empty folder ``root/name-YYYYmmdd-HHMMSS`` (never reuses an existing one)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for k in range(1000):
            path = root / (f"{name}-{stamp}" + (f"-{k}" if k else ""))
            try:
                path.mkdir()
                return cls(path)
            except FileExistsError:
                continue
        raise RunError(f"could not create a new run folder under {root}")

    @classmethod
    def open(cls, path: str | Path) -> Run:
        path = Path(path)
        if not (path / "config.yaml").is_file():
            raise RunError(f"{path} is not a branchnet run folder (no config.yaml)")
        return cls(path)

    @property
    def work(self) -> Path:
        return self.path / "work"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    def write_config(self, config: dict[str, Any]) -> Path:
        p = self.path / "config.yaml"
        atomic_write_text(p, yaml.safe_dump(jsonable(config), sort_keys=False))
        return p

    def read_config(self) -> dict[str, Any]:
        return yaml.safe_load((self.path / "config.yaml").read_text())

    def write_metrics(self, metrics: dict[str, Any], name: str = "metrics.json") -> Path:
        p = self.path / name
        write_json(p, metrics)
        return p

    def read_metrics(self, name: str = "metrics.json") -> dict[str, Any]:
        p = self.path / name
        if not p.is_file():
            raise RunError(f"{p} does not exist; the run has not finished")
        return read_json(p, RunError)

    def save_figure(self, fig: Figure, name: str) -> Path:
        self.figures.mkdir(exist_ok=True)
        p = self.figures / f"{name}.png"
        atomic_write(p, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
        return p

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"


def finished_runs(run_dirs: Iterable[str | Path]) -> list[Run]:
    """The runs among ``run_dirs`` that have finished (``metrics.json`` written); the others
    are skipped with a note on stderr, so a table can be made while a sweep still runs."""
    done = []
    for d in run_dirs:
        run = Run.open(d)
        if (run.path / "metrics.json").is_file():
            done.append(run)
        else:
            print(f"skipping {run.path}: not finished", file=sys.stderr)
    return done
