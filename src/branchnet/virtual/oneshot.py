"""One-shot classification runs (Lake's ``runNN`` layout) and retrieval metrics.

A run folder::

    root/runNN/class_labels.txt   one line per test item: "<test image> <its training image>"
    root/runNN/training/classNN.png   one image per class (the one shot)
    root/runNN/test/itemNN.png        the items to classify

Paths in ``class_labels.txt`` may be relative to ``root`` (``run01/test/item01.png``, as in
Lake's ``all_runs``) or to the run folder (``test/item01.png``). Images of any size are read
as greyscale, resized to ``image_size`` and scaled to [-1, 1] with
:func:`branchnet.data.omniglot.scale_images` — the scaling used in training.

A test item is classified as the class of its nearest training image (Euclidean distance
between embeddings); accuracy is the mean over all trials (REFERENCE 3.5).

Example:
    >>> import torch
    >>> emb = torch.tensor([[0.0, 0.0], [0.0, 0.1], [5.0, 5.0], [5.0, 5.2]])
    >>> m = retrieval_metrics(emb, torch.tensor([0, 0, 1, 1]))
    >>> m["precision_at_1"], m["mAP"], m["map_at_r"]
    (1.0, 1.0, 1.0)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from branchnet.data import images
from branchnet.data.dataset import DataError
from branchnet.data.omniglot import scale_images

__all__ = ["OneShotRun", "oneshot_accuracy", "read_oneshot_runs", "retrieval_metrics"]

RUN_DIR = re.compile(r"^run\d+$")
LABELS_FILE = "class_labels.txt"

EmbedFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class OneShotRun:
    """One run: ``train_x`` float ``(W, 1, S, S)`` (one image per class), ``test_x`` float
    ``(T, 1, S, S)``, ``answers`` ``(T,)`` = index into ``train_files`` of each item's class.
    Images are scaled to [-1, 1]; files are listed relative to the run folder, sorted."""

    name: str
    train_x: torch.Tensor
    test_x: torch.Tensor
    answers: torch.Tensor
    train_files: list[str]
    test_files: list[str]

    @property
    def ways(self) -> int:
        return len(self.train_files)


def _resolve(run_dir: Path, entry: str, line_no: int) -> str:
    """A label-file path -> path relative to the run folder (strip a leading ``runNN/``)."""
    parts = [p for p in entry.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts or entry.startswith("/"):
        raise DataError(f"{run_dir.name}/{LABELS_FILE} line {line_no}: unsafe path {entry!r}")
    if parts and parts[0] == run_dir.name:
        parts = parts[1:]
    rel = "/".join(parts)
    if not (run_dir / rel).is_file():
        raise DataError(
            f"{run_dir.name}/{LABELS_FILE} line {line_no} points to {entry!r}, but "
            f"{run_dir.name}/{rel} is missing"
        )
    return rel


def _read_run(run_dir: Path, size: tuple[int, int] | None) -> OneShotRun:
    labels = run_dir / LABELS_FILE
    if not labels.is_file():
        raise DataError(f"{run_dir.name}/{LABELS_FILE} is missing (in {run_dir.parent})")
    pairs: list[tuple[str, str]] = []
    for no, line in enumerate(labels.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise DataError(f"{run_dir.name}/{LABELS_FILE} line {no}: expected '<test image> "
                            f"<training image>', got {line!r}")
        pairs.append((_resolve(run_dir, fields[0], no), _resolve(run_dir, fields[1], no)))
    if not pairs:
        raise DataError(f"{run_dir.name}/{LABELS_FILE} has no label lines")
    tests = [t for t, _ in pairs]
    if len(set(tests)) != len(tests):
        raise DataError(f"{run_dir.name}/{LABELS_FILE} lists a test image twice")
    train_files = sorted({c for _, c in pairs})
    answer_of = dict(pairs)
    test_files = sorted(tests)
    answers = torch.tensor([train_files.index(answer_of[t]) for t in test_files], dtype=torch.long)

    def read(files: list[str]) -> torch.Tensor:
        arr = images.decode_many([(str(run_dir / f), run_dir / f) for f in files], size=size,
                                 mode="L", progress=False)
        return scale_images(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))

    return OneShotRun(run_dir.name, read(train_files), read(test_files), answers, train_files, test_files)


def read_oneshot_runs(root: str | Path, image_size: int | None = 105) -> list[OneShotRun]:
    """Read every ``runNN`` folder of ``root`` (sorted by name).

    ``image_size`` resizes every image to ``S x S`` (bilinear; ``None`` keeps the files' size,
    which must then be uniform). As in Lake's code, the classes of a run are the training
    images named in ``class_labels.txt``. Raises :class:`DataError` naming what is missing: the root, any
    ``runNN`` folder, a ``class_labels.txt``, an image a label line points to.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"one-shot runs folder {root} does not exist")
    run_dirs = sorted(p for p in root.iterdir() if p.is_dir() and RUN_DIR.match(p.name))
    if not run_dirs:
        raise DataError(f"no runNN folders in {root}; expected {root}/run01/{LABELS_FILE}, "
                        f"{root}/run01/training/class01.png, {root}/run01/test/item01.png, ...")
    size = images.parse_size(image_size)
    return [_read_run(d, size) for d in run_dirs]


