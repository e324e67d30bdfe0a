"""Ready-made networks: parents and branch heads.

Every model built here carries a JSON ``spec`` so that a saved tree can rebuild it from
safetensors + JSON alone (:func:`build`). Any other ``nn.Module`` works as a parent or head too;
then pass the module again when loading.

Example:
    >>> import torch
    >>> net = mlp([64, 256, 128], num_classes=10)
    >>> net(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    >>> build(net.spec)(torch.zeros(2, 64)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class Dense(nn.Module):
    """Linear -> ReLU -> Dropout. Tap ``.linear`` for the pre-activation output."""

    def __init__(self, n_in: int, n_out: int, dropout: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.linear(x)))


class MLP(nn.Module):
    """Flatten -> ``hidden`` (a stack of :class:`Dense`) -> ``head`` (Linear).

    ``sizes = [n_in, h1, h2, ...]``. Layer names: ``hidden.0``, ``hidden.0.linear`` (pre-ReLU),
    ..., ``head``.
    """

    def __init__(self, sizes: Sequence[int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        sizes = [int(s) for s in sizes]
        if len(sizes) < 1 or any(s < 1 for s in sizes) or num_classes < 1:
            raise ValueError(f"MLP sizes must be positive integers, got {sizes} -> {num_classes}")
        self.spec = {"kind": "mlp", "sizes": sizes, "num_classes": int(num_classes),
                     "dropout": float(dropout)}
        self.flatten = nn.Flatten()
        self.hidden = nn.Sequential(
            *[Dense(a, b, dropout) for a, b in itertools.pairwise(sizes)]
        )
        self.head = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        if not torch.jit.is_tracing() and x.shape[1] != self.spec["sizes"][0]:
            raise ValueError(
                f"MLP expects {self.spec['sizes'][0]} input features, got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        return self.head(self.hidden(x))


class SmallCNN(nn.Module):
    """Conv stages (3x3 conv -> BN -> ReLU -> 2x2 max-pool), global average pool,
    ``hidden`` (Dense) and ``head``. Tap ``hidden`` or ``hidden.linear`` for branch input."""

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        hidden: int = 256,
        num_classes: int = 10,
        dropout: float = 0.0,
    ):
        super().__init__()
        widths = [int(w) for w in widths]
        self.spec = {"kind": "cnn", "in_channels": int(in_channels), "widths": widths,
                     "hidden": int(hidden), "num_classes": int(num_classes),
                     "dropout": float(dropout)}
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hidden = Dense(c, hidden, dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (x.ndim != 4 or x.shape[1] != self.spec["in_channels"]):
            raise ValueError(
                f"SmallCNN expects images [N, {self.spec['in_channels']}, H, W], "
                f"got shape {tuple(x.shape)}"
            )
        return self.head(self.hidden(self.pool(self.features(x))))


def mlp(sizes: Sequence[int], num_classes: int, dropout: float = 0.0) -> MLP:
    """An MLP ``sizes[0] -> sizes[1] -> ... -> num_classes`` (see :class:`MLP`)."""
    return MLP(sizes, num_classes, dropout)


def cnn(in_channels: int = 3, widths: Sequence[int] = (32, 64, 128), hidden: int = 256,
        num_classes: int = 10, dropout: float = 0.0) -> SmallCNN:
    """A small CNN (see :class:`SmallCNN`)."""
    return SmallCNN(in_channels, widths, hidden, num_classes, dropout)


def branch_head(n_in: int, n_out: int, hidden: int = 256, dropout: float = 0.5) -> MLP:
    """The default branch: ``n_in -> hidden -> n_out`` with dropout, as in Neural-Branching
    (512 -> 256 -> 3, Dropout 0.5). Its hidden layer ``hidden.0`` can itself be tapped."""
    return MLP([n_in, hidden], n_out, dropout)


_BUILDERS = {
    "mlp": lambda s: MLP(s["sizes"], s["num_classes"], s.get("dropout", 0.0)),
    "cnn": lambda s: SmallCNN(s["in_channels"], s["widths"], s["hidden"], s["num_classes"],
                              s.get("dropout", 0.0)),
}


def build(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its ``spec`` (a plain dict, as stored in JSON)."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in _BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; known kinds are {sorted(_BUILDERS)}")
    return _BUILDERS[kind](spec)


def spec_of(model: nn.Module) -> dict[str, Any] | None:
    """The model's spec if branchnet can rebuild it, else None."""
    # exact classes only: a subclass may change forward() and would be rebuilt wrongly
    if type(model) not in (MLP, SmallCNN):
        return None
    return dict(model.spec)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
