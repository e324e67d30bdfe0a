"""What :meth:`BranchTree.predict` returns: label, path, confidence per level, and abstentions.

Example (hand-made, one input that abstained at the root):
    >>> import torch
    >>> p = Prediction(
    ...     label=torch.tensor([-1]), leaf=torch.tensor([0]),
    ...     path_nodes=torch.tensor([[0]]), path_conf=torch.tensor([[0.4]]),
    ...     stop_level=torch.tensor([0]), leaf_probs=torch.tensor([[0.4, 0.6]]),
    ...     nodes=["root"], classes=["a", "b"], thresholds=[0.9], backoff=False)
    >>> p.explain(0)
    "abstained at 'root': confidence 0.400 < threshold 0.900"
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Prediction:
    """Per-input results of routing a batch down a :class:`BranchTree`.

    * ``label``: predicted class index, -1 where the tree abstained.
    * ``leaf``: the class the routing policy reached (even where it then abstained).
    * ``path_nodes`` / ``path_conf``: internal nodes visited and the confidence at each level.
    * ``stop_level``: level at which the input abstained (-1: accepted).
    * ``leaf_probs``: P(class) as the product of probabilities along its path.
    * With ``backoff``, an abstaining input is predicted as the deepest node whose membership
      is confident (``node``): the node where it stopped.
    * ``novel_level``: level at which open-world rejection found the input to be none of that
      node's children (-1: not novel; None: the tree has no calibrated novelty rejection), and
      ``novelty`` its end-to-end novelty statistic. A novel input is not *unsure*: ``status``
      tells ``known`` (accepted), ``unsure`` (abstained among known classes) and ``novel``.
    """

    label: torch.Tensor
    leaf: torch.Tensor
    path_nodes: torch.Tensor
    path_conf: torch.Tensor
    stop_level: torch.Tensor
    leaf_probs: torch.Tensor
    nodes: list[str]
    classes: list[str]
    thresholds: list[float]
    backoff: bool = False
    novel_level: torch.Tensor | None = None
    novelty: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def abstained(self) -> torch.Tensor:
        """Unsure among the known classes (a confidence below the threshold)."""
        return self.stop_level >= 0

    @property
    def novel(self) -> torch.Tensor:
        """Rejected as belonging to none of a node's children."""
        if self.novel_level is None:
            return torch.zeros(len(self), dtype=torch.bool)
        return self.novel_level >= 0

    @property
    def rejected(self) -> torch.Tensor:
        """No class predicted: unsure or novel."""
        return self.abstained | self.novel

    @property
    def status(self) -> list[str]:
        """Per input: ``novel``, ``unsure`` or ``known``."""
        novel, unsure = self.novel.tolist(), self.abstained.tolist()
        return ["novel" if n else "unsure" if u else "known"
                for n, u in zip(novel, unsure, strict=True)]

    @property
    def confidence(self) -> torch.Tensor:
        """End-to-end confidence: the smallest confidence along the path."""
        padded = self.path_nodes < 0  # NaN there is padding; NaN on the path stays NaN
        return torch.where(padded, torch.full_like(self.path_conf, float("inf")),
                           self.path_conf).min(dim=1).values

    @property
    def coverage(self) -> float:
        """The fraction of inputs given a class (neither unsure nor novel)."""
        return float((~self.rejected).float().mean()) if len(self) else float("nan")

    def node(self, i: int) -> str | None:
        """The prediction as a node name: a class, a backed-off group, or None (abstained)."""
        s = int(self.stop_level[i])
        if self.novel_level is not None and int(self.novel_level[i]) >= 0:
            return None
        if s < 0:
            return self.classes[int(self.leaf[i])]
        if self.backoff and s > 0:
            return self.nodes[int(self.path_nodes[i, s])]
        return None

    def predicted_nodes(self) -> list[str | None]:
        return [self.node(i) for i in range(len(self))]

    def path(self, i: int) -> list[str]:
        """Nodes visited from the root, ending with the class the policy reached."""
        names = [self.nodes[int(n)] for n in self.path_nodes[i] if int(n) >= 0]
        return [*names, self.classes[int(self.leaf[i])]]

    def explain(self, i: int) -> str:
        s = int(self.stop_level[i])
        if self.novel_level is not None and int(self.novel_level[i]) >= 0:
            node = self.nodes[int(self.path_nodes[i, int(self.novel_level[i])])]
            assert self.novelty is not None
            return (f"novel at {node!r}: none of its children (novelty {float(self.novelty[i]):.3f}"
                    " above the calibrated threshold)")
        if s < 0:
            conf = float(torch.nan_to_num(self.path_conf[i], nan=float("inf")).min())  # one row
            return f"accepted: {self.classes[int(self.leaf[i])]} (confidence {conf:.3f})"
        node = int(self.path_nodes[i, s])
        why = (f"confidence {float(self.path_conf[i, s]):.3f} < threshold "
               f"{self.thresholds[node]:.3f}")
        if self.backoff and s > 0:
            return f"backed off to group {self.nodes[node]!r}: choosing inside it, {why}"
        return f"abstained at {self.nodes[node]!r}: {why}"

    def topk(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most probable classes by path probability: (probabilities, indices)."""
        return self.leaf_probs.topk(min(k, self.leaf_probs.shape[1]), dim=1)

    def to_records(self, k: int = 1) -> list[dict[str, Any]]:
        """One JSON-able dict per input (what ``branchnet tree predict`` prints)."""
        out = []
        probs, idx = self.topk(k) if k > 1 else (None, None)  # top-k needs every head's output
        confidence, status = self.confidence.tolist(), self.status  # once, not per row
        for i in range(len(self)):
            levels = [
                {"node": self.nodes[int(n)], "confidence": round(float(c), 6)}
                for n, c in zip(self.path_nodes[i], self.path_conf[i], strict=True)
                if int(n) >= 0 and not math.isnan(float(c))
            ]
            rec: dict[str, Any] = {
                "label": self.classes[int(self.label[i])] if int(self.label[i]) >= 0 else None,
                "prediction": self.node(i),
                "path": self.path(i),
                "levels": levels,
                "confidence": round(confidence[i], 6),
                "abstained": status[i] == "unsure",
                "status": status[i],
                "why": self.explain(i),
            }
            if k > 1:
                rec["top"] = [{"class": self.classes[int(j)], "p": round(float(p), 6)}
                              for p, j in zip(probs[i], idx[i], strict=True)]
            out.append(rec)
        return out