def _as_2d(e: torch.Tensor, n: int, what: str) -> torch.Tensor:
    e = torch.as_tensor(e)
    if e.ndim != 2 or len(e) != n:
        raise ValueError(f"embed_fn returned shape {tuple(e.shape)} for {n} {what} images; it must "
                         f"return (N, D) — for a branched model use e.g. "
                         "branchnet.virtual.embedding.embedding_fn(model)")
    return e.detach().to(torch.float64)


def oneshot_accuracy(embed_fn: EmbedFn, runs: list[OneShotRun]) -> dict:
    """Nearest-neighbour one-shot accuracy of ``embed_fn`` (images ``(n, 1, S, S)`` in [-1, 1]
    -> embeddings ``(n, D)``) over ``runs``.

    Returns ``{"accuracy": correct / trials, "per_run": [accuracy per run], "n_trials": trials}``;
    ties go to the first training image in file order.

    >>> run = OneShotRun("run01", torch.eye(3).view(3, 1, 1, 3), torch.eye(3).view(3, 1, 1, 3),
    ...                  torch.tensor([0, 1, 2]), ["a", "b", "c"], ["x", "y", "z"])
    >>> oneshot_accuracy(lambda x: x.flatten(1), [run])
    {'accuracy': 1.0, 'per_run': [1.0], 'n_trials': 3}
    """
    if not runs:
        raise ValueError("oneshot_accuracy needs at least one run; read them with read_oneshot_runs")
    correct, trials, per_run = 0, 0, []
    for run in runs:
        e_train = _as_2d(embed_fn(run.train_x), len(run.train_x), f"{run.name} training")
        e_test = _as_2d(embed_fn(run.test_x), len(run.test_x), f"{run.name} test")
        pred = torch.cdist(e_test, e_train).argmin(dim=1)
        ok = int((pred == run.answers).sum())
        correct += ok
        trials += len(run.answers)
        per_run.append(ok / len(run.answers))
    return {"accuracy": correct / trials, "per_run": per_run, "n_trials": trials}


def retrieval_metrics(emb: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                      *, chunk_size: int = 512) -> dict:
    """Leave-one-out retrieval with Euclidean distance: every row queries all the others.

    ``precision_at_1``: the nearest other row has the query's label. ``mAP``: mean over queries
    of average precision (mean of precision at each relevant rank). ``map_at_r`` (Musgrave et
    al. 2020): (1/R) sum_{i<=R} P(i) rel(i), R = number of other rows with the query's label.
    Queries whose label has no other row are left out (``n_queries`` counts the rest); ties in
    distance are broken by row order. Queries are processed ``chunk_size`` at a time
    (``O(chunk_size * N)`` memory).
    """
    e = torch.as_tensor(emb).detach().to(torch.float64)
    y = torch.as_tensor(labels).detach().reshape(-1)
    if e.ndim != 2 or len(e) != len(y):
        raise ValueError(f"emb must be (N, D) and labels (N,), got {tuple(e.shape)} and {tuple(y.shape)}")
    n = len(y)
    sums = torch.zeros(3, dtype=torch.float64)
    n_queries = 0
    ranks = torch.arange(1, n, dtype=torch.float64)
    for start in range(0, n, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, n))
        d = torch.cdist(e[rows], e, compute_mode="donot_use_mm_for_euclid_dist")
        d[torch.arange(len(rows)), rows] = float("inf")  # leave the query out
        order = torch.sort(d, dim=1, stable=True).indices[:, : n - 1]
        rel = (y[order] == y[rows, None]).to(torch.float64)  # (rows, N-1), by rank
        n_rel = rel.sum(1)
        keep = n_rel > 0
        rel, n_rel = rel[keep], n_rel[keep]
        prec = rel.cumsum(1) / ranks
        within_r = ranks[None, :] <= n_rel[:, None]
        sums[0] += rel[:, 0].sum()
        sums[1] += ((prec * rel).sum(1) / n_rel).sum()
        sums[2] += ((prec * rel * within_r).sum(1) / n_rel).sum()
        n_queries += int(keep.sum())
    if n_queries == 0:
        raise ValueError("no query has another row with its label; retrieval metrics are undefined")
    p1, ap, map_r = (float(v) / n_queries for v in sums)
    return {"precision_at_1": p1, "mAP": ap, "map_at_r": map_r, "n_queries": n_queries}
