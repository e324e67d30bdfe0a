"""Fused virtual-branch layers: K branches of one network in one set of tensor ops.

Layout
    Every virtual activation has shape ``(B, K, C, H, W)`` (images) or ``(B, K, F)`` (vectors):
    dim 1 is the branch. Within a branch the channels (features) are ordered
    ``[shared part, unique part]``; each layer records the split as ints (``shared_in`` /
    ``shared_out`` or ``shared``), so models can track it. Each of :class:`VLinear`,
    :class:`VConv2d`, :class:`VBatchNorm1d` / ``2d`` and :class:`VInput` states its output as
    ``branch_layout = (K, C, shared)``: :mod:`branchnet.analysis` reads that attribute (and
    ``VInput.input_shape``) without importing this module.

Blocks (vbranch, REFERENCE 2.1)
    A linear or convolutional layer is a 2 x 2 block matrix per branch ``i``::

        shared_out_i = SS  (shared_in_i) + US_i(unique_in_i)
        unique_out_i = SU_i(shared_in_i) + UU_i(unique_in_i)

    Only ``SS`` is tied across branches (``weight_ss``: 2-D ``(out, in)`` / 4-D
    ``(out, in, kh, kw)``); ``weight_su``, ``weight_us``, ``weight_uu`` carry a leading K
    (3-D / 5-D). A first layer that reads the raw input (the same tensor for every branch) passes
    ``shared_in = in_features``. An empty block (0 units on one side, e.g. ``weight_us`` of a
    first layer, or everything shared at s = 1) is skipped: the attribute is ``None``, as a
    missing bias is in ``torch.nn``, so no zero-size parameter ever appears. Every weight
    parameter has ``weight`` in its name; BatchNorm's affine parameters are called ``gamma_*`` /
    ``beta_*`` so that code selecting weights by name never picks them.

Fused
    The forward pass assembles the per-branch full weight ``(K, out, in, ...)`` from the blocks
    and runs ONE batched matmul (:class:`VLinear`), ONE grouped convolution with ``groups=K``
    (:class:`VConv2d`) or ONE ``F.batch_norm`` (:class:`VBatchNorm1d` / ``2d``) for all
    branches. When the input is broadcast (one batch for all branches, stride 0 on dim 1) the
    layer runs one dense op on that batch instead of copying it K times.

Shared gradients are the MEAN over branches
    Training sums the per-branch losses, ``loss = sum_i L_i`` (each branch on its own batch).
    Unique parameters of branch i then get ``dL_i``; a shared parameter would get the SUM of the
    branches' gradients. With ``shared_grad="mean"`` (the default) every layer scales the
    gradient reaching its shared parameters by ``1/K``, so they get the mean (vbranch,
    REFERENCE 2.2; it matters for SGD step sizes). The scaling is a node in the autograd graph
    (identity forward, ``grad / K`` backward) applied where the shared parameter enters the
    forward pass: it survives ``copy.deepcopy`` and ``torch.func`` (tensor hooks do not), and it
    scales only gradients that flow through the branches, not a penalty such as an L2 term added
    on the parameter itself. ``shared_grad="sum"`` leaves the sum.

Example:
    >>> import torch
    >>> layer = VLinear(6, 4, branches=3, shared_in=6, shared_out=2)   # a first layer
    >>> layer(torch.randn(5, 3, 6)).shape
    torch.Size([5, 3, 4])
    >>> layer.weight_ss.shape, layer.weight_su.shape, layer.weight_us
    (torch.Size([2, 6]), torch.Size([3, 2, 6]), None)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PerBranch",
    "VBatchNorm1d",
    "VBatchNorm2d",
    "VConv2d",
    "VFlatten",
    "VGlobalAvgPool2d",
    "VInput",
    "VLinear",
    "check_branches",
    "shared_units",
    "vcat",
]

SHARED_GRADS = ("mean", "sum")


def shared_units(frac: float | int, units: int) -> int:
    """How many of ``units`` are shared: a float ``f`` in [0, 1] gives ``int(f * units)``
    (floor), an int is an absolute count in [0, units].

    Example:
        >>> shared_units(0.5, 7), shared_units(3, 7), shared_units(1.0, 7)
        (3, 3, 7)
    """
    units = _count(units, "units")
    if isinstance(frac, bool) or not isinstance(frac, numbers.Real):
        raise ValueError(f"shared must be a fraction (float in [0, 1]) or a count of units "
                         f"(int in [0, {units}]), got {frac!r}")
    if isinstance(frac, numbers.Integral):
        if not 0 <= int(frac) <= units:
            raise ValueError(f"shared count {frac} is outside [0, {units}] (the layer has {units} units)")
        return int(frac)
    f = float(frac)
    if not 0.0 <= f <= 1.0:  # also rejects NaN
        raise ValueError(f"shared fraction {frac!r} is outside [0, 1]")
    return int(f * units)


def check_branches(branches: int) -> int:
    """``branches`` as an int >= 1, else ValueError."""
    if isinstance(branches, bool) or not isinstance(branches, numbers.Integral) or branches < 1:
        raise ValueError(f"branches must be an int >= 1, got {branches!r}")
    return int(branches)


def _count(n: Any, what: str, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {n!r}")
    return int(n)


def _check_shared_grad(shared_grad: str) -> str:
    if shared_grad not in SHARED_GRADS:
        raise ValueError(f"shared_grad must be one of {list(SHARED_GRADS)}, got {shared_grad!r}")
    return shared_grad


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class _SharedGradMixin:
    branches: int
    shared_grad: str
    _shapes: dict[str, tuple[int, ...]]

    def _register(self, name: str, shape: tuple[int, ...], fill: float | None = None) -> None:
        """A parameter of ``shape``, or ``None`` when the block is empty."""
        self._shapes[name] = shape
        p = None
        if math.prod(shape) > 0:
            p = nn.Parameter(torch.empty(shape) if fill is None else torch.full(shape, fill))
        self.register_parameter(name, p)  # type: ignore[attr-defined]

    def _get(self, name: str) -> torch.Tensor:
        """The parameter, or an empty tensor of its (zero-size) shape for a skipped block."""
        p = getattr(self, name)
        if p is not None:
            return p
        like = next(self.parameters())  # type: ignore[attr-defined]
        return like.new_empty(self._shapes[name])

    def _shared(self, p: torch.Tensor) -> torch.Tensor:
        """``p`` as it enters the forward pass: gradient scaled by 1/K under ``"mean"``."""
        if self.shared_grad == "mean" and self.branches > 1 and p.requires_grad and p.numel() \
                and torch.is_grad_enabled():
            return _ScaleGrad.apply(p, 1.0 / self.branches)
        return p


def _check_input(x: torch.Tensor, layer: str, branches: int, channels: int, ndims: Sequence[int],
                 layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{layer} expects a tensor {layout}, got {type(x).__name__}")
    if x.ndim not in ndims or x.shape[1] != branches or x.shape[2] != channels:
        raise ValueError(f"{layer} expects {layout} with K={branches} and C={channels}, "
                         f"got shape {tuple(x.shape)}")


class _VBlocks(_SharedGradMixin, nn.Module):
    """The four weight blocks and two bias pieces of a virtual linear/conv layer."""

    def __init__(self, n_in: int, n_out: int, kernel: tuple[int, ...], branches: int,
                 shared_in: float | int, shared_out: float | int, bias: bool, shared_grad: str):
        super().__init__()
        self.in_units = _count(n_in, "in size")
        self.out_units = _count(n_out, "out size")
        self.branches = check_branches(branches)
        self.shared_in = shared_units(shared_in, self.in_units)
        self.shared_out = shared_units(shared_out, self.out_units)
        self.shared_grad = _check_shared_grad(shared_grad)
        K, s_in, s_out = self.branches, self.shared_in, self.shared_out
        u_in, u_out = self.in_units - s_in, self.out_units - s_out
        self.kernel = tuple(kernel)
        self.has_bias = bool(bias)
        self._shapes = {}
        self._register("weight_ss", (s_out, s_in, *kernel))
        self._register("weight_su", (K, u_out, s_in, *kernel))
        self._register("weight_us", (K, s_out, u_in, *kernel))
        self._register("weight_uu", (K, u_out, u_in, *kernel))
        self._register("bias_shared", (s_out,) if bias else (0,), 0.0)
        self._register("bias_unique", (K, u_out) if bias else (K, 0), 0.0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal weights, std sqrt(2 / fan_in) with fan_in = whole input width x kernel
        area (the same for every block of a branch); zero biases."""
        fan_in = self.in_units * math.prod(self.kernel)
        std = math.sqrt(2.0 / fan_in)
        with torch.no_grad():
            for w in (self.weight_ss, self.weight_su, self.weight_us, self.weight_uu):
                if w is not None:
                    w.normal_(0.0, std)
            for b in (self.bias_shared, self.bias_unique):
                if b is not None:
                    b.zero_()

    def full_weight(self) -> torch.Tensor:
        """Every branch's whole weight, ``(K, out, in, *kernel)``: ``[[SS, US_i], [SU_i, UU_i]]``."""
        K = self.branches
        ss = self._shared(self._get("weight_ss"))
        ss = ss.expand(K, *ss.shape)
        top = torch.cat([ss, self._get("weight_us")], dim=2)
        bottom = torch.cat([self._get("weight_su"), self._get("weight_uu")], dim=2)
        return torch.cat([top, bottom], dim=1)

    def full_bias(self) -> torch.Tensor | None:
        """Every branch's bias ``(K, out)``: ``[shared vector, unique vector of branch i]``."""
        if not self.has_bias:
            return None
        shared = self._shared(self._get("bias_shared")).expand(self.branches, -1)
        return torch.cat([shared, self._get("bias_unique")], dim=1)

    @property
    def branch_layout(self) -> tuple[int, int, int]:
        """``(K, C, shared)`` of the output: K branches of C units, the first ``shared`` shared."""
        return self.branches, self.out_units, self.shared_out

    def _broadcast(self, x: torch.Tensor) -> bool:
        """True when every branch reads the same data (K = 1 or stride 0 on the branch dim)."""
        return self.branches == 1 or x.stride(1) == 0

    def extra_repr(self) -> str:
        return (f"{self.in_units}, {self.out_units}, branches={self.branches}, shared_in={self.shared_in}, "
                f"shared_out={self.shared_out}, bias={self.has_bias}, "
                f"shared_grad={self.shared_grad!r}")


