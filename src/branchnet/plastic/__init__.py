"""Plasticity: connectivity that changes during training.

Weight level (dynamic sparse training): masks and layer densities (:mod:`.masks`), drop / grow
rules as pure functions (:mod:`.rules`), the :class:`DynamicSparsity` Lightning callback
(:mod:`.callback`), theoretical FLOPs (:mod:`.flops`) and export to ``torch.nn.utils.prune`` or
CSR layers (:mod:`.export`). Path level: a residual network with gated candidate paths and
the controller that drops and grows them, with path-length statistics (:mod:`.paths`).

>>> import torch
>>> from branchnet.plastic import SparseMasks
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> SparseMasks.from_model(net, 0.25).density()
0.25
"""

from __future__ import annotations

from branchnet.plastic.callback import DynamicSparsity
from branchnet.plastic.export import CSRLinear, remove_prune, to_csr, to_torch_prune
from branchnet.plastic.flops import (
    flops_summary,
    inference_flops,
    layer_flops,
    sparse_flops,
    summarize_flops,
    training_flops,
)
from branchnet.plastic.masks import (
    DISTRIBUTIONS,
    LayerShape,
    SparseMasks,
    SparsityError,
    find_prunable,
    layer_counts,
    layer_densities,
    random_masks,
)
from branchnet.plastic.paths import (
    PathLengthStats,
    PathPlasticity,
    PlasticResNet,
    path_length_distribution,
    plot_path_lengths,
)
from branchnet.plastic.rules import (
    ALPHA_SCHEDULES,
    RULES,
    MaskUpdate,
    adam_momentum,
    alpha_at,
    drop_smallest,
    grow_largest,
    grow_random,
    rigl_update,
    set_update,
    snfs_update,
    static_update,
    update_count,
)

__all__ = [
    "ALPHA_SCHEDULES",
    "DISTRIBUTIONS",
    "RULES",
    "CSRLinear",
    "DynamicSparsity",
    "LayerShape",
    "MaskUpdate",
    "PathLengthStats",
    "PathPlasticity",
    "PlasticResNet",
    "SparseMasks",
    "SparsityError",
    "adam_momentum",
    "alpha_at",
    "drop_smallest",
    "find_prunable",
    "flops_summary",
    "grow_largest",
    "grow_random",
    "inference_flops",
    "layer_counts",
    "layer_densities",
    "layer_flops",
    "path_length_distribution",
    "plot_path_lengths",
    "random_masks",
    "remove_prune",
    "rigl_update",
    "set_update",
    "snfs_update",
    "sparse_flops",
    "static_update",
    "summarize_flops",
    "to_csr",
    "to_torch_prune",
    "training_flops",
    "update_count",
]
