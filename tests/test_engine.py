"""Tests for branchnet.engine (training on Lightning) and branchnet.data.batches (loaders):
configuration, learning, early stopping that restores the best weights, interruption and
bit-identical resume, finished runs, NaN losses, metrics.csv, safetensors-only checkpoints,
seeding and DDP."""

from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import branchnet.engine as engine
from branchnet.checkpoint import load_checkpoint
from branchnet.data.batches import EpochShuffle, TensorPairs, make_loader
from branchnet.engine import FitResult, TrainConfig, TrainingError, fit

# ---------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")



def blobs(n: int, seed: int, classes: int = 3, dim: int = 4) -> TensorPairs:
    """Well separated Gaussian blobs: a linear model learns them in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(classes, dim) * 4
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    return TensorPairs(x, y)


def noise(n: int, seed: int, dim: int = 2) -> TensorPairs:
    """Random labels: a net can only memorise them, so its validation loss rises after a while."""
    g = torch.Generator().manual_seed(seed)
    return TensorPairs(torch.randn(n, dim, generator=g), torch.randint(0, 2, (n,), generator=g))


def noisy(n: int, seed: int, flip: float = 0.2) -> TensorPairs:
    """Learnable labels (sign of x0) with a share flipped: an MLP first learns the rule, then
    memorises the flipped labels, and its validation loss rises again."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorPairs(x, torch.where(torch.rand(n, generator=g) < flip, 1 - y, y))


def dropout_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"epochs": 3, "batch_size": 16, "lr": 0.02, "progress": False}
    return TrainConfig(**{**base, **kw})


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ckpt_state(path: str | Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in load_checkpoint(path)["state_dict"].items()}


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def val_loss(model: nn.Module, ds: TensorPairs) -> float:
    model.eval()
    return float(F.cross_entropy(model(ds.x), ds.y))


@torch.no_grad()
def accuracy(model: nn.Module, ds: TensorPairs) -> float:
    model.eval()
    return float((model(ds.x).argmax(1) == ds.y).float().mean())


def with_callbacks(monkeypatch: pytest.MonkeyPatch, *callbacks: L.Callback) -> None:
    """Make ``fit`` build its Trainer with extra callbacks."""
    original = engine.L.Trainer

    def make(*args: Any, **kwargs: Any) -> L.Trainer:
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), *callbacks]
        return original(*args, **kwargs)

    monkeypatch.setattr(engine.L, "Trainer", make)


class Interrupted(Exception):
    pass


