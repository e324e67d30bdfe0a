"""The registry of run kinds: ``kind`` name -> its :class:`~branchnet.protocol.Experiment`.

The command line makes ``branchnet KIND fit / eval / compare`` for every entry; a new kind of
run is one module with one ``Experiment`` subclass, and one line here. Entries name the class
by module path so that ``branchnet --help`` starts without importing every kind (and torch).

Example:
    >>> sorted(KINDS)
    ['exits', 'model', 'plastic', 'probe', 'tree', 'vbranch']
    >>> get("tree").kind
    'tree'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, NamedTuple

from branchnet.errors import ConfigError

if TYPE_CHECKING:
    from branchnet.protocol import Experiment

__all__ = ["KINDS", "Kind", "get"]


class Kind(NamedTuple):
    target: str     #: ``module:Class`` of the Experiment subclass
    help: str       #: one line for ``branchnet --help``
    config_help: str  #: what CONFIG is
    set_example: str  #: an example for ``--set``


KINDS: dict[str, Kind] = {
    "tree": Kind("branchnet.tree.experiment:TreeExperiment", "hierarchical branching",
                 "experiment YAML (see configs/)", "parent.train.epochs=5"),
    "model": Kind("branchnet.classifier:ClassifierExperiment",
                  "train and evaluate one plain classifier",
                  "classifier YAML (e.g. configs/specialization-cifar10.yaml)", "model.groups=1"),
    "vbranch": Kind("branchnet.virtual.experiment:VBranchExperiment",
                    "virtual branching: K-branch ensembles in one network",
                    "vbranch YAML (see configs/vbranch-*.yaml)", "model.shared_frac=0.25"),
    "plastic": Kind("branchnet.plastic.experiment:PlasticExperiment",
                    "plasticity: dynamic sparse training, plastic paths",
                    "plastic YAML (see configs/plastic-*.yaml)", "sparsity.density=0.05"),
    "exits": Kind("branchnet.exits.experiment:ExitsExperiment",
                  "early exits on a frozen parent: calibrated, staged, measured in FLOPs",
                  "exits YAML (see configs/exits-*.yaml)", "calibration.epsilon=0.02"),
    "probe": Kind("branchnet.probing:ProbeExperiment",
                  "linear probes on every layer of a frozen (pretrained) parent",
                  "probe YAML (e.g. configs/probe-debian.yaml)", "parent.model.max_length=64"),
}


def get(kind: str) -> type[Experiment]:
    """The Experiment class of a registered kind."""
    if kind not in KINDS:
        raise ConfigError(f"unknown run kind {kind!r}; known kinds are {sorted(KINDS)}")
    module, _, name = KINDS[kind].target.partition(":")
    return getattr(importlib.import_module(module), name)
