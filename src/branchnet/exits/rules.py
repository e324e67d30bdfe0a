"""Exit rules: a confidence score per early exit, and the first exit whose score reaches the
threshold answers (:func:`branchnet.exits.calibrate.exit_at`).

* ``msp``: the largest class probability; ``margin``: top-1 minus top-2; ``entropy``: minus
  the entropy (BranchyNet's rule); all from that exit's own probabilities.
* ``patience``: PABEE's rule (Zhou et al., "BERT Loses Patience", NeurIPS 2020): the number of
  consecutive exits before this one that gave the same answer; with threshold ``t`` an input
  leaves at the first exit whose answer the ``t`` exits before it agreed on.

Example:
    >>> import torch
    >>> p = torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.4, 0.6]]])   # 1 input, 3 exits
    >>> [round(v, 2) for v in exit_scores(p, "msp")[0].tolist()]
    [0.9, 0.8, 0.6]
    >>> exit_scores(p, "patience").tolist()   # exit 1 repeats exit 0; exit 2 changes its mind
    [[0.0, 1.0, 0.0]]
"""

from __future__ import annotations

import torch

from branchnet.tree.router import local_score

__all__ = ["RULES", "exit_scores", "patience_step"]

RULES = ("msp", "margin", "entropy", "patience")


def patience_step(count: torch.Tensor | None, previous: torch.Tensor | None,
                  answer: torch.Tensor) -> torch.Tensor:
    """The patience counter after one more exit: ``count + 1`` where the answer repeats the
    previous exit's, else 0 (0 at the first exit)."""
    if count is None or previous is None:
        return torch.zeros(answer.shape, dtype=torch.float32)
    return torch.where(answer == previous, count + 1, torch.zeros_like(count))


def exit_scores(probs: torch.Tensor, rule: str) -> torch.Tensor:
    """``[N, E]`` scores of ``rule`` from the exits' class probabilities ``[N, E, C]``."""
    if rule == "patience":
        answers = probs.argmax(dim=2)
        count, cols = None, []
        for e in range(probs.shape[1]):
            count = patience_step(count, answers[:, e - 1] if e else None, answers[:, e])
            cols.append(count)
        return torch.stack(cols, dim=1)
    return torch.stack([local_score(probs[:, e], rule) for e in range(probs.shape[1])], dim=1)
