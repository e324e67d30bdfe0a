"""Path-level plasticity for residual networks: PlasticNet done correctly.

The network is a :class:`~branchnet.plastic.resnet_paths.PlasticResNet` (an always-on ResNet
backbone plus gated candidate residual paths, every one registered at construction); the
controller is the Lightning callback :class:`PathPlasticity`, the block analogue of RigL
(REFERENCE 4.1, 4.7): drop the weakest active paths, grow the inactive paths with the largest
``|d loss / d gate|`` at gate 0, new gates at 0, the number of active paths constant.

**One update, step by step.** Optimizer steps are numbered ``s = 1, 2, ...`` (one per
``optimizer.step()``; the engine takes several per Lightning batch, and Lightning's
``on_before_optimizer_step`` fires once per step, after ``backward``). Step ``s`` is an *update
step* when ``s % every == 0`` and ``s < t_end``.

1. After step ``s - 1`` the callback sets ``model.probe = True``: the forward of step ``s`` also
   computes every inactive candidate with its gate at exactly 0 (same output, same loss), and
   its backward leaves ``d loss / d gate`` of *that step alone* in ``model.probe_grad`` for every
   candidate (a tensor hook: independent of ``.grad`` accumulation).
2. In ``on_before_optimizer_step`` of step ``s`` (gradients ready, weights not yet updated):
   *drop* the ``n_swap`` active paths with the smallest score (``criterion="gate"``: ``|gate|``;
   ``"gradient"``: ``|d loss / d gate|`` of this step), ties to the lower index; *grow* the
   ``n_swap`` paths that were inactive before the update (a just-dropped path is not regrown in
   the same update: drop and grow sets are disjoint) with the largest ``|d loss / d gate|``
   (``grow="random"``: at random, a SET-like baseline).
3. Dropped paths: gate set to 0 and switched off; their contribution disappears, so **dropping a
   path whose gate was not 0 changes the function** (the gates they had are recorded). Grown
   paths: gate exactly 0 (the function does not change), their optimizer state (Adam
   ``exp_avg``/``exp_avg_sq``/``step``, SGD ``momentum_buffer``) removed so that the optimizer
   starts them like new parameters, and their gradients of this step cleared: they skip this
   step and start training at the next one, still at gate 0 with empty state. The gradients of
   every inactive path are cleared (the optimizer skips parameters without a gradient).
4. The optimizer step then updates the backbone and the surviving active paths as usual.

Extra cost: one probe forward/backward through all candidates every ``every`` steps.

Choose ``every`` large enough for a grown path to learn (RigL: 100 steps): a grown gate starts
at 0, and its block gets no gradient until the gate has moved, so with ``criterion="gate"`` and
a short period the path grown at one update tends to be the weakest at the next one.

In ``mode="static"`` and ``"stochastic_depth"`` the callback never probes or swaps (the same
harness gives the baselines) but still logs the per-epoch statistics. ``state_dict()`` holds the
step counter and the history, and the model's ``active`` buffer is in its own state dict, so a
run resumed with ``engine.fit(..., resume=True)`` is identical to an uninterrupted one.

Example:
    >>> import tempfile, torch
    >>> from branchnet.data.batches import TensorPairs
    >>> from branchnet.engine import TrainConfig, fit
    >>> net = PlasticResNet(2, widths=(4,), blocks_per_stage=3, candidates="skip12", max_active=2)
    >>> ds = TensorPairs(torch.randn(32, 3, 8, 8), torch.randint(0, 2, (32,)))
    >>> cb = PathPlasticity(every=2, n_swap=1, t_end=1.0)
    >>> _ = fit(net, ds, None, TrainConfig(epochs=1, batch_size=8, progress=False),
    ...         workdir=tempfile.mkdtemp(), callbacks=[cb])
    >>> [s["step"] for s in cb.swaps], len(net.active_indices())
    ([2], 2)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch

from branchnet.plastic.path_stats import PathLengthStats, path_length_distribution, plot_path_lengths
from branchnet.plastic.resnet_paths import (
    BLOCK_KINDS,
    CANDIDATE_PATTERNS,
    MODES,
    CandidatePath,
    PlasticResNet,
    ResidualBranch,
    candidate_spans,
)

CRITERIA = ("gate", "gradient")
GROW_RULES = ("gradient", "random")

__all__ = [
    "BLOCK_KINDS",
    "CANDIDATE_PATTERNS",
    "CRITERIA",
    "GROW_RULES",
    "MODES",
    "CandidatePath",
    "PathLengthStats",
    "PathPlasticity",
    "PlasticResNet",
    "ResidualBranch",
    "candidate_spans",
    "path_length_distribution",
    "plot_path_lengths",
    "reset_optimizer_state",
]


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
    """Forget the optimizer's per-parameter state (momentum, Adam moments and step count) of
    ``params``: it is re-created, zero, at their next step, as for a new parameter.

    >>> p = torch.nn.Parameter(torch.ones(2)); opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    >>> p.grad = torch.ones(2); opt.step(); reset_optimizer_state(opt, [p])
    >>> len(opt.state[p])
    0
    """
    opt = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
    for p in params:
        opt.state.pop(p, None)


def _find_model(pl_module: torch.nn.Module) -> PlasticResNet:
    found = [m for m in pl_module.modules() if isinstance(m, PlasticResNet)]
    if len(found) != 1:
        raise ValueError(
            f"PathPlasticity needs exactly one PlasticResNet inside the trained module, found {len(found)}"
        )
    return found[0]


def _optimizer_steps_per_epoch(trainer: L.Trainer, pl_module: L.LightningModule) -> int | None:
    """Optimizer steps per epoch with the engine's chunking (``cfg.batch_size`` minibatches per
    Lightning batch); one step per batch for other modules. ``None`` if it cannot be known."""
    try:
        loader = trainer.train_dataloader
        chunk = int(loader.batch_size)
        n = len(loader.sampler) if loader.sampler is not None else len(loader.dataset)
    except (AttributeError, TypeError):
        return None
    if getattr(loader, "drop_last", False):
        n -= n % chunk
    bs = getattr(getattr(pl_module, "cfg", None), "batch_size", None)
    if not getattr(pl_module, "automatic_optimization", True) and bs:
        full, last = divmod(n, chunk)
        return full * math.ceil(chunk / bs) + (math.ceil(last / bs) if last else 0)
    return math.ceil(n / chunk)


class PathPlasticity(L.Callback):
    """Drop / grow candidate residual paths of a :class:`PlasticResNet` during training.

    Args:
        every: optimizer steps between updates (``>= 1``).
        n_swap: paths dropped and grown at each update (``1 <= n_swap <= min(active, inactive)``).
        criterion: drop criterion, ``"gate"`` (smallest ``|gate|``) or ``"gradient"`` (smallest
            ``|d loss / d gate|`` of the probe step).
        t_end: no update from this optimizer step on: an ``int`` is a step, a ``float`` in
            ``(0, 1]`` a fraction of all the training steps (RigL: 0.75). A step beyond the end of
            training is an error (found when training starts).
        grow: ``"gradient"`` (largest ``|d loss / d gate|`` at gate 0) or ``"random"``.
        seed: seed of ``grow="random"`` (drawn from ``(seed, step)``: resumable).
        log_stats: log path-length statistics per epoch (:attr:`epochs`).

    Attributes:
        step: optimizer steps taken so far.
        swaps: one dict per update: ``step``, ``epoch``, ``dropped``, ``grown`` (candidate
            indices), ``dropped_gates`` (gates before the drop), ``drop_scores``, ``grow_scores``.
        epochs: one dict per epoch: ``epoch``, ``step``, ``model_mode``, ``active``, ``gates``,
            ``n_swaps``, ``n_probes`` and the :class:`PathLengthStats` fields.
    """

    def __init__(self, every: int = 100, n_swap: int = 1, criterion: str = "gate",
                 t_end: int | float = 0.75, grow: str = "gradient", seed: int = 0,
                 log_stats: bool = True):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1 (optimizer steps), got {every!r}")
        if isinstance(n_swap, bool) or not isinstance(n_swap, int) or n_swap < 1:
            raise ValueError(f"n_swap must be an integer >= 1, got {n_swap!r}")
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; choose one of {list(CRITERIA)}")
        if grow not in GROW_RULES:
            raise ValueError(f"unknown grow rule {grow!r}; choose one of {list(GROW_RULES)}")
        if isinstance(t_end, bool) or not isinstance(t_end, (int, float)):
            raise ValueError(f"t_end must be an int (a step) or a float in (0, 1], got {t_end!r}")
        if isinstance(t_end, float) and not 0.0 < t_end <= 1.0:
            raise ValueError(f"t_end as a fraction of training must be in (0, 1], got {t_end}")
        if isinstance(t_end, int) and t_end < 1:
            raise ValueError(f"t_end as a step must be >= 1, got {t_end}")
        self.every, self.n_swap, self.criterion, self.t_end = every, n_swap, criterion, t_end
        self.grow, self.seed, self.log_stats = grow, int(seed), log_stats
        self.step = 0
        self.n_probes = 0
        self.t_end_step: int | None = t_end if isinstance(t_end, int) else None
        self.total_steps: int | None = None
        self.swaps: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every=self.every, n_swap=self.n_swap, criterion=self.criterion,
                                        t_end=self.t_end, grow=self.grow)

    @property
    def history(self) -> dict[str, Any]:
        """JSON-able record for the run report: configuration, swaps and per-epoch statistics."""
        return {
            "config": {"every": self.every, "n_swap": self.n_swap, "criterion": self.criterion,
                       "t_end": self.t_end, "t_end_step": self.t_end_step, "grow": self.grow,
                       "seed": self.seed, "total_steps": self.total_steps},
            "swaps": self.swaps,
            "epochs": self.epochs,
        }

    def is_update_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) drops and grows paths."""
        return step % self.every == 0 and (self.t_end_step is None or step < self.t_end_step)

    # ------------------------------------------------------------------ the update

    def swap(self, model: PlasticResNet, optimizer: torch.optim.Optimizer | None = None,
             trainer: L.Trainer | None = None) -> dict[str, Any]:
        """Drop ``n_swap`` active paths and grow as many inactive ones (module docstring, step 2-3).

        Needs the gate gradients of a probe forward/backward just before (``model.probe_grad``);
        they are consumed (set to ``None``). Returns the record appended to :attr:`swaps`.
        """
        if model.probe_grad is None:
            raise RuntimeError(
                "no probe gradient for this update: the forward before it must be a probe forward "
                "(model.probe = True, training mode, gradients enabled) followed by backward"
            )
        scores = model.probe_grad.detach().abs()
        if trainer is not None:  # the same decision on every process
            scores = trainer.strategy.reduce(scores, reduce_op="mean")
        score = scores.tolist()
        active = model.active_indices()
        inactive = [k for k in range(model.n_candidates) if k not in set(active)]
        n = self.n_swap
        if n > min(len(active), len(inactive)):
            raise ValueError(
                f"n_swap={n} but the model has {len(active)} active and {len(inactive)} inactive "
                "candidate paths; n_swap must be at most the smaller"
            )
        gates = model.gates().abs().tolist()
        drop_score = gates if self.criterion == "gate" else score
        drop = sorted(active, key=lambda k: (drop_score[k], k))[:n]
        if self.grow == "gradient":
            grow = sorted(inactive, key=lambda k: (-score[k], k))[:n]
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
            grow = sorted(inactive[i] for i in torch.randperm(len(inactive), generator=g)[:n].tolist())
        dropped_gates = model.deactivate(drop)
        model.activate(grow)
        changed = [p for k in drop + grow for p in model.candidate_parameters(k)]
        if optimizer is not None:
            reset_optimizer_state(optimizer, changed)
        for p in changed:
            p.grad = None  # grown paths skip this step (stay at gate 0); dropped ones are off
        model.clear_inactive_grads()
        model.probe_grad = None
        record = {
            "step": self.step,
            "epoch": int(trainer.current_epoch) if trainer is not None else None,
            "dropped": drop,
            "grown": grow,
            "dropped_gates": dropped_gates,
            "drop_scores": [drop_score[k] for k in drop],
            "grow_scores": [score[k] for k in grow],
        }
        self.swaps.append(record)
        return record

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _find_model(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = _find_model(pl_module)
        per_epoch = _optimizer_steps_per_epoch(trainer, pl_module)
        max_epochs = trainer.max_epochs
        self.total_steps = per_epoch * max_epochs if per_epoch is not None and max_epochs and max_epochs > 0 \
            else None
        if isinstance(self.t_end, float):
            if self.total_steps is None:
                raise ValueError(
                    f"t_end={self.t_end} is a fraction of training, but the number of training steps "
                    "cannot be known here; give t_end as an int (an optimizer step)"
                )
            self.t_end_step = max(1, int(self.t_end * self.total_steps))
        elif self.total_steps is not None and self.t_end > self.total_steps:
            raise ValueError(
                f"t_end={self.t_end} is beyond the end of training ({self.total_steps} optimizer steps "
                f"= {max_epochs} epochs x {per_epoch}); choose t_end <= {self.total_steps}"
            )
        if model.mode == "plastic":
            n_active = len(model.active_indices())
            n_inactive = model.n_candidates - n_active
            if self.n_swap > min(n_active, n_inactive):
                raise ValueError(
                    f"n_swap={self.n_swap} but the model has {n_active} active and {n_inactive} inactive "
                    "candidate paths; n_swap must be at most the smaller (or use mode='static')"
                )
            if self.t_end_step is not None and self.every >= self.t_end_step:
                raise ValueError(
                    f"every={self.every} >= t_end={self.t_end_step} steps: no update would ever happen"
                )
        model.probe = model.mode == "plastic" and self.is_update_step(self.step + 1)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self.step += 1
        model = _find_model(pl_module)
        if model.probe:
            self.n_probes += 1
        if model.mode == "plastic" and self.is_update_step(self.step):
            self.swap(model, optimizer, trainer)
        model.clear_inactive_grads()
        model.probe = model.mode == "plastic" and self.is_update_step(self.step + 1)

    def _log_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = int(trainer.current_epoch)
        if not self.log_stats or (self.epochs and self.epochs[-1]["epoch"] == epoch):
            return
        model = _find_model(pl_module)
        stats = path_length_distribution(model)
        self.epochs.append({
            "epoch": epoch, "step": self.step, "model_mode": model.mode, "active": model.active_indices(),
            "gates": model.gates().tolist(), "n_swaps": len(self.swaps), "n_probes": self.n_probes,
            **stats.to_dict(),
        })

    # validation runs before the checkpoint of the epoch is written: log there (the row is then in
    # the checkpoint), else at the end of the training epoch
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._log_epoch(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_epoch(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _find_model(pl_module).probe = False

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "n_probes": self.n_probes, "swaps": self.swaps, "epochs": self.epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.n_probes = int(state_dict.get("n_probes", 0))
        self.swaps = [dict(s) for s in state_dict.get("swaps", [])]
        self.epochs = [dict(e) for e in state_dict.get("epochs", [])]
