"""Read the output of any named layer of any :class:`torch.nn.Module`.

A *tap* runs a frozen parent network on a batch and returns what one of its layers produced;
a :class:`MultiTap` reads several layers from one forward pass. Extraction always happens in
eval mode (dropout off, batch-norm running statistics) under :func:`torch.inference_mode`; the
training flag of every submodule is restored afterwards.

Inputs are tensors ``[N, ...]`` (numpy arrays are converted), moved to the model's device, or
any other batch of ``N`` rows with ``len()`` and slicing (e.g. :class:`branchnet.data.Texts`,
for a parent whose forward takes a batch of strings), which is passed to the model as it is.

Two ways to read a layer:

* ``truncate=False`` (default): a forward hook copies the layer's output during a full forward
  pass. Works on any model; layers after the tap are still computed. This is how a
  :class:`MultiTap` reads all its layers.
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
    >>> {k: v.shape for k, v in extract_many(net, ["0", "2"], torch.randn(10, 4)).items()}
    {'0': torch.Size([10, 3]), '2': torch.Size([10, 2])}
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from branchnet.data.dataset import Split
from branchnet.errors import BranchnetError

__all__ = [
    "MultiTap",
    "Tap",
    "TapError",
    "extract",
    "extract_many",
    "layer_names",
    "module_fingerprint",
    "tap",
]

_MAX_LISTED_NAMES = 40


class TapError(BranchnetError, ValueError):
    """Raised when a layer cannot be tapped: unknown name, untraceable model, odd output."""


def layer_names(model: nn.Module) -> list[str]:
    """Names of all submodules that can be tapped (``named_modules`` without the root ``""``),
    or, for a model that defines ``tap_names()`` (such as a text parent, whose taps are its
    pooled hidden states), those names.

    >>> from torch import nn
    >>> layer_names(nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU())))
    ['0', '1', '1.0']
    """
    names = getattr(model, "tap_names", None)
    if callable(names):
        return list(names())
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


def _is_array(x: object) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray))


def _num_rows(x: Any) -> int:
    """Rows of a batch: ``shape[0]`` of a tensor or array, else ``len(x)`` (e.g. texts)."""
    return int(x.shape[0]) if _is_array(x) else len(x)


def _to_model(model: nn.Module, x: Any) -> Any:
    """A tensor or array as a tensor on the model's device; any other batch as it is."""
    if not _is_array(x):
        return x
    x = torch.as_tensor(x)
    device = _model_device(model)
    return x if device is None else x.to(device)


def _hooked(model: nn.Module, modules: dict[str, nn.Module], x: Any) -> dict[str, torch.Tensor]:
    """One frozen forward of ``model`` on ``x`` with a hook copying each layer's output; every
    layer must run exactly once."""
    x = _to_model(model, x)
    captured: dict[str, list[torch.Tensor]] = {layer: [] for layer in modules}

    def hook_for(layer: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured[layer].append(_copy(_first_tensor(output, layer)))

        return hook

    handles = [m.register_forward_hook(hook_for(layer)) for layer, m in modules.items()]
    try:
        with _frozen(model):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    for layer, outputs in captured.items():
        if len(outputs) != 1:
            why = "never called" if not outputs else f"called {len(outputs)} times"
            raise TapError(
                f"layer {layer!r} was {why} during the forward pass; "
                "tap a layer that runs exactly once per forward"
            )
    return {layer: outputs[0] for layer, outputs in captured.items()}


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

    Build it with :func:`tap`. ``Tap(x)`` moves a tensor ``x`` to the model's device (any other
    batch, e.g. texts, is passed as it is) and returns the activations on that device; the model
    is put in eval mode for the call and restored afterwards.
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

    def __call__(self, x: Any) -> torch.Tensor:
        if self._graph is None:
            return _hooked(self.model, {self.layer: self.module}, x)[self.layer]
        x = _to_model(self.model, x)
        with _frozen(self.model):
            return _copy(_first_tensor(self._graph(x), self.layer))


