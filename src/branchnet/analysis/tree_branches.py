"""Do sibling branches of a tree read different parent units?

Branch heads on a frozen parent cannot reorganise the parent (``../shared/REFERENCE.md`` §5),
but they can *select* from it. For every pair of heads that read the parent's tapped layer this
module measures:

* **input-weight overlap**: each head's importance of each parent unit (L2 norm of the unit's
  column in the head's first Linear layer), the cosine similarity of two heads' importances, and
  the overlap of their top units against the hypergeometric chance of that overlap;
* **ablation asymmetry**: zeroing one head's top units in the parent's layer should hurt that
  head (on its own test inputs) more than its sibling.

Example:
    >>> import numpy as np
    >>> top_overlap_pvalue(np.array([3, 2, 1, 0]), np.array([0, 1, 2, 3]), k=2)[:2]
    (0, 2)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy.stats import hypergeom
from torch import nn

from branchnet.analysis.partitions import AnalysisError, Partition
from branchnet.data.dataset import Split
from branchnet.fileio import jsonable, write_json
from branchnet.report import Report


def first_linear(head: nn.Module, n_in: int) -> nn.Linear:
    """The head's first Linear layer reading ``n_in`` features."""
    for m in head.modules():
        if isinstance(m, nn.Linear) and m.in_features == n_in:
            return m
    raise AnalysisError(f"the head has no Linear layer reading {n_in} features, so its input "
                        "weights cannot be compared")


def top_overlap_pvalue(a: np.ndarray, b: np.ndarray, k: int) -> tuple[int, int, float, float]:
    """Overlap of the top-``k`` units of importances ``a`` and ``b``: (overlap, k, expected by
    chance, P(overlap <= observed) under random top sets)."""
    n = len(a)
    top_a, top_b = set(np.argsort(-a)[:k].tolist()), set(np.argsort(-b)[:k].tolist())
    overlap = len(top_a & top_b)
    return overlap, k, k * k / n, float(hypergeom.cdf(overlap, n, k, k))


@dataclass
class TreeSpecialization:
    """Results of :func:`tree_specialization` (JSON via :meth:`to_dict`)."""

    heads: list[str]
    importance: np.ndarray  # [heads, units]
    pairs: list[dict[str, Any]] = field(default_factory=list)
    ablation: dict[str, Any] = field(default_factory=dict)
    partition: Partition | None = None

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"heads": self.heads, "pairs": self.pairs, "ablation": self.ablation,
                         "units_per_head": self.partition.sizes if self.partition else None})

    def summary_text(self) -> str:
        lines = []
        for p in self.pairs:
            lines.append(f"{p['a']} vs {p['b']}: cosine {p['cosine']:.3f}, top-{p['k']} overlap "
                         f"{p['overlap']} (chance {p['expected']:.1f}, P(<=) {p['p_low']:.3g})")
        for a, row in self.ablation.get("drop", {}).items():
            cells = ", ".join(f"{b} {d:+.3f}" for b, d in row.items())
            lines.append(f"zeroing {a}'s top units: accuracy change {cells}")
        return "\n".join(lines)

    def figures(self) -> dict[str, Figure]:
        figs = {}
        order = np.argsort(self.partition.labels(), kind="stable") if self.partition else None
        imp = self.importance / self.importance.max(axis=1, keepdims=True)
        fig = Figure(figsize=(9, 1.2 + 0.5 * len(self.heads)))
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(imp[:, order] if order is not None else imp, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(self.heads)), self.heads)
        ax.set_xlabel("parent units (ordered by the head that weighs them most)")
        ax.set_title("input-weight importance of each parent unit, per head (row-normalised)")
        fig.colorbar(im, ax=ax, fraction=0.03)
        figs["importance"] = fig
        drop = self.ablation.get("drop")
        if drop:
            names = list(drop)
            cols = list(next(iter(drop.values())))
            mat = np.array([[drop[a][b] for b in cols] for a in names])
            fig = Figure(figsize=(1.6 + 1.1 * len(cols), 1.2 + 0.6 * len(names)))
            ax = fig.add_subplot(1, 1, 1)
            lim = max(1e-6, float(np.abs(mat).max()))
            im = ax.imshow(mat, cmap="RdBu", vmin=-lim, vmax=lim)
            ax.set_xticks(range(len(cols)), [f"{c}\naccuracy" for c in cols])
            ax.set_yticks(range(len(names)), [f"zero {a}'s\ntop units" for a in names])
            for i in range(len(names)):
                for j in range(len(cols)):
                    ax.text(j, i, f"{mat[i, j]:+.3f}", ha="center", va="center", fontsize=8)
            ax.set_title("ablation: change in each head's accuracy")
            fig.colorbar(im, ax=ax, fraction=0.05)
            figs["ablation"] = fig
        return figs

    def write_report(self, folder: str | Path) -> Path:
        folder = Path(folder)
        (folder / "figures").mkdir(parents=True, exist_ok=True)
        write_json(folder / "specialization.json", self.to_dict())
        rep = Report("branchnet: do sibling branches read different parent units?")
        rep.add_text("Importance of a parent unit to a head = L2 norm of its column in the head's "
                     "first Linear layer. Overlap p-value: chance of an overlap this small or "
                     "smaller between random top sets (hypergeometric).")
        rep.add_table(self.pairs)
        if self.ablation:
            rep.add_heading("Ablation")
            rep.add_text(f"Zeroing each head's top {self.ablation['k']} parent units; each head "
                         "evaluated on the test inputs of its own classes.")
            rep.add_table([{"zeroed": a, **{f"Δ acc {b}": d for b, d in row.items()}}
                           for a, row in self.ablation["drop"].items()])
        for name, fig in self.figures().items():
            fig.savefig(folder / "figures" / f"{name}.png", dpi=110, bbox_inches="tight")
            rep.add_figure(fig, name)
        return rep.write(folder / "report.html")


