"""Config schemas: types, ranges and choices declared once, with pydantic, for every run kind.

An experiment kind declares its config as a :class:`Section` (a pydantic model that forbids
unknown keys). :func:`validate` checks a user's mapping against it and returns the complete
config as plain data (defaults filled in); any problem becomes one
:class:`~branchnet.errors.ConfigError` whose message gives the key path, the value and what is
allowed, so the command line can print it before any work starts. :func:`describe` turns a
field into that "what is allowed" phrase, the same text ``docs/errors.md`` shows.

Example:
    >>> validate(TrainSection, {"lr": "nan"}, where="parent.train")
    Traceback (most recent call last):
    ...
    branchnet.errors.ConfigError: parent.train.lr must be a positive number, got 'nan'
    >>> validate(TrainSection, {"epochs": 3})["epochs"]
    3
"""

from __future__ import annotations

import json
import types
import typing
from typing import Annotated, Any, Literal

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from branchnet.errors import ConfigError

__all__ = [
    "DataSection",
    "Fraction",
    "OpenFraction",
    "PositiveFloat",
    "PositiveInt",
    "Section",
    "Seed",
    "TrainSection",
    "describe",
    "validate",
]

# ---------------------------------------------------------------------------------- types
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
#: a number strictly between 0 and 1 (a risk, a delta, a split fraction)
OpenFraction = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
#: a number in [0, 1]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
#: a random seed: what numpy, torch and scikit-learn all accept (32 bits)
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked strictly enough that
    ``epochs: ten`` or ``lr: nan`` fail, loosely enough that ``lr: 1e-3`` (a YAML string) works."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class TrainSection(Section):
    """How to train one network (:class:`branchnet.engine.TrainConfig`)."""

    epochs: PositiveInt = 20
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.9
    patience: PositiveInt | None = None
    seed: Seed = 0
    devices: PositiveInt = 1
    num_workers: NonNegativeInt = 0
    progress: bool = True
    batches_per_step: PositiveInt | None = None
    lr_schedule: Literal["cosine", "step", "onecycle"] | None = None
    lr_milestones: list[PositiveInt] = Field(default_factory=list)
    lr_gamma: PositiveFloat = 0.1
    warmup_epochs: NonNegativeFloat = 0.0
    nesterov: bool = False
    label_smoothing: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.0
    augment: Literal["flip", "crop", "flip-crop"] | None = None
    crop_padding: PositiveInt = 4
    precision: Literal["32", "bf16"] = "32"
    channels_last: bool = True


def with_defaults(section: type[Section], **defaults: Any) -> type[Section]:
    """A subclass of ``section`` whose own defaults are ``defaults``: they apply to the keys a
    user leaves out, whether the user gives the section or not. Declare the field with it::

        HeadTrain = with_defaults(TrainSection, epochs=100)
        head_train: HeadTrain = Field(default_factory=HeadTrain)
    """
    def field_of(name: str) -> Any:
        info = section.model_fields[name]
        kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        return kind, defaults[name]

    return create_model(section.__name__, __base__=section, __doc__=section.__doc__,
                        **{k: field_of(k) for k in defaults})


class DataSection(Section):
    """The ``data`` section every experiment shares (arguments of :func:`branchnet.data.load`)."""

    source: str = "digits"
    test_source: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    group_column: str | None = None
    classes: list[str | int] | None = None
    normalize: Literal["channel", "feature", "none"] | None = None
    val_fraction: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.1
    test_fraction: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.2
    max_per_class: PositiveInt | None = None
    image_size: PositiveInt | Annotated[list[PositiveInt], Field(min_length=2, max_length=2)] | None = None
    label_set: Literal["fine", "coarse"] = "fine"
    cache_dir: str | None = None
    split_seed: Seed | None = None


#: the data section of kinds whose runs of different seeds must share one test split (so that
#: single-branch runs form independent ensembles, and sparsity rules compare on the same data)
SharedSplitData = with_defaults(DataSection, split_seed=0)


# ---------------------------------------------------------------------------- messages
_BOUNDS = {"gt": at.Gt, "ge": at.Ge, "lt": at.Lt, "le": at.Le, "min_length": at.MinLen,
           "max_length": at.MaxLen}


def _constraints(info: FieldInfo | None, annotation: Any) -> dict[str, Any]:
    """The bounds (``gt``, ``le``, ``min_length``, ...) declared on a field."""
    meta = [*(info.metadata if info else []), *_annotated_metadata(annotation)]
    return {name: getattr(m, name) for m in meta for name, cls in _BOUNDS.items()
            if isinstance(m, cls)}


