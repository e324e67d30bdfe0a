"""Batch augmentation for images: random crop with padding and horizontal flip, on whole batches.

One indexing operation per batch, never a Python loop over images: a batch of 128 CIFAR-10
images costs about a millisecond (its share of a ResNet-20 training step is in
``docs/benchmarks.md``). Works on any dtype (uint8 or normalised float): padding is zero,
which for channel-normalised inputs is the mean pixel. The randomness comes from the global
torch RNG (or ``generator``), which the engine saves in every checkpoint, so a resumed run
draws the same crops.

Example:
    >>> import torch
    >>> x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    >>> out = flip_crop(x, padding=1, generator=torch.Generator().manual_seed(0))
    >>> out.shape, out.dtype
    (torch.Size([2, 1, 4, 4]), torch.uint8)
    >>> bool((flip_crop(x, padding=0, flip=False) == x).all())
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: the values of ``TrainConfig.augment``
AUGMENTS = ("flip", "crop", "flip-crop")


def flip_crop(x: torch.Tensor, padding: int = 4, *, flip: bool = True,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of ``x`` ``[N, C, H, W]`` shifted by up to ``padding`` pixels in each
    direction (a random ``H x W`` crop of the zero-padded image) and, with ``flip``, mirrored
    left-right with probability 1/2. Returns a new tensor of ``x``'s shape and dtype."""
    if x.ndim != 4:
        raise ValueError(f"flip_crop expects images [N, C, H, W], got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if padding > 0:
        dy, dx = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=generator)
        rows = (dy + torch.arange(h)).view(n, 1, h, 1)
        cols = (dx + torch.arange(w)).view(n, 1, 1, w)
        x = F.pad(x, (padding,) * 4)[torch.arange(n).view(n, 1, 1, 1),
                                     torch.arange(c).view(1, c, 1, 1), rows, cols]
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mirror.view(n, 1, 1, 1), x.flip(3), x)
    return x


def augment_batch(x: torch.Tensor, kind: str, padding: int = 4) -> torch.Tensor:
    """``x`` augmented as ``TrainConfig.augment`` says: ``flip``, ``crop`` or ``flip-crop``."""
    if kind not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {kind!r}")
    return flip_crop(x, padding if kind != "flip" else 0, flip=kind != "crop")
