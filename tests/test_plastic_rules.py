"""Drop / grow rules as pure functions, and the DynamicSparsity callback: invariants after every
optimizer step (driven by hand for property tests, and through Lightning: branchnet's engine in
manual optimization and a plain automatic-optimization module), exact resume."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from branchnet.checkpoint import load_checkpoint, save_checkpoint
from branchnet.data.batches import TensorPairs
from branchnet.engine import TrainConfig, fit
from branchnet.plastic.callback import STATE_KEYS, DynamicSparsity
from branchnet.plastic.masks import SparsityError
from branchnet.plastic.rules import (
    alpha_at,
    drop_smallest,
    grow_largest,
    rigl_update,
    set_update,
    snfs_update,
    static_update,
    update_count,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- pure rules


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), density=st.floats(0.05, 0.95), alpha=st.floats(0.0, 1.0),
       rule=st.sampled_from(["set", "rigl", "snfs"]), seed=st.integers(0, 2**16))
def test_rules_keep_counts_and_drop_grow_semantics(n: int, density: float, alpha: float, rule: str,
                                                    seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[: max(1, round(density * n))]] = True
    w = torch.randn(n, generator=g) * mask
    score = torch.randn(n, generator=g)
    k = update_count(alpha, int(mask.sum()), n)
    if rule == "set":
        u = set_update(w, mask, k, generator=g, noise_std=0.0)
    elif rule == "rigl":
        u = rigl_update(w, score, mask, k, generator=g, noise_std=0.0)
    else:
        u = snfs_update(w, score, mask, k, generator=g, noise_std=0.0)
    assert u.k == k and int(u.mask.sum()) == int(mask.sum())
    assert not (u.dropped & u.grown).any()  # disjoint
    assert torch.equal(u.dropped, mask & ~u.mask) and torch.equal(u.grown, u.mask & ~mask)
    assert torch.equal(u.regrown, u.regrown & mask & u.mask)  # regrown ones were and stay active
    # the magnitude drop set: the k smallest |w| among active (dropped-for-good plus regrown)
    drop_set = u.dropped | u.regrown
    assert int(drop_set.sum()) == k and not (drop_set & ~mask).any()
    if k and (mask & ~drop_set).any():
        assert w[drop_set].abs().max() <= w[mask & ~drop_set].abs().min()
    grow_set = u.grown | u.regrown
    assert int(grow_set.sum()) == k
    if rule != "set" and k:
        not_kept = ~(mask & ~drop_set)
        rest = not_kept & ~grow_set
        if rest.any():  # grown = largest |score| among the not-kept connections
            assert score[grow_set].abs().min() >= score[rest].abs().max()


def test_rigl_lets_a_dropped_connection_regrow_with_its_value() -> None:
    w = torch.tensor([0.1, 2.0, 3.0, 0.0, 0.0])
    mask = w != 0
    grad = torch.tensor([9.0, 0.0, 0.0, 1.0, 0.5])  # the dropped 0.1 has the largest gradient
    u = rigl_update(w, grad, mask, 1, noise_std=0.0)
    assert u.regrown.tolist() == [True, False, False, False, False]
    assert torch.equal(u.mask, mask) and not u.grown.any() and not u.dropped.any()
    u = rigl_update(w, torch.tensor([0.0, 0.0, 0.0, 1.0, 0.5]), mask, 1, noise_std=0.0)
    assert u.dropped.tolist() == [True, False, False, False, False]
    assert u.grown.tolist() == [False, False, False, True, False]


def test_tie_break_noise_breaks_magnitude_ties_randomly() -> None:
    w, mask = torch.ones(8), torch.ones(8, dtype=torch.bool)
    mask[-1] = False
    picks = {int(drop_smallest(w, mask, 1, generator=torch.Generator().manual_seed(s)).logical_not()
                 [:7].nonzero()) for s in range(20)}
    assert len(picks) > 2


def test_static_and_argument_checks() -> None:
    mask = torch.tensor([True, False, True])
    u = static_update(torch.ones(3), mask)
    assert torch.equal(u.mask, mask) and not u.grown.any()
    with pytest.raises(SparsityError, match=r"k must be in \[0, 2\]"):
        rigl_update(torch.ones(3), torch.ones(3), mask, 3)
    with pytest.raises(SparsityError, match="does not match"):
        rigl_update(torch.ones(3), torch.ones(4), mask, 1)
    with pytest.raises(SparsityError, match="only 1 positions"):
        grow_largest(torch.ones(3), mask, 2)


def test_alpha_schedules_and_update_count() -> None:
    assert alpha_at(0, 0.3, 100) == pytest.approx(0.3)
    assert alpha_at(25, 0.3, 100) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert alpha_at(100, 0.3, 100) == 0.0 and alpha_at(150, 0.3, 100) == 0.0
    assert alpha_at(40, 0.3, 100, "constant") == 0.3
    assert alpha_at(50, 0.4, 100, "linear") == pytest.approx(0.2)
    assert alpha_at(50, 0.4, 100, "power", power=2.0) == pytest.approx(0.1)
    with pytest.raises(SparsityError, match="'exp'"):
        alpha_at(0, 0.3, 10, "exp")
    assert update_count(0.3, 7, 20) == 2 and update_count(0.3, 20, 20) == 0


# ---------------------------------------------------------------- the callback, driven by hand


def small_net(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "conv":
        return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                             nn.Conv2d(6, 8, 1), nn.Flatten(), nn.Linear(8 * 16, 3))
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))


def make_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.05, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=0.01, weight_decay=0.05, fused=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.05, amsgrad=True)
    return torch.optim.RMSprop(params, lr=0.01)


class Holder(nn.Module):
    """Stands in for a LightningModule with a ``model`` (what ``target="auto"`` picks)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class Invariants:
    """Checks, after every optimizer step (its post-hook runs after the callback's), that the
    callback kept its promises."""

    def __init__(self, cb: DynamicSparsity, model: nn.Module, opt: torch.optim.Optimizer):
        assert cb.masks is not None
        self.cb, self.model, self.opt = cb, model, opt
        self.counts = cb.masks.active_counts()
        self.handle = opt.register_step_post_hook(self.after)
        self.checked = self.updates = self.skipped = 0
        self.t: int | None = None
        self.n_last = cb.n_updates
        self.check_state = True

    def before(self) -> None:
        """Call right after the callback's ``on_before_optimizer_step``."""
        self.t = self.cb.step
        self.update = self.cb.is_update_step(self.t)
        self.snapshot = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def after(self, opt: Any, args: Any, kwargs: Any) -> None:
        cb, masks = self.cb, self.cb.masks
        assert masks is not None and self.t is not None
        assert cb.step == self.t + 1
        assert masks.active_counts() == self.counts  # exact per-layer density, always
        for name, p in masks.parameters(self.model).items():
            inactive = ~masks[name]
            assert torch.all(p[inactive] == 0), name  # inactive weights exactly zero
            for key in STATE_KEYS if self.check_state else ():  # ... and hold no optimizer state
                t = opt.state.get(p, {}).get(key)
                if isinstance(t, torch.Tensor):
                    assert torch.all(t[inactive] == 0), (name, key)
        updated, self.n_last = cb.n_updates == self.n_last + 1, cb.n_updates
        assert updated == (self.update and cb.rule != "static")
        if updated:
            self.updates += 1
            for name, u in cb.last_update.items():
                p = masks.parameters(self.model)[name]
                assert torch.all(p[u.grown] == 0)  # grown weights zero right after the update
                for key in STATE_KEYS:
                    t = opt.state.get(p, {}).get(key)
                    if isinstance(t, torch.Tensor):
                        assert torch.all(t[u.grown] == 0), (name, key)
            if cb.rule == "rigl":  # the weight update of this step was skipped
                self.skipped += 1
                for n, p in self.model.named_parameters():
                    assert torch.equal(p.detach(), self.snapshot[n]), n
        self.checked += 1