def _annotated_metadata(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is Annotated:
        meta = []
        for m in typing.get_args(annotation)[1:]:
            meta.extend(m.metadata if isinstance(m, FieldInfo) else [m])
        return meta
    return []


def _base(annotation: Any) -> Any:
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation


def _range(kind: str, c: dict[str, Any]) -> str:
    lo = c.get("gt", c.get("ge"))
    hi = c.get("lt", c.get("le"))
    if kind == "number" and c.get("gt") == 0 and hi is None:
        return "a positive number"
    if kind == "whole number" and c.get("ge") == 1 and hi is None:
        return "a positive whole number"
    if lo is not None and hi is not None:
        left = "(" if "gt" in c else "["
        right = ")" if "lt" in c else "]"
        return f"a {kind} in {left}{lo}, {hi}{right}"
    if lo is not None:
        return f"a {kind} {'>' if 'gt' in c else '>='} {lo}"
    if hi is not None:
        return f"a {kind} {'<' if 'lt' in c else '<='} {hi}"
    return f"a {kind}"


def describe(annotation: Any, info: FieldInfo | None = None) -> str:
    """What a field allows, in words: ``a positive number``, ``one of ['adam', 'sgd']``, ...

    >>> describe(PositiveFloat)
    'a positive number'
    >>> describe(Literal["a", "b"] | None)
    "one of ['a', 'b'] or null"
    """
    base = _base(annotation)
    c = _constraints(info, annotation)
    origin = typing.get_origin(base)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(base)
        parts = [describe(a) for a in args if a is not type(None)]
        # merge the choices of several literals
        text = " or ".join(dict.fromkeys(parts))
        return text + (" or null" if type(None) in args else "")
    if origin is Literal:
        return f"one of {list(typing.get_args(base))}"
    if origin is list:
        (item,) = typing.get_args(base) or (Any,)
        n = ""
        if c.get("min_length") is not None and c.get("min_length") == c.get("max_length"):
            n = f"{c['min_length']} "
        members = [a for a in typing.get_args(item) if a is not type(None)] if typing.get_origin(
            item) in (typing.Union, types.UnionType) else [item]
        return f"a list of {n}" + " or ".join(_plural(describe(m)) for m in members)
    if origin is dict or base is dict:
        return "a mapping"
    if isinstance(base, type) and issubclass(base, BaseModel):
        return "a mapping of keys"
    if base is bool:
        return "true or false"
    if base is int:
        return _range("whole number", c)
    if base is float:
        return _range("number", c)
    if base is str:
        return "a string"
    return "any value" if base is Any else getattr(base, "__name__", str(base))


def _plural(text: str) -> str:
    """``a positive whole number`` -> ``positive whole numbers`` (for list items)."""
    text = text.removeprefix("a ")
    for noun in ("number", "string", "mapping"):
        if noun in text:
            return text.replace(noun, noun + "s", 1)
    return text


def _model_in(annotation: Any) -> type[BaseModel] | None:
    base = _base(annotation)
    if isinstance(base, type) and issubclass(base, BaseModel):
        return base
    for a in typing.get_args(base):
        m = _model_in(a)
        if m is not None:
            return m
    return None


def _list_item(annotation: Any) -> Any:
    base = _base(annotation)
    if typing.get_origin(base) is list:
        return (typing.get_args(base) or (Any,))[0]
    for a in typing.get_args(base):
        if typing.get_origin(_base(a)) is list:
            return _list_item(a)
    return Any


def _walk(model: type[BaseModel], loc: tuple[Any, ...], where: str) -> tuple[str, Any, Any, Any]:
    """(dotted key path, annotation, FieldInfo, enclosing model) of a pydantic error location.
    Location parts that name a union member (``'int'``, ``'list[int]'``) are skipped."""
    path = where
    annotation: Any = model
    info: FieldInfo | None = None
    owner: type[BaseModel] | None = model
    for part in loc:
        sub = _model_in(annotation)
        if isinstance(part, int):
            path += f"[{part}]"
            annotation, info = _list_item(annotation), None
        elif sub is not None:
            path += ("." if path else "") + part
            owner, info = sub, sub.model_fields.get(part)
            annotation = info.annotation if info else None
            if info is None:
                break
    return path, annotation, info, owner


def _message(err: dict[str, Any], model: type[BaseModel], where: str) -> str:
    path, annotation, info, owner = _walk(model, tuple(err["loc"]), where)
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        valid = sorted(owner.model_fields) if owner else []
        return f"unknown config key {path!r}; valid keys here: {valid}"
    if err["type"] == "missing":
        return f"{path} is required ({describe(annotation, info)})"
    if err["type"] in ("value_error", "assertion_error"):
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
        return f"{path}: {msg}" if path else msg
    allowed = describe(annotation, info) if annotation is not None else err["msg"]
    return f"{path} must be {allowed}, got {value!r}"


def reference(schema: type[BaseModel], where: str = "") -> list[dict[str, str]]:
    """Every key of a config schema with what it allows and its default, sections expanded:
    the rows of ``docs/config.md``.

    >>> reference(TrainSection)[0]
    {'key': 'epochs', 'allowed': 'a positive whole number', 'default': '20'}
    """
    rows = []
    for name, info in schema.model_fields.items():
        key = f"{where}.{name}" if where else name
        sub = _model_in(info.annotation)
        if sub is not None and typing.get_origin(info.annotation) is None:
            rows += reference(sub, key)
            continue
        default = info.get_default(call_default_factory=True)
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        rows.append({"key": key, "allowed": describe(annotation),
                     "default": json.dumps(default)})
    return rows


def validate(schema: type[Section], cfg: Any, where: str = "") -> dict[str, Any]:
    """``cfg`` checked against ``schema``, as plain data with every default filled in.
    Raises :class:`ConfigError` with the first problem (key path, value, what is allowed)."""
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping of keys, got {cfg!r}")
    try:
        return schema.model_validate(cfg).model_dump(mode="python")
    except ValidationError as e:
        errors = sorted(e.errors(include_url=False),
                        key=lambda er: er["type"] != "extra_forbidden")  # unknown keys first
        raise ConfigError(_message(errors[0], schema, where)) from None
