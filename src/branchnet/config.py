"""Experiment configs in YAML: reading, ``--set`` overrides, absolute paths.

What a config may contain is declared by each run kind's schema (:mod:`branchnet.schema`);
this module reads the file, applies ``--set key.sub=value`` overrides (values parsed as YAML)
and makes file paths absolute, so that a run folder's ``config.yaml`` works from anywhere.

Example:
    >>> cfg = {"data": {"source": "digits"}}
    >>> apply_overrides(cfg, ["data.val_fraction=0.3", "seed=2"])
    {'data': {'source': 'digits', 'val_fraction': 0.3}, 'seed': 2}
    >>> apply_overrides({"data": 3}, ["data.source=x"])
    Traceback (most recent call last):
    ...
    branchnet.errors.ConfigError: cannot set data.source=x: data is 3, not a mapping of keys
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from branchnet.errors import ConfigError

__all__ = ["apply_overrides", "read_yaml", "resolve_paths"]

#: data sources that are names, not paths
BUILTIN_SOURCES = ("digits", "cifar10", "cifar100")


def apply_overrides(cfg: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """``cfg`` with each ``key.sub=value`` of ``overrides`` set (the value parsed as YAML)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not k for k in key.split(".")):
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        node = cfg
        *parents, last = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                where = ".".join(parents[:i + 1])
                raise ConfigError(f"cannot set {item}: {where} is {node!r}, not a mapping of keys")
        try:
            node[last] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML "
                              f"({_yaml_error(e)})") from None
    return cfg


def _yaml_error(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong, and where."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def read_yaml(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The mapping in a YAML config file, with ``overrides`` applied."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        user = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_error(e)}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(user).__name__}")
    return apply_overrides(user, overrides)


def _absolute(value: Any, config_dir: Path | None) -> Any:
    """A path found relative to the working directory, else to the config file, made absolute;
    anything else (a built-in name, a path that exists nowhere) as given."""
    if not isinstance(value, str) or value in BUILTIN_SOURCES:
        return value
    path = Path(value).expanduser()
    if not path.exists() and config_dir is not None and (config_dir / path).exists():
        path = config_dir / path
    return str(path.resolve()) if path.exists() else value


def resolve_paths(cfg: dict[str, Any], config_dir: Path | None) -> dict[str, Any]:
    """The config with its file paths (data source and test file, hierarchy file, parent
    weights and pretrained model, Omniglot archives and one-shot runs) made absolute."""
    cfg = copy.deepcopy(cfg)
    if "data" in cfg:
        cfg["data"]["source"] = _absolute(cfg["data"]["source"], config_dir)
    if isinstance(cfg.get("hierarchy"), str):
        cfg["hierarchy"] = _absolute(cfg["hierarchy"], config_dir)
    if "data" in cfg and cfg["data"].get("test_source"):
        cfg["data"]["test_source"] = _absolute(cfg["data"]["test_source"], config_dir)
    if "parent" in cfg:
        cfg["parent"]["weights"] = _absolute(cfg["parent"]["weights"], config_dir)
        model = cfg["parent"].get("model")
        if isinstance(model, dict) and isinstance(model.get("source"), str):
            model["source"] = _absolute(model["source"], config_dir)
    if "embedding" in cfg:
        cfg["embedding"]["train"] = [_absolute(p, config_dir) for p in cfg["embedding"]["train"]]
        cfg["embedding"]["runs"] = _absolute(cfg["embedding"]["runs"], config_dir)
    return cfg


def check_file(value: str | None, key: str, what: str = "file") -> None:
    """``value`` is None or names an existing file or folder; else a ConfigError for ``key``."""
    if value is not None and not Path(value).exists():
        raise ConfigError(f"{key} must be an existing {what}, got {value!r}")
