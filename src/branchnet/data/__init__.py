"""Data layer: loaders for every supported source, splits, normalisation, and class hierarchies."""

from branchnet.data.dataset import Data, DataError, Split, tensor_fingerprint
from branchnet.data.images import read_image_files
from branchnet.data.load import load
from branchnet.data.prepare import apply_preprocessing
from branchnet.data.texts import Texts

__all__ = [
    "Data",
    "DataError",
    "Split",
    "Texts",
    "apply_preprocessing",
    "load",
    "read_image_files",
    "tensor_fingerprint",
]
