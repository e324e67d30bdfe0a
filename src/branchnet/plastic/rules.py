"""Drop-and-grow rules as pure functions over one layer: ``(weight, score, mask, k) -> MaskUpdate``.

Every rule keeps the layer's active count: it drops ``k`` active weights and grows ``k``.

- **static**: never changes the mask.
- **SET** (RigL-code variant): drop the ``k`` active weights of smallest ``|w|``; grow ``k``
  connections at random among the *not kept* ones (so a just-dropped one may come back).
- **RigL**: drop the ``k`` active weights of smallest ``|w|`` (tie-break noise N(0, 1e-5));
  grow the ``k`` not-kept connections with the largest ``|dense gradient|``. A just-dropped
  connection may regrow and keeps its value; every *new* connection starts at 0.
- **SNFS** (no redistribution): RigL's drop; grow by the largest ``|momentum|`` of the dense
  gradient (Adam: ``m / (sqrt(v) + eps)``, :func:`adam_momentum`).

``k = floor(alpha_t × n_active)`` with :func:`alpha_at` (cosine by default); a full layer
(nothing inactive) is never updated.

Example:
    >>> import torch
    >>> w = torch.tensor([0.5, -0.1, 0.0, 0.0, 0.9, 0.0])
    >>> g = torch.tensor([0.0, 0.0, 2.0, 0.1, 0.0, 0.3])
    >>> mask = w != 0
    >>> u = rigl_update(w, g, mask, k=1, generator=torch.Generator().manual_seed(0))
    >>> u.mask.tolist(), u.dropped.tolist()[1], u.grown.tolist()[2]
    ([True, False, True, False, True, False], True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from branchnet.plastic.masks import SparsityError

RULES = ("static", "set", "rigl", "snfs")
ALPHA_SCHEDULES = ("cosine", "constant", "linear", "power")
NOISE_STD = 1e-5


@dataclass
class MaskUpdate:
    """One layer's update. ``dropped = old & ~mask`` and ``grown = mask & ~old`` are disjoint;
    ``regrown`` were dropped by magnitude and grown back (active before and after, value kept).
    Zero the weights and optimizer state at ``grown``."""

    mask: torch.Tensor
    dropped: torch.Tensor
    grown: torch.Tensor
    regrown: torch.Tensor
    k: int


def alpha_at(step: int, alpha: float, t_end: int, schedule: str = "cosine", power: float = 1.0) -> float:
    """The update fraction at ``step``: cosine ``alpha/2 (1 + cos(pi t / t_end))``, constant, or
    ``alpha (1 - t / t_end) ** power`` (``linear`` is ``power=1``); 0 from ``t_end`` on.

    >>> [round(alpha_at(t, 0.3, 100), 4) for t in (0, 50, 100)]
    [0.3, 0.15, 0.0]
    """
    if schedule not in ALPHA_SCHEDULES:
        raise SparsityError(f"unknown alpha schedule {schedule!r}; choose one of {list(ALPHA_SCHEDULES)}")
    if step >= t_end:
        return 0.0
    frac = step / t_end
    if schedule == "cosine":
        return alpha / 2 * (1 + math.cos(math.pi * frac))
    if schedule == "constant":
        return alpha
    return alpha * (1 - frac) ** (1.0 if schedule == "linear" else power)


def update_count(alpha_t: float, n_active: int, n_total: int) -> int:
    """``k = floor(alpha_t × n_active)``; 0 for a full layer (nothing could grow but what drops).

    >>> update_count(0.3, 10, 100), update_count(0.3, 10, 10)
    (3, 0)
    """
    if n_active >= n_total:
        return 0
    return max(0, min(n_active, math.floor(alpha_t * n_active)))


def _check(mask: torch.Tensor, k: int, *tensors: torch.Tensor) -> None:
    if mask.dtype != torch.bool:
        raise SparsityError(f"mask must be a bool tensor, got {mask.dtype}")
    for t in tensors:
        if t.shape != mask.shape:
            raise SparsityError(f"tensor of shape {tuple(t.shape)} does not match mask {tuple(mask.shape)}")
    n_active = int(mask.sum())
    if not 0 <= k <= n_active:
        raise SparsityError(f"k must be in [0, {n_active}] (the active count), got {k}")


def _noise(shape: torch.Size, std: float, generator: torch.Generator | None,
           device: torch.device) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return (noise * std).to(device)


def drop_smallest(weight: torch.Tensor, mask: torch.Tensor, k: int, *, noise_std: float = NOISE_STD,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The kept mask: ``mask`` minus its ``k`` active weights of smallest ``|w|`` (+ noise).

    >>> drop_smallest(torch.tensor([3.0, -1.0, 2.0, 0.0]), torch.tensor([1, 1, 1, 0]).bool(), 1).tolist()
    [True, False, True, False]
    """
    _check(mask, k, weight)
    if k == 0:
        return mask.clone()
    score = weight.detach().abs().float()
    if noise_std:
        score = score + _noise(mask.shape, noise_std, generator, score.device)
    score = score.masked_fill(~mask, -math.inf).flatten()
    n_keep = int(mask.sum()) - k
    kept = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    kept[torch.topk(score, n_keep, sorted=False).indices] = True
    return kept.view(mask.shape)


