"""Experiment configs in YAML: defaults, deep merge with validation, overrides, paths, data.

Every experiment (``tree fit``, ``model fit``) reads its config through here: unknown keys are
errors that list the valid ones, ``--set key.sub=value`` overrides are applied before the
merge, and file paths are made absolute so a run folder's config works from anywhere.

Example:
    >>> merge_config({"a": 1, "b": {"c": 2}}, {"b": {"c": 3}})
    {'a': 1, 'b': {'c': 3}}
    >>> merge_config({"a": 1}, {"x": 2})
    Traceback (most recent call last):
    ...
    branchnet.config.ConfigError: unknown config key 'x'; valid keys here: ['a']
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from branchnet.data import Data, load
from branchnet.errors import ConfigError

#: the ``data`` section shared by every experiment (arguments of :func:`branchnet.data.load`)
DATA_DEFAULTS: dict[str, Any] = {
    "source": "digits", "classes": None, "normalize": None, "val_fraction": 0.1,
    "test_fraction": 0.2, "max_per_class": None, "image_size": None, "label_set": "fine",
    "cache_dir": None, "split_seed": None,
}

# values that are whole user-defined structures, not sections with fixed keys
_FREE_FORM = {"hierarchy", "model", "classes"}


def merge_config(base: dict[str, Any], override: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Deep-merge ``override`` into ``base``; unknown keys raise (with the valid ones listed)."""
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if k not in base:
            raise ConfigError(f"unknown config key {where + k!r}; valid keys here: {sorted(base)}")
        if isinstance(base[k], dict) and isinstance(v, dict) and k not in _FREE_FORM:
            out[k] = merge_config(base[k], v, f"{where}{k}.")
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(path: str | Path, overrides: list[str] | None,
                defaults: dict[str, Any]) -> dict[str, Any]:
    """Read a YAML config, apply ``key.sub=value`` overrides, merge into ``defaults``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        user = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(user, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(user).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        node = user
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    return merge_config(defaults, user)


def resolve_source(source: str, config_dir: Path | None) -> str:
    """A data source path relative to the working directory, else to the config file."""
    if source in ("digits",) or Path(source).exists() or config_dir is None:
        return source
    alt = config_dir / source
    return str(alt) if alt.exists() else source


def resolve_paths(cfg: dict[str, Any], config_dir: Path | None) -> dict[str, Any]:
    """The config with its file paths (data source, hierarchy file, parent weights) made
    absolute, found relative to the working directory or else to the config file, so that the
    run folder's config.yaml works from any directory (``tree eval``, ``tree fit --resume``)."""
    cfg = copy.deepcopy(cfg)

    def absolute(value: Any) -> Any:
        if not isinstance(value, str) or value in ("digits", "cifar10", "cifar100"):
            return value
        path = Path(value).expanduser()
        if not path.exists() and config_dir is not None and (config_dir / path).exists():
            path = config_dir / path
        return str(path.resolve()) if path.exists() else value

    cfg["data"]["source"] = absolute(cfg["data"]["source"])
    if "hierarchy" in cfg:  # tree experiments
        cfg["hierarchy"] = absolute(cfg["hierarchy"])
    if "parent" in cfg:
        cfg["parent"]["weights"] = absolute(cfg["parent"]["weights"])
    if "embedding" in cfg:  # vbranch embedding runs
        cfg["embedding"]["train"] = [absolute(p) for p in cfg["embedding"]["train"] or []]
        cfg["embedding"]["runs"] = absolute(cfg["embedding"]["runs"])
    return cfg


def load_data(cfg: dict[str, Any], config_dir: Path | None = None) -> Data:
    d = cfg["data"]
    return load(resolve_source(str(d["source"]), config_dir), classes=d["classes"],
                val_fraction=d["val_fraction"], test_fraction=d["test_fraction"],
                seed=cfg["seed"] if d.get("split_seed") is None else d["split_seed"],
                normalize=d["normalize"], image_size=d["image_size"],
                max_per_class=d["max_per_class"], label_set=d["label_set"],
                cache_dir=d["cache_dir"], progress=cfg["progress"])
