"""Read the output of any named layer of any :class:`torch.nn.Module`.

A *tap* runs a frozen parent network on a batch and returns what one of its layers produced.
Extraction always happens in eval mode (dropout off, batch-norm running statistics) under
:func:`torch.inference_mode`; the training flag of every submodule is restored afterwards.

Two ways to read a layer:

* ``truncate=False`` (default): a forward hook copies the layer's output during a full forward
  pass. Works on any model; layers after the tap are still computed.
* ``truncate=True``: :mod:`torch.fx` traces the model and drops everything downstream of the
  tap, so later layers are never run. Only the ``forward`` of the root and of the blocks that
  contain the tapped layer are traced (other submodules are called as they are), and those
  must be traceable (no data-dependent control flow); otherwise :class:`TapError` says to use
  ``truncate=False``.

Both return a copy (never a view into the model's buffers, so in-place ops that follow the tapped
layer, e.g. ``nn.ReLU(inplace=True)``, cannot change it), and the result is an ordinary tensor
that can be fed to a trainable branch. When a layer returns a tuple (``nn.LSTM``, ``nn.GRU``,
many attention blocks) the first element is taken.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> layer_names(net)
    ['0', '1', '2']
    >>> extract(net, "1", torch.randn(10, 4), batch_size=4).shape
    torch.Size([10, 3])
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from branchnet.data.dataset import Split
from branchnet.errors import BranchnetError

__all__ = ["Tap", "TapError", "extract", "layer_names", "module_fingerprint", "tap"]

_MAX_LISTED_NAMES = 40


class TapError(BranchnetError, ValueError):
    """Raised when a layer cannot be tapped: unknown name, untraceable model, odd output."""


def layer_names(model: nn.Module) -> list[str]:
    """Names of all submodules that can be tapped (``named_modules`` without the root ``""``).

    >>> from torch import nn
    >>> layer_names(nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU())))
    ['0', '1', '1.0']
    """
    return [name for name, _ in model.named_modules() if name]


def _unknown_layer(model: nn.Module, layer: object) -> TapError:
    names = layer_names(model)
    what = f"unknown layer {layer!r} in {type(model).__name__}"
    if not names:
        return TapError(f"{what}: the model has no submodules to tap")
    if len(names) <= _MAX_LISTED_NAMES:
        return TapError(f"{what}; valid layers are: {', '.join(names)}")
    close = difflib.get_close_matches(str(layer), names, n=8, cutoff=0.4)
    hint = f"closest matches: {', '.join(close)}" if close else "no close matches"
    return TapError(
        f"{what} ({len(names)} layers; {hint}); "
        "call branchnet.taps.layer_names(model) to list them all"
    )


def _resolve(model: nn.Module, layer: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(layer, str) or not layer:
        raise _unknown_layer(model, layer)
    try:
        return model.get_submodule(layer)
    except AttributeError:
        raise _unknown_layer(model, layer) from None


def _first_tensor(output: Any, layer: str) -> torch.Tensor:
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TapError(
            f"layer {layer!r} returned {type(output).__name__}, not a tensor "
            "(for tuple outputs the first element is used); tap a different layer"
        )
    return output


def _model_device(model: nn.Module) -> torch.device | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode + inference mode; restores every submodule's own training flag on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(modes[0][1])  # runs any custom train() override with the root's mode ...
        for m, mode in modes:  # ... then puts back each submodule's exact flag
            m.training = mode


def _copy(t: torch.Tensor) -> torch.Tensor:
    # Cloning outside inference mode gives an ordinary tensor (usable by autograd later).
    with torch.inference_mode(False):
        return t.detach().clone()


class _TapTracer(torch.fx.Tracer):
    """fx tracer that traces only into the tapped layer's ancestors.

    Every other submodule (the tapped layer included) stays one opaque ``call_module`` node,
    so only the forwards of the root and of the blocks containing the tap must be traceable;
    a sibling with data-dependent control flow is simply called, or dropped if downstream.
    """

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not self.target.startswith(module_qualified_name + ".")


def _truncated_graph(model: nn.Module, layer: str) -> torch.fx.GraphModule:
    tracer = _TapTracer(layer)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError, NotImplementedError)
        raise TapError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); "
            "use truncate=False (a forward hook, which runs the whole model)"
        ) from e
    nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(nodes) != 1:
        why = (
            "is never called as a module in the traced graph (its parent may call it "
            "through a functional op using its weights, or not at all)"
            if not nodes
            else f"is called {len(nodes)} times per forward pass, so its output is ambiguous"
        )
        raise TapError(f"cannot truncate at layer {layer!r}: it {why}; use truncate=False")
    # GraphModule references (does not copy) the model's submodules: weights stay shared.
    gm = torch.fx.GraphModule(tracer.root, graph, class_name=f"Truncated{type(model).__name__}")
    for n in [n for n in gm.graph.nodes if n.op == "output"]:
        gm.graph.erase_node(n)
    gm.graph.output(nodes[0])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


class Tap:
    """A callable that returns the output of ``layer`` of ``model`` for an input batch.

    Build it with :func:`tap`. ``Tap(x)`` moves ``x`` to the model's device and returns the
    activations there; the model is put in eval mode for the call and restored afterwards.
    With ``truncate=True`` the fx graph is built once, here, and shares the model's submodules
    (so later weight updates are seen, but replacing a submodule needs a new Tap).
    """

    def __init__(self, model: nn.Module, layer: str, *, truncate: bool = False) -> None:
        self.module = _resolve(model, layer)
        self.model = model
        self.layer = layer
        self.truncate = truncate
        self._graph = _truncated_graph(model, layer) if truncate else None

    def __repr__(self) -> str:
        mode = "truncated" if self.truncate else "hooked"
        return f"Tap({type(self.model).__name__}, {self.layer!r}, {mode})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        device = _model_device(self.model)
        if device is not None:
            x = x.to(device)
        if self._graph is not None:
            with _frozen(self.model):
                return _copy(_first_tensor(self._graph(x), self.layer))

        captured: list[torch.Tensor] = []

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured.append(_copy(_first_tensor(output, self.layer)))

        handle = self.module.register_forward_hook(hook)
        try:
            with _frozen(self.model):
                self.model(x)
        finally:
            handle.remove()
        if len(captured) != 1:
            why = "never called" if not captured else f"called {len(captured)} times"
            raise TapError(
                f"layer {self.layer!r} was {why} during the forward pass; "
                "tap a layer that runs exactly once per forward"
            )
        return captured[0]


def tap(model: nn.Module, layer: str, *, truncate: bool = False) -> Tap:
    """A :class:`Tap` reading ``layer`` (a name from :func:`layer_names`) of ``model``.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.9), nn.Linear(3, 2))
    >>> t = tap(net, "1", truncate=True)          # dropout is off while tapping
    >>> x = torch.randn(5, 4)
    >>> torch.equal(t(x), net[0](x).detach())
    True
    """
    return Tap(model, layer, truncate=truncate)


def extract(
    model: nn.Module | Tap,
    layer: str | None,
    x: torch.Tensor | Split,
    *,
    batch_size: int = 1024,
    truncate: bool = False,
    progress: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Activations of ``layer`` for all rows of ``x``, computed in batches, on the CPU.

    ``x`` is a tensor ``[N, ...]`` or a :class:`~branchnet.data.Split` (its ``x`` is used).
    Returns ``[N, *layer_shape]`` in ``dtype`` (default float32). ``model`` may also be a ready
    :class:`Tap` (then ``layer`` and ``truncate`` are ignored).

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    >>> h = extract(net, "0", torch.randn(100, 4), batch_size=32, dtype=torch.float16)
    >>> h.shape, h.dtype
    (torch.Size([100, 8]), torch.float16)
    """
    t = model if isinstance(model, Tap) else tap(model, str(layer), truncate=truncate)
    if isinstance(x, Split):
        x = x.x
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dtype = dtype or torch.float32
    n = int(x.shape[0])
    out: torch.Tensor | None = None
    with tqdm(total=n, unit="row", desc=f"tap {t.layer}", disable=not progress) as bar:
        for start in range(0, max(n, 1), batch_size):
            chunk = x[start : start + batch_size]
            h = _check_rows(t(chunk), len(chunk), t.layer).to("cpu", dtype)
            if out is None:
                out = torch.empty((n, *h.shape[1:]), dtype=dtype)
            out[start : start + len(h)] = h
            bar.update(len(h))
    assert out is not None
    return out


