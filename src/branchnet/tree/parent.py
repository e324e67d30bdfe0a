"""A config's trained parent: its ``parent.weights`` loaded, the classes it was trained on
checked against the run's, and its output layer cut to the run's classes when it knows more
(``parent.classes``: a 10-class CIFAR-10 parent under a 6-class tree).

Cutting the output layer to some of its rows leaves those classes' logits exactly as they
were, so the parent's softmax over them is its prediction given that the input is one of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from branchnet.checkpoint import CheckpointError, load_weights
from branchnet.errors import ConfigError
from branchnet.fileio import read_json

__all__ = ["load_parent_weights", "restrict_outputs", "trained_classes"]


def load_parent_weights(parent: nn.Module, section: dict[str, Any]) -> None:
    """Load a config's ``parent.weights`` into ``parent``: a model run's
    ``model/weights.safetensors`` (branchnet's own format), or any safetensors state dict."""
    weights = section.get("weights")
    if not weights:
        return
    try:
        try:
            state = load_weights(weights)[0]
        except CheckpointError:  # not branchnet's format: a plain state dict
            state = load_file(weights)
        parent.load_state_dict(state)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"parent.weights {weights} is not a readable safetensors file: "
                              f"{e}") from e
    except RuntimeError as e:
        raise ConfigError(f"parent.weights {weights} do not fit parent.model "
                          f"{section['model']}: {e}") from e


def trained_classes(weights: str | Path | None) -> list[str] | None:
    """The classes a model run's parent was trained on, in its output order (``model.json``
    beside ``weights``), or None for weights without one."""
    meta = Path(weights).parent / "model.json" if weights else None
    if meta is None or not meta.is_file():
        return None
    classes = read_json(meta).get("classes")
    return [str(c) for c in classes] if isinstance(classes, list) else None


def restrict_outputs(model: nn.Module, rows: list[int]) -> str:
    """Cut ``model``'s output layer (its last ``nn.Linear``) to ``rows``, in that order, in
    place; the model's ``spec`` follows. Returns the layer's name.

    >>> from branchnet import models
    >>> m = models.MLP([4, 8], num_classes=5)
    >>> x = torch.randn(3, 4)
    >>> full = m(x)
    >>> restrict_outputs(m, [4, 1])
    'head'
    >>> torch.equal(m(x), full[:, [4, 1]]), m.spec["num_classes"]
    (True, 2)
    """
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"parent.classes needs a parent whose output layer is an nn.Linear; "
                          f"{type(model).__name__} has none")
    name, layer = linears[-1]
    if not rows or min(rows) < 0 or max(rows) >= layer.out_features:
        raise ConfigError(f"output rows {rows} are not rows of the parent's output layer "
                          f"{name!r} ({layer.out_features} outputs)")
    idx = torch.tensor(rows, device=layer.weight.device)
    with torch.no_grad():  # indexing copies the rows
        layer.weight = nn.Parameter(layer.weight[idx], requires_grad=layer.weight.requires_grad)
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[idx], requires_grad=layer.bias.requires_grad)
    layer.out_features = len(rows)
    spec = getattr(model, "spec", None)
    if isinstance(spec, dict) and "num_classes" in spec:
        spec["num_classes"] = len(rows)
    return name