class InterruptAt(L.Callback):
    """Raise in the middle of epoch ``epoch`` (at its ``batch``-th Lightning batch)."""

    def __init__(self, epoch: int, batch: int = 0):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise Interrupted(f"interrupted at epoch {self.epoch}")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"optimizer": "adagrad"}, "adagrad"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"devices": 0}, "devices"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "-1.0"),
        ({"patience": 0}, "patience"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(TrainingError, match=needle):
        TrainConfig(**kwargs)
    with pytest.raises(TrainingError, match=needle):
        TrainConfig.from_dict(kwargs)


def test_config_rejects_unknown_keys_and_round_trips() -> None:
    with pytest.raises(TrainingError, match="learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1, "epochs": 2})
    c = TrainConfig.from_dict({"epochs": 2, "optimizer": "sgd", "patience": 3})
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert TrainConfig.from_dict(None) == TrainConfig()


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_learns_a_separable_problem(tmp_path: Path, optimizer: str) -> None:
    train, val = blobs(192, seed=1), blobs(96, seed=2)
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    lr = 0.1 if optimizer == "sgd" else 0.05
    result = fit(net, train, val, cfg(epochs=4, lr=lr, optimizer=optimizer), workdir=tmp_path)
    assert isinstance(result, FitResult)
    assert result.epochs_run == 4 and not result.stopped_early
    assert accuracy(net, val) >= 0.95
    assert result.history[-1]["val_acc"] >= 0.95
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert json.loads((tmp_path / "result.json").read_text())["epochs_run"] == 4


@pytest.mark.filterwarnings("ignore:You defined a `validation_step`")
def test_training_without_validation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    result = fit(net, blobs(128, seed=1), None, cfg(epochs=2, patience=1), workdir=tmp_path)
    assert result.epochs_run == 2 and result.best_checkpoint is None and result.best_val_loss is None
    assert [sorted(r) for r in result.history] == [["epoch", "train_acc", "train_loss"]] * 2
    assert len(result.epoch_seconds) == 2 and 0 < result.epoch_seconds[0] < result.epoch_seconds[1]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")["epoch"] == 1
    assert_states_equal(ckpt_state(tmp_path / "checkpoints" / "last.safetensors"), state_of(net))


# ---------------------------------------------------------------- early stopping


def test_early_stopping_restores_the_best_weights(tmp_path: Path) -> None:
    train, val = noisy(48, seed=3), noisy(48, seed=4)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    result = fit(net, train, val, cfg(epochs=60, batch_size=8, lr=0.003, patience=3), workdir=tmp_path)

    assert result.stopped_early and result.epochs_run < 60
    losses = [row["val_loss"] for row in result.history]
    assert len(losses) == result.epochs_run
    assert result.best_epoch == losses.index(min(losses))
    assert result.best_epoch == result.epochs_run - 1 - 3  # patience epochs without improvement
    assert result.best_epoch > 0  # the best weights are trained ones, not the initial ones
    assert result.best_val_loss == pytest.approx(min(losses), rel=1e-6)
    assert losses[-1] > result.best_val_loss  # the run really got worse

    # the returned model is the best one, not the last one
    assert val_loss(net, val) == pytest.approx(result.best_val_loss, rel=1e-5)
    assert val_loss(net, val) < losses[-1] - 1e-4
    assert result.best_checkpoint is not None
    assert Path(result.best_checkpoint).name == f"best-epoch={result.best_epoch:03d}.safetensors"
    assert_states_equal(state_of(net), ckpt_state(result.best_checkpoint))
    last = tmp_path / "checkpoints" / "last.safetensors"
    assert load_checkpoint(last)["epoch"] == result.epochs_run - 1
    assert not states_equal(state_of(net), ckpt_state(last))


# ---------------------------------------------------------------- resume


def test_a_moved_run_folder_still_resumes(tmp_path: Path) -> None:
    train, val = noisy(48, seed=3), noisy(48, seed=4)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    first = fit(net, train, val, cfg(epochs=4, batch_size=8), workdir=tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "b")
    again = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    result = fit(again, train, val, cfg(epochs=4, batch_size=8), workdir=tmp_path / "b", resume=True)
    assert result.best_epoch == first.best_epoch
    assert Path(result.best_checkpoint).is_file()
    assert_states_equal(state_of(again), state_of(net))


def _mid_epoch() -> tuple[TensorPairs, TensorPairs, Any, TrainConfig]:
    # dropout (global RNG), Adam state, several Lightning batches per epoch; interrupted mid-epoch
    return blobs(96, seed=5), blobs(48, seed=6), dropout_net, cfg(
        epochs=5, batch_size=16, batches_per_step=2, patience=10)


def _after_best() -> tuple[TensorPairs, TensorPairs, Any, TrainConfig]:
    # interrupted after the best epoch, while early stopping is counting: the resumed run must
    # restore the best-so-far and the patience counter to stop at the same epoch
    def net(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 64), nn.ReLU(),
                             nn.Linear(64, 2))

    return noisy(48, seed=3), noisy(48, seed=4), net, cfg(
        epochs=60, batch_size=8, lr=0.003, batches_per_step=2, patience=3)


@pytest.mark.parametrize("scenario", [_mid_epoch, _after_best], ids=["mid_epoch", "after_best"])
def test_interrupted_run_resumes_bit_identically(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: Any) -> None:
    train, val, make_net, c = scenario()
    full = make_net()
    ref = fit(full, train, val, c, workdir=tmp_path / "full")
    assert ref.best_epoch is not None
    if c.patience == 3:
        assert ref.stopped_early and ref.best_epoch > 0
        stop = InterruptAt(epoch=ref.best_epoch + 2, batch=0)
    else:
        stop = InterruptAt(epoch=3, batch=1)
    assert stop.epoch < ref.epochs_run

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        with_callbacks(m, stop)
        with pytest.raises(Interrupted):
            fit(make_net(), train, val, c, workdir=run)
    assert load_checkpoint(run / "checkpoints" / "last.safetensors")["epoch"] == stop.epoch - 1
    assert not (run / "result.json").exists()
    assert len(read_csv(run / "metrics.csv")) == stop.epoch

    resumed = make_net(123)  # other initial weights: everything must come from the checkpoint
    result = fit(resumed, train, val, c, workdir=run, resume=True)

    assert result.history == ref.history
    assert [row["epoch"] for row in result.history] == list(range(ref.epochs_run))
    assert (result.epochs_run, result.stopped_early, result.best_epoch, result.best_val_loss) == (
        ref.epochs_run, ref.stopped_early, ref.best_epoch, ref.best_val_loss)
    assert_states_equal(state_of(resumed), state_of(full))
    last_ref = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.safetensors")
    last_run = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert last_run["epoch"] == last_ref["epoch"] == ref.epochs_run - 1
    assert_states_equal(last_run["state_dict"], last_ref["state_dict"])
    for a, b in zip(last_run["optimizer_states"], last_ref["optimizer_states"], strict=True):
        assert a["state"].keys() == b["state"].keys()
        for pid in a["state"]:
            assert_states_equal(a["state"][pid], b["state"][pid])
    assert torch.equal(last_run["torch_rng_state"], last_ref["torch_rng_state"])
    assert read_csv(run / "metrics.csv") == read_csv(tmp_path / "full" / "metrics.csv")


def test_resume_of_a_finished_run_does_not_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, val = noise(48, seed=3), noise(48, seed=4)

    def mlp(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 2))

    first = fit(mlp(0), train, val, cfg(epochs=12, batch_size=8, patience=2), workdir=tmp_path)
    assert first.best_checkpoint is not None
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished run must not be trained again")

    monkeypatch.setattr(engine.L, "Trainer", no_training)
    again = mlp(seed=99)
    result = fit(again, train, val, cfg(epochs=12, batch_size=8, patience=2), workdir=tmp_path, resume=True)
    assert result == first
    assert_states_equal(state_of(again), ckpt_state(first.best_checkpoint))
    assert val_loss(again, val) == pytest.approx(first.best_val_loss, rel=1e-5)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


