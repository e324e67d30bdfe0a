"""One call that shows how the units of a branched layer organise themselves by branch.

:func:`specialization` reads a layer of any PyTorch classifier on data and returns a
:class:`SpecializationResult` with per-unit properties, per-branch summaries, permutation
tests, cluster/branch association, cross-branch CKA, per-branch ablation and (for a first
layer) the colour-family enrichment of Voss et al. (2021), plus figures and an HTML report.

Virtual-branch models (:mod:`branchnet.virtual`) work too: a layer's ``(B, K, C, ...)`` output
is read as ``K*C`` units, branch-major, the K branches are the partition (each unit labelled
``shared`` or ``unique``), a first ``VConv2d``'s filters are its per-branch full weights, and
accuracy is the ensemble's (mean of the branches' logits).

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2),
    ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> x, y = torch.randn(40, 3, 8, 8), torch.arange(40) % 4
    >>> r = specialization(net, "0", (x, y), n_permutations=200)
    >>> r.partition.sizes, sorted(r.tests)
    ([4, 4], ['clusters', 'colourfulness', 'frequency', 'selectivity'])
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from branchnet.analysis.partitions import (
    AnalysisError,
    Partition,
    _get_module,
    consumer,
    infer_partition,
    units_view,
    virtual_branches,
)
from branchnet.analysis.stats import (
    PermutationResult,
    _predict,
    ablation,
    branch_table,
    cramers_v,
    enrichment_pvalue,
    linear_cka,
    mutual_information,
    permutation_test,
)
from branchnet.analysis.units import (
    MIN_SAMPLES,
    class_means,
    class_selectivity,
    colourfulness,
    dominant_frequency,
    svd_factors,
)
from branchnet.data.dataset import Data, Split
from branchnet.fileio import jsonable, read_json, write_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["SpecializationResult", "compare_reports", "specialization"]

_TEST_LABELS = {
    "colourfulness": "colourfulness",
    "frequency": "dominant frequency",
    "selectivity": "class selectivity",
    "clusters": "MI(class-profile cluster, branch)",
}


# --------------------------------------------------------------------------- result


@dataclass
class SpecializationResult:
    """Everything :func:`specialization` computed. Arrays are numpy; see :meth:`to_dict`.

    ``units`` has one dict per unit (branch, mean activation, class selectivity, preferred
    class, and for first layers colourfulness and dominant frequency, and SVD loadings when an
    unbranched layer reads the units); ``branches`` one dict per branch; ``tests`` the
    permutation tests by property; ``summary`` the headline numbers.
    """

    layer: str
    weight_layer: str
    partition: Partition
    classes: list[str]
    activations: np.ndarray  # [samples, units]
    labels: np.ndarray  # [samples]
    class_means: np.ndarray  # [units, classes]
    units: list[dict[str, Any]]
    branches: list[dict[str, Any]]
    tests: dict[str, PermutationResult]
    clusters: np.ndarray  # [units] k-means cluster of each unit's class profile
    mutual_information: float
    cramers_v: float
    cka: np.ndarray  # [branches, branches]
    ablation: dict[str, Any]
    enrichment: dict[str, Any] | None
    colour_table: list[dict[str, Any]]
    filters: np.ndarray | None  # [units, 3, kh, kw] first-layer weights, if any
    svd: np.ndarray | None  # [units, 2] loadings on the next layer's |W| factors, if any
    summary: dict[str, Any]
    config: dict[str, Any]
    _embedding: np.ndarray | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ export

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (plain Python types; NaN becomes None)."""
        return jsonable({
            "summary": self.summary,
            "config": self.config,
            "partition": self.partition.to_dict(),
            "classes": self.classes,
            "branches": self.branches,
            "units": self.units,
            "tests": {name: t.to_dict() for name, t in self.tests.items()},
            "cka": {"branches": self.partition.names, "matrix": self.cka},
            "ablation": self.ablation,
            "enrichment": self.enrichment,
            "colour_table": self.colour_table,
        })

    def embedding(self) -> np.ndarray:
        """``[units, 2]`` t-SNE of the units' class profiles (PCA to <= 50 dims first; seeded)."""
        if self._embedding is None:
            self._embedding = _tsne(_profiles(self.class_means), int(self.config["seed"]))
        return self._embedding

    def figures(self) -> dict[str, Figure]:
        """The report's figures (``matplotlib.figure.Figure``, no pyplot state).

        ``filters`` (first layers only), ``correlation``, ``embedding``, ``ablation``, ``null``,
        plus ``colour_family`` (first layers) and ``svd`` (when an unbranched layer reads the
        units).
        """
        figs: dict[str, Figure] = {}
        if self.filters is not None:
            figs["filters"] = _plot_filters(self.filters, self.partition)
        figs["correlation"] = _plot_correlation(self.activations, self.partition)
        figs["embedding"] = _plot_embedding(self)
        figs["ablation"] = _plot_ablation(self.ablation, self.classes)
        if self.tests:
            figs["null"] = _plot_null(self.tests)
        if self.enrichment is not None:
            figs["colour_family"] = _plot_family(self.colour_table, self.partition)
        if self.svd is not None:
            figs["svd"] = _plot_svd(self.svd, self.partition)
        return figs

    def write_report(self, folder: str | Path) -> Path:
        """Write ``folder/report.html`` (self-contained), ``specialization.json`` and
        ``figures/*.png``; returns the HTML path."""
        from branchnet.report import Report, figure_png

        folder = Path(folder)
        (folder / "figures").mkdir(parents=True, exist_ok=True)
        pngs = {}
        for name, fig in self.figures().items():
            pngs[name] = figure_png(fig)
            (folder / "figures" / f"{name}.png").write_bytes(pngs[name])
        write_json(folder / "specialization.json", self.to_dict())
        return _build_report(self, pngs, Report).write(folder / "report.html")


