"""FLOPs of each stage of a staged parent and of each exit head, counted by
:class:`torch.utils.flop_counter.FlopCounterMode` on a sample batch (per input: divided by its
size). FlopCounterMode counts matrix products and convolutions (2 FLOPs per multiply-add);
element-wise work (activations, norms, pooling) is not counted. For text parents the count
depends on the sample's token lengths (and padding): it is the mean over the sample.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from branchnet.exits.stages import split
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> f = stage_flops(split(net, ["0"]), [nn.Linear(16, 4)], torch.zeros(3, 8))
    >>> f["start"], f["stages"], f["heads"], f["finish"]
    (0.0, [256.0], [128.0], [128.0])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from branchnet.exits.stages import Stages

__all__ = ["stage_flops"]


class _Count:
    def __init__(self) -> None:
        self.mode = FlopCounterMode(display=False)

    def __enter__(self) -> _Count:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)

    @property
    def total(self) -> float:
        return float(self.mode.get_total_flops())


def stage_flops(stages: Stages, heads: list[nn.Module], sample: Any) -> dict[str, Any]:
    """Per-input FLOPs: ``start`` (all of a parent that cannot be cut), ``stages[k]``,
    ``heads[k]`` (exit head ``k`` on its tap's output) and ``finish`` (a one-element list: the
    parent after the last tap)."""
    n = len(sample)
    with torch.inference_mode():
        with _Count() as c:
            state = stages.start(sample)
        out: dict[str, Any] = {"start": c.total / n, "stages": [], "heads": []}
        for k, head in enumerate(heads):
            with _Count() as c:
                state, feats = stages.run(k, state)
            out["stages"].append(c.total / n)
            with _Count() as c:
                head(feats.float())
            out["heads"].append(c.total / n)
        with _Count() as c:
            stages.finish(state)
        out["finish"] = [c.total / n]
    return out