class MultiTap:
    """A callable that returns ``{layer: output}`` for several layers of ``model`` from one
    forward pass (forward hooks, as :class:`Tap` with ``truncate=False``).

    Each layer must run exactly once per forward; outputs are copies, on the model's device,
    in the order of ``layers``. Duplicate names are a ``ValueError``, unknown ones a
    :class:`TapError`, both raised here.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> t = MultiTap(net, ["2", "0"])
    >>> out = t(torch.randn(5, 4))
    >>> list(out), out["0"].shape, out["2"].shape
    (['2', '0'], torch.Size([5, 3]), torch.Size([5, 2]))
    >>> MultiTap(net, ["0", "0"])
    Traceback (most recent call last):
    ...
    ValueError: duplicate layers in ['0', '0']: 0
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        if isinstance(layers, str):
            raise TypeError(f"layers must be a sequence of layer names, not the str {layers!r}")
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("a MultiTap needs at least one layer")
        dups = sorted({name for name in self.layers if self.layers.count(name) > 1}, key=str)
        if dups:
            raise ValueError(f"duplicate layers in {self.layers}: {', '.join(map(str, dups))}")
        self.modules = {layer: _resolve(model, layer) for layer in self.layers}
        self.model = model

    def __repr__(self) -> str:
        return f"MultiTap({type(self.model).__name__}, {self.layers!r})"

    def __call__(self, x: Any) -> dict[str, torch.Tensor]:
        return _hooked(self.model, self.modules, x)


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
    x: Any,
    *,
    batch_size: int = 1024,
    truncate: bool = False,
    progress: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Activations of ``layer`` for all rows of ``x``, computed in batches, on the CPU.

    ``x`` is a tensor ``[N, ...]``, a :class:`~branchnet.data.Split` (its ``x`` is used) or any
    other batch of ``N`` rows with ``len()`` and slicing (e.g. texts), whose slices are passed
    to the model as they are. Returns ``[N, *layer_shape]`` in ``dtype`` (default float32).
    ``model`` may also be a ready :class:`Tap` (then ``layer`` and ``truncate`` are ignored).

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    >>> h = extract(net, "0", torch.randn(100, 4), batch_size=32, dtype=torch.float16)
    >>> h.shape, h.dtype
    (torch.Size([100, 8]), torch.float16)
    """
    t = model if isinstance(model, Tap) else tap(model, str(layer), truncate=truncate)
    return _collect(lambda chunk: {t.layer: t(chunk)}, x, batch_size, progress, dtype,
                    f"tap {t.layer}")[t.layer]


def extract_many(
    model: nn.Module | MultiTap,
    layers: Sequence[str] | None,
    x: Any,
    *,
    batch_size: int = 1024,
    progress: bool = False,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Activations of several ``layers`` for all rows of ``x``, from one forward pass per
    batch: ``{layer: [N, *layer_shape]}`` on the CPU, as :func:`extract` gives each.

    ``model`` may also be a ready :class:`MultiTap` (then ``layers`` is ignored).

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x = torch.randn(10, 4)
    >>> h = extract_many(net, ["0", "2"], x, batch_size=4)
    >>> torch.equal(h["2"], extract(net, "2", x)), h["0"].shape
    (True, torch.Size([10, 8]))
    """
    t = model if isinstance(model, MultiTap) else MultiTap(model, layers or [])
    desc = f"tap {t.layers[0]}" if len(t.layers) == 1 else f"tap {len(t.layers)} layers"
    return _collect(t, x, batch_size, progress, dtype, desc)


def _collect(
    call: Callable[[Any], dict[str, torch.Tensor]],
    x: Any,
    batch_size: int,
    progress: bool,
    dtype: torch.dtype | None,
    desc: str,
) -> dict[str, torch.Tensor]:
    """The outputs of ``call`` over all batches of ``x``, each stacked on the CPU in ``dtype``."""
    if isinstance(x, Split):
        x = x.x
    dtype = dtype or torch.float32
    n = _num_rows(x)
    out: dict[str, torch.Tensor] = {}
    for start, outputs in _batch_outputs(call, x, batch_size, progress=progress, desc=desc):
        for layer, h in outputs.items():
            h = h.to("cpu", dtype)
            if layer not in out:
                out[layer] = torch.empty((n, *h.shape[1:]), dtype=dtype)
            out[layer][start : start + len(h)] = h
    return out


def _check_batch_size(batch_size: int) -> None:
    """Raise ``ValueError`` unless ``batch_size`` is a positive int."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")


def _batch_outputs(
    call: Callable[[Any], dict[str, torch.Tensor]],
    x: Any,
    batch_size: int,
    *,
    progress: bool = False,
    desc: str = "tap",
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """``(start, call(x[start : start + batch_size]))`` for each batch of ``x``, each output
    checked to have one row per input row, with a progress bar over the rows.

    An ``x`` without rows gives one empty batch, so that the layers' output shapes are known.
    """
    _check_batch_size(batch_size)
    n = _num_rows(x)
    with tqdm(total=n, unit="row", desc=desc, disable=not progress) as bar:
        for start in range(0, max(n, 1), batch_size):
            chunk = x[start : start + batch_size]
            rows = _num_rows(chunk)
            outputs = call(chunk)
            yield start, {layer: _check_rows(h, rows, layer) for layer, h in outputs.items()}
            bar.update(rows)


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
    shape, dtype and bytes. Code changes inside ``forward`` are not seen. A model that defines
    ``tap_fingerprint()`` (a text parent: its transformer, tokenizer, pooling and max length,
    not its trainable probe, which no tap reads) is identified by that instead.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(2, 2)
    >>> before = module_fingerprint(net)
    >>> with torch.no_grad():
    ...     net.weight += 1
    >>> module_fingerprint(net) != before
    True
    """
    custom = getattr(model, "tap_fingerprint", None)
    if callable(custom):
        return str(custom())
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
