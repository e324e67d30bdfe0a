"""A frozen parent cut at its taps, run stage by stage so that inputs can leave early.

Stage ``k`` runs the parent from tap ``k - 1`` (or the input) to tap ``k`` and gives tap ``k``'s
output exactly as :func:`branchnet.taps.extract` (and so the activation cache) gives it;
:meth:`Stages.finish` runs the rest, after the last tap, to the parent's output. Between stages
the *state* is whatever later stages still need (for a ResNet, also the skip connections'
inputs); :meth:`Stages.select` keeps the rows of the inputs still undecided, so only they go on.

How a parent is cut (:func:`split`):

* a parent with a ``staged(taps)`` method (the transformer parents of :mod:`branchnet.text`,
  run layer by layer) cuts itself;
* an :class:`torch.nn.Sequential` whose taps are its own children: the slices between them;
* any other model: :mod:`torch.fx` traces it (into the blocks that contain a tap; other
  submodules stay opaque calls), and each stage is a generated ``GraphModule`` of the nodes
  between two taps, taking and returning the values that cross the cut;
* a model fx cannot trace cannot be cut: :class:`FullStages` runs it whole on every input (all
  taps read by forward hooks), says why in ``reason``, and saves nothing.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> st = split(net, ["0"])
    >>> state, feats = st.run(0, st.start(torch.randn(5, 4)))
    >>> feats.shape, st.finish(st.select(state, torch.tensor([0, 2]))).shape
    (torch.Size([5, 8]), torch.Size([2, 3]))
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from branchnet.errors import BranchnetError
from branchnet.taps import TapError, _to_model, extract_many, layer_names

__all__ = ["FullStages", "FxStages", "SequentialStages", "StageError", "Stages", "split"]


class StageError(BranchnetError, ValueError):
    """A parent cannot be cut at the taps asked for (unknown, out of order, off its path)."""


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _select(value: Any, rows: torch.Tensor, n: int) -> Any:
    """Rows of a batch-shaped tensor (first dimension ``n``); other values as they are."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
        return value.index_select(0, rows.to(value.device))
    if isinstance(value, (tuple, list)):
        return type(value)(_select(v, rows, n) for v in value)
    return value


