"""Layout adapter between virtual-branch models and torch-uncertainty's ensemble convention.

branchnet's virtual models return ``(B, K, C)`` (batch, branch, classes). torch-uncertainty
(REFERENCE 3.3) expects ensembles to return **estimator-major** ``(M * B, C)`` — all of member 0's
rows, then member 1's, i.e. einops ``"(m b) c"`` — with targets repeated the same way
(``RepeatTarget(M)``), and averages the members' softmax probabilities at evaluation.
This module converts between the two without importing torch-uncertainty.

Example:
    >>> import torch
    >>> out = torch.arange(12.0).view(2, 3, 2)          # B 2, K 3, C 2
    >>> flat = to_estimator_major(out)                  # (6, 2): member 0's 2 rows first
    >>> flat[:2].tolist() == out[:, 0].tolist()
    True
    >>> torch.equal(from_estimator_major(flat, 3), out)
    True
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

__all__ = ["TorchUncertaintyAdapter", "from_estimator_major", "repeat_target", "to_estimator_major"]


def _check_estimators(num_estimators: int) -> int:
    if (isinstance(num_estimators, bool) or not isinstance(num_estimators, numbers.Integral)
            or num_estimators < 1):
        raise ValueError(f"num_estimators must be an integer >= 1, got {num_estimators!r}")
    return int(num_estimators)


def to_estimator_major(outputs: torch.Tensor) -> torch.Tensor:
    """``(B, K, ...) -> (K * B, ...)``, estimator-major (row ``k * B + b`` is branch k, example b).

    Example:
        >>> to_estimator_major(torch.zeros(4, 3, 10)).shape
        torch.Size([12, 10])
    """
    if not isinstance(outputs, torch.Tensor) or outputs.ndim < 2:
        raise ValueError("outputs must be a tensor of shape (B, K, ...), got "
                         f"{tuple(getattr(outputs, 'shape', ())) or type(outputs).__name__}")
    B, K = outputs.shape[:2]
    return outputs.transpose(0, 1).reshape(K * B, *outputs.shape[2:])


def from_estimator_major(out: torch.Tensor, num_estimators: int) -> torch.Tensor:
    """``(M * B, ...) -> (B, M, ...)``: undo :func:`to_estimator_major`.

    Example:
        >>> from_estimator_major(torch.zeros(12, 10), 4).shape
        torch.Size([3, 4, 10])
    """
    m = _check_estimators(num_estimators)
    if not isinstance(out, torch.Tensor) or out.ndim < 1:
        raise ValueError("out must be a tensor of shape (M * B, ...)")
    if out.shape[0] % m:
        raise ValueError(f"out has {out.shape[0]} rows, not a multiple of num_estimators={m}; "
                         "expected estimator-major (M * B, ...) outputs")
    return out.reshape(m, out.shape[0] // m, *out.shape[1:]).transpose(0, 1)


def repeat_target(y: torch.Tensor, num_estimators: int) -> torch.Tensor:
    """Targets repeated estimator-major, ``(B, ...) -> (M * B, ...)``, like torch-uncertainty's
    ``RepeatTarget(M)`` (einops ``"b ... -> (m b) ..."``).

    Example:
        >>> repeat_target(torch.tensor([0, 1, 2]), 2).tolist()
        [0, 1, 2, 0, 1, 2]
    """
    m = _check_estimators(num_estimators)
    if not isinstance(y, torch.Tensor) or y.ndim < 1:
        raise ValueError("y must be a tensor of shape (B, ...)")
    return y.repeat(m, *([1] * (y.ndim - 1)))


class TorchUncertaintyAdapter(nn.Module):
    """Wrap a virtual model (``(B, K, C)`` outputs) so that ``forward`` returns ``(K * B, C)``
    estimator-major, with a ``num_estimators`` attribute: usable as a torch-uncertainty
    ensemble model (``is_ensemble=True``, ``num_estimators=K``).

    Example:
        >>> class Toy(nn.Module):
        ...     def forward(self, x):
        ...         return torch.stack([x, -x], dim=1)      # K = 2 "branches"
        >>> TorchUncertaintyAdapter(Toy(), 2)(torch.ones(5, 3)).shape
        torch.Size([10, 3])
    """

    def __init__(self, model: nn.Module, num_estimators: int):
        super().__init__()
        self.model = model
        self.num_estimators = _check_estimators(num_estimators)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[1] != self.num_estimators:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the wrapped model must return (B, {self.num_estimators}, ...) "
                             f"per-branch outputs (num_estimators={self.num_estimators}), got {shape}")
        return to_estimator_major(out)
