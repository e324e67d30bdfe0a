"""Training engine on PyTorch Lightning, shared by every branchnet model.

:func:`fit` trains any classifier ``nn.Module`` with cross-entropy: seeded, with progress
bars, CSV metrics, a safetensors checkpoint after every epoch, early stopping that really
restores the best weights, ``resume=True`` after an interruption, a clear error on a NaN loss,
and multi-process DDP (gloo on CPU) with ``devices=2``.

Example:
    >>> import tempfile, torch
    >>> from branchnet.data.batches import TensorPairs
    >>> net = torch.nn.Linear(4, 2)
    >>> ds = TensorPairs(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    >>> cfg = TrainConfig(epochs=2, batch_size=16, progress=False)
    >>> result = fit(net, ds, ds, cfg, workdir=tempfile.mkdtemp())
    >>> result.epochs_run
    2
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import Dataset

from branchnet.checkpoint import CheckpointError, SafetensorsCheckpointIO, load_checkpoint
from branchnet.data.augment import augment_batch
from branchnet.data.batches import make_loader
from branchnet.errors import BranchnetError, ConfigError
from branchnet.fileio import atomic_write, read_json, write_json
from branchnet.schema import TrainSection, validate

_FUSED = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4) or None


class TrainingError(BranchnetError, RuntimeError):
    """Training cannot go on (NaN loss, bad configuration)."""


@dataclass
class TrainConfig:
    """How to train one network. All fields have defaults; unknown keys are rejected."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    momentum: float = 0.9
    patience: int | None = None
    seed: int = 0
    devices: int = 1
    num_workers: int = 0
    progress: bool = True
    batches_per_step: int | None = None
    lr_schedule: str | None = None
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    #: ``onecycle``: linear rise from 0 over ``warmup_epochs``, then linear fall to 0 at the end
    warmup_epochs: float = 0.0
    nesterov: bool = False
    label_smoothing: float = 0.0
    #: batch augmentation of image inputs (:mod:`branchnet.data.augment`)
    augment: str | None = None
    crop_padding: int = 4
    #: ``bf16``: bfloat16 autocast (Lightning's ``bf16-mixed``); weights stay float32
    precision: str = "32"
    #: 4-d weights and image batches in channels-last memory order (faster convolutions on CPU)
    channels_last: bool = True

    def __post_init__(self) -> None:
        # ranges and choices are declared once, in the config schema's TrainSection
        try:
            validate(TrainSection, asdict(self))
        except ConfigError as e:
            raise TrainingError(str(e)) from None
        if self.lr_schedule == "onecycle" and self.warmup_epochs >= self.epochs:
            raise TrainingError(f"warmup_epochs must be below epochs ({self.epochs}) for the "
                                f"onecycle schedule, got {self.warmup_epochs}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise TrainingError("nesterov needs optimizer 'sgd' with momentum > 0, got "
                                f"optimizer {self.optimizer!r}, momentum {self.momentum}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TrainConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainingError(f"unknown training options {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lr_at(self, epoch: float) -> float:
        """The learning rate at ``epoch`` (0-based; fractional within an epoch for
        ``onecycle``, which is set every step): constant, cosine to 0 over ``epochs``,
        multiplied by ``lr_gamma`` at each of ``lr_milestones``, or one cycle (up over
        ``warmup_epochs``, then down to 0 at the end).

        >>> TrainConfig(lr=0.1, lr_schedule="step", lr_milestones=[2], epochs=4).lr_at(3)
        0.010000000000000002
        >>> TrainConfig(lr=0.1, lr_schedule="onecycle", warmup_epochs=1, epochs=3).lr_at(2)
        0.05
        """
        if self.lr_schedule == "onecycle":
            up = self.warmup_epochs
            if epoch < up:
                return self.lr * epoch / up
            return self.lr * max(0.0, (self.epochs - epoch) / (self.epochs - up))
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))
        if self.lr_schedule == "step":
            return self.lr * self.lr_gamma ** sum(epoch >= m for m in self.lr_milestones)
        return self.lr


Scorer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]


