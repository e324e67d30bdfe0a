"""Loop implementations of the virtual layers, for testing the fused ones.

Each class is built FROM a fused layer (``LoopVLinear.from_fused(layer)``) and uses the very same
parameter (and buffer) objects, so outputs and gradients of the two can be compared. They loop
over branches and sub-blocks exactly as vbranch describes them (REFERENCE 2.1)::

    shared_out_i = SS(shared_in_i) + US_i(unique_in_i)
    unique_out_i = SU_i(shared_in_i) + UU_i(unique_in_i)

with BatchNorm run per branch on the shared slice (tied gamma/beta) and on the unique slice
(the branch's own gamma/beta). Empty (``None``) blocks contribute nothing and are skipped. The loops apply
no gradient scaling: with ``loss = sum_i L_i`` a shared parameter gets the SUM of the branches'
gradients here (the fused layers' ``shared_grad="sum"``); the fused default divides it by K.

Example:
    >>> import torch
    >>> from branchnet.virtual.layers import VLinear
    >>> fused = VLinear(5, 4, branches=3, shared_in=2, shared_out=1)
    >>> x = torch.randn(2, 3, 5)
    >>> torch.allclose(fused(x), LoopVLinear.from_fused(fused)(x), atol=1e-6)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from branchnet.virtual.layers import VBatchNorm1d, VBatchNorm2d, VConv2d, VLinear

__all__ = ["LoopVBatchNorm", "LoopVConv2d", "LoopVLinear"]


def _at(p: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if p is None else p[i]


class _LoopBlocks(nn.Module):
    def __init__(self, fused: VLinear | VConv2d):
        super().__init__()
        self.fused = fused  # registered: the loop module owns no parameters of its own
        self.branches = fused.branches
        self.shared_in, self.shared_out = fused.shared_in, fused.shared_out

    def _block(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor | None:
        """One sub-layer's contribution, or None if the block is empty."""
        return None if w is None else self._op(x, w)

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fused
        s_in, s_out = f.shared_in, f.shared_out
        u_out = f.out_units - s_out
        outs = []
        for i in range(f.branches):
            xi = x[:, i]
            xs, xu = xi[:, :s_in], xi[:, s_in:]
            parts_s = [self._block(xs, f.weight_ss), self._block(xu, _at(f.weight_us, i))]
            parts_u = [self._block(xs, _at(f.weight_su, i)), self._block(xu, _at(f.weight_uu, i))]
            shared_out = self._sum(parts_s, s_out, xi)
            unique_out = self._sum(parts_u, u_out, xi)
            if f.bias_shared is not None:
                shared_out = shared_out + self._bias_view(f.bias_shared)
            if f.bias_unique is not None:
                unique_out = unique_out + self._bias_view(f.bias_unique[i])
            outs.append(torch.cat([shared_out, unique_out], dim=1))
        return torch.stack(outs, dim=1)

    def _sum(self, parts: list[torch.Tensor | None], n_out: int, xi: torch.Tensor) -> torch.Tensor:
        present = [p for p in parts if p is not None]
        if present:
            return present[0] if len(present) == 1 else present[0] + present[1]
        return self._zeros(xi, n_out)

    def _zeros(self, xi: torch.Tensor, n_out: int) -> torch.Tensor:
        raise NotImplementedError

    def _bias_view(self, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LoopVLinear(_LoopBlocks):
    """:class:`~branchnet.virtual.layers.VLinear` as a loop of ``F.linear`` per branch and block."""

    @classmethod
    def from_fused(cls, layer: VLinear) -> LoopVLinear:
        if not isinstance(layer, VLinear):
            raise ValueError(f"LoopVLinear.from_fused needs a VLinear, got {type(layer).__name__}")
        return cls(layer)

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w)

    def _zeros(self, xi: torch.Tensor, n_out: int) -> torch.Tensor:
        return xi.new_zeros(xi.shape[0], n_out)

    def _bias_view(self, b: torch.Tensor) -> torch.Tensor:
        return b


class LoopVConv2d(_LoopBlocks):
    """:class:`~branchnet.virtual.layers.VConv2d` as a loop of ``F.conv2d`` per branch and block."""

    @classmethod
    def from_fused(cls, layer: VConv2d) -> LoopVConv2d:
        if not isinstance(layer, VConv2d):
            raise ValueError(f"LoopVConv2d.from_fused needs a VConv2d, got {type(layer).__name__}")
        return cls(layer)

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        f = self.fused
        return F.conv2d(x, w, None, f.stride, f.padding, f.dilation)

    def _zeros(self, xi: torch.Tensor, n_out: int) -> torch.Tensor:
        # the output size of this convolution, from a one-channel dummy run
        f = self.fused
        probe = F.conv2d(xi[:, :1].detach() * 0, xi.new_zeros(1, 1, *f.kernel_size), None, f.stride,
                         f.padding, f.dilation)
        return xi.new_zeros(xi.shape[0], n_out, *probe.shape[-2:])

    def _bias_view(self, b: torch.Tensor) -> torch.Tensor:
        return b.view(-1, 1, 1)


class LoopVBatchNorm(nn.Module):
    """:class:`~branchnet.virtual.layers.VBatchNorm1d` / ``2d`` as one ``F.batch_norm`` per branch
    and per slice (shared slice with the tied gamma/beta, unique slice with the branch's own),
    updating the fused layer's running statistics (views of its buffers)."""

    def __init__(self, fused: VBatchNorm1d | VBatchNorm2d):
        super().__init__()
        self.fused = fused
        self.branches = fused.branches
        self.shared = fused.shared

    @classmethod
    def from_fused(cls, layer: VBatchNorm1d | VBatchNorm2d) -> LoopVBatchNorm:
        if not isinstance(layer, (VBatchNorm1d, VBatchNorm2d)):
            raise ValueError(f"LoopVBatchNorm.from_fused needs a VBatchNorm1d/2d, got {type(layer).__name__}")
        return cls(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fused
        s = f.shared
        training = f.training  # follow the fused layer's mode (train()/eval() reach it through us)
        outs = []
        for i in range(f.branches):
            xi = x[:, i]
            pieces = []
            unique = slice(s, f.num_features)
            for sl, gamma, beta in ((slice(0, s), f.gamma_shared, f.beta_shared),
                                    (unique, _at(f.gamma_unique, i), _at(f.beta_unique, i))):
                part = xi[:, sl]
                if part.shape[1] == 0:
                    continue
                pieces.append(F.batch_norm(part, f.running_mean[i, sl], f.running_var[i, sl], gamma, beta,
                                           training, f.momentum, f.eps))
            outs.append(torch.cat(pieces, dim=1))
        return torch.stack(outs, dim=1)
