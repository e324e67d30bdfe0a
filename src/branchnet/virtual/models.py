"""Virtual-branch models: K branches of an MLP, CNN, ResNet or DenseNet fused into one network.

Every model takes ``branches=K`` and ``shared_frac=s`` (a float in [0, 1], the fraction of each
layer's units that is shared, or a list with one value per V layer depth, see each model) and
accepts what :class:`~branchnet.virtual.layers.VInput` accepts: ``(B, *input_shape)`` (one
batch, broadcast to all branches), ``(B, K, *input_shape)`` or a list of K batches. It returns
per-branch outputs ``(B, K, num_classes)`` (logits, or embeddings of size ``num_classes``);
merging them is :mod:`branchnet.virtual.merge`'s job. ``K = 1`` is the plain network
(``shared_frac`` is then irrelevant). Training sums the per-branch losses; shared parameters get
the mean of the branches' gradients (see :mod:`branchnet.virtual.layers`).

Every model carries a JSON-able ``.spec`` (the builder's arguments plus ``kind``) and
:func:`build_vmodel` rebuilds the same architecture from it, so a run is saved as safetensors
weights plus that JSON.

Example:
    >>> import torch
    >>> net = vmlp([64, 32], num_classes=10, branches=3, shared_frac=0.5)
    >>> net(torch.randn(4, 64)).shape
    torch.Size([4, 3, 10])
    >>> build_vmodel(net.spec).load_state_dict(net.state_dict())
    <All keys matched successfully>
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

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

__all__ = [
    "VCNN",
    "VMLP",
    "VDenseNet",
    "VResNet",
    "build_vmodel",
    "count_parameters",
    "expected_linear_params",
    "plain_width",
    "vcnn",
    "vdensenet_bc",
    "vmlp",
    "vresnet",
    "vresnet18",
]


# ---------------------------------------------------------------- helpers


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (elements of every parameter tensor, buffers excluded).

    Example:
        >>> count_parameters(torch.nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters())


def expected_linear_params(n_in: int, n_out: int, branches: int, s: float, first: bool = False,
                           bias: bool = False) -> int:
    """Weights of one virtual Dense layer by REFERENCE 2.2 with ``shared = floor(s * n)``.

    Inner layer: ``s_in*s_out + K*(n_in*n_out - s_in*s_out)``, i.e. ``n_in*n_out*(s^2 + K(1-s^2))``
    when the products are integers. First layer (raw input shared by every branch):
    ``n_in*(s_out + K*(n_out - s_out))`` = ``n_in*n_out*(s + K(1-s))``. With ``bias``, adds
    ``s_out + K*(n_out - s_out)``.

    Example:
        >>> expected_linear_params(784, 512, 4, 0.5, first=True) + expected_linear_params(512, 10, 4, 0.5)
        1020160
    """
    K = check_branches(branches)
    s_out = shared_units(float(s), n_out)
    s_in = n_in if first else shared_units(float(s), n_in)
    weights = s_in * s_out + K * (n_in * n_out - s_in * s_out)
    return weights + (s_out + K * (n_out - s_out) if bias else 0)


def plain_width(width: int, branches: int) -> int:
    """Width of a plain (K = 1) network with about the FLOPs of K branches of ``width`` channels:
    ``round(width * sqrt(K))`` (conv FLOPs grow with width squared).

    Example:
        >>> plain_width(16, 4)
        32
    """
    w = _positive_int(width, "width")
    return max(1, round(w * math.sqrt(check_branches(branches))))


def _positive_int(n: Any, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{what} must be an int >= 1, got {n!r}")
    return int(n)


def _frac(f: Any) -> float:
    if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0.0 <= float(f) <= 1.0:
        raise ValueError(f"shared_frac values must be fractions in [0, 1], got {f!r}")
    return float(f)


def _fracs(shared_frac: float | Sequence[float], n: int, model: str, what: str) -> list[float]:
    """One fraction per V layer depth; an int 0 or 1 means 0.0 or 1.0 (a fraction, not a count)."""
    if isinstance(shared_frac, (list, tuple)):
        if len(shared_frac) != n:
            raise ValueError(f"shared_frac has {len(shared_frac)} values but {model} needs {n} "
                             f"({what}), or one float for all")
        return [_frac(f) for f in shared_frac]
    return [_frac(shared_frac)] * n


def _json_frac(shared_frac: float | Sequence[float]) -> float | list[float]:
    if isinstance(shared_frac, (list, tuple)):
        return [float(f) for f in shared_frac]
    return float(shared_frac)


def _image_shape(input_shape: Sequence[int], model: str) -> tuple[int, int, int]:
    shape = tuple(input_shape) if isinstance(input_shape, (list, tuple)) else (input_shape,)
    if len(shape) != 3 or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1
                              for d in shape):
        raise ValueError(f"{model} needs input_shape (channels, height, width) of positive ints, "
                         f"got {input_shape!r}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def _check_image_size(hw: tuple[int, int], factor: int, model: str) -> None:
    if min(hw) < factor:
        raise ValueError(f"{model} halves the image {int(math.log2(factor))} times: input_shape needs "
                         f"height and width >= {factor}, got {hw[0]}x{hw[1]}")


# ---------------------------------------------------------------- building blocks


class VDense(nn.Module):
    """VLinear -> VBatchNorm1d -> ReLU -> Dropout (per branch). ``shared_out`` is the split."""

    def __init__(self, n_in: int, shared_in: int, n_out: int, frac: float, branches: int,
                 dropout: float = 0.0, shared_grad: str = "mean"):
        super().__init__()
        self.linear = VLinear(n_in, n_out, branches, shared_in, shared_units(frac, n_out),
                              shared_grad=shared_grad)
        self.shared_out = self.linear.shared_out
        self.bn = VBatchNorm1d(n_out, branches, self.shared_out, shared_grad=shared_grad)
        self.act = nn.ReLU()
        self.drop = PerBranch(nn.Dropout(dropout)) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.bn(self.linear(x))))


class VConvBN(nn.Module):
    """VConv2d -> VBatchNorm2d (-> ReLU if ``relu``). ``shared_out`` is the output split."""

    def __init__(self, c_in: int, shared_in: int, c_out: int, shared_out: int, kernel: int, branches: int,
                 stride: int = 1, padding: int = 0, bias: bool = False, relu: bool = True,
                 shared_grad: str = "mean"):
        super().__init__()
        self.conv = VConv2d(c_in, c_out, kernel, branches, shared_in, shared_out, stride=stride,
                            padding=padding, bias=bias, shared_grad=shared_grad)
        self.shared_out = self.conv.shared_out
        self.bn = VBatchNorm2d(c_out, branches, self.shared_out, shared_grad=shared_grad)
        self.act = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _VModel(nn.Module):
    """Common bits: ``branches``, ``shared_fracs`` (resolved per depth), ``spec``."""

    spec: dict[str, Any]
    branches: int
    shared_fracs: list[float]


# ---------------------------------------------------------------- MLP


class VMLP(_VModel):
    """Flatten -> hidden ``VDense`` layers (Dense -> BN -> ReLU [-> Dropout]) -> ``head`` (VLinear).

    ``sizes = [n_in, h1, h2, ...]`` as in :class:`branchnet.models.MLP`; ``n_in`` must equal the
    product of ``input_shape`` (default ``(n_in,)``). ``shared_frac``: one float for every Dense
    layer (vbranch's "fcn2A"), or a list of ``len(sizes)`` values, one per Dense layer including
    the head (vbranch's "fcn" is ``[f, 1, ..., 1]``). The first layer reads the raw input, which
    counts as shared. Layer names: ``hidden.0.linear``, ``hidden.0.bn``, ..., ``head``.
    """

    def __init__(self, sizes: Sequence[int], num_classes: int, branches: int = 1,
                 shared_frac: float | Sequence[float] = 0.0, input_shape: Sequence[int] | None = None,
                 dropout: float = 0.0, shared_grad: str = "mean"):
        super().__init__()
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
            raise ValueError(f"vmlp sizes must be a non-empty list [n_in, h1, ...], got {sizes!r}")
        sizes = [_positive_int(s, "every vmlp size") for s in sizes]
        num_classes = _positive_int(num_classes, "num_classes")
        K = check_branches(branches)
        if input_shape is None:
            shape: tuple[int, ...] = (sizes[0],)
        elif isinstance(input_shape, numbers.Integral):
            shape = (int(input_shape),)
        else:
            shape = tuple(input_shape)
        if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in shape) \
                or math.prod(shape) != sizes[0]:
            raise ValueError(f"vmlp input_shape {input_shape!r} must be positive ints whose product is "
                             f"sizes[0] = {sizes[0]}")
        shape = tuple(int(d) for d in shape)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        fracs = _fracs(shared_frac, len(sizes), "vmlp", "one per Dense layer, the head included")
        self.branches, self.shared_fracs = K, fracs
        self.spec = {"kind": "vmlp", "sizes": sizes, "num_classes": num_classes, "branches": K,
                     "shared_frac": _json_frac(shared_frac), "input_shape": list(shape),
                     "dropout": float(dropout), "shared_grad": shared_grad}
        self.input = VInput(K, shape)
        self.flatten = VFlatten()
        layers, s_in = [], sizes[0]  # the raw input is shared by all branches
        for (a, b), f in zip(itertools.pairwise(sizes), fracs[:-1], strict=True):
            layers.append(VDense(a, s_in, b, f, K, float(dropout), shared_grad))
            s_in = layers[-1].shared_out
        self.hidden = nn.Sequential(*layers)
        self.head = VLinear(sizes[-1], num_classes, K, s_in, shared_units(fracs[-1], num_classes),
                            shared_grad=shared_grad)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        return self.head(self.hidden(self.flatten(self.input(x))))


def vmlp(sizes: Sequence[int], num_classes: int, branches: int = 1,
         shared_frac: float | Sequence[float] = 0.0, input_shape: Sequence[int] | None = None,
         dropout: float = 0.0, shared_grad: str = "mean") -> VMLP:
    """A virtual MLP ``sizes[0] -> sizes[1] -> ... -> num_classes`` (see :class:`VMLP`).

    Example:
        >>> import torch
        >>> net = vmlp([784, 512], 10, branches=4, shared_frac=0.5, input_shape=(1, 28, 28))
        >>> sum(p.numel() for n, p in net.named_parameters() if "weight" in n)   # REFERENCE 2.2
        1020160
    """
    return VMLP(sizes, num_classes, branches, shared_frac, input_shape, dropout, shared_grad)


# ---------------------------------------------------------------- CNN


class VCNN(_VModel):
    """vbranch's CNN: [stem] -> stages of ``convs_per_stage`` x (3x3 conv -> BN -> ReLU) with a
    2x2 average pool between stages -> global average pool -> ``hidden`` (Dense -> BN -> ReLU)
    -> ``head`` (Dense, unshared: every branch has its own).

    As in vbranch, each stage has two convolutions by default (its MNIST CNN ``[16, 32]`` is
    16-16-32-32, 18,010 parameters) and the convolutions have biases; padding is 1 (vbranch used
    'valid'), so small images work; the parameter count does not depend on it. ``hidden``
    defaults to the last width. ``stem`` (channels) adds a 7x7 stride-2 conv -> BN -> ReLU first
    (for large images such as Omniglot's 105x105).

    ``shared_frac``: a float, or one value per V layer in order: the stem (if any), every
    convolution, the hidden Dense (``[stem] + len(widths) * convs_per_stage + 1`` values).
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128), num_classes: int = 10, branches: int = 1,
                 shared_frac: float | Sequence[float] = 0.0, input_shape: Sequence[int] = (3, 32, 32),
                 stem: int | None = None, convs_per_stage: int = 2, hidden: int | None = None,
                 shared_grad: str = "mean"):
        super().__init__()
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths:
            raise ValueError(f"vcnn widths must be a non-empty list of ints, got {widths!r}")
        widths = [_positive_int(w, "every vcnn width") for w in widths]
        num_classes = _positive_int(num_classes, "num_classes")
        K = check_branches(branches)
        c_in, h, w = _image_shape(input_shape, "vcnn")
        stem = None if stem is None else _positive_int(stem, "stem")
        convs_per_stage = _positive_int(convs_per_stage, "convs_per_stage")
        hidden = widths[-1] if hidden is None else _positive_int(hidden, "hidden")
        n_fracs = (stem is not None) + len(widths) * convs_per_stage + 1
        fracs = _fracs(shared_frac, n_fracs, "vcnn",
                       "the stem if any, every convolution, the hidden Dense")
        _check_image_size((h, w), 2 ** (len(widths) - 1 + (stem is not None)), "vcnn")
        self.branches, self.shared_fracs = K, fracs
        self.spec = {"kind": "vcnn", "widths": widths, "num_classes": num_classes, "branches": K,
                     "shared_frac": _json_frac(shared_frac), "input_shape": [c_in, h, w], "stem": stem,
                     "convs_per_stage": convs_per_stage, "hidden": hidden, "shared_grad": shared_grad}
        self.input = VInput(K, (c_in, h, w))
        it = iter(fracs)
        c, s = c_in, c_in  # the raw input is shared by all branches
        if stem is not None:
            self.stem: nn.Module = VConvBN(c, s, stem, shared_units(next(it), stem), 7, K, stride=2,
                                           padding=3, bias=True, shared_grad=shared_grad)
            c, s = stem, self.stem.shared_out
        else:
            self.stem = nn.Identity()
        stages: list[nn.Module] = []
        for i, width in enumerate(widths):
            stage: list[nn.Module] = []
            for _ in range(convs_per_stage):
                stage.append(VConvBN(c, s, width, shared_units(next(it), width), 3, K, padding=1,
                                     bias=True, shared_grad=shared_grad))
                c, s = width, stage[-1].shared_out
            if i < len(widths) - 1:
                stage.append(PerBranch(nn.AvgPool2d(2)))
            stages.append(nn.Sequential(*stage))
        self.features = nn.Sequential(*stages)
        self.pool = VGlobalAvgPool2d()
        self.hidden = VDense(c, s, hidden, next(it), K, shared_grad=shared_grad)
        self.head = VLinear(hidden, num_classes, K, self.hidden.shared_out, 0, shared_grad=shared_grad)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.features(self.stem(self.input(x)))
        return self.head(self.hidden(self.pool(x)))


def vcnn(widths: Sequence[int] = (32, 64, 128), num_classes: int = 10, branches: int = 1,
         shared_frac: float | Sequence[float] = 0.0, input_shape: Sequence[int] = (3, 32, 32),
         stem: int | None = None, convs_per_stage: int = 2, hidden: int | None = None,
         shared_grad: str = "mean") -> VCNN:
    """vbranch's virtual CNN (see :class:`VCNN`).

    Example:
        >>> import torch
        >>> net = vcnn((4, 8), 5, branches=2, shared_frac=0.5, input_shape=(1, 8, 8))
        >>> net(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 2, 5])
    """
    return VCNN(widths, num_classes, branches, shared_frac, input_shape, stem, convs_per_stage, hidden,
                shared_grad)


# ---------------------------------------------------------------- ResNet


class VBasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, -> ReLU. The residual add works
    because both sides have the same ``[shared, unique]`` split; the shortcut is the identity, or
    (option B) a 1x1 conv + BN when the stride, the width or the split changes."""

    def __init__(self, c_in: int, s_in: int, c_out: int, s_out: int, stride: int, branches: int,
                 shared_grad: str = "mean"):
        super().__init__()
        K = branches
        self.conv1 = VConvBN(c_in, s_in, c_out, s_out, 3, K, stride=stride, padding=1,
                             shared_grad=shared_grad)
        self.conv2 = VConvBN(c_out, s_out, c_out, s_out, 3, K, padding=1, relu=False, shared_grad=shared_grad)
        if stride != 1 or c_in != c_out or s_in != s_out:
            self.shortcut: nn.Module = VConvBN(c_in, s_in, c_out, s_out, 1, K, stride=stride, relu=False,
                                               shared_grad=shared_grad)
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU()
        self.shared_out = s_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class VResNet(_VModel):
    """A CIFAR-style virtual ResNet: 3x3 stem conv -> BN -> ReLU -> stages of basic blocks ->
    global average pool -> ``fc`` (Dense, unshared: every branch has its own, as in vbranch).

    Built by :func:`vresnet` (depth 6n+2, 3 stages) and :func:`vresnet18` (4 stages of 2).
    ``shared_frac``: a float, or one value per stage (the stem takes the first stage's value).
    Identity shortcuts force every block of a stage to keep the stage's split, so fractions
    vary by stage, not by layer.
    """

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], strides: Sequence[int],
                 num_classes: int, branches: int, shared_frac: float | Sequence[float],
                 input_shape: Sequence[int], shared_grad: str, spec: dict[str, Any]):
        super().__init__()
        K = check_branches(branches)
        num_classes = _positive_int(num_classes, "num_classes")
        c_in, h, w = _image_shape(input_shape, spec["kind"])
        fracs = _fracs(shared_frac, len(widths), spec["kind"], "one per stage")
        self.branches, self.shared_fracs = K, fracs
        self.spec = {**spec, "num_classes": num_classes, "branches": K,
                     "shared_frac": _json_frac(shared_frac), "input_shape": [c_in, h, w],
                     "shared_grad": shared_grad}
        self.input = VInput(K, (c_in, h, w))
        self.stem = VConvBN(c_in, c_in, widths[0], shared_units(fracs[0], widths[0]), 3, K, padding=1,
                            shared_grad=shared_grad)
        c, s = widths[0], self.stem.shared_out
        stages = []
        for width, n, stride, f in zip(widths, blocks, strides, fracs, strict=True):
            stage = []
            for j in range(n):
                stage.append(VBasicBlock(c, s, width, shared_units(f, width), stride if j == 0 else 1, K,
                                         shared_grad))
                c, s = width, stage[-1].shared_out
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = VGlobalAvgPool2d()
        self.fc = VLinear(c, num_classes, K, s, 0, shared_grad=shared_grad)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(self.input(x)))))


def vresnet(depth: int = 20, num_classes: int = 10, branches: int = 1,
            shared_frac: float | Sequence[float] = 0.0, width: int = 16,
            input_shape: Sequence[int] = (3, 32, 32), shared_grad: str = "mean") -> VResNet:
    """CIFAR ResNet-``depth`` (He et al. 2016: depth = 6n+2, n basic blocks per stage, stages of
    ``width``, ``2*width``, ``4*width`` channels = 16/32/64 by default) with K virtual branches.
    ``shared_frac``: a float or 3 values (one per stage). A plain net of about the FLOPs of K
    branches: ``vresnet(depth, branches=1, width=plain_width(16, K))``.

    Example:
        >>> import torch
        >>> net = vresnet(8, num_classes=3, branches=2, shared_frac=0.5, width=4, input_shape=(3, 8, 8))
        >>> net(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 2, 3])
    """
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"vresnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), "
                         f"got {depth!r}")
    w = _positive_int(width, "width")
    n = (int(depth) - 2) // 6
    spec = {"kind": "vresnet", "depth": int(depth), "width": w}
    return VResNet([w, 2 * w, 4 * w], [n] * 3, [1, 2, 2], num_classes, branches, shared_frac,
                   input_shape, shared_grad, spec)


def vresnet18(num_classes: int = 10, branches: int = 1, shared_frac: float | Sequence[float] = 0.0,
              width: int = 64, input_shape: Sequence[int] = (3, 32, 32),
              shared_grad: str = "mean") -> VResNet:
    """CIFAR ResNet-18 (3x3 stem, no max-pool, 4 stages of 2 basic blocks, 64-128-256-512
    channels for ``width=64``) with K virtual branches. ``shared_frac``: a float or 4 values.

    Example:
        >>> import torch
        >>> net = vresnet18(num_classes=3, branches=2, shared_frac=0.5, width=4, input_shape=(3, 8, 8))
        >>> net(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 2, 3])
    """
    w = _positive_int(width, "width")
    spec = {"kind": "vresnet18", "width": w}
    return VResNet([w, 2 * w, 4 * w, 8 * w], [2] * 4, [1, 2, 2, 2], num_classes, branches, shared_frac,
                   input_shape, shared_grad, spec)


# ---------------------------------------------------------------- DenseNet


class VDenseLayer(nn.Module):
    """BN -> ReLU -> 1x1 conv (4*growth) -> BN -> ReLU -> 3x3 conv (growth), concatenated to the
    input with the layout ``[all shared pieces] + [all unique pieces]`` (:func:`vcat`)."""

    def __init__(self, c_in: int, s_in: int, growth: int, frac: float, branches: int,
                 shared_grad: str = "mean"):
        super().__init__()
        K, inner = branches, 4 * growth
        self.bn1 = VBatchNorm2d(c_in, K, s_in, shared_grad=shared_grad)
        self.conv1 = VConv2d(c_in, inner, 1, K, s_in, shared_units(frac, inner), bias=False,
                             shared_grad=shared_grad)
        self.bn2 = VBatchNorm2d(inner, K, self.conv1.shared_out, shared_grad=shared_grad)
        self.conv2 = VConv2d(inner, growth, 3, K, self.conv1.shared_out, shared_units(frac, growth),
                             padding=1, bias=False, shared_grad=shared_grad)
        self.act = nn.ReLU()
        self.shared_in = s_in
        self.out_channels = c_in + growth
        self.shared_out = s_in + self.conv2.shared_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.act(self.bn2(self.conv1(self.act(self.bn1(x))))))
        return vcat([x, y], [self.shared_in, self.conv2.shared_out])


class VTransition(nn.Module):
    """BN -> ReLU -> 1x1 conv (``floor(C * compression)`` channels) -> 2x2 average pool."""

    def __init__(self, c_in: int, s_in: int, c_out: int, frac: float, branches: int,
                 shared_grad: str = "mean"):
        super().__init__()
        self.bn = VBatchNorm2d(c_in, branches, s_in, shared_grad=shared_grad)
        self.act = nn.ReLU()
        self.conv = VConv2d(c_in, c_out, 1, branches, s_in, shared_units(frac, c_out), bias=False,
                            shared_grad=shared_grad)
        self.pool = PerBranch(nn.AvgPool2d(2))
        self.shared_out = self.conv.shared_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.act(self.bn(x))))


class VDenseNet(_VModel):
    """DenseNet-BC for CIFAR (Huang et al. 2017) with K virtual branches: 3x3 conv (2*growth)
    -> 3 dense blocks of (depth-4)/6 bottleneck layers with transitions between them -> BN ->
    ReLU -> global average pool -> ``fc`` (Dense, unshared). ``shared_frac``: a float or 3 values,
    one per stage (stage 1 = first conv, dense block 1 and transition 1; stage 2 = block 2 and
    transition 2; stage 3 = block 3)."""

    def __init__(self, depth: int = 100, growth: int = 12, num_classes: int = 10, branches: int = 1,
                 shared_frac: float | Sequence[float] = 0.0, compression: float = 0.5,
                 input_shape: Sequence[int] = (3, 32, 32), shared_grad: str = "mean"):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 10 \
                or (depth - 4) % 6:
            raise ValueError(f"vdensenet_bc depth must be 6n+4 with n >= 1 (10, 16, ..., 100, ...), "
                             f"got {depth!r}")
        growth = _positive_int(growth, "growth")
        num_classes = _positive_int(num_classes, "num_classes")
        if isinstance(compression, bool) or not isinstance(compression, numbers.Real) \
                or not 0.0 < float(compression) <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression!r}")
        K = check_branches(branches)
        c_in, h, w = _image_shape(input_shape, "vdensenet_bc")
        _check_image_size((h, w), 4, "vdensenet_bc")
        fracs = _fracs(shared_frac, 3, "vdensenet_bc", "one per stage")
        n = (int(depth) - 4) // 6
        self.branches, self.shared_fracs = K, fracs
        self.spec = {"kind": "vdensenet_bc", "depth": int(depth), "growth": growth,
                     "num_classes": num_classes, "branches": K, "shared_frac": _json_frac(shared_frac),
                     "compression": float(compression), "input_shape": [c_in, h, w],
                     "shared_grad": shared_grad}
        self.input = VInput(K, (c_in, h, w))
        c = 2 * growth
        self.conv0 = VConv2d(c_in, c, 3, K, c_in, shared_units(fracs[0], c), padding=1, bias=False,
                             shared_grad=shared_grad)
        s = self.conv0.shared_out
        parts: list[nn.Module] = []
        for stage, f in enumerate(fracs):
            for _ in range(n):
                parts.append(VDenseLayer(c, s, growth, f, K, shared_grad))
                c, s = parts[-1].out_channels, parts[-1].shared_out
            if stage < 2:
                c_out = int(c * float(compression))
                if c_out < 1:
                    raise ValueError(f"compression {compression} leaves no channels of {c} in a transition")
                parts.append(VTransition(c, s, c_out, f, K, shared_grad))
                c, s = c_out, parts[-1].shared_out
        self.features = nn.Sequential(*parts)
        self.bn = VBatchNorm2d(c, K, s, shared_grad=shared_grad)
        self.act = nn.ReLU()
        self.pool = VGlobalAvgPool2d()
        self.fc = VLinear(c, num_classes, K, s, 0, shared_grad=shared_grad)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.features(self.conv0(self.input(x)))
        return self.fc(self.pool(self.act(self.bn(x))))


def vdensenet_bc(depth: int = 100, growth: int = 12, num_classes: int = 10, branches: int = 1,
                 shared_frac: float | Sequence[float] = 0.0, compression: float = 0.5,
                 input_shape: Sequence[int] = (3, 32, 32), shared_grad: str = "mean") -> VDenseNet:
    """DenseNet-BC-``depth``-``growth`` with K virtual branches (see :class:`VDenseNet`).

    Example:
        >>> import torch
        >>> net = vdensenet_bc(10, 4, num_classes=3, branches=2, shared_frac=0.5, input_shape=(3, 8, 8))
        >>> net(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 2, 3])
    """
    return VDenseNet(depth, growth, num_classes, branches, shared_frac, compression, input_shape,
                     shared_grad)


# ---------------------------------------------------------------- specs

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "vmlp": vmlp, "vcnn": vcnn, "vresnet": vresnet, "vresnet18": vresnet18, "vdensenet_bc": vdensenet_bc,
}


def build_vmodel(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a virtual model from its ``spec`` (a plain dict, e.g. read back from JSON).

    Example:
        >>> net = vresnet(8, branches=2, shared_frac=[0.5, 0.25, 0.0], width=4)
        >>> build_vmodel(net.spec).spec == net.spec
        True
    """
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in _BUILDERS:
        raise ValueError(f"unknown virtual model kind {kind!r}; known kinds are {sorted(_BUILDERS)}")
    args = {k: v for k, v in spec.items() if k != "kind"}
    try:
        return _BUILDERS[kind](**args)
    except TypeError as e:
        raise ValueError(f"invalid spec for {kind}: {e}") from e
