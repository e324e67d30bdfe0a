"""A :class:`~branchnet.text.TextParent` run layer by layer, so that texts can leave early.

:class:`TextStages` is the :class:`~branchnet.exits.stages.Stages` of a text parent: stage
``k`` runs the transformer's layers from tap ``k - 1`` up to tap ``k`` and gives tap ``k``'s
pooled state exactly as :meth:`TextParent.hidden_states` (and so :func:`branchnet.taps.extract`
and the activation cache) gives it; :meth:`TextStages.finish` runs the layers left up to the
probe layer, then the probe. :meth:`TextStages.select` keeps the texts still undecided and,
with dynamic padding, drops the padding columns none of them needs, so later layers run on a
smaller batch *and* shorter sequences.

How the layers are called: the model's own ``forward`` runs up to its first layer, where a
pre-hook takes the layer's inputs (the embeddings' output, which is ``hidden_states[0]``, and
the attention mask the model built for its architecture: bidirectional for BERT-like
encoders, causal and padding for GPT-2-like decoders; position ids, ...) and stops it. Every
layer is then called with the same arguments, on the hidden state the layer before gave; after
the last layer the model's final norm (GPT-2's ``ln_f``), if it has one, gives the last tap.
After :meth:`~TextStages.select` the layers' arguments are taken again the same way for the
rows and columns kept. This works for any model whose layers are one ``nn.ModuleList`` called
one after the other with the same arguments; whether a model is one is checked once on two
short texts against its own ``forward`` (:func:`unstageable`), and a model that is not one
(layers of different kinds, such as sliding-window and global attention) is run whole by
:class:`~branchnet.exits.stages.FullStages` instead (:meth:`TextParent.staged` does this).

Example:
    >>> from branchnet.text import TextParent
    >>> parent = TextParent.tiny(num_classes=3, layers=3)
    >>> st = parent.staged(["layer.0", "layer.1"])
    >>> texts = ["a short text", "a much, much longer text than that", "mid length"]
    >>> state, feats = st.run(0, st.start(texts))
    >>> feats.shape, state.seq_len
    (torch.Size([3, 16]), 36)
    >>> state = st.select(state, torch.tensor([2, 0]))  # the longest text has left
    >>> state.seq_len
    14
    >>> state, feats = st.run(1, state)
    >>> st.finish(state).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from branchnet.exits.stages import StageError, Stages
from branchnet.taps import _model_device

if TYPE_CHECKING:
    from branchnet.text.parent import TextParent

__all__ = ["TextStages", "TextState", "UnstageableError", "unstageable"]

#: names of a base model's final norm, applied to the last layer's output (GPT-2: ``ln_f``)
_FINAL_NORMS = ("ln_f", "norm", "final_layer_norm", "final_layernorm", "layernorm", "ln_final")
#: texts of the one-time check that a model can be run layer by layer
_CHECK_TEXTS = ["a b", "a longer text, to check the padding"]
_CHECK_ATOL, _CHECK_RTOL = 1e-4, 1e-3


class UnstageableError(StageError):
    """The transformer cannot be run layer by layer (the message says why)."""


class _Stop(Exception):
    """Raised by the first layer's pre-hook to stop the model's forward there."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.args_, self.kwargs_ = args, kwargs


@dataclasses.dataclass
class _Plan:
    """How to run a model layer by layer: its layer list and final norm (or None)."""

    layers: nn.ModuleList
    final: nn.Module | None


@dataclasses.dataclass
class TextState:
    """A batch between two stages.

    Attributes:
        inputs: the tokenizer's tensors (``input_ids``, ``attention_mask``, ...) on the
            model's device, for the rows and columns still in the batch.
        hidden: ``[B, L, H]``, the hidden state after ``done`` layers (``hidden_states[done]``
            of the model; before its final norm when ``done`` is the number of layers).
        done: how many transformer layers have run.
        layer_args, layer_kwargs: what every layer is called with besides the hidden state
            (attention mask, position ids, ...); ``None`` until needed after a select.
        probe: the pooled state of the probe layer once it has been passed, else ``None``.
    """

    inputs: dict[str, torch.Tensor]
    hidden: torch.Tensor
    done: int
    layer_args: tuple[Any, ...] | None
    layer_kwargs: dict[str, Any] | None
    probe: torch.Tensor | None

    @property
    def seq_len(self) -> int:
        """Tokens per text in the batch (padding included)."""
        return int(self.hidden.shape[1])

    def __len__(self) -> int:
        return int(self.hidden.shape[0])