class VLinear(_VBlocks):
    """K fused linear layers with a tied shared->shared block.

    Args:
        in_features, out_features: per-branch widths.
        branches: K >= 1.
        shared_in, shared_out: shared units of the input / output (see :func:`shared_units`:
            a float is a fraction, an int a count). A first layer on the raw input passes
            ``shared_in=in_features``: ``n_in * n_out * (s + K (1 - s))`` weights.
        bias: one shared bias vector for the shared outputs ``(s_out,)`` and one per branch for
            the unique outputs ``(K, u_out)``: ``s_out + K * u_out`` biases.
        shared_grad: ``"mean"`` (default) or ``"sum"``, see the module docstring.

    Forward: ``(B, K, in_features)`` -> ``(B, K, out_features)``.

    Example:
        >>> import torch
        >>> layer = VLinear.fractional(8, 4, branches=2, shared_in_frac=0.5, shared_out_frac=0.5)
        >>> layer.shared_in, layer.shared_out, layer(torch.randn(3, 2, 8)).shape
        (4, 2, torch.Size([3, 2, 4]))
    """

    def __init__(self, in_features: int, out_features: int, branches: int, shared_in: float | int,
                 shared_out: float | int, bias: bool = True, shared_grad: str = "mean"):
        super().__init__(in_features, out_features, (), branches, shared_in, shared_out, bias, shared_grad)
        self.in_features = self.in_units
        self.out_features = self.out_units

    @classmethod
    def fractional(cls, in_features: int, out_features: int, branches: int, shared_in_frac: float,
                   shared_out_frac: float, bias: bool = True, shared_grad: str = "mean") -> VLinear:
        """The layer with fractions (floats in [0, 1]; ints 0 and 1 count as 0.0 and 1.0)."""
        return cls(in_features, out_features, branches, _as_frac(shared_in_frac),
                   _as_frac(shared_out_frac), bias, shared_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, "VLinear", self.branches, self.in_features, (3,), "(B, K, in_features)")
        K, n_out = self.branches, self.out_features
        w, b = self.full_weight(), self.full_bias()
        if self._broadcast(x):  # one (B, in) @ (in, K*out) for all branches
            y = F.linear(x[:, 0], w.reshape(K * n_out, -1), None if b is None else b.reshape(-1))
            return y.unflatten(1, (K, n_out))
        xt, wt = x.transpose(0, 1), w.transpose(1, 2)  # (K, B, in), (K, in, out)
        y = torch.bmm(xt, wt) if b is None else torch.baddbmm(b.unsqueeze(1), xt, wt)
        return y.transpose(0, 1)


