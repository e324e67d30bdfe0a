"""Pretrained text parents: local Hugging Face transformers, frozen, tapped at every layer."""

from branchnet.text.hub import ModelError, resolve_model
from branchnet.text.parent import POOLINGS, Pooling, TextParent

__all__ = ["POOLINGS", "ModelError", "Pooling", "TextParent", "resolve_model"]