def tree_specialization(tree: Any, test: Split, *, top_fraction: float = 0.1,
                        seed: int = 0) -> TreeSpecialization:
    """Compare every pair of a fitted tree's heads that read the parent's tapped layer."""
    lay = tree._require_fit()
    del seed  # deterministic: no sampling involved
    n_units = int(tree.fit_summary_.get("tap_dim", 0))
    heads = {lay.nodes[i]: t.module for i, t in tree.heads_.items()
             if tree.sources_[i] < 0 and lay.n_children[i] > 1}
    if len(heads) < 2:
        raise AnalysisError("the tree needs at least two learned heads reading the parent's layer "
                            f"to compare; it has {sorted(heads)}")
    importance = np.stack([first_linear(h, n_units).weight.detach().norm(dim=0).numpy()
                           for h in heads.values()])
    names = list(heads)
    k = max(1, round(top_fraction * n_units))
    pairs = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = importance[i], importance[j]
            overlap, _, expected, p_low = top_overlap_pvalue(a, b, k)
            pairs.append({"a": names[i], "b": names[j],
                          "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
                          "k": k, "overlap": overlap, "expected": expected, "p_low": p_low})
    partition = Partition.from_labels(
        np.argmax(importance / importance.sum(axis=1, keepdims=True), axis=0))
    return TreeSpecialization(names, importance, pairs,
                              _ablation(tree, test, names, importance, k), partition)


def _own_accuracy(tree: Any, node: str, test: Split) -> float:
    slots = tree.layout_.slot_of_label(node, test.y)
    rows = torch.nonzero(slots >= 0).flatten()
    if len(rows) == 0:
        raise AnalysisError(f"no test inputs of {node!r}'s classes")
    probs = tree.node_proba(node, test.x[rows])
    return float((probs.argmax(1) == slots[rows]).float().mean())


def _ablation(tree: Any, test: Split, names: list[str], importance: np.ndarray,
              k: int) -> dict[str, Any]:
    base = {n: _own_accuracy(tree, n, test) for n in names}
    module = tree.parent.get_submodule(tree.tap)
    drop: dict[str, dict[str, float]] = {}
    for i, a in enumerate(names):
        units = torch.from_numpy(np.argsort(-importance[i])[:k].copy())

        def zero(mod: nn.Module, inp: Any, out: torch.Tensor, units: torch.Tensor = units) -> Any:
            out = out.clone()
            out.view(out.shape[0], -1)[:, units] = 0
            return out

        handle = module.register_forward_hook(zero)
        try:
            drop[a] = {b: _own_accuracy(tree, b, test) - base[b] for b in names}
        finally:
            handle.remove()
    return {"k": k, "baseline": base, "drop": drop}
