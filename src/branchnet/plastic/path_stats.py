"""Path-length statistics of residual networks (Veit, Wilber & Belongie, NeurIPS 2016).

Unrolled, a residual network is a collection of paths: at each block ``x + f(x)`` a path either
takes the skip or goes through ``f``. :func:`path_length_distribution` views a
:class:`~branchnet.plastic.resnet_paths.PlasticResNet` as a DAG over positions and counts the
input-to-output paths of each length by dynamic programming (a polynomial in ``z`` per
position, ``z`` marking one traversed layer):

* backbone block ``j`` of a stage: ``N_j = N_{j-1} (1 + w_j z)`` (skip, or through the block);
* an *active* candidate path ``i -> j``: one more edge of length 1, ``+ g_ij z N_i``;
* a downsampling transition between stages is not residual: every path goes through it, so it
  counts as one mandatory layer (``N <- z N``; ``include_transitions=False`` leaves it out).
  The stem and the head are common to all paths and are not counted.

Length = number of residual blocks / paths (plus transitions) traversed. For a plain chain of
``n`` blocks the counts are binomial ``C(n, k)``. ``counts`` use weights 1 (every path counted
once, exact integers); the *weighted* version uses ``w_j = 1`` for backbone blocks and
``g_ij = |gate|`` for candidate paths (a path's weight is the product of the |gates| on it: its
effective contribution) and, in ``stochastic_depth`` mode, multiplies every residual edge by its
survival probability ``p_l`` (the test-time scaling).

Example:
    >>> from branchnet.plastic.resnet_paths import PlasticResNet
    >>> net = PlasticResNet(2, widths=(4,), blocks_per_stage=3, max_active=0)
    >>> stats = path_length_distribution(net)
    >>> stats.counts, stats.mean, stats.mode
    ([1, 3, 3, 1], 1.5, 1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from branchnet.plastic.resnet_paths import PlasticResNet


@dataclass
class PathLengthStats:
    """Distribution of path lengths: index ``k`` of each list is length ``k``."""

    counts: list[int]
    distribution: list[float]
    mean: float
    mode: int
    weighted: list[float]
    weighted_mean: float
    weighted_mode: int

    @property
    def n_paths(self) -> int:
        return sum(self.counts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (``counts`` may be large integers; ``n_paths`` added)."""
        return {**asdict(self), "n_paths": self.n_paths}


def _add(a: list[Any], b: list[Any], shift: int, w: Any) -> list[Any]:
    """``a + w z^shift b`` on coefficient lists."""
    out = list(a) + [0] * max(0, len(b) + shift - len(a))
    for k, v in enumerate(b):
        out[k + shift] = out[k + shift] + w * v
    return out


def _summary(values: Sequence[float]) -> tuple[list[float], float, int]:
    total = float(sum(values))
    dist = [float(v) / total for v in values]
    mean = sum(k * p for k, p in enumerate(dist))
    mode = max(range(len(dist)), key=lambda k: (dist[k], -k))  # first maximum
    return dist, mean, mode


def _polynomial(model: PlasticResNet, weighted: bool, include_transitions: bool) -> list[Any]:
    active = model.active.tolist()
    gates = [abs(float(g)) for g in model.gates()]
    sd = model.mode == "stochastic_depth"
    one: Any = 1.0 if weighted else 1
    n: list[Any] = [one]
    ending: dict[tuple[int, int], list[int]] = {}
    for k, (s, _, j) in enumerate(model.spans):
        if active[k]:
            ending.setdefault((s, j), []).append(k)
    for s, n_blocks in enumerate(model.blocks_per_stage):
        if s > 0 and include_transitions:
            n = [0 * one, *n]
        pos = [n]
        for j in range(1, n_blocks + 1):
            p = model.block_survival(s, j) if (weighted and sd) else 1
            w_block = p if weighted else 1
            cur = _add(pos[-1], pos[-1], 1, w_block)
            for k in ending.get((s, j), ()):
                w = gates[k] * p if weighted else 1
                cur = _add(cur, pos[model.spans[k][1]], 1, w)
            pos.append(cur)
        n = pos[-1]
    return n


def path_length_distribution(model: PlasticResNet, include_transitions: bool = True) -> PathLengthStats:
    """Count input-to-output paths of ``model`` by length (module docstring), unweighted and
    weighted by |gate| products; normalized distributions, means and modes."""
    if not isinstance(model, PlasticResNet):
        raise TypeError(f"path_length_distribution needs a PlasticResNet, got {type(model).__name__}")
    counts = [int(c) for c in _polynomial(model, False, include_transitions)]
    weights = _polynomial(model, True, include_transitions)
    dist, mean, mode = _summary(counts)
    wdist, wmean, wmode = _summary(weights)
    return PathLengthStats(counts=counts, distribution=dist, mean=mean, mode=mode,
                           weighted=wdist, weighted_mean=wmean, weighted_mode=wmode)


def plot_path_lengths(history: dict[str, Any] | Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Plot per-epoch path-length distributions (left: solid = path counts, dashed = weighted
    by |gate| products; colour = epoch) and mean lengths over epochs (right) to ``path``
    (PNG/PDF/SVG; matplotlib ``Figure`` rendered with Agg, no pyplot).

    ``history`` is :attr:`PathPlasticity.history <branchnet.plastic.paths.PathPlasticity.history>`
    or its ``"epochs"`` list (rows with ``epoch``, ``distribution``, ``weighted``, ``mean``,
    ``weighted_mean``).

    >>> import tempfile
    >>> row = {"epoch": 0, "distribution": [0.25, 0.5, 0.25], "weighted": [0.5, 0.5, 0.0],
    ...        "mean": 1.0, "weighted_mean": 0.5}
    >>> plot_path_lengths([row], tempfile.mkdtemp() + "/p.png").is_file()
    True
    """
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot state: renders with Agg, never shown

    rows = history.get("epochs", []) if isinstance(history, dict) else list(history)
    if not rows:
        raise ValueError("no per-epoch path-length statistics to plot (empty history)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    cmap = matplotlib.colormaps["viridis"]
    for n, row in enumerate(rows):
        colour = cmap(n / max(1, len(rows) - 1))
        label = f"epoch {row['epoch']}"
        ax1.plot(range(len(row["distribution"])), row["distribution"], color=colour, label=label)
        ax1.plot(range(len(row["weighted"])), row["weighted"], color=colour, linestyle="--")
    ax1.set_xlabel("path length (residual blocks / paths traversed)")
    ax1.set_ylabel("fraction of paths")
    ax1.set_title("path lengths (dashed: weighted by |gate| products)")
    if len(rows) <= 10:
        ax1.legend(fontsize="small")
    epochs = [row["epoch"] for row in rows]
    ax2.plot(epochs, [row["mean"] for row in rows], marker="o", label="mean length")
    ax2.plot(epochs, [row["weighted_mean"] for row in rows], marker="s", linestyle="--",
             label="weighted mean length")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("path length")
    ax2.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return path