class VConv2d(_VBlocks):
    """K fused 2-D convolutions with a tied shared->shared block: one grouped ``F.conv2d``
    (or one dense conv per branch with ``conv_impl = "split"``).

    Same block semantics and arguments as :class:`VLinear` (channels instead of features),
    plus ``kernel_size``, ``stride``, ``padding`` and ``dilation`` as in ``nn.Conv2d``.

    Forward: ``(B, K, in_channels, H, W)`` -> ``(B, K, out_channels, H', W')``.

    Example:
        >>> import torch
        >>> conv = VConv2d(3, 8, 3, branches=2, shared_in=3, shared_out=0.25, padding=1)
        >>> conv(torch.randn(4, 2, 3, 8, 8)).shape, conv.shared_out
        (torch.Size([4, 2, 8, 8, 8]), 2)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 branches: int, shared_in: float | int, shared_out: float | int,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, bias: bool = True, shared_grad: str = "mean"):
        kernel = _pair(kernel_size, "kernel_size")
        super().__init__(in_channels, out_channels, kernel, branches, shared_in, shared_out, bias,
                         shared_grad)
        self.in_channels = self.in_units
        self.out_channels = self.out_units
        self.kernel_size = kernel
        self.stride = _pair(stride, "stride")
        self.padding = padding if isinstance(padding, str) else _pair(padding, "padding", minimum=0)
        self.dilation = _pair(dilation, "dilation")
        #: per-branch batches: "grouped" (one conv with groups=K, the default) or "split" (K
        #: dense convs; on a busy CPU the grouped kernels can be slower, see docs/benchmarks.md)
        self.conv_impl = "grouped"

    @classmethod
    def fractional(cls, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                   branches: int, shared_in_frac: float, shared_out_frac: float,
                   **kwargs: Any) -> VConv2d:
        """The layer with fractions (floats in [0, 1]; ints 0 and 1 count as 0.0 and 1.0)."""
        return cls(in_channels, out_channels, kernel_size, branches, _as_frac(shared_in_frac),
                   _as_frac(shared_out_frac), **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, "VConv2d", self.branches, self.in_channels, (5,), "(B, K, C, H, W)")
        K, n_out = self.branches, self.out_channels
        w, b = self.full_weight().flatten(0, 1), self.full_bias()
        b = None if b is None else b.reshape(-1)
        if self._broadcast(x):  # one dense conv with K*out filters on the shared batch
            y = F.conv2d(x[:, 0], w, b, self.stride, self.padding, self.dilation)
        elif self.conv_impl == "split":  # one dense conv per branch (see conv_impl)
            ws, bs = w.unflatten(0, (K, n_out)), None if b is None else b.unflatten(0, (K, n_out))
            return torch.stack([F.conv2d(x[:, k], ws[k], None if bs is None else bs[k], self.stride,
                                         self.padding, self.dilation) for k in range(K)], dim=1)
        else:
            y = F.conv2d(x.flatten(1, 2), w, b, self.stride, self.padding, self.dilation, groups=K)
        return y.unflatten(1, (K, n_out))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")


def _as_frac(f: float) -> float:
    if isinstance(f, bool) or not isinstance(f, numbers.Real):
        raise ValueError(f"a shared fraction must be a float in [0, 1], got {f!r}")
    return float(f)


def _pair(v: Any, what: str, minimum: int = 1) -> tuple[int, int]:
    vals = (v, v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else tuple(v)
    if len(vals) != 2 or any(isinstance(a, bool) or not isinstance(a, numbers.Integral) or a < minimum
                             for a in vals):
        raise ValueError(f"{what} must be an int >= {minimum} or a pair of them, got {v!r}")
    return int(vals[0]), int(vals[1])


class _VBatchNorm(_SharedGradMixin, nn.Module):
    _ndims: tuple[int, ...] = ()
    _layout = ""

    def __init__(self, num_features: int, branches: int, shared: float | int, eps: float = 1e-5,
                 momentum: float = 0.1, shared_grad: str = "mean"):
        super().__init__()
        self.num_features = _count(num_features, "num_features")
        self.branches = check_branches(branches)
        self.shared = shared_units(shared, self.num_features)
        self.shared_in = self.shared_out = self.shared
        self.shared_grad = _check_shared_grad(shared_grad)
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        if not float(eps) > 0.0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps, self.momentum = float(eps), float(momentum)
        K, s, u = self.branches, self.shared, self.num_features - self.shared
        self._shapes = {}
        self._register("gamma_shared", (s,), 1.0)
        self._register("beta_shared", (s,), 0.0)
        self._register("gamma_unique", (K, u), 1.0)
        self._register("beta_unique", (K, u), 0.0)
        self.register_buffer("running_mean", torch.zeros(K, self.num_features))
        self.register_buffer("running_var", torch.ones(K, self.num_features))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    def full_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every branch's ``gamma`` and ``beta``, ``(K, C)`` each."""
        K = self.branches
        gamma, beta = (torch.cat([self._shared(self._get(f"{n}_shared")).expand(K, -1),
                                  self._get(f"{n}_unique")], dim=1) for n in ("gamma", "beta"))
        return gamma, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, type(self).__name__, self.branches, self.num_features, self._ndims, self._layout)
        gamma, beta = self.full_affine()
        y = F.batch_norm(x.flatten(1, 2), self.running_mean.view(-1), self.running_var.view(-1),
                         gamma.reshape(-1), beta.reshape(-1), self.training, self.momentum, self.eps)
        return y.unflatten(1, (self.branches, self.num_features))

    @property
    def branch_layout(self) -> tuple[int, int, int]:
        """``(K, C, shared)`` of the output: K branches of C units, the first ``shared`` shared."""
        return self.branches, self.num_features, self.shared

    def extra_repr(self) -> str:
        return (f"{self.num_features}, branches={self.branches}, shared={self.shared}, eps={self.eps}, "
                f"momentum={self.momentum}, shared_grad={self.shared_grad!r}")


