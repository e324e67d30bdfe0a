"""Index tables that turn a :class:`~branchnet.data.hierarchy.Hierarchy` into tensor lookups.

Internal nodes are numbered ``0..M-1`` (root first, depth-first), leaves are the dataset's class
indices ``0..C-1``. Each node's children sit in slots ``0..n_children-1``.

Example:
    >>> from branchnet.data.hierarchy import Hierarchy
    >>> lay = TreeLayout(Hierarchy.from_dict({"a": ["x", "y"], "b": ["z"]}), ["x", "y", "z"])
    >>> lay.nodes, lay.child_node.tolist(), lay.child_leaf.tolist()
    (['root', 'a', 'b'], [[1, 2], [-1, -1], [-1, -1]], [[-1, -1], [0, 1], [2, -1]])
    >>> lay.slot_of_label("a", [0, 1, 2]).tolist()
    [0, 1, -1]
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from branchnet.data.hierarchy import Hierarchy


class TreeLayout:
    """Node numbering, child tables and root-to-leaf paths for a hierarchy bound to classes."""

    def __init__(self, hierarchy: Hierarchy, classes: Sequence[str]):
        self.hierarchy = hierarchy.bind(classes)
        self.classes = [str(c) for c in classes]
        self.nodes = self.hierarchy.internal_nodes()
        self.node_index = {n: i for i, n in enumerate(self.nodes)}
        self.class_index = {c: i for i, c in enumerate(self.classes)}
        h = self.hierarchy
        self.n_children = [len(h.children(n)) for n in self.nodes]
        self.max_children = max(self.n_children)
        self.depth = h.depth()
        M, K = len(self.nodes), self.max_children
        self.child_node = torch.full((M, K), -1, dtype=torch.long)
        self.child_leaf = torch.full((M, K), -1, dtype=torch.long)
        for i, n in enumerate(self.nodes):
            for j, kid in enumerate(h.children(n)):
                if h.is_leaf(kid):
                    self.child_leaf[i, j] = self.class_index[kid]
                else:
                    self.child_node[i, j] = self.node_index[kid]
        C, D = len(self.classes), self.depth
        # For each class: the internal nodes on its path and the slot taken at each of them.
        self.leaf_nodes = torch.full((C, D), -1, dtype=torch.long)
        self.leaf_slots = torch.zeros((C, D), dtype=torch.long)
        for c, name in enumerate(self.classes):
            path = h.path(name)
            for d, (node, kid) in enumerate(itertools.pairwise(path)):
                self.leaf_nodes[c, d] = self.node_index[node]
                self.leaf_slots[c, d] = h.children(node).index(kid)
        # The parent node of each node (-1 for the root).
        self.parent_of = [
            -1 if n == self.nodes[0] else self.node_index[h.parent(n)] for n in self.nodes
        ]

    def slot_of_label(self, node: str, y: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """For labels ``y``, the child slot of ``node`` containing each class (-1 if not under it)."""
        i = self.node_index[node]
        y = torch.as_tensor(y, dtype=torch.long)
        on_path = self.leaf_nodes[y] == i  # [N, D]
        slots = torch.where(on_path, self.leaf_slots[y], torch.full_like(self.leaf_slots[y], -1))
        return slots.max(dim=1).values

    def root_groups(self) -> torch.Tensor:
        """``[C, n_root_children]`` 0/1 matrix: which root child each class falls under."""
        A = torch.zeros(len(self.classes), self.n_children[0])
        A[torch.arange(len(self.classes)), self.leaf_slots[:, 0]] = 1.0
        return A