def argmax_score(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Correct predictions and their count: ``argmax`` over the last dimension against ``y``."""
    return (logits.argmax(-1) == y).sum(), y.numel()


@dataclass
class FitResult:
    """What a training run did: per-epoch history, best epoch and score, checkpoint paths."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_loss: float | None = None
    epochs_run: int = 0
    stopped_early: bool = False
    best_checkpoint: str | None = None
    #: wall seconds of training (validation included) from the start to the end of each epoch
    epoch_seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ClassifierModule(L.LightningModule):
    """Wraps any classifier: cross-entropy loss, accuracy, the configured optimizer.

    Lightning hands over *chunks* of ``batches_per_step`` minibatches; the module steps the
    optimizer once per minibatch (manual optimization). Same maths as one Lightning step per
    minibatch, but the framework's per-step cost is paid once per chunk: that matters for the
    small branch heads trained on cached activations, whose own step is well under a
    millisecond. Metrics are summed on the fly and logged once per epoch.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 score_fn: Scorer | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.cfg = cfg
        self.loss_fn = loss_fn or partial(F.cross_entropy, label_smoothing=cfg.label_smoothing)
        self.score_fn = score_fn or argmax_score
        self._sums: dict[str, torch.Tensor] = {}
        self._time_before, self._t0, self._chunks = 0.0, time.perf_counter(), 1
        self.history: list[dict[str, float]] = []
        #: training seconds from the start of the run to the end of each epoch (resumes add on)
        self.epoch_seconds: list[float] = []
        self.csv_path: Path | None = None
        self.monitor: Any = None  # a loader evaluated after every epoch, for the record only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory order the convolutions are trained in."""
        if self.cfg.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _loss(self, x: torch.Tensor, y: torch.Tensor, stage: str) -> torch.Tensor:
        logits = self.model(self._inputs(x))
        loss = self.loss_fn(logits, y)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"{stage} loss is {loss.item()} at epoch {self.current_epoch}; lower the "
                f"learning rate (lr={self.cfg.lr}) or check the inputs for NaN/inf. "
                "Checkpoints of earlier epochs are kept."
            )
        correct, count = self.score_fn(logits.detach(), y)
        s = self._sums.setdefault(stage, torch.zeros(4))
        s[0] += loss.detach() * len(y)
        s[1] += correct
        s[2] += count
        s[3] += len(y)
        return loss

    @torch.no_grad()
    def _evaluate(self, loader: Any) -> tuple[float, float]:
        """Mean loss and score over ``loader``, in eval mode, touching no training state."""
        was_training = self.model.training
        self.model.eval()
        loss = correct = count = rows = 0.0
        for x, y in loader:
            with self.trainer.precision_plugin.forward_context():
                logits = self.model(self._inputs(x))
            loss += float(self.loss_fn(logits.float(), y)) * len(y)
            c, n = self.score_fn(logits, y)
            correct, count, rows = correct + float(c), count + n, rows + len(y)
        self.model.train(was_training)
        return loss / max(rows, 1.0), correct / max(count, 1.0)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt, cfg = self.optimizers(), self.cfg
        x, y = batch
        starts = range(0, len(y), cfg.batch_size)
        for i, start in enumerate(starts):
            sl = slice(start, start + cfg.batch_size)
            if cfg.lr_schedule == "onecycle":
                epoch = self.current_epoch + (batch_idx + i / len(starts)) / self._chunks
                for group in opt.optimizer.param_groups:
                    group["lr"] = cfg.lr_at(epoch)
            xb = x[sl] if cfg.augment is None else augment_batch(x[sl], cfg.augment,
                                                                 cfg.crop_padding)
            loss = self._loss(xb, y[sl], "train")
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            opt.step()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._loss(*batch, "val")

    def _end_epoch(self) -> None:
        """Log this epoch's sums and add a row to the history (kept inside checkpoints)."""
        row: dict[str, float] = {"epoch": self.current_epoch}
        self.epoch_seconds.append(self._time_before + time.perf_counter() - self._t0)
        if self.monitor is not None:
            t = time.perf_counter()
            row["monitor_loss"], row["monitor_acc"] = self._evaluate(self.monitor)
            self._t0 += time.perf_counter() - t  # the record's time is not training time
        for stage in ("train", "val"):
            sums = self._sums.pop(stage, None)
            if sums is None:
                continue
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            row[f"{stage}_loss"] = float(sums[0]) / max(float(sums[3]), 1.0)
            row[f"{stage}_acc"] = float(sums[1]) / max(float(sums[2]), 1.0)
            self.log(f"{stage}_loss", row[f"{stage}_loss"], prog_bar=stage == "val")
            self.log(f"{stage}_acc", row[f"{stage}_acc"], prog_bar=stage == "val")
        self.history.append(row)
        if self.csv_path is not None and self.trainer.is_global_zero:
            write_history(self.history, self.csv_path)

    # Validation runs after the epoch's training batches, before checkpointing: end the epoch
    # there when there is validation, else at the end of training.
    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._end_epoch()

    def on_train_start(self) -> None:
        self._time_before = self.epoch_seconds[-1] if self.epoch_seconds else 0.0
        self._t0 = time.perf_counter()
        if self.cfg.channels_last:
            # optimizer state restored from a checkpoint comes back contiguous; the optimizer's
            # element-wise kernels round differently on mixed memory orders, so give every
            # state tensor its parameter's order, or a resumed run drifts from an unbroken one
            for opt in self.trainer.optimizers:
                for p, state in opt.state.items():
                    for k, v in state.items():
                        if torch.is_tensor(v) and v.shape == p.shape and v.ndim == 4:
                            state[k] = v.contiguous(memory_format=torch.channels_last)

    def on_train_epoch_start(self) -> None:
        # set, not stepped: the rate depends on the epoch (and step) alone, so a resumed run
        # matches
        self._chunks = max(1, self.trainer.num_training_batches)
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = self.cfg.lr_at(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        if "train" in self._sums:
            self._end_epoch()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the global RNG drives dropout: restoring it makes a resumed run identical
        checkpoint["torch_rng_state"] = torch.get_rng_state()
        checkpoint["history"] = self.history
        checkpoint["epoch_seconds"] = self.epoch_seconds

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])
        self.history = list(checkpoint.get("history", []))
        self.epoch_seconds = list(checkpoint.get("epoch_seconds", []))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        c = self.cfg
        params = self.model.parameters()
        if c.optimizer == "adam":  # fused: one kernel for all parameters (CPU too, torch >= 2.4)
            return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay, fused=_FUSED)
        if c.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay, fused=_FUSED)
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                               nesterov=c.nesterov)