class Driver:
    """A hand-rolled training loop calling the callback's hooks as Lightning would."""

    def __init__(self, cb: DynamicSparsity, net: nn.Module, opt_name: str, kind: str = "mlp", seed: int = 0):
        self.cb, self.net, self.kind = cb, net, kind
        self.holder = Holder(net)
        self.opt = make_optimizer(opt_name, net.parameters())
        self.trainer = SimpleNamespace(optimizers=[self.opt], lightning_module=self.holder)
        cb.on_fit_start(self.trainer, self.holder)
        cb.on_train_start(self.trainer, self.holder)
        self.check = Invariants(cb, net, self.opt)
        self.g = torch.Generator().manual_seed(seed)

    def backward(self) -> None:
        shape = (8, 2, 4, 4) if self.kind == "conv" else (8, 12)
        x, y = torch.randn(*shape, generator=self.g), torch.randint(0, 3, (8,), generator=self.g)
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.net(x), y).backward()

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.backward()
            self.cb.on_before_optimizer_step(self.trainer, self.holder, self.opt)
            self.check.before()
            self.opt.step()

    def close(self) -> Invariants:
        self.cb.teardown(self.trainer, self.holder, "fit")
        self.check.handle.remove()
        return self.check


def drive(cb: DynamicSparsity, net: nn.Module, opt_name: str, steps: int, kind: str = "mlp",
          seed: int = 0) -> Invariants:
    d = Driver(cb, net, opt_name, kind, seed)
    d.step(steps)
    return d.close()


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_grown_weights_lose_stale_optimizer_state(opt: str) -> None:
    # optimizer state at inactive positions cannot arise in training, but can come with a loaded
    # optimizer (say from dense training): an update must still zero it where weights grow
    d = Driver(DynamicSparsity("rigl", 0.2, delta_t=2, total_steps=10, alpha=0.5), small_net("mlp"), opt)
    d.step(2)
    for state in d.opt.state.values():
        for key in STATE_KEYS:
            if isinstance(state.get(key), torch.Tensor):
                state[key].fill_(1.0)
    d.step()  # step 2: an update
    assert d.check.updates == 2
    params = d.cb.masks.parameters(d.net)
    for name, u in d.cb.last_update.items():
        for key in STATE_KEYS:
            t = d.opt.state[params[name]].get(key)
            if isinstance(t, torch.Tensor):
                assert u.grown.any() and torch.all(t[u.grown] == 0) and torch.all(t[~d.cb.masks[name]] == 0)
    d.close()


