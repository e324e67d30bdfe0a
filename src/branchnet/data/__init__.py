"""Data layer: loaders for every supported source, splits, normalisation, and class hierarchies."""

from branchnet.data.dataset import Data, DataError, Split, tensor_fingerprint

__all__ = ["Data", "DataError", "Split", "tensor_fingerprint"]
