"""Merging the K branches of a virtual model, and the per-branch loss and score for training.

Virtual models return per-branch outputs of layout ``(B, K, C)`` (REFERENCE 2.3):

- ``before_mean`` (the default): average the logits, then softmax / argmax;
- ``after_mean``: average the branches' softmax probabilities (what torch-uncertainty does);
- ``concat``: concatenate the branches' embeddings ``(B, K, D) -> (B, K * D)``.

The first two suit a classifier head, ``concat`` an embedding head (:func:`check_merge`).
Training sums each branch's mean cross-entropy on its own minibatch (:func:`per_branch_loss`;
shared parameters then receive the *sum* of the branches' gradients; averaging them is the
layers' business). :func:`ensemble_score` is the matching ``score_fn`` for
:func:`branchnet.engine.fit`.

Example:
    >>> import torch
    >>> logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)  # B 1, K 2, C 2
    >>> merge_probs(logits, "before_mean").round(decimals=4).tolist()
    [[0.6225, 0.3775]]
    >>> merge_probs(logits, "after_mean").round(decimals=4).tolist()
    [[0.5749, 0.4251]]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HEADS",
    "MERGES",
    "EnsembleLoss",
    "branch_probs",
    "check_merge",
    "ensemble_score",
    "merge",
    "merge_embeddings",
    "merge_probs",
    "per_branch_loss",
]

MERGES = ("before_mean", "after_mean", "concat")
"""Valid merge names."""

HEADS = ("classifier", "embedding")
"""Kinds of head a merge applies to."""

_FOR_HEAD = {"classifier": ("before_mean", "after_mean"), "embedding": ("concat",)}


def check_merge(how: str, head: str = "classifier") -> None:
    """Raise ``ValueError`` unless ``how`` is a merge name that fits a ``head`` head.

    Example:
        >>> check_merge("concat", head="embedding")
        >>> check_merge("concat")
        Traceback (most recent call last):
        ...
        ValueError: merge 'concat' does not match a classifier head; use one of ['before_mean', 'after_mean']
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {list(HEADS)}, got {head!r}")
    if how not in MERGES:
        raise ValueError(f"unknown merge {how!r}; allowed: {list(MERGES)}")
    if how not in _FOR_HEAD[head]:
        raise ValueError(
            f"merge {how!r} does not match a{'n' if head[0] in 'aeiou' else ''} {head} head; "
            f"use one of {list(_FOR_HEAD[head])}")


def _check_outputs(outputs: torch.Tensor, what: str = "outputs") -> None:
    if not isinstance(outputs, torch.Tensor) or outputs.ndim != 3:
        shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise ValueError(f"{what} must be per-branch outputs of shape (B, K, C), got {shape}")


def branch_probs(outputs: torch.Tensor) -> torch.Tensor:
    """Softmax of every branch's logits: ``(B, K, C) -> (B, K, C)``.

    Example:
        >>> branch_probs(torch.zeros(1, 2, 4))[0, 1].tolist()
        [0.25, 0.25, 0.25, 0.25]
    """
    _check_outputs(outputs)
    return outputs.softmax(-1)


def merge_probs(outputs: torch.Tensor, how: str = "before_mean") -> torch.Tensor:
    """Ensemble probabilities ``(B, C)`` from per-branch logits ``(B, K, C)``.

    ``before_mean`` = softmax of the mean logits; ``after_mean`` = mean of the softmaxes.

    Example:
        >>> merge_probs(torch.zeros(3, 2, 5), "after_mean").shape
        torch.Size([3, 5])
    """
    check_merge(how, "classifier")
    _check_outputs(outputs)
    if how == "before_mean":
        return outputs.mean(1).softmax(-1)
    return outputs.softmax(-1).mean(1)


def merge_embeddings(emb: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Concatenate the branches' embeddings: ``(B, K, D) -> (B, K * D)``, branch 0 first.

    With ``normalize`` each branch's embedding is scaled to unit L2 norm first (so every branch
    weighs the same in Euclidean distances between concatenations).

    Example:
        >>> e = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])
        >>> merge_embeddings(e).tolist(), merge_embeddings(e, normalize=True).tolist()
        ([[3.0, 4.0, 0.0, 2.0]], [[0.6000000238418579, 0.800000011920929, 0.0, 1.0]])
    """
    _check_outputs(emb, "emb")
    if normalize:
        emb = F.normalize(emb, dim=-1)
    return emb.reshape(emb.shape[0], -1)


def merge(outputs: torch.Tensor, how: str, head: str = "classifier") -> torch.Tensor:
    """:func:`merge_probs` for a classifier head, :func:`merge_embeddings` for an embedding head.

    Example:
        >>> merge(torch.zeros(2, 3, 4), "concat", head="embedding").shape
        torch.Size([2, 12])
    """
    check_merge(how, head)
    return merge_probs(outputs, how) if head == "classifier" else merge_embeddings(outputs)


def _branch_targets(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _check_outputs(outputs)
    B, K = outputs.shape[:2]
    if y.shape == (B,):
        return y.unsqueeze(1).expand(B, K)
    if y.shape == (B, K):
        return y
    raise ValueError(f"targets must have shape ({B},) or ({B}, {K}) for outputs of shape "
                     f"{tuple(outputs.shape)}, got {tuple(y.shape)}")


def per_branch_loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over branches of each branch's mean cross-entropy.

    ``y`` is ``(B, K)`` (branch k's own targets, training) or ``(B,)`` (one target for all
    branches, evaluation).

    Example:
        >>> out = torch.zeros(4, 3, 2)                   # uniform over 2 classes, 3 branches
        >>> round(per_branch_loss(out, torch.zeros(4, dtype=torch.long)).item(), 4)  # 3 ln 2
        2.0794
    """
    t = _branch_targets(outputs, y)
    B, K, C = outputs.shape
    ce = F.cross_entropy(outputs.reshape(B * K, C), t.reshape(B * K).long(), reduction="none")
    return ce.view(B, K).mean(0).sum()


class EnsembleLoss(nn.Module):
    """:func:`per_branch_loss` as a module; ``reduction="mean"`` divides by K.

    Example:
        >>> EnsembleLoss("mean")(torch.zeros(2, 4, 2), torch.zeros(2, 4, dtype=torch.long))
        tensor(0.6931)
    """

    def __init__(self, reduction: str = "sum"):
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def forward(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = per_branch_loss(outputs, y)
        return loss / outputs.shape[1] if self.reduction == "mean" else loss


def ensemble_score(outputs: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(n_correct, count)`` for :func:`branchnet.engine.fit`'s ``score_fn``.

    With ``(B,)`` targets: accuracy of the before-mean ensemble (``count = B``); with ``(B, K)``
    targets (training on bags): per-branch accuracy against each branch's own targets
    (``count = B * K``).

    Example:
        >>> out = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
        >>> ensemble_score(out, torch.tensor([0]))
        (tensor(1), 1)
        >>> ensemble_score(out, torch.tensor([[0, 0]]))
        (tensor(1), 2)
    """
    _branch_targets(outputs, y)  # validates the shapes
    if y.ndim == 1:  # one target per example: the before-mean ensemble
        return (outputs.mean(1).argmax(-1) == y).sum(), y.numel()
    return (outputs.argmax(-1) == y).sum(), y.numel()
