"""The tree's inference core: one ``nn.Module`` of tensor operations, exportable to TorchScript.

:class:`TreeRouter` runs the frozen parent once, every branch head on its input (the parent's
tapped layer, or the hidden layer of the branch above it), and routes each input down the tree:

* ``hard``/``threshold``: at each node take the most probable child; the confidence at a level
  is that node's local score (max softmax by default), or, with the ``selfcheck`` score, the
  output of a self-check branch on the parent's tap (one score for the whole answer).
* ``soft``/``topk``: pick the leaf with the largest path probability P(leaf) = product of the
  probabilities along its path (HD-CNN style); the confidence at a level is the path
  probability so far.

An input abstains at the first level whose confidence is below that node's threshold, so the
end-to-end confidence is ``min`` over the path, and one threshold on it is what
``BranchTree.calibrate`` sets with a finite-sample guarantee.

Outputs (all tensors): ``leaf [N]``, ``path_nodes [N, D]`` (-1 padded), ``path_conf [N, D]``
(NaN padded), ``stop_level [N]`` (-1 when accepted) and ``leaf_probs [N, C]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from branchnet.tree.layout import TreeLayout

POLICIES = ("hard", "threshold", "soft", "topk")
SCORES = ("msp", "margin", "entropy", "selfcheck")
#: the scores computed from a node's child probabilities
LOCAL_SCORES = ("msp", "margin", "entropy")


class Tapped(nn.Module):
    """Runs ``module`` and also returns the output of its sub-layer ``layer``, flattened.

    The hook lives only for the duration of one forward pass, so modules shared between
    several trees never accumulate hooks or stored activations.
    """

    def __init__(self, module: nn.Module, layer: str | None):
        super().__init__()
        self.module = module
        self.layer = layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.layer:
            out = self.module(x)
            return out, out.flatten(1)
        store: list[torch.Tensor] = []

        def hook(mod: nn.Module, inp: object, output: object) -> None:
            store.append((output[0] if isinstance(output, (tuple, list)) else output).clone())

        handle = self.module.get_submodule(self.layer).register_forward_hook(hook)
        try:
            out = self.module(x)
        finally:
            handle.remove()
        return out, store[-1].flatten(1)


def local_score(p: torch.Tensor, kind: str) -> torch.Tensor:
    """Confidence of a probability vector (padding slots hold 0): msp, margin or -entropy."""
    if kind == "msp":
        return p.max(dim=1).values
    if kind == "margin":
        top = p.topk(2, dim=1).values
        return top[:, 0] - top[:, 1]
    return (p * torch.log(p.clamp_min(1e-12))).sum(dim=1)


class TreeRouter(nn.Module):
    """Parent + heads + routing tables. ``forward(x)`` returns the tensors listed above."""

    def __init__(
        self,
        layout: TreeLayout,
        parent: Tapped,
        heads: dict[int, Tapped],
        sources: list[int],
        root_from_parent: bool,
        parent_groups: torch.Tensor | None,
        policy: str = "hard",
        score: str = "msp",
        selfcheck: nn.Module | None = None,
    ):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {list(POLICIES)}")
        if score not in SCORES:
            raise ValueError(f"unknown confidence score {score!r}; choose one of {list(SCORES)}")
        if score == "selfcheck" and selfcheck is None:
            raise ValueError("score='selfcheck' needs a trained self-check head (selfcheck=...)")
        self.parent = parent
        self.selfcheck = selfcheck
        self.heads = nn.ModuleDict({str(i): h for i, h in heads.items()})
        self.sources = list(sources)
        self.root_from_parent = root_from_parent
        self.policy = policy
        self.score = score
        self.n_nodes = len(layout.nodes)
        self.max_children = layout.max_children
        self.depth = layout.depth
        self.register_buffer("child_node", layout.child_node.clone())
        self.register_buffer("child_leaf", layout.child_leaf.clone())
        self.register_buffer("leaf_nodes", layout.leaf_nodes.clone())
        self.register_buffer("leaf_slots", layout.leaf_slots.clone())
        groups = parent_groups if parent_groups is not None else torch.zeros(1, 1)
        self.register_buffer("parent_groups", groups.clone().float())
        self.register_buffer("thresholds", torch.full((self.n_nodes,), float("-inf")))

    def node_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, M, K]`` child probabilities at every internal node (0 in padding slots)."""
        return self.probs_and_features(x)[0]

    def probs_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`node_probs` and the parent's tapped features ``[N, D]``."""
        logits, feats = self.parent(x)
        hidden: dict[int, torch.Tensor] = {}
        probs = []
        for i in range(self.n_nodes):
            if i == 0 and self.root_from_parent:
                p = F.softmax(logits, dim=1) @ self.parent_groups
            else:
                src = self.sources[i]
                out, h = self.heads[str(i)](feats if src < 0 else hidden[src])
                hidden[i] = h
                p = F.softmax(out, dim=1)
            probs.append(F.pad(p, (0, self.max_children - p.shape[1])))
        return torch.stack(probs, dim=1), feats

    def selfcheck_score(self, feats: torch.Tensor) -> torch.Tensor:
        """``[N]`` the self-check branch's estimate, in [0, 1], that the answer is right."""
        if self.selfcheck is None:
            raise ValueError("this router has no self-check head")
        return torch.sigmoid(self.selfcheck(feats).reshape(-1))

    def forward(self, x: torch.Tensor):
        P, feats = self.probs_and_features(x)
        check = self.selfcheck_score(feats) if self.score == "selfcheck" else None
        return self.route(P, check)

    def route(self, P: torch.Tensor, check: torch.Tensor | None = None):
        """The routing outputs from node probabilities ``P`` (and self-check scores)."""
        N = P.shape[0]
        rows = torch.arange(N, device=P.device)
        # soft path probabilities of every leaf
        valid_leaf = self.leaf_nodes >= 0  # [C, D]
        gathered = P[:, self.leaf_nodes.clamp_min(0), self.leaf_slots]  # [N, C, D]
        leaf_probs = torch.where(valid_leaf, gathered, torch.ones_like(gathered)).prod(dim=2)

        if self.policy in ("soft", "topk"):
            leaf = leaf_probs.argmax(dim=1)
            path_nodes = self.leaf_nodes[leaf]  # [N, D]
            valid = path_nodes >= 0
            step = P[rows[:, None], path_nodes.clamp_min(0), self.leaf_slots[leaf]]
            step = torch.where(valid, step, torch.ones_like(step))
            path_conf = torch.cumprod(step, dim=1)
        else:
            cur = torch.zeros(N, dtype=torch.long, device=P.device)
            done = torch.zeros(N, dtype=torch.bool, device=P.device)
            leaf = torch.full((N,), -1, dtype=torch.long, device=P.device)
            nodes, confs = [], []
            for _ in range(self.depth):
                p = P[rows, cur]
                j = p.argmax(dim=1)
                nodes.append(torch.where(done, torch.full_like(cur, -1), cur))
                confs.append(local_score(p, self.score) if check is None else check)
                nxt_leaf = self.child_leaf[cur, j]
                leaf = torch.where(~done & (nxt_leaf >= 0), nxt_leaf, leaf)
                done = done | (nxt_leaf >= 0)
                cur = torch.where(done, torch.zeros_like(cur), self.child_node[cur, j])
            path_nodes = torch.stack(nodes, dim=1)
            valid = path_nodes >= 0
            path_conf = torch.stack(confs, dim=1)
        path_conf = torch.where(valid, path_conf, torch.full_like(path_conf, float("nan")))
        # "not >=" so that a NaN confidence (garbage input) abstains instead of passing
        below = valid & ~(path_conf >= self.thresholds[path_nodes.clamp_min(0)])
        stop_level = torch.where(below.any(dim=1), below.int().argmax(dim=1),
                                 torch.full_like(leaf, -1))
        return leaf, path_nodes, path_conf, stop_level, leaf_probs
