"""Virtual branching (vbranch, arXiv 1803.05872): K branches of one network that share a
fraction of every layer's units, fused so that all branches run in one set of tensor ops.

Layout ``(B, K, C, H, W)`` / ``(B, K, F)``, channels ``[shared, unique]`` per branch; see
:mod:`branchnet.virtual.layers` (layers and the shared-gradient rule),
:mod:`branchnet.virtual.models` (MLP, CNN, ResNet, DenseNet-BC) and
:mod:`branchnet.virtual.reference` (loop implementations for testing).

Example:
    >>> import torch
    >>> from branchnet.virtual import vmlp
    >>> vmlp([8, 16], num_classes=3, branches=2, shared_frac=0.5)(torch.randn(5, 8)).shape
    torch.Size([5, 2, 3])
"""

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
from branchnet.virtual.reference import LoopVBatchNorm, LoopVConv2d, LoopVLinear

__all__ = [
    "VCNN",
    "VMLP",
    "LoopVBatchNorm",
    "LoopVConv2d",
    "LoopVLinear",
    "PerBranch",
    "VBatchNorm1d",
    "VBatchNorm2d",
    "VConv2d",
    "VDenseNet",
    "VFlatten",
    "VGlobalAvgPool2d",
    "VInput",
    "VLinear",
    "VResNet",
    "build_vmodel",
    "check_branches",
    "count_parameters",
    "expected_linear_params",
    "plain_width",
    "shared_units",
    "vcat",
    "vcnn",
    "vdensenet_bc",
    "vmlp",
    "vresnet",
    "vresnet18",
]
