"""The experiment protocol: what a run kind supplies, and the one runner that does the rest.

A run kind (``tree``, ``model``, ``vbranch``, ``plastic``, ...) is one subclass of
:class:`Experiment` in one module, registered in :mod:`branchnet.kinds`. It supplies

* ``schema``: its typed config (a :class:`~branchnet.schema.Section`), with every default;
* :meth:`Experiment.check`: what must hold before any work, beyond the schema (files exist,
  the model spec names a known network, choices that depend on each other);
* :meth:`Experiment.setup`: load the data and build the model; an error here still leaves no
  run folder behind;
* :meth:`Experiment.fit`: train and evaluate into the run folder, resumably; returns the
  metrics;
* :meth:`Experiment.summary_rows`, :meth:`Experiment.report` and :meth:`Experiment.figures`:
  its summary row(s), report sections and figures;
* :meth:`Experiment.evaluate` and :meth:`Experiment.compare` for ``eval`` and ``compare``.

:func:`run` does the shared steps in order: validate, set up, create the run folder (only now),
write ``config.yaml`` and the manifest ``run.json`` (with the run's ``kind``), fit (or return the
metrics of a finished run on ``--resume``), write ``metrics.json``, the figures (the training
curves for every kind) and ``report.html``.

Example:
    >>> import tempfile
    >>> from branchnet import kinds
    >>> cfg = {"name": "doc", "data": {"source": "digits", "max_per_class": 20},
    ...        "model": {"kind": "mlp", "sizes": ["auto", 8]}, "train": {"epochs": 1},
    ...        "progress": False}
    >>> folder, metrics = run(kinds.get("model"), cfg, out=tempfile.mkdtemp(), quiet=True)
    >>> read_manifest(folder)["kind"], 0.0 <= metrics["accuracy"] <= 1.0
    ('model', True)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import yaml
from matplotlib.figure import Figure

from branchnet._version import __version__
from branchnet.config import check_file, read_yaml, resolve_paths
from branchnet.data import Data, load
from branchnet.engine import FitResult, TrainConfig
from branchnet.errors import ConfigError
from branchnet.fileio import read_json, write_json
from branchnet.report import Report, plot_training_curves
from branchnet.runs import Run, RunError
from branchnet.schema import Section, validate

__all__ = ["MANIFEST", "Experiment", "fit_record", "read_config", "read_manifest", "run"]

#: the manifest of a run folder: kind, branchnet version, status, times
MANIFEST = "run.json"


class Experiment:
    """One kind of run (see the module docstring). ``cfg`` is a validated, complete config."""

    kind: ClassVar[str]
    schema: ClassVar[type[Section]]
    #: what the run folder holds, for the closing message
    contents: ClassVar[str] = "report.html, metrics.json, figures/, model/"

    def __init__(self, cfg: dict[str, Any], *, quiet: bool = False):
        self.cfg = cfg
        self.say: Callable[..., None] = (lambda *a: None) if quiet else (
            lambda *a: print(*a, flush=True))
        self.data: Data | None = None

    # ------------------------------------------------------------------------ config
    @classmethod
    def validate(cls, user: dict[str, Any], config_dir: Path | None = None) -> dict[str, Any]:
        """A user's config mapping checked against :attr:`schema` and :meth:`check`, defaults
        filled in, file paths made absolute."""
        cfg = resolve_paths(validate(cls.schema, user), config_dir)
        cls.check(cfg)
        return cfg

    @classmethod
    def check(cls, cfg: dict[str, Any]) -> None:
        """Checks beyond the schema, before any work; by default that the data source exists."""
        check_source(cfg["data"]["source"])
        check_file(cfg["data"].get("test_source"), "data.test_source", "file")

    # ---------------------------------------------------------------------- the steps
    def load_data(self) -> Data:
        self.data = self._load(self.cfg["data"])
        return self.data

    def load_more(self, **changes: Any) -> Data:
        """Data from the config's data section with ``changes`` (other classes, another source
        ...), normalised with this run's training statistics: inputs the parent never saw
        (novel classes, classes grown into a tree) reach it as its own training data did."""
        assert self.data is not None
        stats = None if self.data.train.is_text else self.data.preprocessing
        return self._load({**self.cfg["data"], **changes}, stats)

    def _load(self, d: dict[str, Any], statistics: dict[str, Any] | None = None) -> Data:
        return load(d["source"], classes=d["classes"], val_fraction=d["val_fraction"],
                    test_fraction=d["test_fraction"],
                    seed=self.cfg["seed"] if d["split_seed"] is None else d["split_seed"],
                    normalize=d["normalize"], image_size=d["image_size"],
                    max_per_class=d["max_per_class"], label_set=d["label_set"],
                    cache_dir=d["cache_dir"], progress=self.cfg["progress"],
                    test_source=d["test_source"], text_column=d["text_column"],
                    label_column=d["label_column"], group_column=d["group_column"],
                    statistics=statistics)

    def train_config(self, section: dict[str, Any]) -> TrainConfig:
        """A config's ``train`` section as the engine's :class:`TrainConfig`, with the run's
        seed and progress setting."""
        return TrainConfig.from_dict({**section, "seed": self.cfg["seed"],
                                      "progress": self.cfg["progress"]})

    def setup(self) -> None:
        """Load the data and build what :meth:`fit` trains; the default loads the data."""
        data = self.load_data()
        self.say(f"data       {data.summary()}")

    def fit(self, run: Run, resume: bool) -> dict[str, Any]:
        raise NotImplementedError

    def histories(self, run: Run) -> dict[str, Path]:
        """The per-epoch ``metrics.csv`` of every network trained, for the training curves."""
        return {"model": run.work / "model" / "metrics.csv"}

    def figures(self, run: Run, result: dict[str, Any]) -> dict[str, Figure]:
        """Figures of this kind, by file name (``figures/NAME.png``)."""
        return {}

    #: captions of the figures, in report order (figures without one are shown by name)
    captions: ClassVar[dict[str, str]] = {"training": "training curves (validation)"}

    def report(self, rep: Report, run: Run, result: dict[str, Any]) -> None:
        """Sections of the report after the summary table and the figures."""

    # -------------------------------------------------------------- results, compare
    @classmethod
    def summary_rows(cls, result: dict[str, Any]) -> list[dict[str, Any]]:
        raise NotImplementedError

    @classmethod
    def summary_text(cls, result: dict[str, Any]) -> str:
        """What the command line prints at the end of a run."""
        from branchnet.metrics import format_table

        return "\n" + format_table(cls.summary_rows(result))

    def evaluate(self, run: Run, split: str) -> tuple[dict[str, Any], dict[str, Figure]]:
        """Metrics (and figures) of a finished run's saved model on one split of its data."""
        raise NotImplementedError

    @classmethod
    def compare(cls, runs: list[Run]) -> str:
        """A table over finished runs of this kind (e.g. mean ± std over seeds)."""
        from branchnet.metrics import format_table, mean_std_rows

        rows = [r for run in runs for r in cls.summary_rows(run.read_metrics())]
        return format_table(mean_std_rows(rows, ())) if rows else "no finished runs"


