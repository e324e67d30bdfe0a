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
        if isinstance(x, torch.Tensor) and not torch.jit.is_tracing() and (
                x.shape[1] != self.spec["sizes"][0]):
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
        # fx proxies are not tensors: the check is skipped while tracing (staged exits)
        if isinstance(x, torch.Tensor) and not torch.jit.is_tracing() and (
                x.ndim != 4 or x.shape[1] != self.spec["in_channels"]):
            raise ValueError(
                f"SmallCNN expects images [N, {self.spec['in_channels']}, H, W], "
                f"got shape {tuple(x.shape)}"
            )
        return self.head(self.hidden(self.pool(self.features(x))))


def _image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return int(image_size), int(image_size)
    hw = [int(v) for v in image_size]
    if len(hw) != 2:
        raise ValueError(f"image_size must be an int or [height, width], got {image_size!r}")
    return hw[0], hw[1]


class AlexNetSmall(nn.Module):
    """An AlexNet-style CNN for small images whose early layers are split into branches.

    Like the original AlexNet, trained on two GPUs, the convolutions after the first are
    *grouped*: with ``groups=2``, ``conv2``'s branch g reads only the g-th block of ``conv1``'s
    filters, and ``conv3``'s branch g only the g-th block of ``conv2``'s. ``conv1`` itself sees
    all input channels (every filter sees RGB), so conv1's filters form ``groups`` branches that
    can specialise (Distill, "Branch Specialization": one AlexNet half learned black-and-white
    Gabor filters, the other low-frequency colour). ``groups=1`` is the unbranched control with
    the same layer sizes::

        conv1 (5x5) -> relu1 -> pool1 -> conv2 (5x5, grouped) -> relu2 -> pool2
        -> conv3 (3x3, grouped) -> relu3 -> pool3 -> flatten -> fc1 -> relu4 -> drop -> head

    Each 2x2 max-pool halves the image (32 -> 16 -> 8 -> 4); ``image_size`` fixes fc1's input.
    Every stage is its own named module, so each can be tapped.
    """

    def __init__(
        self,
        num_classes: int = 10,
        groups: int = 2,
        widths: Sequence[int] = (48, 96, 128),
        hidden: int = 256,
        in_channels: int = 3,
        dropout: float = 0.5,
        image_size: int | Sequence[int] = 32,
    ):
        super().__init__()
        widths = [int(w) for w in widths]
        groups, hidden, in_channels = int(groups), int(hidden), int(in_channels)
        h, w = _image_hw(image_size)
        if len(widths) != 3 or any(c < 1 for c in widths):
            raise ValueError(f"AlexNetSmall needs three positive widths, got {widths}")
        if groups < 1 or any(c % groups for c in widths):
            raise ValueError(f"every width in {widths} must be divisible by groups={groups}")
        if min(num_classes, hidden, in_channels) < 1:
            raise ValueError("num_classes, hidden and in_channels must be >= 1")
        if min(h, w) < 8:
            raise ValueError(f"AlexNetSmall pools three times: images must be at least 8x8, "
                             f"got {h}x{w}")
        self.spec = {"kind": "alexnet", "num_classes": int(num_classes), "groups": groups,
                     "widths": widths, "hidden": hidden, "in_channels": in_channels,
                     "dropout": float(dropout), "image_size": [h, w]}
        w0, w1, w2 = widths
        self.conv1 = nn.Conv2d(in_channels, w0, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(w0, w1, 5, padding=2, groups=groups)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(w1, w2, 3, padding=1, groups=groups)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(w2 * (h // 8) * (w // 8), hidden)
        self.relu4 = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fx proxies are not tensors: the check is skipped while tracing (taps with truncate)
        if isinstance(x, torch.Tensor) and not torch.jit.is_tracing() and (
                x.ndim != 4 or x.shape[1] != self.spec["in_channels"]
                or list(x.shape[2:]) != self.spec["image_size"]):
            raise ValueError(
                f"AlexNetSmall expects images [N, {self.spec['in_channels']}, "
                f"{self.spec['image_size'][0]}, {self.spec['image_size'][1]}], "
                f"got shape {tuple(x.shape)}"
            )
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.pool3(self.relu3(self.conv3(x)))
        x = self.drop(self.relu4(self.fc1(self.flatten(x))))
        return self.head(x)


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut (identity, or a 1x1 conv + BN
    when the stride or width changes: option B of He et al.), -> ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet-``depth`` (He et al. 2016): 3x3 stem conv -> BN -> ReLU, three ``stages`` of
    ``(depth - 2) / 6`` basic blocks with ``width``, ``2 width``, ``4 width`` channels (strides
    1, 2, 2), global average ``pool`` and ``head``. Tap ``pool`` (``4 width`` features) or a
    stage (``stages.1``) for branch input."""

    def __init__(self, depth: int = 20, width: int = 16, num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, "
                             f"110, ...), got {depth!r}")
        if width < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(f"resnet width, num_classes and in_channels must be positive, got "
                             f"{width}, {num_classes}, {in_channels}")
        self.spec = {"kind": "resnet", "depth": depth, "width": int(width),
                     "num_classes": int(num_classes), "in_channels": int(in_channels)}
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        n, c, stages = (depth - 2) // 6, width, []
        for w, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            blocks = [BasicBlock(c, w, stride)] + [BasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            c = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal convolutions (fan-out), BN weight 1 and bias 0, PyTorch's default head."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.head.reset_parameters()

    def extra_repr(self) -> str:
        return f"depth={self.spec['depth']}, width={self.spec['width']}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stages(self.stem(x))))


def mlp(sizes: Sequence[int], num_classes: int, dropout: float = 0.0) -> MLP:
    """An MLP ``sizes[0] -> sizes[1] -> ... -> num_classes`` (see :class:`MLP`)."""
    return MLP(sizes, num_classes, dropout)


def cnn(in_channels: int = 3, widths: Sequence[int] = (32, 64, 128), hidden: int = 256,
        num_classes: int = 10, dropout: float = 0.0) -> SmallCNN:
    """A small CNN (see :class:`SmallCNN`)."""
    return SmallCNN(in_channels, widths, hidden, num_classes, dropout)


def alexnet(num_classes: int = 10, groups: int = 2, widths: Sequence[int] = (48, 96, 128),
            hidden: int = 256, in_channels: int = 3, dropout: float = 0.5,
            image_size: int | Sequence[int] = 32) -> AlexNetSmall:
    """An AlexNet-style CNN with ``groups`` branches (see :class:`AlexNetSmall`)."""
    return AlexNetSmall(num_classes, groups, widths, hidden, in_channels, dropout, image_size)


def resnet(depth: int = 20, width: int = 16, num_classes: int = 10,
           in_channels: int = 3) -> ResNet:
    """A CIFAR ResNet (see :class:`ResNet`); ``resnet(20)`` is ResNet-20 (0.27 M parameters).

    >>> net = resnet(8, width=4, num_classes=3)
    >>> net(torch.zeros(2, 3, 8, 8)).shape
    torch.Size([2, 3])
    """
    return ResNet(depth, width, num_classes, in_channels)


def branch_head(n_in: int, n_out: int, hidden: int = 256, dropout: float = 0.5) -> MLP:
    """The default branch: ``n_in -> hidden -> n_out`` with dropout, as in Neural-Branching
    (512 -> 256 -> 3, Dropout 0.5). Its hidden layer ``hidden.0`` can itself be tapped."""
    return MLP([n_in, hidden], n_out, dropout)


_BUILDERS = {
    "mlp": lambda s: MLP(s["sizes"], s["num_classes"], s.get("dropout", 0.0)),
    "cnn": lambda s: SmallCNN(s["in_channels"], s["widths"], s["hidden"], s["num_classes"],
                              s.get("dropout", 0.0)),
    "alexnet": lambda s: AlexNetSmall(
        s.get("num_classes", 10), s.get("groups", 2), s.get("widths", (48, 96, 128)),
        s.get("hidden", 256), s.get("in_channels", 3), s.get("dropout", 0.5),
        s.get("image_size", 32)),
    "resnet": lambda s: ResNet(s["depth"], s["width"], s["num_classes"], s["in_channels"]),
}

#: the kinds :func:`build` rebuilds from a spec
KINDS = tuple(_BUILDERS)


def build(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its ``spec`` (a plain dict, as stored in JSON)."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in _BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; known kinds are {sorted(_BUILDERS)}")
    return _BUILDERS[kind](spec)


def spec_of(model: nn.Module) -> dict[str, Any] | None:
    """The model's spec if branchnet can rebuild it, else None."""
    # exact classes only: a subclass may change forward() and would be rebuilt wrongly
    if type(model) not in (MLP, SmallCNN, AlexNetSmall, ResNet):
        return None
    return dict(model.spec)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