class VBatchNorm1d(_VBatchNorm):
    """Per-branch BatchNorm of ``(B, K, F)``: statistics per branch for every feature (running
    statistics per branch, used in eval mode; the original vbranch used batch statistics even at
    test time), affine ``gamma/beta`` of the shared slice tied across branches
    (``gamma_shared (s,)``), of the unique slice per branch (``gamma_unique (K, F - s)``); an
    empty slice's parameters are ``None``.
    One ``F.batch_norm`` over the ``(B, K*F)`` view.

    Example:
        >>> import torch
        >>> bn = VBatchNorm1d(6, branches=2, shared=0.5)
        >>> bn(torch.randn(8, 2, 6)).shape, bn.running_mean.shape
        (torch.Size([8, 2, 6]), torch.Size([2, 6]))
    """

    _ndims = (3,)
    _layout = "(B, K, F)"


class VBatchNorm2d(_VBatchNorm):
    """:class:`VBatchNorm1d` for images ``(B, K, C, H, W)`` (one ``F.batch_norm`` over the
    ``(B, K*C, H, W)`` view).

    Example:
        >>> import torch
        >>> VBatchNorm2d(4, branches=3, shared=1)(torch.randn(2, 3, 4, 5, 5)).shape
        torch.Size([2, 3, 4, 5, 5])
    """

    _ndims = (5,)
    _layout = "(B, K, C, H, W)"