# --------------------------------------------------------------------------- helpers


def _xy(data: Split | Data | tuple[Any, Any]) -> tuple[torch.Tensor, np.ndarray, list[str] | None]:
    names = None
    if isinstance(data, Data):
        names, data = list(data.classes), data.test
    if isinstance(data, Split):
        x, y = data.x, data.y
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise AnalysisError(
            f"data must be a Split, a Data (its test split is used) or an (x, y) pair, got "
            f"{type(data).__name__}"
        )
    x = torch.as_tensor(x)
    y = torch.as_tensor(y).cpu().numpy()
    if y.ndim != 1 or len(y) != len(x):
        raise AnalysisError(f"y must be 1-D with one label per input ({len(x)}), got shape {y.shape}")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0):
        raise AnalysisError("y must hold non-negative integer class indices")
    return x, y.astype(np.int64), names


def _profiles(means: np.ndarray) -> np.ndarray:
    """Class profiles: each unit's class means, centred and scaled to unit norm (the *pattern*
    of class preference, not its magnitude); flat units stay at 0."""
    p = means - means.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(p, axis=1, keepdims=True)
    return np.divide(p, norm, out=np.zeros_like(p), where=norm > 1e-12)


def _kmeans(profiles: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():  # fewer distinct profiles than clusters: fine, just say less
        warnings.simplefilter("ignore")
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(profiles)


def _tsne(profiles: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = profiles.shape[0]
    dims = min(50, n, profiles.shape[1])
    z = PCA(n_components=dims, random_state=seed).fit_transform(profiles) if dims >= 2 else profiles
    if n < 5 or z.shape[1] < 2:  # too few units for t-SNE: show the PCA plane
        out = np.zeros((n, 2))
        out[:, : min(2, z.shape[1])] = z[:, :2]
        return out
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(z)


def _subset(n: int, max_samples: int, seed: int) -> np.ndarray:
    if max_samples < MIN_SAMPLES:
        raise AnalysisError(f"max_samples must be >= {MIN_SAMPLES}, got {max_samples}")
    if n <= max_samples:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))


def _weight(module: nn.Module) -> np.ndarray | None:
    """The layer's weight; for a virtual ``VConv2d`` / ``VLinear`` every branch's full weight
    ``(K, out, in, ...)`` stacked as ``(K*out, in, ...)`` (rows = the layer's units)."""
    full = getattr(module, "full_weight", None)
    if callable(full):
        with torch.no_grad():
            w = full()
        if isinstance(w, torch.Tensor) and w.ndim >= 3:
            return w.detach().flatten(0, 1).cpu().double().numpy()
    w = getattr(module, "weight", None)
    return w.detach().cpu().double().numpy() if isinstance(w, torch.Tensor) else None


