"""Virtual branching (vbranch, arXiv 1803.05872): K branches of one network that share a
fraction of every layer's units, fused so that all branches run in one set of tensor ops.

Layout ``(B, K, C, H, W)`` / ``(B, K, F)``, channels ``[shared, unique]`` per branch; see
:mod:`branchnet.virtual.layers` (layers and the shared-gradient rule),
:mod:`branchnet.virtual.models` (MLP, CNN, ResNet, DenseNet-BC) and
:mod:`branchnet.virtual.reference` (loop implementations for testing); training data per
branch (:mod:`.bagging`), merges and the per-branch loss (:mod:`.merge`), metric learning
(:mod:`.embedding`), one-shot evaluation (:mod:`.oneshot`), the torch-uncertainty layout
(:mod:`.uncertainty`) and the ``branchnet vbranch`` experiments (:mod:`.experiment`).

Example:
    >>> import torch
    >>> from branchnet.virtual import vmlp
    >>> vmlp([8, 16], num_classes=3, branches=2, shared_frac=0.5)(torch.randn(5, 8)).shape
    torch.Size([5, 2, 3])
"""

from branchnet.virtual.bagging import BAG_MODES, BaggedPairs, BranchBags
from branchnet.virtual.embedding import (
    BranchTripletLoss,
    PKBatches,
    batch_hard_triplet_loss,
    embed,
    ensemble_embedding,
)
from branchnet.virtual.layers import (
    PerBranch,
    VBatchNorm1d,
    VBatchNorm2d,
    VConv2d,
    VFlatten,
    VGlobalAvgPool2d,
    VInput,
    VLinear,
    check_branches,
    shared_units,
    vcat,
)
from branchnet.virtual.merge import MERGES, branch_probs, ensemble_score, merge_probs, per_branch_loss
from branchnet.virtual.models import (
    VCNN,
    VMLP,
    VDenseNet,
    VResNet,
    build_vmodel,
    count_parameters,
    expected_linear_params,
    plain_width,
    vcnn,
    vdensenet_bc,
    vmlp,
    vresnet,
    vresnet18,
)
from branchnet.virtual.oneshot import oneshot_accuracy, read_oneshot_runs, retrieval_metrics
from branchnet.virtual.reference import LoopVBatchNorm, LoopVConv2d, LoopVLinear
from branchnet.virtual.uncertainty import TorchUncertaintyAdapter, from_estimator_major, to_estimator_major

__all__ = [
    "BAG_MODES",
    "MERGES",
    "VCNN",
    "VMLP",
    "BaggedPairs",
    "BranchBags",
    "BranchTripletLoss",
    "LoopVBatchNorm",
    "LoopVConv2d",
    "LoopVLinear",
    "PKBatches",
    "PerBranch",
    "TorchUncertaintyAdapter",
    "VBatchNorm1d",
    "VBatchNorm2d",
    "VConv2d",
    "VDenseNet",
    "VFlatten",
    "VGlobalAvgPool2d",
    "VInput",
    "VLinear",
    "VResNet",
    "batch_hard_triplet_loss",
    "branch_probs",
    "build_vmodel",
    "check_branches",
    "count_parameters",
    "embed",
    "ensemble_embedding",
    "ensemble_score",
    "expected_linear_params",
    "from_estimator_major",
    "merge_probs",
    "oneshot_accuracy",
    "per_branch_loss",
    "plain_width",
    "read_oneshot_runs",
    "retrieval_metrics",
    "shared_units",
    "to_estimator_major",
    "vcat",
    "vcnn",
    "vdensenet_bc",
    "vmlp",
    "vresnet",
    "vresnet18",
]