class PerBranch(nn.Module):
    """Apply a stateless module (ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten, Dropout,
    ZeroPad2d, ...) to every branch: runs it on the ``(B*K, ...)`` view and restores
    ``(B, K, ...)``. Channel order, hence the ``[shared, unique]`` split, is kept (Flatten of
    ``(C, H, W)`` puts the ``shared * H * W`` shared features first). Elementwise modules such as
    ReLU also work on ``(B, K, ...)`` directly, without this wrapper.

    Example:
        >>> import torch
        >>> pool = PerBranch(torch.nn.MaxPool2d(2))
        >>> pool(torch.randn(2, 3, 4, 8, 8)).shape
        torch.Size([2, 3, 4, 4, 4])
    """

    def __init__(self, module: nn.Module, branches: int | None = None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ValueError(f"PerBranch wraps an nn.Module, got {type(module).__name__}")
        state = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
        if state:
            raise ValueError(f"PerBranch applies stateless modules only; {type(module).__name__} has "
                             f"parameters or buffers {state[:4]} (use VLinear / VConv2d / VBatchNorm*)")
        self.module = module
        self.branches = None if branches is None else check_branches(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or (self.branches is not None and x.shape[1] != self.branches):
            raise ValueError(f"PerBranch({type(self.module).__name__}) expects (B, K, ...)"
                             f"{'' if self.branches is None else f' with K={self.branches}'}, "
                             f"got shape {tuple(x.shape)}")
        B, K = x.shape[:2]
        return self.module(x.flatten(0, 1)).unflatten(0, (B, K))


class VFlatten(nn.Module):
    """``(B, K, C, H, W)`` -> ``(B, K, C*H*W)`` (a view when possible, also of a broadcast
    input); the shared channels' features come first.

    Example:
        >>> import torch
        >>> VFlatten()(torch.zeros(2, 3, 4, 5, 5)).shape
        torch.Size([2, 3, 100])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3:
            raise ValueError(f"VFlatten expects (B, K, ...) with at least one feature dim, "
                             f"got shape {tuple(x.shape)}")
        return x.flatten(2)


class VGlobalAvgPool2d(nn.Module):
    """``(B, K, C, H, W)`` -> ``(B, K, C)``: the mean over H and W.

    Example:
        >>> import torch
        >>> VGlobalAvgPool2d()(torch.ones(2, 3, 4, 5, 5)).shape
        torch.Size([2, 3, 4])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"VGlobalAvgPool2d expects (B, K, C, H, W), got shape {tuple(x.shape)}")
        return x.mean(dim=(-2, -1))


class VInput(nn.Module):
    """The entry of a virtual model: turns what a caller gives into ``(B, K, *input_shape)``.

    Accepts
        * ``(B, *input_shape)``: one batch for all branches, broadcast (``expand``, no copy);
        * ``(B, K, *input_shape)``: one batch per branch, passed through;
        * a list/tuple of K tensors ``(B, *input_shape)``: per-branch batches, stacked on dim 1
          (they must have the same batch size).

    Example:
        >>> import torch
        >>> inp = VInput(3, (4,))
        >>> inp(torch.zeros(2, 4)).shape, inp([torch.zeros(2, 4)] * 3).shape
        (torch.Size([2, 3, 4]), torch.Size([2, 3, 4]))
    """

    def __init__(self, branches: int, input_shape: int | Sequence[int]):
        super().__init__()
        self.branches = check_branches(branches)
        shape = (input_shape,) if isinstance(input_shape, numbers.Integral) else tuple(input_shape)
        if not shape or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1
                            for d in shape):
            raise ValueError(f"input_shape must be positive ints, got {input_shape!r}")
        self.input_shape = tuple(int(d) for d in shape)

    @property
    def branch_layout(self) -> tuple[int, int, int]:
        """``(K, C, C)``: the raw input's C channels are the same (shared) in every branch."""
        c = self.input_shape[0]
        return self.branches, c, c

    def _accepted(self) -> str:
        s = ", ".join(str(d) for d in self.input_shape)
        return (f"(B, {s}) (one batch for all branches) or (B, {self.branches}, {s}) "
                f"(one batch per branch), or a list of {self.branches} tensors (B, {s})")

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        shape, K = self.input_shape, self.branches
        if isinstance(x, (list, tuple)):
            if len(x) != K or not all(isinstance(t, torch.Tensor) for t in x):
                raise ValueError(f"VInput expects {self._accepted()}; got a {type(x).__name__} of "
                                 f"{len(x)} items")
            bad = [tuple(t.shape) for t in x if tuple(t.shape[1:]) != shape or t.ndim != len(shape) + 1]
            if bad:
                raise ValueError(f"VInput expects {self._accepted()}; got per-branch shapes "
                                 f"{[tuple(t.shape) for t in x]}")
            sizes = [int(t.shape[0]) for t in x]
            if len(set(sizes)) > 1:
                raise ValueError(f"per-branch batches of different sizes: {sizes}")
            return torch.stack(list(x), dim=1)
        if isinstance(x, torch.Tensor):
            if x.ndim == len(shape) + 1 and tuple(x.shape[1:]) == shape:
                return x.unsqueeze(1).expand(x.shape[0], K, *shape)
            if x.ndim == len(shape) + 2 and x.shape[1] == K and tuple(x.shape[2:]) == shape:
                return x
            raise ValueError(f"VInput expects {self._accepted()}; got shape {tuple(x.shape)}")
        raise ValueError(f"VInput expects {self._accepted()}; got {type(x).__name__}")

    def extra_repr(self) -> str:
        return f"branches={self.branches}, input_shape={self.input_shape}"