class _SafeCheckpoint(ModelCheckpoint):
    FILE_EXTENSION = ".safetensors"


class _LastCheckpoint(_SafeCheckpoint):
    """``last.safetensors`` after every epoch (its own class: its own callback state key).

    ``ModelCheckpoint(save_last=True)`` writes ``last`` only on epochs where it also wrote a
    top-k checkpoint (Lightning >= 2.5): never without validation, and not on the epochs where
    the validation loss got worse, so an interrupted run would lose those epochs.
    """


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")


def memory_format(model: nn.Module, fmt: torch.memory_format) -> None:
    """Store the 4-d parameters of ``model`` in ``fmt`` (channels-last or contiguous), in place;
    values, optimizer and ``state_dict`` are unchanged."""
    for p in model.parameters():
        if p.ndim == 4:
            p.data = p.data.contiguous(memory_format=fmt)


def write_history(history: list[dict[str, float]], path: Path) -> None:
    """Write per-epoch metrics as CSV, atomically."""
    columns = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)


def fit(
    model: nn.Module,
    train: Dataset,
    val: Dataset | None,
    cfg: TrainConfig,
    *,
    workdir: str | Path,
    resume: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    score_fn: Scorer | None = None,
    callbacks: list[L.Callback] | None = None,
    description: str = "",
    monitor: Dataset | None = None,
) -> FitResult:
    """Train ``model`` in place; with ``val`` and ``cfg.patience``, stop early and restore the best.

    ``workdir`` receives ``checkpoints/last.safetensors`` (every epoch), ``checkpoints/best-*``,
    ``metrics.csv`` and ``result.json``. With ``resume=True`` training continues from
    ``last.safetensors``; a finished run (``result.json`` present) is not trained again.

    ``loss_fn(output, y)`` replaces cross-entropy; ``score_fn(output, y) -> (correct, count)``
    replaces argmax accuracy (for models whose output is not ``(batch, classes)``). Extra
    Lightning ``callbacks`` run with the engine's own; their ``state_dict`` goes into every
    checkpoint (tensors included), so they resume too. ``monitor`` (say, the test split) is
    evaluated after every epoch for the record only (``monitor_loss`` / ``monitor_acc`` in the
    history): it never decides early stopping or the best checkpoint, and its time is left
    out of ``epoch_seconds``.
    """
    _quiet_lightning()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result_path = workdir / "result.json"
    ckpt_dir = workdir / "checkpoints"
    last = ckpt_dir / "last.safetensors"
    if resume and result_path.is_file():
        result = _read_result(result_path)
        if result.best_checkpoint:
            result.best_checkpoint = str(workdir / result.best_checkpoint)
        _restore(model, Path(result.best_checkpoint or last))
        return result
    if not resume and last.exists():
        raise TrainingError(
            f"{workdir} already holds checkpoints of an earlier run; pass resume=True to continue "
            "it, or use a new run folder (earlier results are never overwritten)"
        )

    if resume and last.exists():
        _check_resumable(last)
        # temporary files of writes that a killed process never finished
        for tmp in [*workdir.glob(".*.tmp"), *ckpt_dir.glob(".*.tmp")]:
            tmp.unlink(missing_ok=True)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.augment is not None:
        x0 = train[0][0]
        if not isinstance(x0, torch.Tensor) or x0.ndim != 3:
            raise TrainingError(f"augment={cfg.augment!r} needs image inputs [C, H, W], got "
                                f"inputs of shape {tuple(getattr(x0, 'shape', ()))}")
    if cfg.channels_last:
        memory_format(model, torch.channels_last)
    module = ClassifierModule(model, cfg, loss_fn, score_fn)
    module.csv_path = workdir / "metrics.csv"
    if monitor is not None:
        module.monitor = make_loader(monitor, max(cfg.batch_size, 256))
    monitor = "val_loss" if val is not None else None
    checkpoint = _SafeCheckpoint(
        dirpath=ckpt_dir, filename="best-{epoch:03d}", monitor=monitor, mode="min",
        save_top_k=1 if monitor else 0, enable_version_counter=False,
    )
    # after `checkpoint`, so that last.safetensors holds its updated best-model state
    last_checkpoint = _LastCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None,
                                      save_top_k=1, enable_version_counter=False)
    # user callbacks first: their state must be current when the checkpoints are written
    all_callbacks: list[L.Callback] = [*(callbacks or []), checkpoint, last_checkpoint]
    if monitor and cfg.patience:
        all_callbacks.append(EarlyStopping(monitor=monitor, patience=cfg.patience, mode="min"))
    strategy: Any = "auto"
    if cfg.devices > 1:
        # models whose forward skips some parameters (inactive plastic paths) say so
        strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo",
                               find_unused_parameters=bool(getattr(model, "has_unused_parameters", False)))
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator="cpu",
        devices=cfg.devices,
        strategy=strategy,
        plugins=[SafetensorsCheckpointIO()],
        callbacks=all_callbacks,
        logger=False,
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        precision="bf16-mixed" if cfg.precision == "bf16" else "32-true",
    )
    if cfg.progress and description:
        print(f"training {description}", flush=True)
    chunk = cfg.batch_size * (cfg.batches_per_step or max(1, 1024 // cfg.batch_size))
    train_loader = make_loader(train, chunk, shuffle=True, num_workers=cfg.num_workers,
                               seed=cfg.seed)
    val_loader = make_loader(val, max(cfg.batch_size, 256)) if val is not None else None
    trainer.fit(module, train_loader, val_loader,
                ckpt_path=str(last) if resume and last.exists() else None)

    memory_format(model, torch.contiguous_format)  # users' code may .view() its outputs
    history, epochs_run, seconds = module.history, trainer.current_epoch, module.epoch_seconds
    if cfg.devices > 1 and last.is_file():
        # DDP trained in spawned workers: this process only got the final weights back (not
        # the history, epoch count or best score), so read them from rank 0's last checkpoint
        ck = load_checkpoint(last)
        history, epochs_run = list(ck.get("history", [])), int(ck["epoch"]) + 1
        seconds = list(ck.get("epoch_seconds", []))
        if checkpoint.state_key in ck.get("callbacks", {}):
            checkpoint.load_state_dict(ck["callbacks"][checkpoint.state_key])
    best_path = checkpoint.best_model_path or None
    result = FitResult(history=history, epochs_run=epochs_run, epoch_seconds=seconds,
                       stopped_early=epochs_run < cfg.epochs,
                       best_checkpoint=best_path)
    if best_path:
        result.best_val_loss = float(checkpoint.best_model_score)
        result.best_epoch = int(load_checkpoint(best_path)["epoch"])
        _restore(model, Path(best_path))
    if os.environ.get("LOCAL_RANK", "0") == "0":
        # the best checkpoint relative to workdir, so that a run folder can be moved
        saved = {**result.to_dict(), "best_checkpoint": os.path.relpath(best_path, workdir)
                 if best_path else None}
        write_json(result_path, saved)
    return result


def _read_result(path: Path) -> FitResult:
    """``result.json`` of a finished fit; a damaged one is a :class:`CheckpointError`."""
    hint = ("; delete it and resume again: training continues from "
            f"{path.parent / 'checkpoints' / 'last.safetensors'}")
    try:
        return FitResult(**read_json(path, CheckpointError))
    except CheckpointError as e:
        raise CheckpointError(f"{e}{hint}") from e
    except TypeError as e:
        raise CheckpointError(f"{path} is damaged (not a branchnet fit result: {e}){hint}") from e


def _check_resumable(last: Path) -> None:
    """Resuming reads ``last``: a damaged one is an error naming it, before training starts
    (there is no earlier epoch's checkpoint to fall back to: ``best-*`` is not the previous
    epoch, so resuming from it would not give the uninterrupted run's result)."""
    try:
        load_checkpoint(last)
    except CheckpointError as e:
        raise CheckpointError(
            f"cannot resume: checkpoint {last} is damaged ({e.__cause__ or e}); delete the folder "
            f"{last.parent} to train this stage again from its first epoch"
        ) from e


def _restore(model: nn.Module, path: Path) -> None:
    state = load_checkpoint(path)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})

