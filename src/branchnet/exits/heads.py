"""Exit heads: small classifiers on a tapped layer's output (SDN's internal classifiers).

A feature map ``[C, H, W]`` (or a sequence ``[L, D]``, pooled over its first axis) is first
average-pooled to a small fixed grid, so a head on an early convolution stays small; vectors
are used as they are. Then a linear layer, or one hidden layer (ReLU, dropout) and a linear
layer.

Example:
    >>> import torch
    >>> head = ExitHead((16, 8, 8), 10, hidden=32, pool=2)
    >>> head(torch.randn(5, 16, 8, 8)).shape, head.in_features
    (torch.Size([5, 10]), 64)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["ExitHead"]


class ExitHead(nn.Module):
    """``pool`` → flatten → (``hidden`` units, ReLU, dropout)? → ``num_classes`` logits.

    Args:
        shape: one input's shape (without the batch axis), as the tap gives it.
        num_classes: outputs.
        hidden: hidden units; 0 for a linear head.
        pool: side of the average-pooled grid for ``[C, H, W]`` maps (``[L, D]`` inputs are
            averaged over ``L``); ignored for vectors.
        dropout: dropout before the last layer (with ``hidden > 0``).
    """

    def __init__(self, shape: tuple[int, ...] | list[int], num_classes: int, *, hidden: int = 0,
                 pool: int = 2, dropout: float = 0.0, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.shape, self.num_classes = tuple(int(s) for s in shape), int(num_classes)
        self.hidden, self.pool_size, self.dropout = int(hidden), int(pool), float(dropout)
        if len(self.shape) == 3:
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(self.pool_size)
            n_in = self.shape[0] * self.pool_size ** 2
        else:
            self.pool = nn.Identity()
            n_in = self.shape[-1] if len(self.shape) == 2 else math.prod(self.shape)
        self.in_features = n_in
        kw = {"device": device, "dtype": dtype}
        if self.hidden:
            self.body: nn.Module = nn.Sequential(nn.Linear(n_in, self.hidden, **kw), nn.ReLU(),
                                                 nn.Dropout(self.dropout))
            n_in = self.hidden
        else:
            self.body = nn.Identity()
        self.out = nn.Linear(n_in, self.num_classes, **kw)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # [N, L, D]: the mean over the sequence
            x = x.mean(dim=1)
        return self.out(self.body(self.pool(x).flatten(1)))

    def spec(self) -> dict[str, Any]:
        """Arguments that rebuild this head (``ExitHead(**spec)``)."""
        return {"shape": list(self.shape), "num_classes": self.num_classes,
                "hidden": self.hidden, "pool": self.pool_size, "dropout": self.dropout}

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, num_classes={self.num_classes}, hidden={self.hidden}, "
                f"pool={self.pool_size}")