@pytest.mark.filterwarnings("ignore:You defined a `validation_step`")
def test_resume_of_a_finished_run_without_validation_restores_the_last_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    first = fit(net, blobs(64, seed=1), None, cfg(epochs=2), workdir=tmp_path)
    monkeypatch.setattr(engine.L, "Trainer", None)  # any training attempt would fail
    again = nn.Linear(4, 3)
    assert fit(again, blobs(64, seed=1), None, cfg(epochs=2), workdir=tmp_path, resume=True) == first
    assert_states_equal(state_of(again), state_of(net))


def test_new_run_refuses_a_used_workdir(tmp_path: Path) -> None:
    train = blobs(64, seed=1)
    fit(nn.Linear(4, 3), train, train, cfg(epochs=1), workdir=tmp_path)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(TrainingError, match="resume=True") as info:
        fit(nn.Linear(4, 3), train, train, cfg(epochs=1), workdir=tmp_path)
    assert str(tmp_path) in str(info.value) and "never overwritten" in str(info.value)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


# ---------------------------------------------------------------- NaN


class PoisonAt(L.Callback):
    """Put a NaN into the training inputs when epoch ``epoch`` starts."""

    def __init__(self, data: TensorPairs, epoch: int):
        self.data, self.epoch = data, epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.current_epoch == self.epoch:
            self.data.x[5, 0] = math.nan