def vcat(tensors: Sequence[torch.Tensor], shared: Sequence[int]) -> torch.Tensor:
    """Concatenate virtual tensors on the channel dim (dim 2) keeping the layout
    ``[all shared pieces] + [all unique pieces]`` (``shared[j]`` = shared channels of
    ``tensors[j]``). One ``torch.cat`` of slices.

    Example:
        >>> import torch
        >>> a = torch.tensor([1., 2., 3.]).view(1, 1, 3)   # shared [1], unique [2, 3]
        >>> b = torch.tensor([4., 5.]).view(1, 1, 2)       # shared [4, 5], unique []
        >>> vcat([a, b], [1, 2]).flatten().tolist()
        [1.0, 4.0, 5.0, 2.0, 3.0]
    """
    if len(tensors) != len(shared):
        raise ValueError(f"vcat needs one shared count per tensor, got {len(tensors)} tensors and "
                         f"{len(shared)} counts")
    for t, s in zip(tensors, shared, strict=True):
        if not 0 <= s <= t.shape[2]:
            raise ValueError(f"shared count {s} is outside [0, {t.shape[2]}] for a tensor of shape "
                             f"{tuple(t.shape)}")
    pairs = list(zip(tensors, shared, strict=True))
    pieces = [t[:, :, :s] for t, s in pairs] + [t[:, :, s:] for t, s in pairs]
    return torch.cat(pieces, dim=2)