class Stages:
    """A parent cut at ``taps``: :meth:`start`, then :meth:`run` for each tap in order, then
    :meth:`finish`; :meth:`select` between any two. Everything runs frozen (eval mode, no
    autograd); the parent is shared, not copied."""

    #: False where the parent could not be cut (every stage costs nothing, start costs all)
    splittable: bool = True
    #: why the parent could not be cut ("" when it could)
    reason: str = ""

    def __init__(self, parent: nn.Module, taps: list[str]) -> None:
        self.parent = parent.eval()
        self.taps = list(taps)

    def start(self, x: Any) -> Any:
        """The state before stage 0 for a batch ``x``."""
        return x

    def run(self, k: int, state: Any) -> tuple[Any, torch.Tensor]:
        """Stage ``k``: ``(state after tap k, tap k's output)``."""
        raise NotImplementedError

    def finish(self, state: Any) -> torch.Tensor:
        """The parent's output from the state after the last tap."""
        raise NotImplementedError

    def select(self, state: Any, rows: torch.Tensor) -> Any:
        """The state of the inputs ``rows`` (indices into the current batch) only."""
        n = state.shape[0] if isinstance(state, torch.Tensor) else len(state)
        if isinstance(state, torch.Tensor):
            return _select(state, rows, n)
        return [state[int(i)] for i in rows]

    def __call__(self, x: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every tap's output and the parent's output, all inputs through every stage."""
        state, feats = self.start(x), []
        for k in range(len(self.taps)):
            state, f = self.run(k, state)
            feats.append(f)
        return feats, self.finish(state)

    def __repr__(self) -> str:
        how = "" if self.splittable else f", not cut: {self.reason}"
        return f"{type(self).__name__}({type(self.parent).__name__}, taps={self.taps}{how})"


class SequentialStages(Stages):
    """An :class:`nn.Sequential` whose taps are children: stage ``k`` is the slice of children
    after tap ``k - 1`` up to and including tap ``k``."""

    def __init__(self, parent: nn.Sequential, taps: list[str]) -> None:
        super().__init__(parent, taps)
        names = [name for name, _ in parent.named_children()]
        cuts = [names.index(t) for t in taps]
        bounds = [-1, *cuts, len(names) - 1]
        kids = list(parent.children())
        self._parts = [nn.Sequential(*kids[a + 1:b + 1]) for a, b in itertools.pairwise(bounds)]

    def start(self, x: Any) -> torch.Tensor:
        return _to_model(self.parent, x)

    def run(self, k: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            out = self._parts[k](state)
        return out, _first(out).clone()

    def finish(self, state: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._parts[-1](state)


class _TapsTracer(torch.fx.Tracer):
    """Traces into the ancestors of the taps only; every other submodule is one call."""

    def __init__(self, taps: list[str]) -> None:
        super().__init__()
        self.taps = taps

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return not any(t.startswith(qualified_name + ".") for t in self.taps)


def _reaches(start: torch.fx.Node, goal: torch.fx.Node) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node is goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(node.users)
    return False


class FxStages(Stages):
    """Any fx-traceable model, cut at its tap nodes into one generated ``GraphModule`` per stage.

    Raises :class:`~branchnet.taps.TapError` when fx cannot trace the model (:func:`split` then
    falls back to :class:`FullStages`), :class:`StageError` when a tap is called other than
    once, comes before the tap listed ahead of it, or does not lead to the parent's output.
    """

    def __init__(self, parent: nn.Module, taps: list[str]) -> None:
        super().__init__(parent, taps)
        tracer = _TapsTracer(taps)
        try:
            graph = tracer.trace(parent)
        except Exception as e:  # fx raises many kinds (TraceError, TypeError, ...)
            raise TapError(f"torch.fx cannot trace {type(parent).__name__} ({type(e).__name__}: "
                           f"{e})") from e
        nodes = list(graph.nodes)
        inputs = [n for n in nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise TapError(f"{type(parent).__name__}.forward takes {len(inputs)} inputs; a "
                           "staged parent takes one")
        output = next(n for n in nodes if n.op == "output")
        pos = {n: i for i, n in enumerate(nodes)}
        cuts = []
        for t in taps:
            hits = [n for n in nodes if n.op == "call_module" and n.target == t]
            if len(hits) != 1:
                raise StageError(f"tap {t!r} is called {len(hits)} times in "
                                 f"{type(parent).__name__}'s forward; a tap must run once")
            if cuts and pos[hits[0]] < pos[cuts[-1]]:
                raise StageError(f"taps must be in the order the parent runs them: {t!r} runs "
                                 f"before {taps[len(cuts) - 1]!r}")
            if not _reaches(hits[0], output):
                raise StageError(f"tap {t!r} is not on the parent's path: its output does not "
                                 "lead to the parent's output, so the parent cannot stop there")
            cuts.append(hits[0])
        bounds = [pos[inputs[0]], *(pos[c] for c in cuts), pos[output] - 1]
        spans = [nodes[a + 1:b + 1] for a, b in itertools.pairwise(bounds)]
        live_in: list[list[torch.fx.Node]] = []
        for s in range(len(spans)):  # values made before stage s and used from it on
            later = {u for sp in spans[s:] for n in sp for u in n.all_input_nodes}
            later |= set(output.all_input_nodes)
            made = [inputs[0], *(n for sp in spans[:s] for n in sp)]
            live_in.append([n for n in made if n in later and n.op != "get_attr"])
        self._stages = []
        for s, span in enumerate(spans):
            outs = live_in[s + 1] if s + 1 < len(spans) else []
            tap = cuts[s] if s < len(cuts) else None
            self._stages.append(self._stage(tracer.root, live_in[s], span, outs, tap, output))
        self._names = [[n.name for n in li] for li in live_in]

    @staticmethod
    def _stage(root: nn.Module, ins: list[torch.fx.Node], span: list[torch.fx.Node],
               outs: list[torch.fx.Node], tap: torch.fx.Node | None,
               output: torch.fx.Node) -> torch.fx.GraphModule:
        g = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {n: g.placeholder(n.name) for n in ins}

        def arg(n: torch.fx.Node) -> torch.fx.Node:
            if n not in env and n.op == "get_attr":  # constants are re-read, not carried
                env[n] = g.node_copy(n)
            return env[n]

        for n in span:
            for a in n.all_input_nodes:
                arg(a)
            env[n] = g.node_copy(n, arg)
        if tap is None:  # the last stage: the parent's output
            g.output(torch.fx.map_arg(output.args[0], arg))
        else:
            g.output((tuple(arg(n) for n in outs), arg(tap)))
        return torch.fx.GraphModule(root, g, class_name="Stage")

    def start(self, x: Any) -> list[Any]:
        return [_to_model(self.parent, x)]

    def run(self, k: int, state: list[Any]) -> tuple[list[Any], torch.Tensor]:
        with torch.inference_mode():
            values, tap = self._stages[k](*state)
        return list(values), _first(tap).clone()

    def finish(self, state: list[Any]) -> torch.Tensor:
        with torch.inference_mode():
            return self._stages[-1](*state)

    def select(self, state: list[Any], rows: torch.Tensor) -> list[Any]:
        n = next(v.shape[0] for v in state if isinstance(v, torch.Tensor) and v.ndim > 0)
        return [_select(v, rows, n) for v in state]


class FullStages(Stages):
    """A parent that cannot be cut: :meth:`start` runs it whole (every tap read by a forward
    hook), the stages only hand out what it computed. Saves no compute; ``reason`` says why."""

    splittable = False

    def __init__(self, parent: nn.Module, taps: list[str], reason: str) -> None:
        super().__init__(parent, taps)
        self.reason = reason

    def start(self, x: Any) -> dict[str, Any]:
        outputs: list[torch.Tensor] = []
        handle = self.parent.register_forward_hook(lambda m, a, out: outputs.append(out))
        try:
            feats = extract_many(self.parent, self.taps, x, batch_size=1 << 30, progress=False)
        finally:
            handle.remove()
        return {"feats": [feats[t] for t in self.taps], "out": outputs[-1]}

    def run(self, k: int, state: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
        return state, state["feats"][k]

    def finish(self, state: dict[str, Any]) -> torch.Tensor:
        return state["out"]

    def select(self, state: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
        n = state["out"].shape[0]
        return {"feats": [_select(f, rows, n) for f in state["feats"]],
                "out": _select(state["out"], rows, n)}


def split(parent: nn.Module, taps: list[str]) -> Stages:
    """``parent`` cut at ``taps`` (in the order it runs them), the best way it allows (see the
    module docstring). Raises :class:`StageError` for unknown taps, taps out of order or off
    the parent's path."""
    if not taps:
        raise StageError("taps must name at least one layer of the parent, got []")
    names = layer_names(parent)
    unknown = [t for t in taps if t not in names]
    if unknown:
        raise StageError(f"taps must be layers of the parent, got {unknown}; its layers are "
                         f"{names if len(names) <= 40 else [*names[:40], '...']}")
    if len(set(taps)) != len(taps):
        raise StageError(f"taps must be different layers, got {taps}")
    staged = getattr(parent, "staged", None)
    if callable(staged):
        return staged(taps)
    children = [name for name, _ in parent.named_children()]
    if isinstance(parent, nn.Sequential) and all(t in children for t in taps):
        idx = [children.index(t) for t in taps]
        if idx != sorted(idx):
            raise StageError(f"taps must be in the order the parent runs them, got {taps}")
        return SequentialStages(parent, taps)
    try:
        return FxStages(parent, taps)
    except TapError as e:
        return FullStages(parent, taps, reason=f"{e}; every input runs the whole parent")