def fit_record(res: FitResult) -> dict[str, Any]:
    """What ``metrics.json`` keeps of a training run (its history, best epoch, ...)."""
    return {k: v for k, v in res.to_dict().items() if k != "best_checkpoint"}


def check_source(source: str) -> None:
    """A data source names a built-in set or an existing file or folder."""
    if source in ("digits",) or Path(source).exists():
        return
    raise ConfigError(f"data.source must be 'digits' or an existing file or folder, got "
                      f"{source!r} (relative paths are looked up from the working directory, "
                      "then from the config file's folder)")


def read_manifest(run: Run) -> dict[str, Any]:
    """The manifest of a run folder (``{}`` for folders written before manifests existed)."""
    p = run.path / MANIFEST
    return read_json(p, RunError) if p.is_file() else {}


def _write_manifest(run: Run, kind: str, **fields: Any) -> None:
    old = read_manifest(run)
    write_json(run.path / MANIFEST, {**old, "kind": kind, "branchnet_version": __version__,
                                     **fields})


def run(experiment: type[Experiment], cfg: dict[str, Any], *, out: str | Path = "runs",
        run_folder: Run | None = None, resume: bool = False, config_dir: Path | None = None,
        quiet: bool = False, on_folder: Callable[[Run], None] | None = None,
        ) -> tuple[Run, dict[str, Any]]:
    """Validate ``cfg``, set up, and fit one run of ``experiment`` into a new folder under
    ``out`` (or into ``run_folder``, e.g. to resume it). Returns the run and its metrics.
    ``on_folder(run)`` is called once the folder exists (the CLI prints its path)."""
    cfg = experiment.validate(cfg, config_dir)
    if resume and run_folder is not None and (run_folder.path / "metrics.json").is_file():
        return run_folder, run_folder.read_metrics()  # finished: nothing to do again
    exp = experiment(cfg, quiet=quiet)
    t0 = time.perf_counter()
    exp.setup()
    if run_folder is None:
        run_folder = Run.create(out, f"{cfg['name']}-s{cfg['seed']}")
    else:
        run_folder.path.mkdir(parents=True, exist_ok=True)
    if on_folder is not None:
        on_folder(run_folder)
    run_folder.write_config(cfg)
    _write_manifest(run_folder, experiment.kind, status="running",
                    started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    result = exp.fit(run_folder, resume)
    result["seconds"] = time.perf_counter() - t0
    run_folder.write_metrics(result)
    histories = exp.histories(run_folder)  # none for a kind that trains no network
    figures = {**({"training": plot_training_curves(histories)} if histories else {}),
               **exp.figures(run_folder, result)}
    for name, fig in figures.items():
        run_folder.save_figure(fig, name)
    write_report(exp, run_folder, result)
    _write_manifest(run_folder, experiment.kind, status="finished",
                    finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return run_folder, result


def write_report(exp: Experiment, run: Run, result: dict[str, Any]) -> Path:
    """``report.html``: the data, the summary, the figures, the kind's sections, the config."""
    rep = Report(f"branchnet {exp.kind}: {exp.cfg['name']}")
    rep.add_text(result.get("data", {}).get("summary", ""))
    rep.add_heading("Summary (test split)")
    rep.add_table(exp.summary_rows(result))
    rep.add_heading("Figures")
    names = [*exp.captions, *sorted(p.stem for p in run.figures.glob("*.png")
                                    if p.stem not in exp.captions and not p.stem.startswith("eval-"))]
    for name in names:
        p = run.figures / f"{name}.png"
        if p.is_file():
            rep.add_figure(p, exp.captions.get(name, name.replace("_", " ")))
    exp.report(rep, run, result)
    rep.add_heading("Configuration")
    rep.add_pre(yaml.safe_dump(exp.cfg, sort_keys=False))
    return rep.write(run.path / "report.html")


def read_config(experiment: type[Experiment], path: str | Path,
                overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML config file with ``key.sub=value`` overrides, validated for ``experiment``."""
    path = Path(path)
    return experiment.validate(read_yaml(path, overrides), path.resolve().parent)
