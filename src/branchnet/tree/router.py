"""The tree's inference core: one ``nn.Module`` of tensor operations, exportable to TorchScript.

:class:`TreeRouter` runs the frozen parent once and the branch heads on their inputs (the
parent's tapped layer, or the hidden layer of the branch above it), and routes each input down
the tree:

* ``hard``/``threshold``: at each node take the most probable child; the confidence at a level
  is that node's local score (max softmax by default), or, with the ``selfcheck`` score, the
  output of a self-check branch on the parent's tap (one score for the whole answer).
* ``soft``/``topk``: pick the leaf with the largest path probability P(leaf) = product of the
  probabilities along its path (HD-CNN style); the confidence at a level is the path
  probability so far.

An input abstains at the first level whose confidence is below that node's threshold, so the
end-to-end confidence is ``min`` over the path, and one threshold on it is what
``BranchTree.calibrate`` sets with a finite-sample guarantee.

Which call computes what:

* ``forward(x)`` (all heads): the parent, then **every** head on every input, then the routing
  of the policy. Returns ``leaf [N]``, ``path_nodes [N, D]`` (-1 padded), ``path_conf [N, D]``
  (NaN padded), ``stop_level [N]`` (-1 when accepted) and ``leaf_probs [N, C]``: the path
  probability of every class, which needs every head. :meth:`node_probs` and
  :meth:`probs_and_features` are this pass without the routing. This is what
  ``BranchTree.to_torchscript`` traces, what ``predict_proba``, ``node_proba`` and
  ``confidence_scores`` run, and what ``predict`` runs for the ``soft``/``topk`` policies
  (they need every leaf's probability to choose).
* :meth:`forward_paths` (conditional computation, ``hard``/``threshold`` routing only): the
  parent, then level by level only the heads on each input's path. At each level the inputs
  still going down are grouped by the node they are at (one stable sort per level), each node
  reached runs its head once on its inputs (gathered with ``index_select``; a level that every
  input reaches through one node, as every level for a single input, gathers nothing), then
  the level's child choices, confidences and next nodes are computed and scattered back in one
  go; an input that reaches a leaf stops. A head that reads the hidden layer of the head above
  (``node_input="branch"``) gets that hidden layer as computed for the same input. The
  self-check score, when used, is computed on the parent's tap of every input. Returns
  ``leaf, path_nodes, path_conf, stop_level``, equal to :meth:`forward`'s (the heads run on
  other batch sizes, so ``path_conf`` may differ in the last bit); no ``leaf_probs``.
  ``BranchTree.predict`` runs this for ``hard``/``threshold`` and computes ``leaf_probs`` only
  when they are read (``PathPrediction``). With ``stop_on_abstain=True`` an input also stops
  at the level where it abstains: its ``path_nodes``/``path_conf`` after ``stop_level`` are
  padding and its ``leaf`` is -1 (the default goes on to the leaf, which ``Prediction.leaf``
  and ``Prediction.path`` report, so ``predict`` does not stop early).

Export: both passes trace with ``torch.jit.trace`` (``BranchTree.to_torchscript``, and
``to_torchscript(paths_only=True)`` for :class:`PathsOnly`) and export with
``torch.export.export(..., strict=False)`` with a dynamic batch dimension. Traced or exported,
path-only routing runs every node's head on its (possibly empty) share of the batch, so that
the graph holds for every input; only eager mode skips the nodes no input reached (it reads the
group sizes, one host sync per level). Neither pass compiles with ``torch.jit.script`` (the
taps are forward hooks), nor with strict ``torch.export`` where a head's hidden layer or the
whole parent is read through a hook.

The parent: with ``root_from_parent`` (``router="parent"``) its output is the root decision,
so it runs whole (:class:`Tapped`, a forward hook reads the tap). Otherwise only the tapped
layer is needed and :func:`parent_module` gives a :class:`TruncatedParent`, the parent cut by
``torch.fx`` right after the tap (:func:`branchnet.taps.tap` with ``truncate=True``), falling
back to the whole parent with a hook when fx cannot trace it; ``TreeRouter.parent_run`` says
which ran, and why.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from branchnet.taps import TapError, tap
from branchnet.tree.layout import TreeLayout

POLICIES = ("hard", "threshold", "soft", "topk")
SCORES = ("msp", "margin", "entropy", "selfcheck")
#: the scores computed from a node's child probabilities
LOCAL_SCORES = ("msp", "margin", "entropy")
#: the policies that :meth:`TreeRouter.forward_paths` can route (one child per node)
PATH_POLICIES = ("hard", "threshold")


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


class TruncatedParent(nn.Module):
    """The parent cut by ``torch.fx`` right after its layer ``layer``: layers after the tap never
    run. ``forward(x)`` returns ``(empty [N, 0], tap features [N, F])``, the same pair as
    :class:`Tapped` without the parent's output (which was not computed).

    The graph shares the parent's submodules (no copy of the weights) and is traced from the
    parent as it is, so build it from the frozen parent in eval mode. Raises
    :class:`~branchnet.taps.TapError` when fx cannot trace the parent.
    """

    def __init__(self, parent: nn.Module, layer: str):
        super().__init__()
        self.layer = layer
        self.graph = tap(parent, layer, truncate=True)._graph

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.graph(x)
        h = out[0] if isinstance(out, (tuple, list)) else out
        return h.new_zeros(h.shape[0], 0), h.flatten(1)


def parent_module(parent: nn.Module, layer: str, output_needed: bool) -> tuple[nn.Module, str]:
    """The parent as the router runs it, and a sentence saying how.

    ``output_needed`` (the root decision is the parent's output): the whole parent, its tap read
    by a hook. Otherwise the parent truncated after ``layer`` (:class:`TruncatedParent`), or,
    where torch.fx cannot trace it, the whole parent with a hook and the reason.
    """
    if output_needed or not layer:
        return Tapped(parent, layer), "whole parent (its output is the root decision)"
    try:
        return TruncatedParent(parent, layer), f"parent truncated after {layer!r} (torch.fx)"
    except TapError as e:
        return (Tapped(parent, layer),
                f"whole parent, tap {layer!r} read by a forward hook (cannot truncate: {e})")


def local_score(p: torch.Tensor, kind: str) -> torch.Tensor:
    """Confidence of a probability vector (padding slots hold 0): msp, margin or -entropy."""
    if kind == "msp":
        return p.max(dim=1).values
    if kind == "margin":
        top = p.topk(2, dim=1).values
        return top[:, 0] - top[:, 1]
    return (p * torch.log(p.clamp_min(1e-12))).sum(dim=1)


def _take(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The rows ``rows`` of ``t`` (all of ``t`` for None)."""
    return t if rows is None else t.index_select(0, rows)


def _tracing() -> bool:
    """True while torch.jit traces or scripts, or torch.compile / torch.export captures."""
    return bool(torch.jit.is_tracing() or torch.jit.is_scripting()
                or torch.compiler.is_compiling())


class TreeRouter(nn.Module):
    """Parent + heads + routing tables. ``forward(x)`` (all heads) returns the tensors listed
    in the module docstring; :meth:`forward_paths` runs only the heads on each input's path.

    Args:
        layout: the tree's tables.
        parent: the parent as a module returning ``(output, tap features)``: :class:`Tapped`
            or (without ``root_from_parent``) :class:`TruncatedParent`; see
            :func:`parent_module`.
        heads: node index -> its head (a :class:`Tapped` returning ``(logits, hidden)``).
        sources: per node, the node whose head's hidden layer it reads (-1: the parent's tap).
        root_from_parent: the root decision is the parent's output (grouped by
            ``parent_groups``); the root has no head.
        policy / score: routing policy and confidence score (see the module docstring).
        selfcheck: the self-check head, for ``score="selfcheck"``.
        parent_run: how the parent runs, for the record (:attr:`parent_run`).
    """

    def __init__(
        self,
        layout: TreeLayout,
        parent: nn.Module,
        heads: dict[int, Tapped],
        sources: list[int],
        root_from_parent: bool,
        parent_groups: torch.Tensor | None,
        policy: str = "hard",
        score: str = "msp",
        selfcheck: nn.Module | None = None,
        parent_run: str = "",
    ):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {list(POLICIES)}")
        if score not in SCORES:
            raise ValueError(f"unknown confidence score {score!r}; choose one of {list(SCORES)}")
        if score == "selfcheck" and selfcheck is None:
            raise ValueError("score='selfcheck' needs a trained self-check head (selfcheck=...)")
        if root_from_parent and isinstance(parent, TruncatedParent):
            raise ValueError("root_from_parent needs the parent's output: pass the whole parent "
                             "(Tapped), not a TruncatedParent")
        self.parent = parent
        #: how the parent runs: whole, or truncated after the tap (and why not, if not)
        self.parent_run = parent_run or type(parent).__name__
        self.selfcheck = selfcheck
        self.heads = nn.ModuleDict({str(i): h for i, h in heads.items()})
        self.sources = list(sources)
        self.root_from_parent = root_from_parent
        self.policy = policy
        self.score = score
        self.n_nodes = len(layout.nodes)
        self.max_children = layout.max_children
        self.depth = layout.depth
        # internal nodes by depth (the root alone at level 0), and which heads' hidden layers
        # other heads read
        level = [0] * self.n_nodes
        for i, up in enumerate(layout.parent_of):
            level[i] = 0 if up < 0 else level[up] + 1
        self.levels = [[i for i in range(self.n_nodes) if level[i] == d] for d in range(self.depth)]
        self.read_by_others = sorted({s for s in self.sources if s >= 0})
        self.register_buffer("child_node", layout.child_node.clone())
        self.register_buffer("child_leaf", layout.child_leaf.clone())
        self.register_buffer("leaf_nodes", layout.leaf_nodes.clone())
        self.register_buffer("leaf_slots", layout.leaf_slots.clone())
        groups = parent_groups if parent_groups is not None else torch.zeros(1, 1)
        self.register_buffer("parent_groups", groups.clone().float())
        self.register_buffer("thresholds", torch.full((self.n_nodes,), float("-inf")))

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}, score={self.score!r}, parent_run={self.parent_run!r}"

    # ------------------------------------------------------------------ all heads
    def node_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, M, K]`` child probabilities at every internal node (0 in padding slots)."""
        return self.probs_and_features(x)[0]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The parent's ``(output, tapped features [N, F])``; the output is empty ``[N, 0]``
        where the parent is truncated after the tap."""
        return self.parent(x)

    def probs_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`node_probs` and the parent's tapped features ``[N, F]``."""
        logits, feats = self.features(x)
        return self.probs_from(logits, feats), feats

    def probs_from(self, logits: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """:meth:`node_probs` from the parent's output and tap (:meth:`features`): every head."""
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
        return torch.stack(probs, dim=1)

    def selfcheck_score(self, feats: torch.Tensor) -> torch.Tensor:
        """``[N]`` the self-check branch's estimate, in [0, 1], that the answer is right."""
        if self.selfcheck is None:
            raise ValueError("this router has no self-check head")
        return torch.sigmoid(self.selfcheck(feats).reshape(-1))

    def forward(self, x: torch.Tensor):
        """All heads: ``(leaf, path_nodes, path_conf, stop_level, leaf_probs)``."""
        P, feats = self.probs_and_features(x)
        check = self.selfcheck_score(feats) if self.score == "selfcheck" else None
        return self.route(P, check)

    def leaf_probs(self, P: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` the path probability of every class, from :meth:`node_probs` ``P``."""
        valid_leaf = self.leaf_nodes >= 0  # [C, D]
        gathered = P[:, self.leaf_nodes.clamp_min(0), self.leaf_slots]  # [N, C, D]
        return torch.where(valid_leaf, gathered, torch.ones_like(gathered)).prod(dim=2)

    def route(self, P: torch.Tensor, check: torch.Tensor | None = None):
        """The routing outputs from node probabilities ``P`` (and self-check scores)."""
        N = P.shape[0]
        rows = torch.arange(N, device=P.device)
        # soft path probabilities of every leaf
        leaf_probs = self.leaf_probs(P)

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
            path_conf = torch.stack(confs, dim=1)
        path_conf, stop_level = self._finish(path_nodes, path_conf)
        return leaf, path_nodes, path_conf, stop_level, leaf_probs

    def _finish(self, path_nodes: torch.Tensor,
                path_conf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``path_conf`` NaN-padded off the path, and the level where each input abstains."""
        valid = path_nodes >= 0
        path_conf = torch.where(valid, path_conf, torch.full_like(path_conf, float("nan")))
        # "not >=" so that a NaN confidence (garbage input) abstains instead of passing
        below = valid & ~(path_conf >= self.thresholds[path_nodes.clamp_min(0)])
        stop_level = torch.where(below.any(dim=1), below.int().argmax(dim=1),
                                 torch.full_like(path_nodes[:, 0], -1))
        return path_conf, stop_level

    # ------------------------------------------------------------------ path only
    def forward_paths(self, x: torch.Tensor, stop_on_abstain: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hard/threshold routing running only the heads on each input's path:
        ``(leaf, path_nodes, path_conf, stop_level)`` (see the module docstring)."""
        logits, feats = self.features(x)
        check = self.selfcheck_score(feats) if self.score == "selfcheck" else None
        return self.paths_from(logits, feats, check, stop_on_abstain)

    def paths_from(self, logits: torch.Tensor, feats: torch.Tensor,
                   check: torch.Tensor | None = None, stop_on_abstain: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward_paths` from the parent's output and tap (:meth:`features`)."""
        if self.policy not in PATH_POLICIES:
            raise ValueError(f"path-only routing follows one child per node (policies "
                             f"{list(PATH_POLICIES)}); the {self.policy} policy needs every head")
        N, device = feats.shape[0], feats.device
        eager = not _tracing()
        cur = torch.zeros(N, dtype=torch.long, device=device)  # the node of each input, -1: done
        leaf = torch.full((N,), -1, dtype=torch.long, device=device)
        # hidden layers read by the heads below: node -> (hidden [n_i, H], row of each input
        # in it [N], -1 for the inputs that did not pass through the node; None: all, in order)
        hidden: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        nodes: list[torch.Tensor] = []
        confs: list[torch.Tensor] = []
        for d, level in enumerate(self.levels):
            # (node, the inputs at it): None for all N inputs, in order, so that nothing is
            # gathered or scattered; so at the root, and in eager mode at a level that all
            # inputs reach through one node (as every level does for a single input)
            at_level: list[tuple[int, torch.Tensor | None]] = [(i, None) for i in level]
            rows_all: torch.Tensor | None = None
            if d > 0 and eager:
                # only the nodes that some input reached: the inputs sorted by node (stable, so
                # in order within a node; the finished ones, -1, first), one sync per level
                order = torch.argsort(cur, stable=True)
                counts = torch.bincount(cur + 1, minlength=self.n_nodes + 1).tolist()
                start, at_level = counts[0], []
                for i in level:  # a level's nodes in increasing number, as the sort has them
                    n_i = counts[i + 1]
                    if n_i:
                        at_level.append((i, None if n_i == N else order[start:start + n_i]))
                        start += n_i
                if at_level and at_level[0][1] is not None:
                    rows_all = order[counts[0]:]
            elif d > 0:  # traced: every node, on its (maybe empty) share of the batch
                at_level = [(i, torch.nonzero(cur == i).flatten()) for i in level]
                rows_all = torch.cat([r for _, r in at_level if r is not None])
            if not at_level:  # no input reached this level
                nodes.append(torch.full((N,), -1, dtype=torch.long, device=device))
                confs.append(torch.full((N,), float("nan"), dtype=confs[0].dtype, device=device))
                continue
            # each node's head on its inputs; then one choice and one scatter for the level
            probs = []
            for i, rows in at_level:
                if i == 0 and self.root_from_parent:
                    p = F.softmax(logits, dim=1) @ self.parent_groups
                else:
                    src = self.sources[i]
                    if src < 0:
                        inp = _take(feats, rows)
                    else:  # the hidden layer of the head above, as computed for these inputs
                        h_src, pos = hidden[src]
                        inp = _take(h_src, rows if pos is None else _take(pos, rows))
                    out, h = self.heads[str(i)](inp)
                    if i in self.read_by_others:
                        if rows is None:
                            hidden[i] = (h, None)
                        else:
                            pos = torch.full((N,), -1, dtype=torch.long, device=device)
                            pos.index_copy_(0, rows, torch.arange(rows.shape[0], device=device))
                            hidden[i] = (h, pos)
                    p = F.softmax(out, dim=1)
                probs.append(F.pad(p, (0, self.max_children - p.shape[1])))
            P = probs[0] if len(probs) == 1 else torch.cat(probs)
            ids = _take(cur, rows_all)  # the node of each of these inputs
            j = P.argmax(dim=1)
            conf = local_score(P, self.score) if check is None else _take(check, rows_all)
            nxt_leaf, nxt_node = self.child_leaf[ids, j], self.child_node[ids, j]
            if stop_on_abstain:  # "not >=": a NaN confidence abstains, as in _finish
                stop = ~(conf >= self.thresholds.index_select(0, ids))
                nxt_leaf = torch.where(stop, torch.full_like(nxt_leaf, -1), nxt_leaf)
                nxt_node = torch.where(stop, torch.full_like(nxt_node, -1), nxt_node)
            if rows_all is None:
                nodes.append(ids)
                confs.append(conf)
                leaf, cur = nxt_leaf, nxt_node
                continue
            col_nodes = torch.full((N,), -1, dtype=torch.long, device=device)
            col_conf = torch.full((N,), float("nan"), dtype=conf.dtype, device=device)
            col_nodes.index_copy_(0, rows_all, ids)
            col_conf.index_copy_(0, rows_all, conf)
            leaf.index_copy_(0, rows_all, nxt_leaf)  # -1 until an input reaches its leaf
            cur.index_copy_(0, rows_all, nxt_node)
            nodes.append(col_nodes)
            confs.append(col_conf)
        path_nodes = torch.stack(nodes, dim=1)
        path_conf, stop_level = self._finish(path_nodes, torch.stack(confs, dim=1))
        return leaf, path_nodes, path_conf, stop_level


class PathsOnly(nn.Module):
    """``forward(x)`` is ``router.forward_paths(x)``: the module to trace for path-only routing
    (``BranchTree.to_torchscript(paths_only=True)``)."""

    def __init__(self, router: TreeRouter):
        super().__init__()
        self.router = router

    def forward(self, x: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.router.forward_paths(x)