def test_inactive_weights_are_rezeroed_after_any_optimizer_step() -> None:
    # a step the Lightning hook did not see (dense gradients reach inactive weights): the
    # optimizer's post-step hook still zeroes them
    cb = DynamicSparsity("static", 0.3, total_steps=10)
    d = Driver(cb, small_net("mlp"), "adamw")
    d.check.check_state = False  # the dense gradient did give them optimizer state
    d.backward()
    d.check.before()
    d.opt.step()
    assert d.check.checked == 1
    d.close()
    d.backward()
    d.opt.step()  # after teardown the hook is gone: inactive weights move
    assert int((d.net[0].weight != 0).sum()) > cb.masks.active_counts()["0.weight"]


@settings(max_examples=30, deadline=None)
@given(rule=st.sampled_from(["static", "set", "rigl", "snfs"]), opt=st.sampled_from(["sgd", "adam", "adamw"]),
       density=st.floats(0.05, 0.8), distribution=st.sampled_from(["uniform", "er", "erk"]),
       delta_t=st.integers(1, 3), kind=st.sampled_from(["mlp", "conv"]), seed=st.integers(0, 1000),
       dense_first=st.booleans())
def test_invariants_hold_after_every_optimizer_step(rule: str, opt: str, density: float, distribution: str,
                                                    delta_t: int, kind: str, seed: int,
                                                    dense_first: bool) -> None:
    steps = 9
    cb = DynamicSparsity(rule, density, distribution, delta_t=delta_t, total_steps=steps, seed=seed,
                         alpha=0.5, alpha_schedule="constant", dense_first=dense_first)
    check = drive(cb, small_net(kind, seed), opt, steps, kind, seed)
    assert check.checked == steps and cb.step == steps
    expected = 0 if rule == "static" else len(range(0, int(0.75 * steps), delta_t))
    assert cb.n_updates == expected
    if rule == "rigl":
        assert check.skipped == expected


def test_updates_change_the_masks_and_time_is_counted() -> None:
    cb = DynamicSparsity("rigl", 0.2, delta_t=2, total_steps=8, alpha=0.5)
    net = small_net("mlp")
    drive(cb, net, "adam", 1)  # step 0 is an update step
    assert cb.n_updates == 1 and cb.update_seconds > 0
    u = cb.last_update["0.weight"]
    assert u.k == math.floor(0.5 * 58) and int(u.dropped.sum()) >= 1 and int(u.grown.sum()) >= 1


def test_unknown_optimizer_is_rejected_for_dynamic_rules_only() -> None:
    with pytest.raises(SparsityError, match=r"'rigl'.*\['SGD', 'Adam', 'AdamW'\]; got RMSprop"):
        drive(DynamicSparsity("rigl", 0.3, total_steps=4), small_net("mlp"), "rmsprop", 2)
    check = drive(DynamicSparsity("static", 0.3, total_steps=4), small_net("mlp"), "rmsprop", 3)
    assert check.checked == 3


