"""A trained network in a run folder: saved as safetensors + JSON, loaded, run in batches.

::

    RUN/model/weights.safetensors    the trained weights
    RUN/model/model.json             the spec (see :func:`branchnet.zoo.spec_of`) and metadata:
                                     classes, preprocessing, input shape, layers, parameters

Loading rebuilds the network from the spec (:func:`branchnet.zoo.rebuild`); it never runs
code from the files.

Example:
    >>> import tempfile, pathlib, torch
    >>> from branchnet import zoo
    >>> net = zoo.build({"kind": "mlp", "sizes": ["auto", 8]}, num_classes=2, input_shape=(4,))
    >>> folder = save_model(net, pathlib.Path(tempfile.mkdtemp()) / "model", {"classes": ["a", "b"]})
    >>> again, meta = load_model(folder)
    >>> meta["classes"], bool((again(torch.ones(1, 4)) == net.eval()(torch.ones(1, 4))).all())
    (['a', 'b'], True)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from branchnet import zoo
from branchnet.checkpoint import CheckpointError, load_weights, save_weights
from branchnet.fileio import read_json, write_json
from branchnet.taps import layer_names

__all__ = ["load_model", "load_saved_parent", "model_outputs", "predict_proba", "read_saved",
           "save_model"]


def save_model(model: nn.Module, path: Path, meta: dict[str, Any]) -> Path:
    """``path/weights.safetensors`` + ``path/model.json`` (the spec and ``meta``). A network
    outside the model registry is saved with ``spec: null`` (its weights can still be read)."""
    spec = zoo.spec_of(model)
    path.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), path / "weights.safetensors")
    write_json(path / "model.json", {"spec": spec, **meta, "layers": layer_names(model),
                                     "parameters": zoo.num_parameters(model)})
    return path


def load_model(run_dir: str | Path, command: str = "model") -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a run folder (or of its ``model/`` folder), in eval mode, and its
    metadata. ``command`` names the ``branchnet COMMAND fit --resume`` that finishes an
    interrupted run."""
    path = Path(run_dir)
    if not (path / "model.json").is_file():
        path = path / "model"
    meta_path = path / "model.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{run_dir} has no saved model (no model/model.json); if the run was "
                              f"interrupted, resume it with: branchnet {command} fit --resume {run_dir}")
    meta = read_json(meta_path, CheckpointError)
    if isinstance(meta, dict) and meta.get("spec", 0) is None:
        raise CheckpointError(f"{meta_path}: this network is not in the model registry, so it "
                              "cannot be rebuilt from its spec")
    try:
        model = zoo.rebuild(meta["spec"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path} is damaged ({type(e).__name__}: {e})") from e
    weights, _ = load_weights(path / "weights.safetensors")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path / 'weights.safetensors'} does not match the model in "
                              f"{meta_path}: {e}") from e
    return model.eval(), meta


@torch.inference_mode()
def model_outputs(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The outputs of ``model`` (put in eval mode) for ``x``, in batches, as float32."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])


def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Class probabilities of ``model`` (put in eval mode) for ``x``, in batches."""
    return torch.softmax(model_outputs(model, x, batch_size), dim=1) if len(x) else torch.zeros(0)


def read_saved(folder: str | Path, meta_name: str, fmt: str, what: str
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(meta, weights)`` of a saved folder: ``meta_name`` (JSON whose ``format`` is ``fmt``)
    and ``weights.safetensors``; a missing or foreign description raises CheckpointError
    naming ``what`` the folder should be (e.g. "BranchTree")."""
    folder = Path(folder)
    meta_path = folder / meta_name
    if not meta_path.is_file():
        raise CheckpointError(f"{folder} is not a saved {what} (no {meta_name})")
    meta = read_json(meta_path, CheckpointError)
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise CheckpointError(f"{meta_path} is not a {fmt.replace('.', ' ')} description")
    weights, _ = load_weights(folder / "weights.safetensors")
    return meta, weights


def load_saved_parent(meta: dict[str, Any], weights: dict[str, torch.Tensor],
                      parent: nn.Module | None, missing: Exception) -> nn.Module:
    """The frozen parent of a saved tree or exits folder: ``parent`` (or rebuilt from
    ``meta["parent_spec"]``; ``missing`` is raised when there is none) with the ``parent.``
    weights loaded (only its probe for a pretrained backbone)."""
    if parent is None:
        if not meta["parent_spec"]:
            raise missing
        parent = zoo.rebuild(meta["parent_spec"])
    state = {k[len("parent."):]: v for k, v in weights.items() if k.startswith("parent.")}
    try:
        if hasattr(parent, "load_saved_state"):
            parent.load_saved_state(state)
        else:
            parent.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"the saved weights do not fit the parent: {e}") from e
    return parent.eval().requires_grad_(False)

