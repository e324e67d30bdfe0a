"""Hierarchical branching: a frozen parent, branch heads per node, routing and abstention."""

from branchnet.tree.layout import TreeLayout
from branchnet.tree.prediction import Prediction
from branchnet.tree.router import POLICIES, SCORES, TreeRouter
from branchnet.tree.tree import BranchTree, TreeError

__all__ = ["POLICIES", "SCORES", "BranchTree", "Prediction", "TreeError", "TreeLayout", "TreeRouter"]