def test_t_end_beyond_the_run_is_rejected() -> None:
    with pytest.raises(SparsityError, match="t_end=20 steps is beyond the 10 optimizer steps"):
        drive(DynamicSparsity("set", 0.3, t_end=20, total_steps=10), small_net("mlp"), "sgd", 1)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rule": "lottery"}, "'lottery'"), ({"density": 0.0}, r"\(0, 1\], got 0.0"),
    ({"density": 1.5}, r"\(0, 1\], got 1.5"), ({"t_end": 1.5}, r"\(0, 1\], got 1.5"),
    ({"delta_t": 0}, "delta_t"), ({"alpha_schedule": "step"}, "'step'"), ({"alpha": 2.0}, "alpha"),
    ({"distribution": "normal"}, "'normal'")])
def test_bad_callback_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(SparsityError, match=match):
        DynamicSparsity(**kwargs)


def test_no_prunable_layer_in_the_model() -> None:
    with pytest.raises(SparsityError, match="LayerNorm has no prunable weight"):
        drive(DynamicSparsity("rigl", 0.5, total_steps=4), nn.LayerNorm(12), "sgd", 1)


def test_state_round_trips_through_a_safetensors_checkpoint(tmp_path: Path) -> None:
    cb = DynamicSparsity("snfs", 0.3, delta_t=2, total_steps=6)
    drive(cb, small_net("mlp"), "adam", 5)
    save_checkpoint({"cb": cb.state_dict()}, tmp_path / "c.safetensors")
    other = DynamicSparsity("snfs", 0.3, delta_t=2, total_steps=6)
    other.load_state_dict(load_checkpoint(tmp_path / "c.safetensors")["cb"])
    assert other.step == 5 and other.n_updates == cb.n_updates
    assert all(torch.equal(other.masks[n], cb.masks[n]) for n in cb.masks)
    assert torch.equal(other._generator.get_state(), cb._generator.get_state())
    assert torch.equal(other._moments["0.weight"]["v"], cb._moments["0.weight"]["v"])
    with pytest.raises(SparsityError, match=r"rule='snfs'.*rule='rigl'"):
        DynamicSparsity("rigl", 0.3).load_state_dict(cb.state_dict())


# ---------------------------------------------------------------- through Lightning


class StepChecker(L.Callback):
    """Runs :class:`Invariants` inside a real Trainer (after the DynamicSparsity callback)."""

    def __init__(self, cb: DynamicSparsity):
        self.cb = cb
        self.check: Invariants | None = None
        self.checked = self.updates = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        model = getattr(pl_module, "model", pl_module)
        self.check = Invariants(self.cb, model, trainer.optimizers[0])

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        assert self.check is not None
        self.check.before()

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        assert self.check is not None
        self.check.handle.remove()
        self.checked, self.updates = self.check.checked, self.check.updates


def digits_like(n: int = 150, seed: int = 0) -> TensorPairs:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 64, generator=g) + F.one_hot(y, 64).float() * 3
    return TensorPairs(x, y)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Dropout(0.1), nn.Linear(48, 10))


def test_engine_fit_with_rigl_keeps_exact_density(tmp_path: Path) -> None:
    cb = DynamicSparsity("rigl", 0.1, "erk", delta_t=3)
    checker = StepChecker(cb)
    cfg = TrainConfig(epochs=2, batch_size=16, batches_per_step=3, progress=False, optimizer="adam",
                      weight_decay=1e-3)
    net = mlp()
    result = fit(net, digits_like(), digits_like(40, seed=1), cfg, workdir=tmp_path, callbacks=[cb, checker])
    steps = 2 * math.ceil(150 / 16)  # the engine steps once per minibatch, 3 per Lightning batch
    assert cb.planned_steps == steps and cb.step == steps and checker.checked == steps
    assert cb.t_end_step == int(0.75 * steps) and cb.n_updates == checker.updates == 5
    assert cb.masks.density() == pytest.approx(0.1, abs=1e-3)
    assert int((net[0].weight != 0).sum()) <= cb.masks.active_counts()["0.weight"]
    assert [r["epoch"] for r in cb.history] == [0, 1]
    assert cb.flops is not None and cb.flops["rule"] == "rigl" and 0 < cb.flops["train_ratio"] < 1
    assert cb.flops["train_total"] == pytest.approx(cb.flops["train_step"] * steps * 16)
    summary = cb.summary()
    assert summary["n_updates"] == 5 and summary["flops"] == cb.flops and len(summary["history"]) == 2
    assert cb.flops_summary()["update_seconds"] == cb.update_seconds > 0
    # fit restored the best epoch's weights: that epoch's masks come from its checkpoint
    best = cb.load_masks(result.best_checkpoint)
    for name, p in best.parameters(net).items():
        assert torch.all(p[~best[name]] == 0)
    assert best.active_counts() == cb.masks.active_counts()