def _svd_loadings(model: nn.Module, weight_layer: str, n_units: int) -> np.ndarray | None:
    """Loadings on the top-2 factors of the reading layer's ``|W|``, if it is unbranched."""
    found = consumer(model, weight_layer)
    if found is None:
        return None
    w = _weight(found[1])
    if w is None or w.ndim not in (2, 4) or w.shape[1] != n_units or min(w.shape[:2]) < 2:
        return None  # grouped (branched) readers and odd weights: the article's SVD needs neither
    return svd_factors(w, k=2)


def _activations_and_predictions(
    model: nn.Module, layer: str, x: torch.Tensor, batch_size: int, rectify: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One pass: ``layer``'s pooled activations (as :func:`unit_activations`) and the model's
    predicted classes, so the ablation baseline costs no extra forward pass."""
    from branchnet.taps import TapError, _first_tensor, _frozen

    if batch_size < 1:
        raise AnalysisError(f"batch_size must be >= 1, got {batch_size}")
    module = _get_module(model, layer)
    branches = virtual_branches(model)
    pooled: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: Any, output: Any) -> None:
        h = units_view(_first_tensor(output, layer).detach().float(), branches)
        if h.ndim < 2:
            raise AnalysisError(f"layer {layer!r} returns shape {tuple(h.shape)}: expected [N, units, ...]")
        if rectify:
            h = h.clamp_min(0)
        pooled.append((h.flatten(2).mean(dim=2) if h.ndim > 2 else h).cpu())

    handle = module.register_forward_hook(hook)
    try:
        with _frozen(model):
            pred = _predict(model, x, batch_size)
    except TapError as e:
        raise AnalysisError(str(e)) from None
    finally:
        handle.remove()
    batches = math.ceil(len(x) / batch_size)
    if len(pooled) != batches:
        raise AnalysisError(
            f"layer {layer!r} ran {len(pooled)} times in {batches} forward passes; analyse a layer "
            "that runs exactly once per forward"
        )
    return torch.cat(pooled).double().numpy(), pred


def _mean(v: np.ndarray) -> float:
    return float(v.mean()) if v.size else float("nan")


# --------------------------------------------------------------------------- main


def specialization(
    model: nn.Module,
    layer: str,
    data: Split | Data | tuple[Any, Any],
    *,
    partition: Partition | None = None,
    input_layer: str | None = None,
    n_permutations: int = 2000,
    seed: int = 0,
    max_samples: int = 2000,
    batch_size: int = 256,
    n_clusters: int | None = None,
    rectify: bool = True,
) -> SpecializationResult:
    """Analyse how the units of ``layer`` organise themselves by branch.

    Args:
        model: any PyTorch classifier returning logits ``[N, classes]``, or a virtual-branch
            model returning ``[N, K, classes]`` (its ensemble, the mean of the logits, is used).
        layer: the layer whose output units are analysed (its output dim 1, or dims 1-2 of a
            virtual layer's ``[N, K, C, ...]``; conv maps are global-average-pooled) and zeroed
            for the ablation.
        data: a :class:`~branchnet.data.Split`, an ``(x, y)`` pair, or a
            :class:`~branchnet.data.Data` (its test split and class names are used).
        partition: the branches; by default :func:`infer_partition` on the weight layer
            (for a virtual layer its K branches, units labelled shared / unique).
        input_layer: the ``Conv2d``/``Linear`` whose weights produce ``layer``'s units, when
            ``layer`` has none (e.g. ``layer`` is the ReLU after a conv); it is used for the
            partition, the filters, colourfulness, frequency and SVD. Default: ``layer``.
        n_permutations, seed: permutation tests (membership shuffled at fixed sizes); ``seed``
            also fixes the sample subset, k-means and t-SNE.
        max_samples: at most this many inputs (a seeded random subset) are used.
        batch_size: forward-pass batch size.
        n_clusters: k for the k-means clustering of unit class profiles (default: #branches).
        rectify: apply a ReLU before pooling (mean rectified response; class selectivity is
            defined on non-negative responses). Set False to pool the raw output.

    Raises:
        AnalysisError: unbranched layer without ``partition``, partition / layer width
            mismatch, too few samples (>= 10, >= 2 per class), branches of < 2 units,
            ``n_permutations < 100``.
    """
    weight_layer = input_layer or layer
    x, y, class_names = _xy(data)
    if len(y) < MIN_SAMPLES:
        raise AnalysisError(f"specialization needs at least {MIN_SAMPLES} samples, got {len(y)}")
    n_classes = int(y.max()) + 1
    classes = class_names or [str(c) for c in range(n_classes)]
    if len(classes) < n_classes:
        raise AnalysisError(f"labels go up to {n_classes - 1} but only {len(classes)} class names")
    classes = classes[:n_classes]
    if partition is None:
        try:
            partition = infer_partition(model, weight_layer)
        except AnalysisError as e:
            hint = "" if input_layer else " (if this layer has no weights, pass input_layer=)"
            raise AnalysisError(f"{e}{hint}") from None
    if not isinstance(partition, Partition):
        raise AnalysisError(f"partition must be a Partition, got {type(partition).__name__}")

    # ---- activations and class statistics
    idx = _subset(len(y), int(max_samples), seed)
    xs, ys = x[torch.from_numpy(idx)], y[idx]
    acts, predictions = _activations_and_predictions(model, layer, xs, batch_size, rectify)
    if acts.shape[1] != partition.n_units:
        raise AnalysisError(
            f"layer {layer!r} has {acts.shape[1]} units but the partition covers "
            f"{partition.n_units}; they must match"
        )
    means = class_means(acts, ys, n_classes)
    selectivity = class_selectivity(means)
    preferred = means.argmax(axis=1)
    labels = partition.labels()

    # ---- weight properties (first layers: [units, 3, k, k])
    w = _weight(_get_module(model, weight_layer))
    first = w is not None and w.ndim == 4 and w.shape[0] == partition.n_units and w.shape[1] == 3
    colour = colourfulness(w) if first else None
    freq = dominant_frequency(w) if first else None
    svd = _svd_loadings(model, weight_layer, partition.n_units)

    # ---- per-unit and per-branch tables
    units: list[dict[str, Any]] = []
    for u in range(partition.n_units):
        row: dict[str, Any] = {
            "unit": u,
            "branch": partition.names[labels[u]],
            **({"kind": partition.kinds[u]} if partition.kinds is not None else {}),
            "mean_activation": float(acts[:, u].mean()),
            "selectivity": float(selectivity[u]),
            "preferred_class": classes[preferred[u]],
        }
        if colour is not None and freq is not None:
            row["colourfulness"] = float(colour[u])
            row["frequency"] = float(freq[u])
        if svd is not None:
            row["svd_1"], row["svd_2"] = float(svd[u, 0]), float(svd[u, 1])
        units.append(row)

    # ---- tests
    tests: dict[str, PermutationResult] = {}
    perm = {"partition": partition, "n_permutations": n_permutations, "seed": seed}
    if colour is not None and freq is not None:
        tests["colourfulness"] = permutation_test(colour, **perm)
        tests["frequency"] = permutation_test(freq, **perm)
    tests["selectivity"] = permutation_test(selectivity, **perm)
    k = int(n_clusters or partition.n_branches)
    if not 1 <= k <= partition.n_units:
        raise AnalysisError(f"n_clusters must be in 1..{partition.n_units}, got {k}")
    clusters = _kmeans(_profiles(means), k, seed)
    tests["clusters"] = permutation_test(clusters, statistic="mutual_information", **perm)
    mi, v = mutual_information(clusters, labels), cramers_v(clusters, labels)

    # ---- CKA between branches, ablation
    b = partition.n_branches
    cka = np.ones((b, b))
    for i in range(b):
        for j in range(i + 1, b):
            cka[i, j] = cka[j, i] = linear_cka(acts[:, partition.members[i]], acts[:, partition.members[j]])
    abl = ablation(model, layer, partition, xs, ys, n_classes, batch_size=batch_size,
                   baseline_predictions=predictions)

    # ---- colour family enrichment
    enrichment, colour_table = None, []
    if colour is not None:
        median = float(np.median(colour))
        family = colour > median
        colour_table = [r for r in branch_table(np.where(family, "colour", "bw"), partition)
                        if r["category"] == "colour"]
        counts = np.array([int(family[m].sum()) for m in partition.members])
        top = int(counts.argmax())
        fam, size = int(family.sum()), partition.sizes[top]
        enrichment = {
            "family": "units with colourfulness above the median",
            "median_colourfulness": median,
            "family_size": fam,
            "branch": partition.names[top],
            "k_in_branch": int(counts[top]),
            "branch_size": size,
            "expected": fam * size / partition.n_units,
            "p_value": enrichment_pvalue(int(counts[top]), fam, size, partition.n_units),
        }

    branches = []
    for i, (name, m) in enumerate(zip(partition.names, partition.members, strict=True)):
        row = {
            "branch": name,
            "size": int(m.size),
            **({"shared_units": sum(partition.kinds[u] == "shared" for u in m)}
               if partition.kinds is not None else {}),
            "mean_activation": _mean(acts[:, m].mean(axis=0)),
            "mean_selectivity": _mean(selectivity[m]),
        }
        if colour is not None and freq is not None:
            row["mean_colourfulness"] = _mean(colour[m])
            row["mean_frequency"] = _mean(freq[m])
            row["colour_family"] = int((colour[m] > enrichment["median_colourfulness"]).sum())  # type: ignore[index]
        top_class = np.bincount(preferred[m], minlength=n_classes).argmax()
        row["most_preferred_class"] = classes[top_class]
        row["accuracy_change_when_zeroed"] = float(abl["ablated_overall"][i] - abl["baseline_overall"])
        branches.append(row)

    off = cka[~np.eye(b, dtype=bool)]
    summary = {
        "layer": layer,
        "weight_layer": weight_layer,
        "n_units": partition.n_units,
        "n_branches": b,
        "virtual": virtual_branches(model) is not None,
        "unit_kinds": (None if partition.kinds is None
                       else {k: partition.kinds.count(k) for k in sorted(set(partition.kinds))}),
        "branch_sizes": dict(zip(partition.names, partition.sizes, strict=True)),
        "n_samples": len(ys),
        "n_classes": n_classes,
        "p_values": {name: t.p_value for name, t in tests.items()},
        "observed": {name: t.observed for name, t in tests.items()},
        "mutual_information": mi,
        "cramers_v": v,
        "n_clusters": k,
        "mean_cross_branch_cka": float(np.nanmean(off)) if off.size and np.isfinite(off).any() else None,
        "colour_enrichment_p": enrichment["p_value"] if enrichment else None,
        "baseline_accuracy": abl["baseline_overall"],
        "accuracy_change_when_zeroed": {
            name: float(a - abl["baseline_overall"])
            for name, a in zip(partition.names, abl["ablated_overall"], strict=True)
        },
    }
    config = {
        "layer": layer, "input_layer": input_layer, "n_permutations": int(n_permutations),
        "seed": int(seed), "max_samples": int(max_samples), "batch_size": int(batch_size),
        "n_clusters": n_clusters, "rectify": bool(rectify),
    }
    return SpecializationResult(
        layer=layer, weight_layer=weight_layer, partition=partition, classes=classes,
        activations=acts, labels=ys, class_means=means, units=units, branches=branches,
        tests=tests, clusters=clusters, mutual_information=mi, cramers_v=v, cka=cka,
        ablation=abl, enrichment=enrichment, colour_table=colour_table,
        filters=w if first else None, svd=svd, summary=jsonable(summary), config=config,
    )


# --------------------------------------------------------------------------- figures


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _block_ticks(partition: Partition) -> tuple[np.ndarray, np.ndarray]:
    bounds = np.cumsum([0, *partition.sizes])
    return bounds, (bounds[:-1] + bounds[1:]) / 2 - 0.5


def _plot_filters(w: np.ndarray, partition: Partition) -> Figure:
    """One mosaic: rows of filters per branch, each filter min-max normalised to RGB."""
    from matplotlib.figure import Figure

    kh, kw = w.shape[2:]
    cols = int(min(16, max(partition.sizes)))
    pad, gap = 1, 4
    rows = [math.ceil(s / cols) for s in partition.sizes]
    height = sum(r * (kh + pad) for r in rows) + gap * (len(rows) - 1) + pad
    width = cols * (kw + pad) + pad
    img = np.ones((height, width, 3))
    lo = w.min(axis=(1, 2, 3), keepdims=True)
    span = w.max(axis=(1, 2, 3), keepdims=True) - lo
    tiles = np.divide(w - lo, span, out=np.full_like(w, 0.5), where=span > 0).transpose(0, 2, 3, 1)
    centres, top = [], 0
    for members, r in zip(partition.members, rows, strict=True):
        for i, u in enumerate(members):
            y0 = top + pad + (i // cols) * (kh + pad)
            x0 = pad + (i % cols) * (kw + pad)
            img[y0 : y0 + kh, x0 : x0 + kw] = tiles[u]
        block = r * (kh + pad) + pad
        centres.append(top + block / 2)
        top += block - pad + gap
    scale = 0.06 * max(kh, 5)
    fig = Figure(figsize=(max(4.0, width * scale / (kw + pad) * 2.2 + 1.5),
                          max(2.0, height * scale / (kh + pad) * 2.2 + 0.8)))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks(centres, [f"{n}\n({s})" for n, s in zip(partition.names, partition.sizes, strict=True)])
    ax.set_title("first-layer filters by branch (each min-max normalised)")
    fig.tight_layout()
    return fig


def _plot_correlation(acts: np.ndarray, partition: Partition) -> Figure:
    from matplotlib.figure import Figure

    order = partition.order()
    a = acts[:, order]
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.corrcoef(a.T) if a.shape[1] > 1 else np.ones((1, 1))
    c = np.nan_to_num(np.atleast_2d(c))
    fig = Figure(figsize=(6.2, 5.2))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(c, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    bounds, centres = _block_ticks(partition)
    for edge in bounds[1:-1]:
        ax.axhline(edge - 0.5, color="k", lw=1.2)
        ax.axvline(edge - 0.5, color="k", lw=1.2)
    ax.set_xticks(centres, partition.names, fontsize=8)
    ax.set_yticks(centres, partition.names, fontsize=8)
    ax.set_title("unit x unit activation correlation (units ordered by branch)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="Pearson r")
    fig.tight_layout()
    return fig


def _plot_embedding(r: SpecializationResult) -> Figure:
    from matplotlib.figure import Figure

    z = r.embedding()
    labels = r.partition.labels()
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, colour) in enumerate(zip(r.partition.names, _colours(r.partition.n_branches), strict=True)):
        m = labels == i
        ax.scatter(z[m, 0], z[m, 1], s=22, color=colour, label=name, edgecolors="none")
    t = r.tests["clusters"]
    ax.set_title(
        f"t-SNE of unit class profiles\nMI(k-means cluster, branch) = {r.mutual_information:.3f} nats "
        f"(permutation p = {t.p_value:.3g}), Cramér's V = {r.cramers_v:.2f}",
        fontsize=9,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, markerscale=1.2)
    fig.tight_layout()
    return fig


def _plot_ablation(abl: dict[str, Any], classes: Sequence[str]) -> Figure:
    from matplotlib.figure import Figure

    drop = np.asarray(abl["drop"])
    b, c = drop.shape
    fig = Figure(figsize=(max(5.0, 0.5 * c * max(1, b) / 2 + 2), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / b
    xs = np.arange(c)
    for i, (name, colour) in enumerate(zip(abl["branches"], _colours(b), strict=True)):
        ax.bar(xs + (i - (b - 1) / 2) * width, drop[i], width, color=colour, label=name)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(xs, list(classes), rotation=45 if c > 6 else 0, ha="right" if c > 6 else "center",
                  fontsize=8)
    ax.set_ylabel("accuracy change (zeroed - baseline)")
    ax.set_title("per-class accuracy change when a branch's units are zeroed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plot_null(tests: dict[str, PermutationResult]) -> Figure:
    from matplotlib.figure import Figure

    n = len(tests)
    fig = Figure(figsize=(3.3 * n, 2.9))
    for i, (name, t) in enumerate(tests.items()):
        ax = fig.add_subplot(1, n, i + 1)
        ax.hist(t.null, bins=40, color="0.65")
        ax.axvline(t.observed, color="crimson", lw=2, label="observed")
        ax.set_title(f"{_TEST_LABELS.get(name, name)}\np = {t.p_value:.3g}", fontsize=9)
        ax.set_xlabel("statistic", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.axes[0].set_ylabel("permutations")
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_family(rows: list[dict[str, Any]], partition: Partition) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.2 * partition.n_branches + 2), 3.2))
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [r["observed"] for r in rows], 0.4, label="observed", color="tab:orange")
    ax.bar(xs + 0.2, [r["expected"] for r in rows], 0.4, label="expected (random)", color="0.7")
    ax.set_xticks(xs, [r["branch"] for r in rows], fontsize=8)
    ax.set_ylabel("colour-family units")
    ax.set_title("units with above-median colourfulness per branch", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plot_svd(svd: np.ndarray, partition: Partition) -> Figure:
    from matplotlib.figure import Figure

    labels = partition.labels()
    fig = Figure(figsize=(5, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, colour) in enumerate(zip(partition.names, _colours(partition.n_branches), strict=True)):
        m = labels == i
        ax.scatter(svd[m, 0], svd[m, 1], s=22, color=colour, label=name, edgecolors="none")
    ax.axhline(0, color="0.8", lw=0.8)
    ax.axvline(0, color="0.8", lw=0.8)
    ax.set_xlabel("factor 1")
    ax.set_ylabel("factor 2")
    ax.set_title("units on the top factors of the next layer's |W| (rows centred)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- report


def _build_report(r: SpecializationResult, pngs: dict[str, bytes], report_cls: Any) -> Any:
    s = r.summary
    rep = report_cls(f"Branch specialization: {r.layer}")
    sizes = ", ".join(f"{n} ({k})" for n, k in s["branch_sizes"].items())
    rep.add_text(
        f"Layer {r.layer!r} (weights of {r.weight_layer!r}): {s['n_units']} units in "
        f"{s['n_branches']} branches: {sizes}. {s['n_samples']} samples, {s['n_classes']} classes. "
        f"Baseline accuracy on these samples: {s['baseline_accuracy']:.4f}."
    )
    if s.get("virtual"):
        rep.add_text(
            "Virtual-branch model: the layer's (B, K, C, ...) output is read as K*C units, branch k "
            "holding units k*C .. k*C + C - 1; accuracy is the ensemble's (mean of the branches' "
            "logits). Within a branch the first units are shared (tied shared->shared weights; in "
            "a first layer they are exact copies in every branch), the rest unique: "
            + (", ".join(f"{n} {k}" for k, n in s["unit_kinds"].items()) if s.get("unit_kinds")
               else "split unknown") + ".",
            muted=True,
        )
    rep.add_heading("Branches")
    rep.add_table(r.branches)

    rep.add_heading("Permutation tests")
    rep.add_text(
        "Branch membership is shuffled at fixed branch sizes "
        f"({r.config['n_permutations']} permutations); p = (1 + #null >= observed) / (1 + n). "
        "Per-unit properties use max over branches of |branch mean - overall mean|; class "
        "profiles use the mutual information between k-means clusters and branches."
    )
    rep.add_table([
        {"property": _TEST_LABELS.get(n, n), "observed": t.observed, "null mean": float(t.null.mean()),
         "null 95%": float(np.quantile(t.null, 0.95)), "p-value": t.p_value}
        for n, t in r.tests.items()
    ])
    if "null" in pngs:
        rep.add_figure(pngs["null"], "permutation null distributions; red: observed")

    if "filters" in pngs:
        rep.add_heading("Filters by branch")
        rep.add_figure(pngs["filters"], "first-layer filters, rows grouped by branch")
    if r.enrichment is not None:
        e = r.enrichment
        rep.add_heading("Colour family")
        rep.add_text(
            f"{e['family_size']} units have colourfulness above the median "
            f"({e['median_colourfulness']:.3f}); {e['k_in_branch']} of them are in {e['branch']} "
            f"({e['branch_size']} units, {e['expected']:.1f} expected). Hypergeometric "
            f"P(X >= {e['k_in_branch']}) = {e['p_value']:.3g}."
        )
        rep.add_table(r.colour_table)
        rep.add_figure(pngs["colour_family"], "colour-family units per branch vs expected")

    rep.add_heading("Class profiles")
    rep.add_text(
        f"k-means (k = {s['n_clusters']}) on each unit's normalised class-mean profile: "
        f"MI with branch = {r.mutual_information:.4f} nats, Cramér's V = {r.cramers_v:.3f}, "
        f"permutation p = {r.tests['clusters'].p_value:.3g}."
    )
    rep.add_figure(pngs["embedding"], "t-SNE of unit class profiles, coloured by branch")

    rep.add_heading("Activation similarity")
    rep.add_figure(pngs["correlation"], "unit x unit correlation of pooled activations")
    names = r.partition.names
    rep.add_table([{"branch": a, **{b: float(r.cka[i, j]) for j, b in enumerate(names)}}
                   for i, a in enumerate(names)])
    rep.add_text("Linear CKA between branches' pooled activations (1 = same representation).",
                 muted=True)
    if "svd" in pngs:
        rep.add_figure(pngs["svd"], "SVD of the next layer's |W|")

    rep.add_heading("Ablation")
    abl = r.ablation
    rep.add_table(
        [{"branch": "(none)", **{c: float(a) for c, a in zip(r.classes, abl["baseline"], strict=True)}}]
        + [{"branch": n, **{c: float(d) for c, d in zip(r.classes, row, strict=True)}}
           for n, row in zip(abl["branches"], abl["drop"], strict=True)]
    )
    rep.add_text("First row: baseline per-class accuracy; other rows: accuracy change when the "
                 "branch's units are zeroed.", muted=True)
    rep.add_figure(pngs["ablation"], "per-class accuracy change per zeroed branch")

    rep.add_heading("Units")
    rep.add_table(r.units)
    rep.add_text(
        "Colourfulness: norm of the filter after removing the per-pixel RGB mean / total norm. "
        "Frequency: FFT-magnitude centroid of radial spatial frequency (cycles/pixel). "
        "Selectivity: (max class mean - mean of other classes) / (sum), on rectified means.",
        muted=True,
    )
    return rep


def compare_reports(folders: Sequence[str | Path]) -> str:
    """A markdown table, one row per ``specialization.json`` folder (e.g. one per seed):
    each branch's mean colourfulness and frequency, and the permutation p-values."""
    rows = []
    for folder in folders:
        path = Path(folder) / "specialization.json"
        if not path.is_file():
            raise AnalysisError(f"{path} does not exist; run `branchnet analyze specialization` first")
        d = read_json(path, AnalysisError)
        s = d["summary"]
        colour = [b.get("mean_colourfulness") for b in d["branches"]]
        freq = [b.get("mean_frequency") for b in d["branches"]]

        def fmt(v: Any) -> str:
            return "–" if v is None else f"{v:.3f}"

        def pval(name: str, p_values: dict[str, Any] = s["p_values"]) -> str:
            v = p_values.get(name)
            return "–" if v is None else f"{v:.3g}"

        rows.append(f"| {Path(folder).parent.name}/{Path(folder).name} | "
                    + " / ".join(fmt(c) for c in colour)
                    + f" | {pval('colourfulness')} | " + " / ".join(fmt(f) for f in freq)
                    + f" | {pval('frequency')} | {pval('selectivity')} | "
                    + f"{fmt(s.get('colour_enrichment_p'))} |")
    head = ("| run | mean colourfulness per branch | p (colourfulness) | mean frequency per branch "
            "| p (frequency) | p (selectivity) | colour-family enrichment p |")
    return "\n".join([head, "|---|---|---|---|---|---|---|", *rows])

