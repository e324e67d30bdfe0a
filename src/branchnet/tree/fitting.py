"""What fitting and growing a tree share: its error, training settings, fit summaries, row hashes."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np
import torch

from branchnet.data.texts import Texts
from branchnet.engine import TrainConfig
from branchnet.errors import BranchnetError


class TreeError(BranchnetError, ValueError):
    """The tree cannot be built, fitted or used as asked."""


HEAD_TRAIN_DEFAULTS = {"epochs": 100, "batch_size": 64, "lr": 3e-4, "weight_decay": 0.01,
                  "patience": 10}


def _train_config(cfg: TrainConfig | dict | None, progress: bool,
                  default: dict[str, Any] | None = None) -> TrainConfig:
    if isinstance(cfg, TrainConfig):
        return cfg
    merged = {**(default or {}), "progress": progress, **(cfg or {})}
    return TrainConfig.from_dict(merged)


def _fit_brief(res: Any) -> dict[str, Any]:
    last = res.history[-1] if res.history else {}
    best = next((h for h in res.history if h.get("epoch") == res.best_epoch), last)
    return {"epochs_run": res.epochs_run, "best_epoch": res.best_epoch,
            "best_val_loss": res.best_val_loss, "val_acc": best.get("val_acc"),
            "train_acc": best.get("train_acc")}


def _row_hashes(x: torch.Tensor | Texts) -> np.ndarray:
    """A 64-bit blake2b hash of each input row's float32 bytes (of each text's UTF-8)."""
    rows = ([t.encode() for t in x] if isinstance(x, Texts)
            else x.detach().cpu().contiguous().flatten(1).numpy())
    return np.frombuffer(b"".join(hashlib.blake2b(r, digest_size=8).digest() for r in rows),
                         dtype=np.uint64)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40]