class AutoModule(L.LightningModule):
    """Plain automatic optimization, the masked layers directly on the LightningModule."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("rule", ["set", "rigl"])
def test_automatic_optimization(rule: str) -> None:
    cb = DynamicSparsity(rule, 0.2, delta_t=2, t_end=1.0, alpha=0.4)
    checker = StepChecker(cb)
    data = digits_like(96)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x, data.y), batch_size=16)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[cb, checker], accumulate_grad_batches=2)
    trainer.fit(AutoModule(), loader)
    steps = 2 * 6 // 2  # two minibatches per optimizer step
    assert cb.planned_steps == steps and cb.step == steps == checker.checked
    assert cb.n_updates == checker.updates == 3
    assert cb.masks.active_counts() == {"fc1.weight": 410, "fc2.weight": 64}
    assert cb._hook is None  # the optimizer hook is gone after the run


class Interrupted(Exception):
    pass


class InterruptAt(L.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch:
            raise Interrupted(f"interrupted at epoch {self.epoch}")


@pytest.mark.parametrize("rule", ["rigl", "snfs"])
def test_resume_is_bit_identical(tmp_path: Path, rule: str) -> None:
    def cfg() -> TrainConfig:
        return TrainConfig(epochs=2, batch_size=16, batches_per_step=2, progress=False, optimizer="adam")

    def cb() -> DynamicSparsity:
        return DynamicSparsity(rule, 0.15, "erk", delta_t=2, t_end=1.0, seed=7)

    data = digits_like(100)
    full, ref = mlp(), cb()
    fit(full, data, None, cfg(), workdir=tmp_path / "full", callbacks=[ref])

    part = cb()
    with pytest.raises(Interrupted):
        fit(mlp(), data, None, cfg(), workdir=tmp_path / "run", callbacks=[part, InterruptAt(1)])
    assert part.step == 7  # interrupted after epoch 0
    resumed_net, resumed = mlp(99), cb()
    fit(resumed_net, data, None, cfg(), workdir=tmp_path / "run", resume=True, callbacks=[resumed])
    assert resumed.step == ref.step == 14 and resumed.n_updates == ref.n_updates
    for name, p in full.state_dict().items():
        assert torch.equal(p, resumed_net.state_dict()[name]), name
    assert all(torch.equal(ref.masks[n].cpu(), resumed.masks[n].cpu()) for n in ref.masks)
    assert [r["step"] for r in resumed.history] == [7, 14]


def test_rigl_on_a_virtual_branch_model() -> None:
    models = pytest.importorskip("branchnet.virtual.models")
    torch.manual_seed(0)
    net = models.vmlp([12, 16], 3, branches=2, shared_frac=0.5)
    cb = DynamicSparsity("rigl", 0.3, "erk", delta_t=2, total_steps=6)
    holder = Holder(net)
    opt = make_optimizer("adam", net.parameters())
    trainer = SimpleNamespace(optimizers=[opt], lightning_module=holder)
    cb.on_fit_start(trainer, holder)
    cb.on_train_start(trainer, holder)
    assert any(n.endswith("weight_uu") for n in cb.masks) and not any("bn" in n for n in cb.masks)
    check = Invariants(cb, net, opt)
    for _ in range(6):
        x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
        opt.zero_grad(set_to_none=True)
        out = net(x)  # (B, K, classes)
        F.cross_entropy(out.flatten(0, 1), y.repeat_interleave(2)).backward()
        cb.on_before_optimizer_step(trainer, holder, opt)
        check.before()
        opt.step()
    cb.teardown(trainer, holder, "fit")
    check.handle.remove()
    assert check.checked == 6 and check.updates == 2 and check.skipped == 2  # steps 0 and 2 (t_end 4)
