"""Theoretical FLOPs of sparse training and inference (REFERENCE 4.3; FLOPs = 2 × MACs).

:func:`layer_flops` runs one forward pass of ``example_input`` under a
``TorchDispatchMode`` and hands every matrix product / convolution that
``torch.utils.flop_counter`` knows (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``convolution`` ...)
to the prunable weight it reads: an operand sharing the weight's storage (the weight itself,
``weight.t()``, ``weight[i]`` ...). This is exact for ``nn.Linear``, ``nn.ConvNd`` and any layer
that multiplies by its weight blocks or views of them. FLOPs of a layer that multiplies by a
*copy* (branchnet's virtual layers assemble ``(K, out, in, ...)`` from their blocks with
``torch.cat``) go to that module and are split over its prunable weights in proportion to the
weights each block contributes: its size, times K for a block without branch dimension beside
blocks with K branches (the tied ``weight_ss`` serves every branch), which is exact for the
virtual layers. A weight seen in no counted
operation gets ``2 × numel × positions`` with positions = the spatial size of its module's
output (1 for ``(B, C)`` outputs). Results are per example (divided by the batch size of
``example_input``); only the prunable weights count (biases, norms, activations are ignored,
as in RigL's accounting of f_D / f_S).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> layer_flops(net, torch.zeros(5, 8))
    {'0.weight': 256.0, '2.weight': 128.0}
    >>> training_flops("rigl", f_dense=100.0, f_sparse=10.0, delta_t=9)
    39.0
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from branchnet.plastic.masks import LayerShape, SparseMasks, SparsityError, find_prunable

TRAINING_RULES = ("dense", "static", "set", "snfs", "rigl")


class _Attribute(TorchDispatchMode):
    """Counts FLOPs of every known op, by the prunable weight (storage) it reads."""

    def __init__(self, storages: dict[int, str]):
        super().__init__()
        self.storages = storages
        self.direct: dict[str, float] = defaultdict(float)
        self.pool: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            flops = float(flop_registry[packet](*args, **kwargs, out_val=out))
            owner = next((self.storages[_ptr(a)] for a in args
                          if isinstance(a, torch.Tensor) and _ptr(a) in self.storages), None)
            if owner is not None:
                self.direct[owner] += flops
            elif self.stack:
                self.pool[self.stack[-1]] += flops
        return out


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _batch_of(example_input: Any) -> int:
    first = example_input if isinstance(example_input, torch.Tensor) else next(
        (t for t in (example_input if isinstance(example_input, (tuple, list)) else ())
         if isinstance(t, torch.Tensor)), None)
    if first is None or first.ndim == 0:
        raise SparsityError(f"example_input must be a batched tensor or a tuple of them, got "
                            f"{type(example_input).__name__}")
    return int(first.shape[0])


def _effective_sizes(shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """Weights a module multiplies by, per block: a block without branch dimension next to
    blocks with K branches (a tied ``weight_ss``) serves every branch, so it counts K times."""
    layers = {n: LayerShape.from_shape(s) for n, s in shapes.items()}
    k = max((s.branches for s in layers.values()), default=1)
    return {n: float(s.numel * (k if s.branches == 1 else 1)) for n, s in layers.items()}


def layer_flops(model: nn.Module, example_input: Any,
                names: Iterable[str] | None = None) -> dict[str, float]:
    """Dense forward FLOPs per example of each prunable weight (``names``, default
    :func:`~branchnet.plastic.masks.find_prunable`). ``example_input`` is a batched tensor, or
    a tuple passed as ``model(*example_input)``. The model runs once in eval mode without
    gradients; its training flags are restored."""
    names = list(names) if names is not None else list(find_prunable(model))
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise SparsityError(f"{type(model).__name__} has no parameters {missing}")
    modules = dict(model.named_modules())
    by_module: dict[str, list[str]] = defaultdict(list)
    for n in names:
        by_module[n.rpartition(".")[0]].append(n)
    mode = _Attribute({_ptr(params[n]): n for n in names})
    positions: dict[str, int] = {}
    handles = []
    for mname in by_module:
        mod = modules[mname]

        def pre(_m: nn.Module, _a: Any, mname: str = mname) -> None:
            mode.stack.append(mname)

        def post(_m: nn.Module, _a: Any, out: Any, mname: str = mname) -> None:
            mode.stack.pop()
            if isinstance(out, torch.Tensor):
                positions[mname] = math.prod(out.shape[2:]) if out.ndim > 2 else 1

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), mode:
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.train(flag)
    batch = _batch_of(example_input)
    out = {n: mode.direct.get(n, 0.0) for n in names}
    for mname, members in by_module.items():
        rest = [n for n in members if out[n] == 0.0]
        pool = mode.pool.get(mname, 0.0)
        size = _effective_sizes({n: tuple(params[n].shape) for n in rest})
        for n in rest:
            if pool:
                out[n] = pool * size[n] / sum(size.values())
            else:  # never seen in a counted op: the parameter-shaped formula
                out[n] = 2.0 * params[n].numel() * positions.get(mname, 1) * batch
    return {n: v / batch for n, v in out.items()}


def sparse_flops(flops: Mapping[str, float], densities: Mapping[str, float]) -> float:
    """``f_S = Σ density × dense FLOPs`` (layers absent from ``densities`` count as dense).

    >>> sparse_flops({"a": 100.0, "b": 10.0}, {"a": 0.1})
    20.0
    """
    return float(sum(f * densities.get(n, 1.0) for n, f in flops.items()))


def training_flops(rule: str, f_dense: float, f_sparse: float, delta_t: int = 100) -> float:
    """Training FLOPs per example and step: dense ``3 f_D``; static / SET ``3 f_S``; SNFS
    ``2 f_S + f_D``; RigL ``(3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)``.

    >>> training_flops("snfs", 100.0, 10.0), training_flops("set", 100.0, 10.0)
    (120.0, 30.0)
    """
    if rule not in TRAINING_RULES:
        raise SparsityError(f"unknown rule {rule!r} for FLOPs; choose one of {list(TRAINING_RULES)}")
    if rule == "dense":
        return 3.0 * f_dense
    if rule in ("static", "set"):
        return 3.0 * f_sparse
    if rule == "snfs":
        return 2.0 * f_sparse + f_dense
    if int(delta_t) < 1:
        raise SparsityError(f"delta_t must be >= 1, got {delta_t}")
    return (3.0 * f_sparse * delta_t + 2.0 * f_sparse + f_dense) / (delta_t + 1)


def inference_flops(flops: Mapping[str, float], densities: Mapping[str, float] | None = None) -> float:
    """Forward FLOPs per example of the sparse model (dense without ``densities``).

    >>> inference_flops({"a": 100.0}, {"a": 0.25})
    25.0
    """
    return sparse_flops(flops, densities or {})


def summarize_flops(flops: Mapping[str, float], densities: Mapping[str, float], rule: str = "static",
                    delta_t: int = 100, *, steps: int | None = None,
                    batch_size: int | None = None) -> dict[str, Any]:
    """A JSON-ready summary: forward FLOPs dense / sparse, per-example training FLOPs per step,
    ratios to dense, and run totals when ``steps`` and ``batch_size`` are given.

    >>> s = summarize_flops({"a": 100.0}, {"a": 0.1}, "static")
    >>> s["sparse_forward"], s["train_ratio"]
    (10.0, 0.1)
    """
    f_d, f_s = float(sum(flops.values())), sparse_flops(flops, densities)
    train, dense_train = training_flops(rule, f_d, f_s, delta_t), 3.0 * f_d
    out: dict[str, Any] = {
        "rule": rule,
        "dense_forward": f_d,
        "sparse_forward": f_s,
        "inference_ratio": f_s / f_d if f_d else float("nan"),
        "train_step": train,
        "dense_train_step": dense_train,
        "train_ratio": train / dense_train if dense_train else float("nan"),
        "layers": {n: {"dense_forward": f, "density": float(densities.get(n, 1.0))}
                   for n, f in flops.items()},
    }
    if steps is not None and batch_size is not None:
        out["train_total"] = train * steps * batch_size
        out["dense_train_total"] = dense_train * steps * batch_size
    return out


def flops_summary(model: nn.Module, masks: SparseMasks, example_input: Any, rule: str = "static",
                  delta_t: int = 100, *, steps: int | None = None,
                  batch_size: int | None = None) -> dict[str, Any]:
    """:func:`summarize_flops` of a masked model: FLOPs of every prunable weight of ``model``
    (and every masked one), at the masks' densities.

    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> m = SparseMasks.from_model(net, 0.5)
    >>> flops_summary(net, m, torch.zeros(2, 8))["inference_ratio"]
    0.5
    """
    names = list(dict.fromkeys([*find_prunable(model), *masks]))
    return summarize_flops(layer_flops(model, example_input, names), masks.densities(), rule, delta_t,
                           steps=steps, batch_size=batch_size)
