"""``DynamicSparsity``: weight-level dynamic sparse training as a Lightning callback.

Works under branchnet's engine (manual optimization, several optimizer steps per Lightning
batch) and under plain automatic optimization: it counts *optimizer steps* itself.

Per optimizer step ``t`` (one optimizer holds the masked weights):

1. ``on_before_optimizer_step`` (after backward, before the optimizer reads gradients):
   SNFS folds the dense gradient into its own moments. On a RigL update step (``t % delta_t
   == 0`` and ``t < t_end``, from step 0) the masks are updated from the dense gradient, and
   every gradient of the optimizer is set to ``None`` so that the optimizer skips the whole
   weight update (torch optimizers, fused Adam included, skip parameters without gradient).
   Otherwise the gradients of inactive weights are zeroed, so inactive weights never build up
   optimizer state.
2. A ``register_step_post_hook`` on the optimizer: SET and SNFS update their masks here (after
   the weight update, as in SET); then inactive weights are zeroed again (weight decay moves
   them), and ``t`` advances.

An update drops ``k = floor(alpha_t × n_active)`` weights per layer and grows as many (see
:mod:`branchnet.plastic.rules`); grown weights and their per-element optimizer state
(``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) are zeroed, as is the
state of every inactive weight. Dynamic rules therefore need SGD, Adam or AdamW.

SNFS keeps its own moments of the dense gradient (the optimizer's betas / eps, or SGD's
momentum) rather than feeding dense gradients to the optimizer as the original does, so that the
invariant "inactive weights have no optimizer state" holds for every rule.

Masks are keyed by parameter names of the *trained model*: ``pl_module.model`` when the
LightningModule has one (branchnet's engine), else the LightningModule (``target=``).

Example:
    >>> import tempfile, torch
    >>> from branchnet.data.batches import TensorPairs
    >>> from branchnet.engine import TrainConfig, fit
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    >>> ds = TensorPairs(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    >>> cb = DynamicSparsity("rigl", density=0.25, delta_t=2)
    >>> _ = fit(net, ds, None, TrainConfig(epochs=2, batch_size=16, progress=False),
    ...         workdir=tempfile.mkdtemp(), callbacks=[cb])
    >>> cb.step, cb.masks.density(), cb.n_updates
    (8, 0.25, 3)
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from branchnet.plastic.flops import layer_flops, summarize_flops
from branchnet.plastic.masks import DISTRIBUTIONS, SparseMasks, SparsityError, check_density
from branchnet.plastic.rules import (
    ALPHA_SCHEDULES,
    NOISE_STD,
    RULES,
    MaskUpdate,
    adam_momentum,
    alpha_at,
    rigl_update,
    set_update,
    snfs_update,
    update_count,
)

STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
KNOWN_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
_STATE_VERSION = 1


class DynamicSparsity(L.Callback):
    """Sparse masks on a model's weights, updated during training by ``rule``.

    Args:
        rule: ``"static"`` (random mask, never updated), ``"set"``, ``"rigl"`` or ``"snfs"``.
        density: fraction of active prunable weights, in (0, 1].
        distribution: ``"uniform"``, ``"er"`` or ``"erk"`` (:func:`~branchnet.plastic.masks.layer_densities`).
        dense_first, dense_last: keep the first / last layer dense (outside the budget).
        delta_t: optimizer steps between mask updates.
        t_end: last update before this step: an int (steps) or a float fraction of the total.
        alpha: update fraction at step 0; ``None``: 0.3, or 0.5 for SNFS (its prune rate).
        alpha_schedule: ``"cosine"``, ``"constant"``, ``"linear"`` or ``"power"`` (``alpha_power``).
        seed: initial masks and tie-break / random-growth draws.
        total_steps: optimizer steps of the run; estimated when ``None`` (see :meth:`estimate_total_steps`).
        erk_power, include, exclude, noise_std: see :mod:`~branchnet.plastic.masks` / rules.
        example_input: a batch for FLOP counting; ``None``: the first training batch's inputs.
        target: the module to sparsify: ``"auto"`` (``pl_module.model`` if present, else the
            LightningModule), ``None`` (the LightningModule) or a submodule path of it.

    After (or during) training: ``masks``, ``step``, ``n_updates``, ``update_seconds`` (time in
    mask updates only), ``history`` (per epoch: step, density, updates), ``layer_flops`` and
    ``flops`` (a :func:`~branchnet.plastic.flops.summarize_flops` dict, counted on the first
    batch), ``last_update`` (the latest :class:`~branchnet.plastic.rules.MaskUpdate` per layer),
    :meth:`summary` for reports. When ``fit`` restores the best epoch's weights (early stopping),
    :meth:`load_masks` reads that epoch's masks from its checkpoint.
    """

    def __init__(
        self,
        rule: str = "rigl",
        density: float = 0.1,
        distribution: str = "uniform",
        *,
        dense_first: bool = False,
        dense_last: bool = False,
        delta_t: int = 100,
        t_end: int | float = 0.75,
        alpha: float | None = None,
        alpha_schedule: str = "cosine",
        alpha_power: float = 1.0,
        erk_power: float = 1.0,
        seed: int = 0,
        total_steps: int | None = None,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        noise_std: float = NOISE_STD,
        example_input: Any = None,
        target: str | None = "auto",
    ):
        if rule not in RULES:
            raise SparsityError(f"unknown rule {rule!r}; choose one of {list(RULES)}")
        if distribution not in DISTRIBUTIONS:
            raise SparsityError(f"unknown distribution {distribution!r}; choose one of {list(DISTRIBUTIONS)}")
        if alpha_schedule not in ALPHA_SCHEDULES:
            raise SparsityError(f"unknown alpha_schedule {alpha_schedule!r}; choose one of "
                                f"{list(ALPHA_SCHEDULES)}")
        if isinstance(delta_t, bool) or not isinstance(delta_t, int) or delta_t < 1:
            raise SparsityError(f"delta_t must be an int >= 1, got {delta_t!r}")
        if isinstance(t_end, bool) or not isinstance(t_end, (int, float)):
            raise SparsityError(f"t_end must be an int (steps) or a float in (0, 1], got {t_end!r}")
        if isinstance(t_end, float) and not 0.0 < t_end <= 1.0:
            raise SparsityError(f"t_end as a fraction of training must be in (0, 1], got {t_end}")
        if isinstance(t_end, int) and t_end < 0:
            raise SparsityError(f"t_end in steps must be >= 0, got {t_end}")
        alpha = (0.5 if rule == "snfs" else 0.3) if alpha is None else float(alpha)
        if not 0.0 < alpha <= 1.0:
            raise SparsityError(f"alpha must be in (0, 1], got {alpha}")
        if total_steps is not None and (isinstance(total_steps, bool) or int(total_steps) < 1):
            raise SparsityError(f"total_steps must be an int >= 1 or None, got {total_steps!r}")
        self.rule, self.density, self.distribution = rule, check_density(density), distribution
        self.dense_first, self.dense_last = dense_first, dense_last
        self.delta_t, self.t_end, self.alpha = delta_t, t_end, alpha
        self.alpha_schedule, self.alpha_power, self.erk_power = alpha_schedule, alpha_power, erk_power
        self.seed, self.total_steps = seed, None if total_steps is None else int(total_steps)
        self.include, self.exclude = list(include or []), list(exclude or [])
        self.noise_std, self.example_input, self.target = noise_std, example_input, target

        self.masks: SparseMasks | None = None
        self.step = 0
        self.n_updates = 0
        self.update_seconds = 0.0
        self.history: list[dict[str, float]] = []
        self.last_update: dict[str, MaskUpdate] = {}
        self.planned_steps: int | None = None
        self.t_end_step: int | None = None
        self.layer_flops: dict[str, float] | None = None
        self.flops: dict[str, Any] | None = None
        self._generator: torch.Generator | None = None
        self._moments: dict[str, dict[str, torch.Tensor]] = {}
        self._ready = False  # masks built by attach() or restored from a checkpoint
        self._params: dict[str, nn.Parameter] = {}
        self._inactive: dict[str, torch.Tensor] = {}
        self._opt: torch.optim.Optimizer | None = None
        self._hook: Any = None
        self._pending = False
        self._batch_size: int | None = None
        self._groups: dict[int, dict[str, Any]] = {}

    # ---------------------------------------------------------------- identity
    @property
    def state_key(self) -> str:
        return self._generate_state_key(rule=self.rule, density=self.density, seed=self.seed)

    @property
    def dynamic(self) -> bool:
        return self.rule != "static"

    # ---------------------------------------------------------------- masks
    def attach(self, model: nn.Module) -> SparseMasks:
        """Build the masks for ``model`` now (seeded) and zero its inactive weights. ``fit``
        then keeps them instead of drawing new ones."""
        self._generator = torch.Generator().manual_seed(int(self.seed))
        self.masks = SparseMasks.from_model(
            model, self.density, self.distribution, erk_power=self.erk_power,
            dense_first=self.dense_first, dense_last=self.dense_last, include=self.include,
            exclude=self.exclude, generator=self._generator)
        self.step, self.n_updates, self.update_seconds = 0, 0, 0.0
        self.history, self.last_update, self._moments = [], {}, {}
        self._ready = True
        self.masks.apply(model)
        return self.masks

    def _model(self, pl_module: nn.Module) -> nn.Module:
        if self.target is None:
            return pl_module
        if self.target == "auto":
            inner = getattr(pl_module, "model", None)
            return inner if isinstance(inner, nn.Module) else pl_module
        return pl_module.get_submodule(self.target)

    def _bind(self, model: nn.Module) -> None:
        assert self.masks is not None
        params = self.masks.parameters(model)
        self.masks = SparseMasks({n: m.to(params[n].device) for n, m in self.masks.items()})
        sparse = {n for n, m in self.masks.items() if not bool(m.all())}
        self._params = {n: p for n, p in params.items() if n in sparse}
        self._inactive = {n: ~self.masks[n] for n in self._params}
        for name, moments in self._moments.items():
            for key, t in moments.items():
                moments[key] = t.to(params[name].device)

    def is_update_step(self, step: int) -> bool:
        """Whether the masks change at optimizer step ``step`` (needs ``t_end_step``)."""
        return (self.dynamic and self.t_end_step is not None and step < self.t_end_step
                and step % self.delta_t == 0)

    # ---------------------------------------------------------------- Lightning hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = self._model(pl_module)
        if not self._ready:
            self.attach(model)
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(int(self.seed))
        self._bind(model)
        assert self.masks is not None
        self.masks.apply(model)
        self._opt = self._find_optimizer(trainer)
        if self.dynamic and not isinstance(self._opt, KNOWN_OPTIMIZERS):
            raise SparsityError(
                f"rule {self.rule!r} resets per-weight optimizer state and knows "
                f"{[o.__name__ for o in KNOWN_OPTIMIZERS]}; got {type(self._opt).__name__}")
        self._groups = {}
        self._remove_hook()
        self._hook = self._opt.register_step_post_hook(self._after_step)
        self._pending = False

    def _find_optimizer(self, trainer: L.Trainer) -> torch.optim.Optimizer:
        ids = {id(p) for p in self._params.values()}
        if not ids:  # every masked layer is dense: any optimizer of the masked weights will do
            assert self.masks is not None
            ids = {id(p) for p in self.masks.parameters(self._model(trainer.lightning_module)).values()}
        owners = [getattr(o, "optimizer", o) for o in trainer.optimizers]
        owners = [o for o in owners if any(id(p) in ids for g in o.param_groups for p in g["params"])]
        if len(owners) != 1:
            raise SparsityError(f"the masked weights must belong to exactly one optimizer, found "
                                f"{len(owners)} ({[type(o).__name__ for o in owners]})")
        return owners[0]

    def estimate_total_steps(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int | None:
        """Optimizer steps of the run: ``total_steps``; under branchnet's engine ``epochs ×
        ceil(N / batch_size)`` (N = training examples per process); else Lightning's
        ``estimated_stepping_batches``. ``None`` if unknown (an infinite run)."""
        if self.total_steps is not None:
            return self.total_steps
        from branchnet.engine import ClassifierModule

        if isinstance(pl_module, ClassifierModule):
            loader = trainer.train_dataloader
            sampler = getattr(loader, "sampler", None)
            n = len(sampler) if sampler is not None and hasattr(sampler, "__len__") else len(loader.dataset)
            epochs = trainer.max_epochs
            if not epochs or epochs < 1:
                epochs = pl_module.cfg.epochs
            return int(epochs) * math.ceil(n / pl_module.cfg.batch_size)
        est = trainer.estimated_stepping_batches
        return int(est) if math.isfinite(est) else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = self.estimate_total_steps(trainer, pl_module)
        self.planned_steps = total
        if isinstance(self.t_end, float):
            if total is None:
                raise SparsityError(f"t_end={self.t_end} is a fraction of training, but the number of "
                                    "steps is unknown: pass total_steps or t_end in steps")
            self.t_end_step = int(self.t_end * total)
        else:
            self.t_end_step = self.t_end
            if self.dynamic and total is not None and self.t_end > total:
                raise SparsityError(f"t_end={self.t_end} steps is beyond the {total} optimizer steps "
                                    "of this run")
        from branchnet.engine import ClassifierModule

        if isinstance(pl_module, ClassifierModule):
            self._batch_size = pl_module.cfg.batch_size
        if self.flops is None and self.example_input is not None:
            self._count_flops(pl_module, self.example_input)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.flops is None:
            x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
            if isinstance(x, torch.Tensor) and x.ndim > 0:
                if self._batch_size is None:
                    self._batch_size = int(x.shape[0])
                self._count_flops(pl_module, x[:1])

    def _count_flops(self, pl_module: L.LightningModule, x: Any) -> None:
        assert self.masks is not None
        model = self._model(pl_module)
        try:
            self.layer_flops = layer_flops(model, x, list(self.masks))
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            # FLOPs are for the report: a model that cannot run this probe must still train
            warnings.warn(f"DynamicSparsity could not count FLOPs of {type(model).__name__} on an input "
                          f"of shape {tuple(getattr(x, 'shape', ()))}: {e}; pass example_input",
                          stacklevel=2)
            self.flops = {}
            return
        self.flops = summarize_flops(self.layer_flops, self.masks.densities(),
                                     self.rule, self.delta_t, steps=self.planned_steps,
                                     batch_size=self._batch_size)

    def flops_summary(self) -> dict[str, Any] | None:
        """``flops`` plus ``update_seconds`` and ``n_updates``; ``None`` before FLOPs were counted."""
        if self.flops is None:
            return None
        return {**self.flops, "update_seconds": self.update_seconds, "n_updates": self.n_updates}

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts for a run report: settings, per-layer and overall density, FLOPs
        (``flops``; empty before the first batch), mask-update count and seconds, history."""
        return {
            "rule": self.rule, "density": self.density, "distribution": self.distribution,
            "delta_t": self.delta_t, "t_end_step": self.t_end_step, "alpha": self.alpha,
            "alpha_schedule": self.alpha_schedule, "steps": self.step, "planned_steps": self.planned_steps,
            "n_updates": self.n_updates, "update_seconds": self.update_seconds,
            "overall_density": None if self.masks is None else self.masks.density(),
            "layer_densities": {} if self.masks is None else self.masks.densities(),
            "flops": dict(self.flops or {}), "history": [dict(r) for r in self.history],
        }

    def load_masks(self, checkpoint: str | Path) -> SparseMasks:
        """The masks this callback had saved in a branchnet checkpoint (say ``best-*.safetensors``
        after early stopping restored those weights), on the CPU."""
        from branchnet.checkpoint import load_checkpoint

        state = load_checkpoint(checkpoint).get("callbacks", {}).get(self.state_key)
        if not state or not state.get("masks"):
            raise SparsityError(f"{checkpoint} holds no masks of callback {self.state_key}")
        return SparseMasks({n: m.to(torch.bool) for n, m in state["masks"].items()})

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if getattr(optimizer, "optimizer", optimizer) is not self._opt:
            return
        if self.rule == "snfs":
            self._accumulate_moments()
        update = self.is_update_step(self.step)
        if update and self.rule == "rigl":
            self._update()
            for group in self._opt.param_groups:  # skip the whole weight update on this step
                for p in group["params"]:
                    p.grad = None
            return
        with torch.no_grad():
            for name, p in self._params.items():
                if p.grad is not None:
                    p.grad.masked_fill_(self._inactive[name], 0)
        self._pending = update

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._pending:
            self._pending = False
            self._update()
        with torch.no_grad():
            for name, p in self._params.items():
                p.masked_fill_(self._inactive[name], 0)
        self.step += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.masks is not None
        row = {"epoch": trainer.current_epoch, "step": self.step, "density": self.masks.density(),
               "n_updates": self.n_updates, "update_seconds": self.update_seconds}
        self.history.append(row)
        pl_module.log("sparse_density", row["density"])

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hook()
        if stage == "fit":
            self._ready = False

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ---------------------------------------------------------------- updates
    def _group_of(self, p: nn.Parameter) -> dict[str, Any]:
        assert self._opt is not None
        group = self._groups.get(id(p))
        if group is None:
            group = next(g for g in self._opt.param_groups if any(q is p for q in g["params"]))
            self._groups[id(p)] = group
        return group

    @torch.no_grad()
    def _accumulate_moments(self) -> None:
        adam = isinstance(self._opt, (torch.optim.Adam, torch.optim.AdamW))
        for name, p in self._params.items():
            if p.grad is None:
                continue
            g, group = p.grad, self._group_of(p)
            mom = self._moments.setdefault(name, {})
            if adam:
                b1, b2 = group["betas"]
                m = mom.setdefault("m", torch.zeros_like(p))
                v = mom.setdefault("v", torch.zeros_like(p))
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
            else:
                m = mom.setdefault("m", torch.zeros_like(p))
                m.mul_(group.get("momentum", 0.0)).add_(g)

    def _score(self, name: str, p: nn.Parameter) -> torch.Tensor | None:
        if self.rule == "rigl":
            return p.grad
        mom = self._moments.get(name)
        if mom is None:
            return None
        if "v" in mom:
            return adam_momentum(mom["m"], mom["v"], self._group_of(p)["eps"])
        return mom["m"]

    @torch.no_grad()
    def _update(self) -> None:
        assert self.masks is not None and self._opt is not None and self.t_end_step is not None
        start = time.perf_counter()
        alpha_t = alpha_at(self.step, self.alpha, self.t_end_step, self.alpha_schedule, self.alpha_power)
        updates: dict[str, MaskUpdate] = {}
        for name, p in self._params.items():
            mask = self.masks[name]
            k = update_count(alpha_t, int(mask.sum()), mask.numel())
            if k == 0:
                continue
            w = p.detach()
            if self.rule == "set":
                upd = set_update(w, mask, k, generator=self._generator, noise_std=self.noise_std)
            else:
                score = self._score(name, p)
                if score is None:  # no gradient reached this weight: nothing to grow by
                    continue
                fn = rigl_update if self.rule == "rigl" else snfs_update
                upd = fn(w, score, mask, k, generator=self._generator, noise_std=self.noise_std)
            self.masks[name] = upd.mask
            zero = ~upd.mask | upd.grown
            p.masked_fill_(zero, 0)
            state = self._opt.state.get(p, {})
            for key in STATE_KEYS:
                t = state.get(key)
                if isinstance(t, torch.Tensor) and t.shape == p.shape:
                    t.masked_fill_(zero, 0)
            self._inactive[name] = ~upd.mask
            updates[name] = upd
        self.last_update = updates
        self.n_updates += 1
        self.update_seconds += time.perf_counter() - start

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "rule": self.rule,
            "density": self.density,
            "distribution": self.distribution,
            "step": self.step,
            "n_updates": self.n_updates,
            "update_seconds": self.update_seconds,
            "masks": self.masks.state_dict() if self.masks is not None else {},
            "generator": self._generator.get_state() if self._generator is not None else None,
            "moments": {n: {k: t.detach().cpu().clone() for k, t in m.items()}
                        for n, m in self._moments.items()},
            "history": [dict(r) for r in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        s = state_dict
        for key in ("rule", "density", "distribution"):
            if s.get(key) != getattr(self, key):
                raise SparsityError(f"the checkpoint was trained with {key}={s.get(key)!r}, this "
                                    f"callback has {key}={getattr(self, key)!r}")
        if not s.get("masks"):
            return
        self.masks = SparseMasks({n: m.to(torch.bool) for n, m in s["masks"].items()})
        self.step, self.n_updates = int(s["step"]), int(s["n_updates"])
        self.update_seconds = float(s.get("update_seconds", 0.0))
        self._generator = torch.Generator().manual_seed(int(self.seed))
        if s.get("generator") is not None:
            self._generator.set_state(s["generator"].to(torch.uint8))
        self._moments = {n: dict(m) for n, m in s.get("moments", {}).items()}
        self.history = [dict(r) for r in s.get("history", [])]
        self._ready = True
