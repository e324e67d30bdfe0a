"""Binary weight masks: which weights are prunable, per-layer densities, random initial masks.

Which weights
    By default every parameter with ``ndim >= 2`` whose attribute name contains ``"weight"``,
    held directly by any module that is not a normalisation layer or an embedding: the
    ``weight`` of ``nn.Linear`` / ``nn.ConvNd`` and the blocks of branchnet's virtual layers
    (``weight_ss`` of shape ``(out, in[, kh, kw])``; ``weight_su`` / ``weight_us`` /
    ``weight_uu`` with a leading branch dimension ``(K, out, in[, kh, kw])``). Biases, norm
    layers (any class whose name contains ``Norm``) and embeddings stay dense. ``include`` /
    ``exclude`` are ``fnmatch`` patterns over the full parameter name (``"layer1.*"``).

Fans for ER / ERK
    A weight of a ``torch.nn`` convolution is ``(out, in, *kernel)``. Any other weight is read by
    its rank: 2-D ``(out, in)``; 4-D ``(out, in, kh, kw)``; 3-D ``(K, out, in)`` and 5-D
    ``(K, out, in, kh, kw)`` carry a leading branch dimension. Branched weights are scored
    per branch (every branch has the same fans), so they get the density of one branch.

Densities (RigL's ``sparse_utils``)
    ``uniform``: every sparse layer gets ``density``. ``er``: density ∝ (n_in + n_out) /
    (n_in·n_out); ``erk``: ∝ (n_in + n_out + Σ kernel) / (n_in·n_out·Π kernel), raised to
    ``erk_power``. One ε is solved so the active total equals ``density`` × (total of the
    non-forced layers); a layer whose density would exceed 1 is made dense, spends its full size
    from the budget, and ε is solved again (the clamp). Layers forced dense (``dense=``, e.g.
    ``dense_first``) are outside the budget, as in RigL, so the whole model is then a little
    denser than ``density``.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> masks = SparseMasks.from_model(net, density=0.25, distribution="uniform", seed=0)
    >>> masks.active_counts()
    {'0.weight': 32, '2.weight': 16}
    >>> masks.apply(net)
    >>> int((net[0].weight != 0).sum())
    32
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from branchnet.errors import BranchnetError

DISTRIBUTIONS = ("uniform", "er", "erk")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class SparsityError(BranchnetError, ValueError):
    """Bad sparsity settings, or a model / mask that does not fit them."""


@dataclass(frozen=True)
class LayerShape:
    """The fans of one prunable weight: ``branches`` × (``n_out`` × ``n_in`` × ``kernel``).

    >>> LayerShape.from_shape((4, 32, 16, 1, 1)).erk_score() == (32 + 16 + 2) / (32 * 16)
    True
    """

    shape: tuple[int, ...]
    n_out: int
    n_in: int
    kernel: tuple[int, ...] = ()
    branches: int = 1

    @classmethod
    def from_shape(cls, shape: Sequence[int], branched: bool | None = None) -> LayerShape:
        """Read a weight shape: 2-D ``(out, in)``, 4-D ``(out, in, kh, kw)``, 3-D / 5-D with a
        leading branch dimension unless ``branched=False`` (a ``Conv1d`` / ``Conv3d`` weight)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or min(shape) < 1:
            raise SparsityError(f"a prunable weight needs >= 2 non-empty dimensions, got shape {shape}")
        if branched is None:
            branched = len(shape) in (3, 5)
        if branched:
            if len(shape) < 3:
                raise SparsityError(f"a branched weight is (K, out, in, ...), got shape {shape}")
            return cls(shape, shape[1], shape[2], shape[3:], shape[0])
        return cls(shape, shape[0], shape[1], shape[2:], 1)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def er_score(self) -> float:
        return (self.n_in + self.n_out) / (self.n_in * self.n_out)

    def erk_score(self) -> float:
        return (self.n_in + self.n_out + sum(self.kernel)) / (
            self.n_in * self.n_out * math.prod(self.kernel))


def _as_layer(shape: Sequence[int] | LayerShape) -> LayerShape:
    return shape if isinstance(shape, LayerShape) else LayerShape.from_shape(shape)


def check_density(density: float) -> float:
    """``density`` as a float in (0, 1], else :class:`SparsityError`.

    >>> check_density(0.5)
    0.5
    """
    d = float(density)
    if not 0.0 < d <= 1.0:  # also rejects NaN
        raise SparsityError(f"density must be in (0, 1], got {density}")
    return d


def _is_excluded_module(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "norm" in name or "embedding" in name or isinstance(
        module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.Embedding,
                 nn.EmbeddingBag))