def test_nan_loss_stops_with_a_clear_error_and_keeps_checkpoints(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, val = blobs(64, seed=1), blobs(32, seed=2)
    with_callbacks(monkeypatch, PoisonAt(train, epoch=1))
    with pytest.raises(TrainingError) as info:
        fit(nn.Linear(4, 3), train, val, cfg(epochs=3), workdir=tmp_path)
    msg = str(info.value)
    assert "train loss is nan" in msg and "epoch 1" in msg
    assert "Checkpoints of earlier epochs are kept" in msg
    last = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert len(read_csv(tmp_path / "metrics.csv")) == 1
    assert not (tmp_path / "result.json").exists()


def test_diverging_learning_rate_raises(tmp_path: Path) -> None:
    train = noisy(48, seed=1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    with pytest.raises(TrainingError, match=r"train loss is (nan|inf) .*lr=10000000000\.0"):
        fit(net, train, train, cfg(epochs=3, optimizer="sgd", lr=1e10, batch_size=8), workdir=tmp_path)


# ---------------------------------------------------------------- files on disk


def test_metrics_csv_and_sampler_epochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    epochs_seen: list[int] = []
    original = EpochShuffle.set_epoch

    def spy(self: EpochShuffle, epoch: int) -> None:
        epochs_seen.append(epoch)
        original(self, epoch)

    monkeypatch.setattr(EpochShuffle, "set_epoch", spy)
    torch.manual_seed(0)
    result = fit(nn.Linear(4, 3), blobs(64, seed=1), blobs(32, seed=2), cfg(epochs=3), workdir=tmp_path)
    assert epochs_seen == [0, 1, 2]  # Lightning reshuffles every epoch

    rows = read_csv(tmp_path / "metrics.csv")
    assert list(rows[0]) == ["epoch", "train_acc", "train_loss", "val_acc", "val_loss"]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for row, hist in zip(rows, result.history, strict=True):
        assert {k: float(v) for k, v in row.items()} == pytest.approx(hist)
        assert 0 <= float(row["train_acc"]) <= 1 and 0 <= float(row["val_acc"]) <= 1
        assert float(row["train_loss"]) > 0 and float(row["val_loss"]) > 0
    assert load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")["history"] == result.history


def test_checkpoints_are_safetensors_without_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.save (pickle) used for a checkpoint")

    monkeypatch.setattr(torch, "save", forbidden)
    result = fit(nn.Linear(4, 3), blobs(64, seed=1), blobs(32, seed=2), cfg(epochs=2, patience=5),
                 workdir=tmp_path)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == [f"checkpoints/best-epoch={result.best_epoch:03d}.safetensors",
                     "checkpoints/last.safetensors", "metrics.csv", "result.json"]
    for path in (tmp_path / "checkpoints").iterdir():
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        structure = json.loads(header.pop("__metadata__")["branchnet.structure"])
        assert {"state_dict", "optimizer_states", "history", "torch_rng_state", "epoch"} <= set(structure)
        end = max(info["data_offsets"][1] for info in header.values())
        assert len(raw) == 8 + n + end  # nothing but header and tensor bytes
        assert b"\x80\x04\x95" not in raw[: 8 + n] and b"torch._utils" not in raw


# ---------------------------------------------------------------- seeding


def test_same_seed_same_result_other_seed_differs(tmp_path: Path) -> None:
    train, val = blobs(64, seed=1), blobs(32, seed=2)

    def run(name: str, seed: int) -> tuple[FitResult, dict[str, torch.Tensor]]:
        net = dropout_net(0)  # same initial weights: only the training seed differs
        r = fit(net, train, val, cfg(epochs=2, seed=seed), workdir=tmp_path / name)
        return r, state_of(net)

    (r1, s1), (r2, s2), (r3, s3) = run("a", 0), run("b", 0), run("c", 1)
    assert r1.history == r2.history
    assert_states_equal(s1, s2)
    assert r3.history != r1.history
    assert not states_equal(s1, s3)


# ---------------------------------------------------------------- loaders


def test_make_loader_batches_equal_direct_indexing() -> None:
    x, y = torch.randn(37, 3, 2), torch.arange(37) % 5
    ds = TensorPairs(x, y)
    batches = list(make_loader(ds, batch_size=8))
    assert [len(b[1]) for b in batches] == [8, 8, 8, 8, 5]
    assert torch.equal(torch.cat([b[0] for b in batches]), x)
    assert torch.equal(torch.cat([b[1] for b in batches]), y)

    loader = make_loader(ds, batch_size=8, shuffle=True, seed=3)
    loader.sampler.set_epoch(2)
    sampler = EpochShuffle(37, seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(37))
    for i, (bx, by) in enumerate(loader):
        idx = order[i * 8 : (i + 1) * 8]
        assert torch.equal(bx, x[idx]) and torch.equal(by, y[idx])
        expected = [ds[j] for j in idx]
        assert torch.equal(bx, torch.stack([e[0] for e in expected]))

    with pytest.raises(ValueError, match="5 rows but y has 4"):
        TensorPairs(torch.zeros(5), torch.zeros(4))


def test_epoch_shuffle_depends_only_on_seed_and_epoch() -> None:
    def order(seed: int, epoch: int, disturb: bool = False) -> list[int]:
        if disturb:  # global RNG state must not matter
            torch.manual_seed(seed * 7 + epoch + 1)
            torch.rand(10)
        s = EpochShuffle(50, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 0) == order(0, 0, disturb=True)
    assert order(4, 9) == order(4, 9, disturb=True)
    s = EpochShuffle(50, seed=4)
    s.set_epoch(9)
    assert list(s) == list(s)  # iterating twice gives the same order
    assert len(s) == 50 and sorted(s) == list(range(50))
    assert order(0, 0) != order(0, 1)
    assert order(0, 1) != order(1, 1)
    assert len({tuple(order(seed, epoch)) for seed in range(3) for epoch in range(3)}) == 9


# ---------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_two_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # read by the spawned workers
    train, val = blobs(128, seed=1), blobs(64, seed=2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3))  # torch classes only: picklable for spawn
    before = state_of(net)
    result = fit(net, train, val, cfg(epochs=3, lr=0.05, devices=2), workdir=tmp_path)

    assert not states_equal(state_of(net), before)
    assert result.epochs_run == 3 and not result.stopped_early
    assert [row["epoch"] for row in result.history] == [0, 1, 2]
    assert result.best_checkpoint is not None and result.best_val_loss is not None
    assert result.best_val_loss == pytest.approx(min(r["val_loss"] for r in result.history), rel=1e-6)
    assert_states_equal(state_of(net), ckpt_state(result.best_checkpoint))
    assert accuracy(net, val) >= 0.9
    rows = read_csv(tmp_path / "metrics.csv")
    assert len(rows) == 3
    # metrics are summed over both processes: every training sample is counted once per epoch
    last = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")
    assert last["history"] == result.history
    assert json.loads((tmp_path / "result.json").read_text())["epochs_run"] == 3


def test_lr_schedules_set_per_epoch_rate(tmp_path):
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    ds = TensorPairs(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.1, lr_schedule="step", lr_milestones=[2],
                      progress=False)
    fit(torch.nn.Linear(4, 2), ds, None, cfg, workdir=tmp_path, callbacks=[Spy()])
    assert seen == pytest.approx([0.1, 0.1, 0.01, 0.01])  # one chunk per epoch
    cos = TrainConfig(epochs=4, lr=1.0, lr_schedule="cosine")
    assert cos.lr_at(0) == 1.0 and cos.lr_at(2) == pytest.approx(0.5)
    with pytest.raises(TrainingError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_score_fn_replaces_accuracy(tmp_path):
    ds = TensorPairs(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    res = fit(torch.nn.Linear(4, 2), ds, ds, TrainConfig(epochs=1, batch_size=16, progress=False),
              workdir=tmp_path, score_fn=lambda out, y: (torch.tensor(3.0), 4))
    assert res.history[0]["train_acc"] == pytest.approx(0.75)
    assert res.history[0]["val_acc"] == pytest.approx(0.75)


def test_train_config_defaults_are_the_schema_defaults() -> None:
    """The engine's TrainConfig and the config schema's TrainSection declare one set of fields."""
    from branchnet.schema import TrainSection, validate

    assert TrainConfig().to_dict() == validate(TrainSection, {})
