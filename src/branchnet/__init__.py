"""branchnet: branched neural networks on PyTorch.

>>> import branchnet as bn
>>> sorted(bn.Hierarchy.builtin("cifar10").children("root"))
['animals', 'vehicles']
"""

from branchnet import (
    analysis,
    data,
    engine,
    exits,
    metrics,
    models,
    plastic,
    selective,
    selfcheck,
    text,
    virtual,
)
from branchnet._version import __version__ as __version__
from branchnet.cache import ActivationCache, CachedActivations
from branchnet.data.hierarchy import Hierarchy
from branchnet.engine import TrainConfig
from branchnet.runs import Run
from branchnet.taps import extract, layer_names, tap
from branchnet.tree import BranchTree, Prediction

__all__ = [
    "ActivationCache",
    "BranchTree",
    "CachedActivations",
    "Hierarchy",
    "Prediction",
    "Run",
    "TrainConfig",
    "analysis",
    "data",
    "engine",
    "exits",
    "extract",
    "layer_names",
    "metrics",
    "models",
    "plastic",
    "selective",
    "selfcheck",
    "tap",
    "text",
    "virtual",
]