def grow_largest(score: torch.Tensor, kept: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` not-kept positions of largest ``score`` (a bool mask disjoint from ``kept``).

    >>> grow_largest(torch.tensor([5.0, 1.0, 3.0]), torch.tensor([True, False, False]), 1).tolist()
    [False, False, True]
    """
    if kept.numel() - int(kept.sum()) < k:
        raise SparsityError(f"cannot grow {k}: only {kept.numel() - int(kept.sum())} positions are free")
    grow = torch.zeros(kept.numel(), dtype=torch.bool, device=kept.device)
    if k:
        free = (~kept).flatten().nonzero().squeeze(1)
        s = score.detach().float().flatten()[free].nan_to_num(nan=-math.inf)
        grow[free[torch.topk(s, k, sorted=False).indices]] = True
    return grow.view(kept.shape)


def grow_random(kept: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` not-kept positions drawn uniformly at random.

    >>> int(grow_random(torch.tensor([True, False, False, False]), 2).sum())
    2
    """
    score = torch.rand(kept.shape, generator=generator).to(kept.device)
    return grow_largest(score, kept, k)


def _result(mask: torch.Tensor, kept: torch.Tensor, grow: torch.Tensor, k: int) -> MaskUpdate:
    new = kept | grow
    return MaskUpdate(mask=new, dropped=mask & ~new, grown=new & ~mask, regrown=grow & mask, k=k)


def static_update(weight: torch.Tensor, mask: torch.Tensor, k: int = 0) -> MaskUpdate:
    """No change (``k`` is ignored).

    >>> static_update(torch.ones(2), torch.tensor([True, False])).mask.tolist()
    [True, False]
    """
    none = torch.zeros_like(mask)
    return MaskUpdate(mask.clone(), none, none.clone(), none.clone(), 0)


def set_update(weight: torch.Tensor, mask: torch.Tensor, k: int, *,
               generator: torch.Generator | None = None, noise_std: float = NOISE_STD) -> MaskUpdate:
    """SET: drop the ``k`` smallest ``|w|`` among active, grow ``k`` at random among not kept.

    >>> u = set_update(torch.tensor([1.0, 0.5, 0.0, 0.0]), torch.tensor([1, 1, 0, 0]).bool(), 1)
    >>> int(u.mask.sum()), bool(u.mask[0])
    (2, True)
    """
    kept = drop_smallest(weight, mask, k, noise_std=noise_std, generator=generator)
    return _result(mask, kept, grow_random(kept, k, generator), k)


def rigl_update(weight: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, k: int, *,
                generator: torch.Generator | None = None, noise_std: float = NOISE_STD) -> MaskUpdate:
    """RigL: drop the ``k`` smallest ``|w|`` among active (tie-break noise), grow the ``k``
    largest ``|grad|`` (the dense gradient) among not kept."""
    _check(mask, k, weight, grad)
    kept = drop_smallest(weight, mask, k, noise_std=noise_std, generator=generator)
    return _result(mask, kept, grow_largest(grad.abs(), kept, k), k)


def snfs_update(weight: torch.Tensor, momentum: torch.Tensor, mask: torch.Tensor, k: int, *,
                generator: torch.Generator | None = None, noise_std: float = NOISE_STD) -> MaskUpdate:
    """SNFS without redistribution: RigL's drop; grow the ``k`` largest ``|momentum|`` of the
    dense gradient among not kept.

    >>> w, m = torch.tensor([1.0, 0.2, 0.0]), torch.tensor([0.0, 0.0, -4.0])
    >>> snfs_update(w, m, w != 0, 1).mask.tolist()
    [True, False, True]
    """
    _check(mask, k, weight, momentum)
    kept = drop_smallest(weight, mask, k, noise_std=noise_std, generator=generator)
    return _result(mask, kept, grow_largest(momentum.abs(), kept, k), k)


def adam_momentum(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """SNFS's growth score under Adam: ``m / (sqrt(v) + eps)``.

    >>> adam_momentum(torch.tensor([0.2]), torch.tensor([0.04]), eps=0.0).tolist()
    [1.0]
    """
    return exp_avg / (exp_avg_sq.sqrt() + eps)