def _find_layers(backbone: nn.Module, n_layers: int) -> nn.ModuleList:
    """The model's ``nn.ModuleList`` of ``n_layers`` transformer layers (the one whose
    members are the class the model records hidden states of, if several qualify)."""
    found = [m for _, m in backbone.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    recorded = (getattr(backbone, "_can_record_outputs", None) or {}).get("hidden_states")
    recorded = getattr(recorded, "target_class", recorded)
    if len(found) > 1 and isinstance(recorded, type):
        found = [m for m in found if all(isinstance(layer, recorded) for layer in m)]
    if len(found) != 1:
        raise UnstageableError(
            f"{type(backbone).__name__} has {len(found)} lists of {n_layers} layers, not one, so "
            "its layers cannot be found to run them one by one")
    return found[0]


def _capture(backbone: nn.Module, layers: nn.ModuleList,
             inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]:
    """The first layer's input (the embeddings' output) and its other arguments, from the
    model's own forward stopped at the first layer."""

    def stop(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _Stop(args, kwargs)

    extra = {}
    if "use_cache" in inspect.signature(backbone.forward).parameters:
        extra["use_cache"] = False  # one pass, nothing to cache; results are the same
    handle = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        backbone(**inputs, **extra)
    except _Stop as s:
        args, kwargs = s.args_, dict(s.kwargs_)
    else:
        raise UnstageableError(f"{type(backbone).__name__}'s forward did not call its first layer "
                               f"({type(layers[0]).__name__})")
    finally:
        handle.remove()
    if args:
        return args[0], tuple(args[1:]), kwargs
    if "hidden_states" in kwargs:
        return kwargs.pop("hidden_states"), (), kwargs
    raise UnstageableError(f"{type(layers[0]).__name__} is not called with the hidden state "
                           "first or as hidden_states=")


def _call(layer: nn.Module, hidden: torch.Tensor, args: tuple[Any, ...],
          kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=_CHECK_ATOL,
                                                 rtol=_CHECK_RTOL)


def _make_plan(parent: TextParent) -> _Plan:
    """Find the layers and the final norm, and check on two short texts that running them one
    by one gives every hidden state the model's forward gives."""
    backbone, n = parent.backbone, len(parent.layer)
    kinds = getattr(backbone.config, "layer_types", None)
    if kinds and len(set(kinds)) > 1:
        raise UnstageableError(f"{type(backbone).__name__}'s layers are of different kinds "
                               f"({sorted(set(kinds))}), each with its own attention mask")
    layers = _find_layers(backbone, n)
    enc = parent.tokenizer(_CHECK_TEXTS, padding="longest", truncation=True,
                           max_length=parent.max_length, return_tensors="pt")
    inputs = {k: v.to(_model_device(backbone)) for k, v in enc.items()}
    with torch.inference_mode():
        ref = backbone(**inputs, output_hidden_states=True).hidden_states
        if ref is None or len(ref) != n + 1:
            raise UnstageableError(f"{type(backbone).__name__} does not give {n + 1} hidden states")
        hidden, args, kwargs = _capture(backbone, layers, inputs)
        states = [hidden]
        for layer in layers:
            states.append(_call(layer, states[-1], args, kwargs))
        bad = [i for i in range(n) if not _close(states[i], ref[i])]
        if bad:
            raise UnstageableError(
                f"running {type(backbone).__name__}'s layers one by one does not give its hidden "
                f"states {bad} (its layers need more than one set of arguments)")
        norms = [getattr(backbone, name) for name in _FINAL_NORMS
                 if isinstance(getattr(backbone, name, None), nn.Module)]
        for final in [None, *norms]:
            if _close(states[n] if final is None else final(states[n]), ref[n]):
                return _Plan(layers, final)
    raise UnstageableError(f"{type(backbone).__name__}'s last hidden state is not its last "
                           "layer's output, nor that through a final norm it has")


_PLANS: weakref.WeakKeyDictionary[nn.Module, _Plan | UnstageableError] = (
    weakref.WeakKeyDictionary())


def _plan(parent: TextParent) -> _Plan:
    """:func:`_make_plan`, once per parent."""
    if parent not in _PLANS:
        try:
            _PLANS[parent] = _make_plan(parent)
        except UnstageableError as e:
            _PLANS[parent] = e
    plan = _PLANS[parent]
    if isinstance(plan, UnstageableError):
        raise UnstageableError(str(plan))
    return plan


def unstageable(parent: TextParent) -> str:
    """Why ``parent``'s transformer cannot be run layer by layer; ``""`` when it can.

    >>> from branchnet.text import TextParent
    >>> unstageable(TextParent.tiny())
    ''
    """
    try:
        _plan(parent)
    except UnstageableError as e:
        return str(e)
    return ""


class TextStages(Stages):
    """A :class:`~branchnet.text.TextParent` cut at ``taps`` (``embeddings``, ``layer.i``), in
    the order it runs them; see the module docstring.

    Raises :class:`~branchnet.exits.stages.StageError` for no taps, unknown, repeated or
    out-of-order taps, and :class:`UnstageableError` (a ``StageError``) when the transformer
    cannot be run layer by layer (:meth:`TextParent.staged` then falls back to
    :class:`~branchnet.exits.stages.FullStages`).

    >>> from branchnet.text import TextParent
    >>> parent = TextParent.tiny(num_classes=2)
    >>> feats, logits = TextStages(parent, ["embeddings", "layer.1"])(["one text", "two"])
    >>> [f.shape for f in feats], logits.shape
    ([torch.Size([2, 16]), torch.Size([2, 16])], torch.Size([2, 2]))
    """

    parent: TextParent

    def __init__(self, parent: TextParent, taps: list[str]) -> None:
        super().__init__(parent, taps)
        names = parent.tap_names()
        if not self.taps:
            raise StageError("taps must name at least one layer of the parent, got []")
        unknown = [t for t in self.taps if t not in names]
        if unknown:
            raise StageError(f"taps must be taps of the text parent, got {unknown}; its taps are "
                             f"{names}")
        if len(set(self.taps)) != len(self.taps):
            raise StageError(f"taps must be different layers, got {self.taps}")
        #: hidden-state index of every tap (embeddings 0, layer.i i + 1)
        self.index = [names.index(t) for t in self.taps]
        for a, b, ta, tb in zip(self.index, self.index[1:], self.taps, self.taps[1:], strict=False):
            if b < a:
                raise StageError(f"taps must be in the order the parent runs them: {tb!r} runs "
                                 f"before {ta!r}, got {self.taps}")
        self.probe_index = names.index(parent.probe_layer)
        self._plan = _plan(parent)

    # ------------------------------------------------------------------------- helpers
    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor, index: int) -> torch.Tensor:
        """Pooled ``hidden_states[index]`` from the hidden state after ``index`` layers."""
        if index == len(self.parent.layer) and self._plan.final is not None:
            hidden = self._plan.final(hidden)
        return self.parent.pooling(hidden, mask).float().cpu()

    def _advance(self, state: TextState, index: int) -> TextState:
        """The state after ``index`` layers (the probe layer's pooled state kept on the way)."""
        if state.done > index:
            raise StageError(f"the state has run {state.done} layers, past hidden state {index}")
        if state.done == index or len(state) == 0:
            return dataclasses.replace(state, done=max(state.done, index))
        args, kwargs = state.layer_args, state.layer_kwargs
        if args is None or kwargs is None:  # after a select: the layers' arguments anew
            _, args, kwargs = _capture(self.parent.backbone, self._plan.layers, state.inputs)
        hidden, probe = state.hidden, state.probe
        for i in range(state.done, index):
            hidden = _call(self._plan.layers[i], hidden, args, kwargs)
            if i + 1 == self.probe_index:
                probe = self._pool(hidden, state.inputs["attention_mask"], i + 1)
        return TextState(state.inputs, hidden, index, args, kwargs, probe)

    # -------------------------------------------------------------------------- stages
    def start(self, x: Sequence[str]) -> TextState:
        """Tokenize the batch as the parent does and run the embeddings."""
        p = self.parent
        texts = p._texts(x)
        padding = "longest" if p.dynamic_padding else "max_length"
        enc = p.tokenizer(texts, padding=padding, truncation=True, max_length=p.max_length,
                          return_tensors="pt")
        inputs = {k: v.to(_model_device(p.backbone)) for k, v in enc.items()}
        with torch.inference_mode():
            hidden, args, kwargs = _capture(p.backbone, self._plan.layers, inputs)
            state = TextState(inputs, hidden, 0, args, kwargs, None)
            if self.probe_index == 0:
                state.probe = self._pool(hidden, inputs["attention_mask"], 0)
        return state

    def run(self, k: int, state: TextState) -> tuple[TextState, torch.Tensor]:
        """Stage ``k``: the layers up to tap ``k``; its pooled state ``[B, H]`` (CPU, float)."""
        with torch.inference_mode():
            state = self._advance(state, self.index[k])
            feats = self._pool(state.hidden, state.inputs["attention_mask"], self.index[k])
        return state, feats.clone()  # outside inference mode: an ordinary tensor

    def finish(self, state: TextState) -> torch.Tensor:
        """The layers left up to the probe layer, then the probe: the parent's output."""
        p = self.parent
        with torch.inference_mode():
            if state.probe is None:
                state = self._advance(state, self.probe_index)
                feats = self._pool(state.hidden, state.inputs["attention_mask"],
                                   self.probe_index)
            else:
                feats = state.probe
        feats = feats.clone()
        if p.probe is None:
            return feats
        return p.probe(feats.to(_model_device(p.probe)))

    def select(self, state: TextState, rows: torch.Tensor | Sequence[int]) -> TextState:
        """The texts ``rows`` only; with dynamic padding (right-padded), the padding columns
        none of them needs are dropped."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        with torch.inference_mode():
            device = state.hidden.device
            idx = rows.to(device)
            inputs = {k: v.index_select(0, idx) for k, v in state.inputs.items()}
            hidden = state.hidden.index_select(0, idx)
            probe = None if state.probe is None else state.probe.index_select(0, rows)
            mask = inputs["attention_mask"]
            if (self.parent.dynamic_padding and self.parent.tokenizer.padding_side == "right"
                    and len(rows) > 0):
                keep = max(int(mask.sum(1).max()), 1)
                if keep < mask.shape[1]:
                    inputs = {k: v[:, :keep] if v.ndim >= 2 and v.shape[1] == mask.shape[1] else v
                              for k, v in inputs.items()}
                    hidden = hidden[:, :keep]
        return TextState(inputs, hidden, state.done, None, None, probe)
