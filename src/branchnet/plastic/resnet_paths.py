"""A small residual network with gated *candidate* residual paths (path-level plasticity).

:class:`PlasticResNet` is a CIFAR-style pre-activation ResNet whose backbone blocks are always
on, plus candidate residual paths inside each stage. Positions of a stage are numbered
``0..n`` (``0`` = the stage input, ``j`` = the output of backbone block ``j``); a candidate path
``(stage, i, j)`` with ``i < j`` is a small residual function ``F`` that reads position ``i``
and adds ``gate * F(position i)`` to position ``j``::

    position[j] = position[j-1] + block_j(position[j-1]) + sum_{active (i, j)} gate_ij * F_ij(position[i])

Everything is registered in ``__init__``: every candidate's block and scalar gate is in
``model.parameters()`` from construction, so an optimizer built once trains any path that is
switched on later (PlasticNet created its blocks after the optimizer, and they were never
trained). The boolean buffer ``active`` says which candidates are on; inactive candidates are
not computed (no cost) and their gates are exactly 0.

**Probe forwards.** With ``model.probe = True`` a *training* forward (``model.training`` and
gradients enabled, ``mode="plastic"``) also computes every inactive candidate, with its gate
at exactly 0: the output is unchanged, but ``d loss / d gate`` exists for every candidate.
The gate gradient of that forward alone is stored in ``model.probe_grad`` by a tensor hook
during ``backward`` (it never accumulates across steps, whatever ``zero_grad`` does). Probe
forwards also update the BatchNorm running statistics of the inactive candidates, and they
give the inactive candidates' parameters (zero) gradients: call :meth:`clear_inactive_grads`
before the optimizer step so that inactive paths are not touched (the controller
:class:`branchnet.plastic.paths.PathPlasticity` does this).

**Switching.** :meth:`activate` sets the gates to exactly 0 first, so growing a path never
changes the function. :meth:`deactivate` also zeroes the gates; a path with a non-zero gate did
contribute, so **dropping a trained path changes the function** (unlike growing).

**Modes.** ``"plastic"``: the active set may be changed by a controller. ``"static"``: same
network, the controller never changes the active set (baseline at the same number of active
paths). ``"stochastic_depth"`` (Huang et al. 2016): in training each backbone block and each
active path is dropped per forward with probability ``1 - p_l``, ``p_l = 1 - (l / L)(1 -
survival_last)`` for backbone block ``l = 1..L`` counted over the whole depth (a path uses the
``p`` of the backbone block at its end position); at evaluation every residual branch is
scaled by its ``p_l``. Random draws use the global torch RNG (restored on resume by the engine).

**Candidate patterns** (``candidates=``): ``"skip1"`` every ``i -> i+1`` (a parallel block next
to each backbone block), ``"skip2"`` every ``i -> i+2``, ``"skip12"`` both, ``"all"`` every
``i < j`` within a stage, or an explicit list of ``(stage, i, j)``.

**Layout.** Stem: 3x3 conv-BN-ReLU. Stage ``s``: ``blocks_per_stage[s]`` pre-activation basic
blocks ``x + F(x)``, ``F`` = BN-ReLU-conv3x3-BN-ReLU-conv3x3. Between stages a downsampling
*transition* BN-ReLU-conv3x3/stride 2 (not residual: every path goes through it). Head:
BN-ReLU, global average pool, linear. Candidate blocks: ``"basic"`` (same ``F`` as the
backbone) or ``"bottleneck"`` (BN-ReLU-conv1x1 to ``max(1, c // 4)``, BN-ReLU-conv3x3,
BN-ReLU-conv1x1 back to ``c``).

Example:
    >>> import torch
    >>> net = PlasticResNet(10, widths=(4, 8), blocks_per_stage=2, candidates="skip12", max_active=2)
    >>> net.spans
    [(0, 0, 1), (0, 1, 2), (0, 0, 2), (1, 0, 1), (1, 1, 2), (1, 0, 2)]
    >>> len(net.active_indices()), net(torch.zeros(2, 3, 8, 8)).shape
    (2, torch.Size([2, 10]))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

MODES = ("plastic", "static", "stochastic_depth")
CANDIDATE_PATTERNS = ("skip1", "skip2", "skip12", "all")
BLOCK_KINDS = ("basic", "bottleneck")

Span = tuple[int, int, int]


def candidate_spans(pattern: str | Iterable[Sequence[int]], blocks_per_stage: Sequence[int]) -> list[Span]:
    """The candidate paths ``(stage, i, j)`` of a pattern (see the module docstring), or an
    explicit list validated against the stages.

    >>> candidate_spans("skip2", [3, 2])
    [(0, 0, 2), (0, 1, 3), (1, 0, 2)]
    """
    if isinstance(pattern, str):
        if pattern not in CANDIDATE_PATTERNS:
            raise ValueError(
                f"unknown candidates pattern {pattern!r}; choose one of {list(CANDIDATE_PATTERNS)} "
                "or give a list of (stage, i, j)"
            )
        gaps = {"skip1": (1,), "skip2": (2,), "skip12": (1, 2)}.get(pattern)
        spans: list[Span] = []
        for s, n in enumerate(blocks_per_stage):
            if gaps is None:  # "all", ordered by end position then start
                spans += [(s, i, j) for j in range(1, n + 1) for i in range(j)]
            else:
                spans += [(s, i, i + g) for g in gaps for i in range(n + 1 - g)]
        return spans
    spans = []
    for item in pattern:
        try:
            s, i, j = (int(v) for v in item)
        except (TypeError, ValueError) as e:
            raise ValueError(f"candidate {item!r} is not a (stage, i, j) triple of integers") from e
        if not 0 <= s < len(blocks_per_stage):
            raise ValueError(
                f"candidate {item!r}: stage {s} does not exist (stages 0..{len(blocks_per_stage) - 1})"
            )
        n = blocks_per_stage[s]
        if not 0 <= i < j <= n:
            raise ValueError(f"candidate {item!r}: need 0 <= i < j <= {n} (positions of stage {s})")
        if (s, i, j) in spans:
            raise ValueError(f"candidate {item!r} is listed twice")
        spans.append((s, i, j))
    return spans


class ResidualBranch(nn.Module):
    """The residual function ``F`` of a pre-activation block (the skip is added by the caller)."""

    def __init__(self, channels: int, kind: str = "basic"):
        super().__init__()
        if kind not in BLOCK_KINDS:
            raise ValueError(f"unknown candidate_block {kind!r}; choose one of {list(BLOCK_KINDS)}")
        c = channels
        if kind == "basic":
            self.body = nn.Sequential(
                nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False),
            )
        else:
            m = max(1, c // 4)
            self.body = nn.Sequential(
                nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, m, 1, bias=False),
                nn.BatchNorm2d(m), nn.ReLU(), nn.Conv2d(m, m, 3, padding=1, bias=False),
                nn.BatchNorm2d(m), nn.ReLU(), nn.Conv2d(m, c, 1, bias=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class CandidatePath(nn.Module):
    """One candidate path: a residual function from position ``src`` to ``dst`` of ``stage``,
    times the scalar ``gate`` (a parameter, 0 when created)."""

    def __init__(self, stage: int, src: int, dst: int, channels: int, kind: str = "basic"):
        super().__init__()
        self.stage, self.src, self.dst = stage, src, dst
        self.branch = ResidualBranch(channels, kind)
        self.gate = nn.Parameter(torch.zeros(()))

    def extra_repr(self) -> str:
        return f"stage={self.stage}, {self.src} -> {self.dst}"


def _transition(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(),
                         nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False))


class PlasticResNet(nn.Module):
    """Pre-activation ResNet backbone plus gated candidate residual paths (module docstring).

    Args:
        num_classes: outputs of the linear head.
        in_channels: input channels.
        widths: channels of each stage (one stage per entry; stages after the first start with
            a stride-2 transition).
        blocks_per_stage: backbone blocks per stage (an int for all stages, or one per stage).
        candidates: a pattern (``"skip1"``, ``"skip2"``, ``"skip12"``, ``"all"``) or a list of
            ``(stage, i, j)``.
        max_active: number of active candidate paths (kept constant by the controller);
            ``None``: half the candidates, rounded down.
        gate_init: initial gate of the initially active paths (0: the initial function is the
            backbone's). Inactive and grown paths always have gate 0.
        mode: ``"plastic"``, ``"static"`` or ``"stochastic_depth"``.
        candidate_block: ``"basic"`` or ``"bottleneck"``.
        survival_last: ``p_L`` of stochastic depth (the deepest block's survival probability).
        initial_active: indices of the initially active candidates; ``None``: ``max_active``
            drawn at random with ``seed`` (a private generator; the global RNG is untouched).
        seed: seed of that draw.
    """

    #: inactive paths take no part in the forward pass: DDP must not wait for their gradients
    has_unused_parameters = True

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int | Sequence[int] = 3,
        candidates: str | Iterable[Sequence[int]] = "skip2",
        max_active: int | None = None,
        gate_init: float = 0.0,
        mode: str = "plastic",
        candidate_block: str = "basic",
        survival_last: float = 0.5,
        initial_active: Sequence[int] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive integers, got {widths}")
        if isinstance(blocks_per_stage, int):
            blocks = [int(blocks_per_stage)] * len(widths)
        else:
            blocks = [int(b) for b in blocks_per_stage]
        if len(blocks) != len(widths) or any(b < 1 for b in blocks):
            raise ValueError(
                f"blocks_per_stage must be a positive int or one positive int per stage "
                f"({len(widths)} stages), got {blocks_per_stage}"
            )
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
        if candidate_block not in BLOCK_KINDS:
            raise ValueError(
                f"unknown candidate_block {candidate_block!r}; choose one of {list(BLOCK_KINDS)}"
            )
        if not 0.0 < survival_last <= 1.0:
            raise ValueError(f"survival_last must be in (0, 1], got {survival_last}")
        spans = candidate_spans(candidates, blocks)
        n_cand = len(spans)
        if max_active is None:
            max_active = n_cand // 2
        if not 0 <= int(max_active) <= n_cand:
            raise ValueError(
                f"max_active={max_active} but there are {n_cand} candidate paths "
                f"(candidates={candidates!r}); choose 0..{n_cand}"
            )
        max_active = int(max_active)

        self.mode = mode
        self.widths, self.blocks_per_stage, self.spans = widths, blocks, spans
        self.survival_last = float(survival_last)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.transitions = nn.ModuleList(_transition(widths[s - 1], widths[s]) for s in range(1, len(widths)))
        self.stages = nn.ModuleList(
            nn.ModuleList(ResidualBranch(w, "basic") for _ in range(n))
            for w, n in zip(widths, blocks, strict=True)
        )
        self.candidates = nn.ModuleList(
            CandidatePath(s, i, j, widths[s], candidate_block) for s, i, j in spans
        )
        self.head = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(widths[-1], num_classes))
        # candidates ending at each (stage, position), in index order
        self._ending: dict[tuple[int, int], list[int]] = {}
        for k, (s, _, j) in enumerate(spans):
            self._ending.setdefault((s, j), []).append(k)
        depth = sum(blocks)
        self._survival = [1.0 - (d / depth) * (1.0 - self.survival_last) for d in range(1, depth + 1)]
        self._first_block = [sum(blocks[:s]) for s in range(len(blocks))]

        self.register_buffer("active", torch.zeros(n_cand, dtype=torch.bool))
        if initial_active is None:
            g = torch.Generator().manual_seed(int(seed))
            initial_active = torch.randperm(n_cand, generator=g)[:max_active].tolist()
        chosen = self._check_indices(initial_active)
        if len(chosen) != max_active:
            raise ValueError(
                f"initial_active has {len(chosen)} paths {sorted(chosen)} but max_active={max_active}"
            )
        with torch.no_grad():
            for k in chosen:
                self.active[k] = True
                self.candidates[k].gate.fill_(float(gate_init))
        self.max_active = max_active
        self.probe = False
        self.probe_grad: torch.Tensor | None = None
        self.spec: dict[str, Any] = {
            "kind": "plastic_resnet", "num_classes": int(num_classes), "in_channels": int(in_channels),
            "widths": widths, "blocks_per_stage": blocks, "candidates": [list(s) for s in spans],
            "max_active": max_active, "gate_init": float(gate_init), "mode": mode,
            "candidate_block": candidate_block, "survival_last": self.survival_last,
        }

    # ------------------------------------------------------------------ active set

    @property
    def n_candidates(self) -> int:
        return len(self.spans)

    def active_indices(self) -> list[int]:
        """Indices of the active candidate paths, ascending."""
        return [k for k, on in enumerate(self.active.tolist()) if on]

    def _check_indices(self, indices: Iterable[int]) -> list[int]:
        out = []
        for k in indices:
            k = int(k)
            if not 0 <= k < self.n_candidates:
                raise ValueError(f"candidate index {k} out of range 0..{self.n_candidates - 1}")
            if k in out:
                raise ValueError(f"candidate index {k} given twice")
            out.append(k)
        return out

    @torch.no_grad()
    def activate(self, indices: Iterable[int]) -> None:
        """Switch candidates on with gate exactly 0: the network's output does not change."""
        for k in self._check_indices(indices):
            self.candidates[k].gate.zero_()
            self.active[k] = True

    @torch.no_grad()
    def deactivate(self, indices: Iterable[int]) -> list[float]:
        """Switch candidates off and zero their gates; returns the gates they had (a non-zero
        gate means the output changes)."""
        before = []
        for k in self._check_indices(indices):
            before.append(float(self.candidates[k].gate))
            self.candidates[k].gate.zero_()
            self.active[k] = False
        return before

    def candidate_parameters(self, k: int) -> list[nn.Parameter]:
        """The gate and the block parameters of candidate ``k``."""
        self._check_indices([k])
        return list(self.candidates[k].parameters())

    def clear_inactive_grads(self) -> None:
        """Set the gradients of every inactive candidate's parameters to ``None`` (optimizers
        then skip them: no step, no weight decay, no state change)."""
        for k, on in enumerate(self.active.tolist()):
            if not on:
                for p in self.candidates[k].parameters():
                    p.grad = None

    def gates(self) -> torch.Tensor:
        """All gates as one detached vector (inactive ones are 0)."""
        return torch.stack([c.gate.detach() for c in self.candidates]) if self.spans else torch.zeros(0)

    # ------------------------------------------------------------------ stochastic depth

    def survival_probabilities(self) -> list[float]:
        """``p_l`` of each backbone block, over the whole depth (stochastic depth).

        >>> PlasticResNet(2, widths=(4,), blocks_per_stage=4, max_active=0).survival_probabilities()
        [0.875, 0.75, 0.625, 0.5]
        """
        return list(self._survival)

    def block_survival(self, stage: int, position: int) -> float:
        """``p`` of the backbone block ending at ``position`` (>= 1) of ``stage``."""
        return self._survival[self._first_block[stage] + position - 1]

    # ------------------------------------------------------------------ forward

    def _store_probe_grad(self, grad: torch.Tensor) -> None:
        self.probe_grad = grad.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probing = self.probe and self.training and torch.is_grad_enabled() and self.mode == "plastic"
        sd = self.mode == "stochastic_depth"
        sd_train = sd and self.training
        active = self.active.tolist()
        gates = None
        if probing and self.spans:
            stacked = torch.stack([c.gate for c in self.candidates])
            stacked.register_hook(self._store_probe_grad)
            # inactive gates enter as g - g.detach(): exactly 0 in value, d/dg = 1, so the
            # gradient is the one at gate 0 even if a stored inactive gate were not 0
            gates = torch.where(self.active, stacked, stacked - stacked.detach())
        h = self.stem(x)
        for s, stage in enumerate(self.stages):
            if s > 0:
                h = self.transitions[s - 1](h)
            pos = [h]
            for b, block in enumerate(stage):
                j = b + 1
                prev = pos[-1]
                p = self.block_survival(s, j)
                out = prev
                if not sd:
                    out = out + block(prev)
                elif sd_train:
                    if bool(torch.rand(()) < p):
                        out = out + block(prev)
                else:
                    out = out + p * block(prev)
                for k in self._ending.get((s, j), ()):
                    if not (active[k] or probing):
                        continue
                    cand = self.candidates[k]
                    gate = gates[k] if gates is not None else cand.gate
                    if not sd:
                        out = out + gate * cand.branch(pos[cand.src])
                    elif sd_train:
                        if bool(torch.rand(()) < p):
                            out = out + gate * cand.branch(pos[cand.src])
                    else:
                        out = out + (p * gate) * cand.branch(pos[cand.src])
                pos.append(out)
            h = pos[-1]
        return self.head(h)