def find_prunable(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> dict[str, LayerShape]:
    """Prunable weights of ``model`` in registration order: full parameter name -> fans.

    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> find_prunable(net)
    {'0.weight': LayerShape(shape=(8, 3, 3, 3), n_out=8, n_in=3, kernel=(3, 3), branches=1)}
    """
    inc, exc = list(include or []), list(exclude or [])
    found: dict[str, LayerShape] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        if _is_excluded_module(module):
            continue
        for attr, p in module._parameters.items():
            if p is None or id(p) in seen or "weight" not in attr or p.ndim < 2:
                continue
            name = f"{mod_name}.{attr}" if mod_name else attr
            if inc and not any(fnmatch.fnmatchcase(name, pat) for pat in inc):
                continue
            if any(fnmatch.fnmatchcase(name, pat) for pat in exc):
                continue
            seen.add(id(p))
            conv = isinstance(module, _CONV)
            shape = LayerShape.from_shape(p.shape, branched=False if conv else None)
            if isinstance(module, _CONV[3:]):  # transposed conv weight: (in, out/groups, *k)
                shape = LayerShape(shape.shape, shape.n_in, shape.n_out, shape.kernel, 1)
            found[name] = shape
    if not found:
        raise SparsityError(
            f"{type(model).__name__} has no prunable weight: the rule selects parameters with "
            "ndim >= 2 whose name contains 'weight', outside norm layers and embeddings"
            f" (include={inc or None}, exclude={exc or None})"
        )
    return found


def layer_densities(
    shapes: Mapping[str, Sequence[int] | LayerShape],
    density: float,
    distribution: str = "uniform",
    erk_power: float = 1.0,
    dense: Iterable[str] = (),
) -> dict[str, float]:
    """Per-layer densities whose active total is ``density`` × the total of non-forced layers.

    ``dense`` names layers kept dense outside the budget (RigL's per-layer overrides). For
    ``er`` / ``erk`` the clamp makes over-full layers dense and re-solves ε, so every density is
    <= 1.

    >>> d = layer_densities({"a": (32, 16, 1, 1), "b": (64, 512)}, 0.5, "erk")
    >>> d["a"], round(d["b"], 4)
    (1.0, 0.4922)
    """
    density = check_density(density)
    if distribution not in DISTRIBUTIONS:
        raise SparsityError(f"unknown distribution {distribution!r}; choose one of {list(DISTRIBUTIONS)}")
    if not erk_power > 0:
        raise SparsityError(f"erk_power must be > 0, got {erk_power}")
    layers = {name: _as_layer(s) for name, s in shapes.items()}
    forced = set(dense)
    unknown = sorted(forced - set(layers))
    if unknown:
        raise SparsityError(f"layers to keep dense {unknown} are not among the prunable {list(layers)}")
    out = {name: 1.0 for name in layers}
    free = [n for n in layers if n not in forced]
    if distribution == "uniform" or density == 1.0:
        out.update({n: density for n in free})
        return out
    raw = {n: (layers[n].erk_score() if distribution == "erk" else layers[n].er_score()) ** erk_power
           for n in free}
    clamped: set[str] = set()
    while True:
        # budget for the unclamped layers: density * total minus what the clamped ones hold
        rhs = sum(density * layers[n].numel for n in free) - sum(layers[n].numel for n in clamped)
        rest = [n for n in free if n not in clamped]
        if not rest:
            break
        eps = rhs / sum(raw[n] * layers[n].numel for n in rest)
        top = max(raw[n] for n in rest)
        if eps * top <= 1.0:
            out.update({n: eps * raw[n] for n in rest})
            break
        clamped.update(n for n in rest if raw[n] == top)
    return out


def layer_counts(shapes: Mapping[str, Sequence[int] | LayerShape],
                 densities: Mapping[str, float]) -> dict[str, int]:
    """Active weights per layer: ``round(density × numel)`` (halves up), within [0, numel].

    >>> layer_counts({"a": (10, 10)}, {"a": 0.125})
    {'a': 13}
    """
    counts = {}
    for name, s in shapes.items():
        n = _as_layer(s).numel
        counts[name] = min(n, max(0, math.floor(densities[name] * n + 0.5)))
    return counts


def random_masks(
    shapes: Mapping[str, Sequence[int] | LayerShape],
    densities: Mapping[str, float],
    *,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Random boolean masks with exactly :func:`layer_counts` active weights per layer.

    Draws from ``generator`` when given (advancing it), else from a generator seeded with
    ``seed``. Positions are uniform over the whole tensor (branched weights included).

    >>> m = random_masks({"a": (4, 5)}, {"a": 0.5}, seed=1)
    >>> int(m["a"].sum()), m["a"].dtype
    (10, torch.bool)
    """
    g = generator or torch.Generator().manual_seed(int(seed or 0))
    counts = layer_counts(shapes, densities)
    masks = {}
    for name, s in shapes.items():
        layer = _as_layer(s)
        flat = torch.zeros(layer.numel, dtype=torch.bool)
        flat[torch.randperm(layer.numel, generator=g)[: counts[name]]] = True
        masks[name] = flat.view(layer.shape)
    return masks


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


class SparseMasks:
    """Boolean masks by parameter name; ``True`` = active. Layers kept dense hold all-True masks.

    >>> masks = SparseMasks({"w": torch.tensor([[True, False], [False, False]])})
    >>> masks.density(), masks.densities()
    (0.25, {'w': 0.25})
    """

    def __init__(self, masks: Mapping[str, torch.Tensor]):
        self.masks: dict[str, torch.Tensor] = {}
        for name, m in masks.items():
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise SparsityError(f"mask {name!r} must be a bool tensor, got "
                                    f"{getattr(m, 'dtype', type(m).__name__)}")
            self.masks[name] = m

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        density: float,
        distribution: str = "uniform",
        *,
        erk_power: float = 1.0,
        dense_first: bool = False,
        dense_last: bool = False,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        seed: int | None = 0,
        generator: torch.Generator | None = None,
    ) -> SparseMasks:
        """Random masks for ``model``'s prunable weights (:func:`find_prunable`) with
        :func:`layer_densities`. ``dense_first`` / ``dense_last`` keep every prunable weight of
        the first / last module holding one dense (outside the budget). Masks live on the
        weights' device."""
        shapes = find_prunable(model, include, exclude)
        modules = list(dict.fromkeys(_module_of(n) for n in shapes))
        keep = set()
        if dense_first:
            keep.add(modules[0])
        if dense_last:
            keep.add(modules[-1])
        dense = {n for n in shapes if _module_of(n) in keep}
        dens = layer_densities(shapes, density, distribution, erk_power, dense)
        masks = random_masks(shapes, dens, seed=seed, generator=generator)
        params = dict(model.named_parameters())
        return cls({n: m.to(params[n].device) for n, m in masks.items()})

    # ---------------------------------------------------------------- container
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        old = self.masks.get(name)
        if old is None or mask.shape != old.shape or mask.dtype != torch.bool:
            raise SparsityError(f"mask {name!r}: expected a bool tensor of shape "
                                f"{None if old is None else tuple(old.shape)}, got {mask.dtype} "
                                f"{tuple(mask.shape)}")
        self.masks[name] = mask

    def __iter__(self) -> Iterator[str]:
        return iter(self.masks)

    def __len__(self) -> int:
        return len(self.masks)

    def __contains__(self, name: object) -> bool:
        return name in self.masks

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.masks.items())

    def to(self, device: torch.device | str) -> SparseMasks:
        """The same masks on ``device`` (a new container)."""
        return SparseMasks({n: m.to(device) for n, m in self.masks.items()})

    # ---------------------------------------------------------------- counting
    def active_counts(self) -> dict[str, int]:
        return {n: int(m.sum()) for n, m in self.masks.items()}

    def densities(self) -> dict[str, float]:
        """Per-layer density."""
        return {n: int(m.sum()) / m.numel() for n, m in self.masks.items()}

    def density(self, name: str | None = None) -> float:
        """Density of layer ``name``, or over all masked layers together (``None``)."""
        if name is not None:
            m = self.masks[name]
            return int(m.sum()) / m.numel()
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)

    # ---------------------------------------------------------------- model
    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """``model``'s masked parameters by name; :class:`SparsityError` if one is missing or
        has another shape."""
        params = dict(model.named_parameters())
        out = {}
        for name, m in self.masks.items():
            p = params.get(name)
            if p is None or p.shape != m.shape:
                raise SparsityError(
                    f"mask {name!r} of shape {tuple(m.shape)} does not fit {type(model).__name__}: "
                    + ("no such parameter" if p is None else f"parameter shape {tuple(p.shape)}"))
            out[name] = p
        return out

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the inactive weights of ``model`` in place."""
        for name, p in self.parameters(model).items():
            m = self.masks[name]
            p.mul_(m if m.device == p.device else m.to(p.device))

    @torch.no_grad()
    def mask_grads(self, model: nn.Module) -> None:
        """Zero the gradients of inactive weights (parameters without a gradient are skipped)."""
        for name, p in self.parameters(model).items():
            if p.grad is not None:
                m = self.masks[name]
                p.grad.mul_(m if m.device == p.device else m.to(p.device))

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Masks as bool tensors by name (safetensors stores them as they are)."""
        return {n: m.detach().cpu().clone() for n, m in self.masks.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the masks (same names and shapes required); each keeps its device."""
        if set(state) != set(self.masks):
            raise SparsityError(f"mask names differ: saved {sorted(state)}, expected {sorted(self.masks)}")
        for name, m in state.items():
            self[name] = m.to(device=self.masks[name].device, dtype=torch.bool)
