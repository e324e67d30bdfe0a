"""Dynamic sparsity on branchnet's own models: the branches of a tree."""

from __future__ import annotations

import branchnet as bn
from branchnet.plastic import DynamicSparsity


def test_tree_branches_train_sparse_with_head_callbacks(tmp_path) -> None:
    data = bn.data.load("digits", seed=0, max_per_class=40)
    hier = bn.Hierarchy.from_dict({"round": [0, 6, 8, 9], "straight": [1, 4, 7], "curly": [2, 3, 5]})
    made: dict[str, DynamicSparsity] = {}

    def sparse(node: str) -> list[DynamicSparsity]:
        made[node] = DynamicSparsity("rigl", density=0.25, delta_t=3, seed=1)
        return [made[node]]

    fast = {"epochs": 8, "batch_size": 16, "lr": 0.01, "progress": False}
    tree = bn.BranchTree(bn.models.mlp([64, 32, 24], 10), tap="hidden.1", parent_train=fast,
                         head_train=fast, head=lambda i, o: bn.models.branch_head(i, o, 16, 0.0),
                         head_callbacks=sparse, workdir=tmp_path)
    tree.fit(data, hierarchy=hier)
    assert set(made) == {"round", "straight", "curly"}  # every internal node's head
    for node, cb in made.items():
        assert cb.n_updates > 0
        head = tree.heads_[tree.layout_.node_index[node]].module
        for name, mask in cb.masks.items():
            w = head.get_parameter(name)
            assert mask.float().mean().item() == 0.25 or mask.all()  # exact density or kept dense
            assert (w[~mask] == 0).all()  # inactive weights are exactly zero in the fitted tree
    assert tree.score(data.test.x, data.test.y) > 0.5
