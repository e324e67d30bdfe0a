"""The model registry: every network a config can name, one place that sizes it for the data.

A config's ``model`` section is ``{kind: NAME, ...the builder's own arguments}``. :data:`MODELS`
maps each registered name to its builder; :func:`check_spec` checks a spec's kind and options
before any work (no data needed), and :func:`build` sizes it for the data, resolving ``"auto"``
and the data-given arguments in one place: ``num_classes``, an MLP's ``sizes[0]``,
``in_channels``, ``image_size`` and a virtual model's ``input_shape``. :func:`rebuild` turns a
saved ``spec`` (JSON) back into the network.

Experiment kinds may call models by shorter names (``vbranch`` says ``resnet`` for ``vresnet``):
they pass their ``aliases``.

Example:
    >>> net = build({"kind": "mlp", "sizes": ["auto", 32]}, num_classes=3, input_shape=(1, 8, 8))
    >>> net.spec["sizes"], rebuild(net.spec).spec == net.spec
    ([64, 32], True)
    >>> check_spec({"kind": "mlp", "width": 3})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    branchnet.errors.ConfigError: model: unknown option(s) ['width'] for model kind 'mlp'; ...
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from branchnet import models
from branchnet.config import check_file
from branchnet.errors import BranchnetError, ConfigError
from branchnet.text.parent import TextParent
from branchnet.virtual import models as vmodels

__all__ = ["MODELS", "ModelKind", "build", "check_spec", "num_parameters", "rebuild", "spec_of"]

#: arguments that come from the data, never from the config
_FROM_DATA = ("num_classes", "input_shape")


@dataclass(frozen=True)
class ModelKind:
    """A registered network: its builder, default options, and what it needs of the data."""

    builder: Callable[..., nn.Module]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    images: bool = False        #: needs image inputs [C, H, W]
    text: bool = False          #: needs text inputs
    virtual: bool = False       #: outputs (B, K, C): K virtual branches
    first_layer: str | None = None  #: the default layer to analyse (virtual models)
    #: options naming a file or folder that must exist (option -> what it is); ``builtins``
    #: are values that name no file
    files: Mapping[str, str] = field(default_factory=dict)
    builtins: tuple[str, ...] = ()

    @property
    def options(self) -> list[str]:
        return sorted(set(inspect.signature(self.builder).parameters) - set(_FROM_DATA))


MODELS: dict[str, ModelKind] = {
    "mlp": ModelKind(models.mlp, {"sizes": ["auto", 256]}),
    "cnn": ModelKind(models.cnn, images=True),
    "alexnet": ModelKind(models.alexnet, images=True),
    "resnet": ModelKind(models.resnet, images=True),
    "vmlp": ModelKind(vmodels.vmlp, {"sizes": ["auto", 512]}, virtual=True,
                      first_layer="hidden.0.linear"),
    "vcnn": ModelKind(vmodels.vcnn, images=True, virtual=True, first_layer="features.0.0.conv"),
    "vresnet": ModelKind(vmodels.vresnet, images=True, virtual=True, first_layer="stem.conv"),
    "vresnet18": ModelKind(vmodels.vresnet18, images=True, virtual=True, first_layer="stem.conv"),
    "vdensenet_bc": ModelKind(vmodels.vdensenet_bc, images=True, virtual=True, first_layer="conv0"),
    "transformer": ModelKind(TextParent.from_config, text=True,
                             files={"source": "Hugging Face model folder or .zip of one"},
                             builtins=("tiny",)),
}


def check_spec(spec: Any, aliases: Mapping[str, str] | None = None,
               where: str = "model") -> tuple[str, dict[str, Any]]:
    """``(registered kind, options)`` of a config's model spec; a spec that is not a mapping,
    an unknown kind, an unknown option or a missing model file raises :class:`ConfigError`
    naming it."""
    names = dict(aliases) if aliases is not None else {k: k for k in MODELS}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where} must be a mapping like {{kind: {next(iter(names))}, ...}}, "
                          f"got {spec!r}")
    kind = spec.get("kind")
    if kind not in names:
        raise ConfigError(f"{where}.kind must be one of {sorted(names)}, got {kind!r}")
    entry = MODELS[names[kind]]
    options = {k: v for k, v in spec.items() if k != "kind"}
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown} for model kind {kind!r}; "
                          f"valid options: {entry.options}")
    for option, what in entry.files.items():
        if options.get(option) not in entry.builtins:
            check_file(options.get(option), f"{where}.{option}", what)
    return names[kind], options


def build(spec: Any, *, num_classes: int, input_shape: tuple[int, ...] | list[int], seed: int = 0,
          aliases: Mapping[str, str] | None = None, where: str = "model") -> nn.Module:
    """The network of ``spec`` sized for ``num_classes`` outputs and inputs of ``input_shape``,
    its weights initialised from ``seed`` (the global RNG is left as it was)."""
    kind, options = check_spec(spec, aliases, where)
    entry = MODELS[kind]
    shape = tuple(int(s) for s in input_shape)
    if entry.images and len(shape) != 3:
        raise ConfigError(f"{where}.kind {spec['kind']!r} needs images [C, H, W], but the data's "
                          f"inputs have shape {shape}")
    if entry.text != (shape == ()):
        need, got = ("text", f"inputs of shape {shape}") if entry.text else ("tensor inputs", "text")
        raise ConfigError(f"{where}.kind {spec['kind']!r} needs {need}, but the data is {got}")
    params = inspect.signature(entry.builder).parameters
    args = {**entry.defaults, **options, "num_classes": int(num_classes)}
    if "input_shape" in params:
        args["input_shape"] = shape
    if "sizes" in params:
        sizes = list(args["sizes"])
        if not sizes or sizes[0] == "auto":
            sizes[:1] = [int(np.prod(shape))]
        args["sizes"] = sizes
    if "in_channels" in params and args.get("in_channels", "auto") == "auto":
        args["in_channels"] = shape[0]
    if "image_size" in params and args.get("image_size", "auto") == "auto":
        args["image_size"] = list(shape[1:])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            return entry.builder(**args)
        except BranchnetError:  # says what is wrong already (e.g. a model folder's problem)
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: cannot build {spec['kind']} with {options}: {e}") from e


def spec_of(model: nn.Module) -> dict[str, Any] | None:
    """The JSON spec that :func:`rebuild` turns back into ``model``, or None for a network
    branchnet did not build."""
    spec = models.spec_of(model)
    if spec is None and getattr(model, "spec", {}).get("kind") in MODELS:
        spec = dict(model.spec)
    return spec


def rebuild(spec: dict[str, Any]) -> nn.Module:
    """The network of a saved spec (as :func:`spec_of` gives it), untrained."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind in models.KINDS:
        return models.build(spec)
    if kind == "transformer":
        return TextParent.from_spec(spec)
    return vmodels.build_vmodel(spec)


num_parameters = models.num_parameters