def _check_rows(h: torch.Tensor, rows: int, layer: str) -> torch.Tensor:
    """Check that a layer output has one row per input row (batch-first); returns ``h``."""
    if h.ndim == 0 or h.shape[0] != rows:
        raise TapError(
            f"layer {layer!r} returned shape {tuple(h.shape)} for a batch of {rows} rows; "
            "only batch-first outputs (one row per input) can be extracted"
        )
    return h


_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def module_fingerprint(model: nn.Module) -> str:
    """A hash (blake2b, 16 hex digits) of a module's weights and structure.

    Covers the class name, every submodule's name, type and ``extra_repr`` (so a ReLU swapped
    for a Tanh, or a changed conv stride, changes it), and every ``state_dict`` entry's name,
    shape, dtype and bytes. Code changes inside ``forward`` are not seen.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(2, 2)
    >>> before = module_fingerprint(net)
    >>> with torch.no_grad():
    ...     net.weight += 1
    >>> module_fingerprint(net) != before
    True
    """
    h = hashlib.blake2b(digest_size=8)
    cls = type(model)
    h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
    for name, m in model.named_modules():
        extra = _ADDRESS.sub("0x?", m.extra_repr())  # object addresses differ between runs
        h.update(f"|{name}:{type(m).__qualname__}({extra})".encode())
    state = model.state_dict()
    for key in sorted(state):
        value = state[key]
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"|{key}|{tuple(value.shape)}|{value.dtype}|".encode())
            if t.numel():
                h.update(t.view(torch.uint8).numpy())
        else:
            h.update(f"|{key}|{_ADDRESS.sub('0x?', repr(value))}".encode())
    return h.hexdigest()
