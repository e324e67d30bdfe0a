"""Tests for branchnet.plastic.paths: PlasticResNet (pre-registered gated candidate paths, probe
forwards, stochastic depth), the PathPlasticity controller (drop / grow, optimizer-state reset,
current-step gradient scores, resume) and Veit path-length statistics."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from branchnet.checkpoint import load_checkpoint, save_checkpoint
from branchnet.data.batches import TensorPairs
from branchnet.engine import TrainConfig, fit
from branchnet.plastic.paths import (
    PathPlasticity,
    PlasticResNet,
    candidate_spans,
    path_length_distribution,
    plot_path_lengths,
    reset_optimizer_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0, **kw: Any) -> PlasticResNet:
    torch.manual_seed(seed)
    args: dict[str, Any] = {"num_classes": 3, "widths": (4, 8), "blocks_per_stage": 2,
                            "candidates": "skip12", "max_active": 2, "seed": seed}
    args.update(kw)
    return PlasticResNet(**args)


def randomize(net: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial weights, BN statistics and gates everywhere (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g) * 0.5
                t.copy_(noise.abs() + 0.5 if "running_var" in name else t + noise)
        if isinstance(net, PlasticResNet):  # the model's invariant: inactive gates are 0
            for k in range(net.n_candidates):
                if not net.active[k]:
                    net.candidates[k].gate.zero_()


def data(n: int = 40, seed: int = 0) -> TensorPairs:
    g = torch.Generator().manual_seed(seed)
    return TensorPairs(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 8, "lr": 0.01, "progress": False, **kw})


class Record(L.Callback):
    """Placed after PathPlasticity: sees every optimizer step just after the controller."""

    def __init__(self, cb: PathPlasticity):
        self.cb = cb
        self.steps = 0
        self.n_active: list[int] = []
        self.checks: list[str] = []
        self.pending: list[int] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self.steps += 1
        net = pl_module.model
        self.n_active.append(len(net.active_indices()))
        for k in self.pending:  # grown one step ago: skipped that update, so still exactly 0
            assert net.candidates[k].gate.item() == 0.0 or not net.active[k]
            self.checks.append("after")
        self.pending = []
        if self.cb.swaps and self.cb.swaps[-1]["step"] == self.cb.step:
            last = self.cb.swaps[-1]
            for k in last["grown"]:
                assert bool(net.active[k]) and net.candidates[k].gate.item() == 0.0
                for p in net.candidate_parameters(k):
                    assert p.grad is None and len(optimizer.state.get(p, {})) == 0
            for k in last["dropped"]:
                assert not bool(net.active[k]) and net.candidates[k].gate.item() == 0.0
            self.pending = list(last["grown"])
            self.checks.append("swap")
        for k in range(net.n_candidates):  # the optimizer never sees a gradient of an inactive path
            if not net.active[k]:
                assert all(p.grad is None for p in net.candidate_parameters(k))


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
def test_activating_a_candidate_leaves_outputs_bitwise_equal(kind: str, train_mode: bool) -> None:
    net = tiny(candidate_block=kind, gate_init=0.7)
    randomize(net)
    net.train(train_mode)
    x = torch.randn(6, 3, 8, 8)
    before = net(x)
    inactive = [k for k in range(net.n_candidates) if not net.active[k]]
    assert inactive
    net.activate(inactive)
    assert all(net.candidates[k].gate.item() == 0.0 for k in inactive)
    assert torch.equal(net(x), before)
    net.probe = True  # a probe forward computes every candidate at gate 0: same output too
    assert torch.equal(net(x), before)


def test_probe_forward_equals_plain_forward_and_dropping_a_trained_path_changes_the_output() -> None:
    net = tiny(gate_init=0.7)
    randomize(net)
    x = torch.randn(6, 3, 8, 8)
    plain = net(x)
    net.probe = True
    assert torch.equal(net(x), plain)
    k = net.active_indices()[0]
    gate = net.candidates[k].gate.item()
    assert net.deactivate([k]) == [gate] and gate != 0.0
    assert not torch.allclose(net(x), plain)  # documented: dropping is not function-preserving


def test_every_parameter_is_registered_at_construction() -> None:
    net = tiny(candidates="all", max_active=1)
    ids = {id(p) for p in net.parameters()}
    for k in range(net.n_candidates):
        assert all(id(p) in ids for p in net.candidate_parameters(k))
        assert any(p is net.candidates[k].gate for p in net.candidate_parameters(k))
    opt = torch.optim.Adam(net.parameters())
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    net.activate(range(net.n_candidates))
    assert {id(p) for p in net.parameters()} == ids == in_opt
    names = dict(net.named_parameters())
    assert sum(n.endswith(".gate") for n in names) == net.n_candidates


def test_inactive_candidates_cost_nothing_and_get_no_gradient() -> None:
    net = tiny(max_active=1)
    calls: list[int] = []
    for k, c in enumerate(net.candidates):
        c.branch.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
    loss = F.cross_entropy(net(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert calls == net.active_indices()
    for k in range(net.n_candidates):
        grads = [p.grad for p in net.candidate_parameters(k)]
        assert all(g is None for g in grads) != bool(net.active[k])


def test_candidate_patterns_and_initial_active_set() -> None:
    assert candidate_spans("skip1", [2]) == [(0, 0, 1), (0, 1, 2)]
    assert candidate_spans("all", [3]) == [(0, 0, 1), (0, 0, 2), (0, 1, 2), (0, 0, 3), (0, 1, 3), (0, 2, 3)]
    assert candidate_spans([(1, 0, 2)], [2, 2]) == [(1, 0, 2)]
    net = tiny(initial_active=[1, 4], max_active=2, gate_init=0.25)
    assert net.active_indices() == [1, 4]
    assert net.gates().tolist() == [0.0, 0.25, 0.0, 0.0, 0.25, 0.0]
    assert tiny(seed=3).active_indices() == tiny(seed=3).active_indices()
    assert len(tiny(max_active=None).active_indices()) == 3
    assert json.loads(json.dumps(net.spec))["candidates"][0] == [0, 0, 1]


# ---------------------------------------------------------------- stochastic depth


def reference_eval(net: PlasticResNet, x: torch.Tensor) -> torch.Tensor:
    """Huang et al. at test time: every residual branch scaled by its survival probability."""
    h = net.stem(x)
    for s, stage in enumerate(net.stages):
        if s > 0:
            h = net.transitions[s - 1](h)
        pos = [h]
        for b, block in enumerate(stage):
            p = net.block_survival(s, b + 1)
            out = pos[-1] + p * block(pos[-1])
            for k, (s2, i, j) in enumerate(net.spans):
                if s2 == s and j == b + 1 and net.active[k]:
                    out = out + p * net.candidates[k].gate * net.candidates[k].branch(pos[i])
            pos.append(out)
        h = pos[-1]
    return net.head(h)


def test_stochastic_depth_is_random_in_training_and_scaled_at_test() -> None:
    net = tiny(mode="stochastic_depth", gate_init=0.5, blocks_per_stage=3)
    randomize(net)
    probs = net.survival_probabilities()
    assert probs[-1] == 0.5 and all(0.5 <= p < 1 for p in probs)
    steps = [a - b for a, b in itertools.pairwise(probs)]
    assert all(math.isclose(d, 0.5 / len(probs)) for d in steps)  # linear from 1 down to p_L
    x = torch.randn(4, 3, 8, 8)
    net.train()
    torch.manual_seed(0)
    outs = [net(x) for _ in range(6)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    torch.manual_seed(0)
    assert torch.equal(net(x), outs[0])  # the global RNG drives the drops (resumable)
    net.eval()
    with torch.no_grad():
        a, b = net(x), net(x)
        assert torch.equal(a, b)
        torch.testing.assert_close(a, reference_eval(net, x))
        net.mode = "static"
        assert not torch.allclose(net(x), a)  # the scaling matters


def test_stochastic_depth_with_survival_one_is_the_static_network() -> None:
    net = tiny(mode="stochastic_depth", survival_last=1.0, gate_init=0.5)
    randomize(net)
    x = torch.randn(4, 3, 8, 8)
    net.train()
    a = net(x)
    net.mode = "static"
    assert torch.equal(net(x), a)


# ---------------------------------------------------------------- path lengths


def brute_force(net: PlasticResNet,
                include_transitions: bool = True) -> tuple[dict[int, int], dict[int, float]]:
    """Enumerate every input-to-output path of the DAG (independent of the dynamic programme)."""
    gates = net.gates().abs().tolist()
    edges: dict[tuple[int, int], list[tuple[tuple[int, int], int, float]]] = {}
    for s, n in enumerate(net.blocks_per_stage):
        for j in range(1, n + 1):
            edges.setdefault((s, j - 1), []).extend([((s, j), 0, 1.0), ((s, j), 1, 1.0)])
        if s + 1 < len(net.blocks_per_stage):
            edges.setdefault((s, n), []).append(((s + 1, 0), int(include_transitions), 1.0))
    for k, (s, i, j) in enumerate(net.spans):
        if net.active[k]:
            edges[(s, i)].append(((s, j), 1, gates[k]))
    end = (len(net.blocks_per_stage) - 1, net.blocks_per_stage[-1])
    counts: dict[int, int] = {}
    weights: dict[int, float] = {}

    def walk(node: tuple[int, int], length: int, w: float) -> None:
        if node == end:
            counts[length] = counts.get(length, 0) + 1
            weights[length] = weights.get(length, 0.0) + w
            return
        for nxt, dl, dw in edges.get(node, []):
            walk(nxt, length + dl, w * dw)

    walk((0, 0), 0, 1.0)
    return counts, weights


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_plain_chain_counts_are_binomial(n: int) -> None:
    net = PlasticResNet(2, widths=(4,), blocks_per_stage=n, max_active=0)
    stats = path_length_distribution(net)
    assert stats.counts == [math.comb(n, k) for k in range(n + 1)]
    assert stats.n_paths == 2**n
    assert stats.mean == pytest.approx(n / 2) and stats.mode == n // 2
    assert stats.weighted == pytest.approx(stats.distribution)


def test_transitions_are_mandatory_layers() -> None:
    net = PlasticResNet(2, widths=(4, 8), blocks_per_stage=3, max_active=0)
    assert path_length_distribution(net).counts == [0] + [math.comb(6, k) for k in range(7)]
    without = path_length_distribution(net, include_transitions=False)
    assert without.counts == [math.comb(6, k) for k in range(7)]


def test_active_candidate_adds_paths_and_gates_weight_them() -> None:
    net = PlasticResNet(2, widths=(4,), blocks_per_stage=2, candidates=[(0, 0, 2)], max_active=1,
                        gate_init=0.5)
    stats = path_length_distribution(net)
    # N1 = 1 + z; N2 = N1 (1 + z) + z = 1 + 3z + z^2
    assert stats.counts == [1, 3, 1]
    # weighted: 1 + (2 + 0.5) z + z^2
    assert stats.weighted == pytest.approx([1 / 4.5, 2.5 / 4.5, 1 / 4.5])
    net.deactivate([0])
    assert path_length_distribution(net).counts == [1, 2, 1]


@settings(max_examples=30, deadline=None)
@given(blocks=st.lists(st.integers(1, 3), min_size=1, max_size=3), pattern=st.sampled_from(
    ["skip1", "skip2", "skip12", "all"]), data_=st.data(), transitions=st.booleans())
def test_path_counts_match_brute_force_enumeration(blocks: list[int], pattern: str, data_: Any,
                                                   transitions: bool) -> None:
    spans = candidate_spans(pattern, blocks)
    active = data_.draw(st.lists(st.sampled_from(range(len(spans))), unique=True) if spans else st.just([]))
    net = PlasticResNet(2, widths=[2] * len(blocks), blocks_per_stage=blocks, candidates=pattern,
                        max_active=len(active), initial_active=active)
    with torch.no_grad():
        for k in active:
            net.candidates[k].gate.fill_(data_.draw(st.floats(-2, 2)))
    counts, weights = brute_force(net, transitions)
    stats = path_length_distribution(net, include_transitions=transitions)
    assert {k: c for k, c in enumerate(stats.counts) if c} == counts
    total = sum(weights.values())
    assert stats.weighted == pytest.approx([weights.get(k, 0.0) / total for k in range(len(stats.weighted))])
    assert stats.mean == pytest.approx(sum(k * c for k, c in counts.items()) / sum(counts.values()))


def test_stochastic_depth_weights_paths_by_survival() -> None:
    net = PlasticResNet(2, widths=(4,), blocks_per_stage=2, max_active=0, mode="stochastic_depth")
    p1, p2 = net.survival_probabilities()
    w = [1.0, p1 + p2, p1 * p2]
    stats = path_length_distribution(net)
    assert stats.counts == [1, 2, 1]
    assert stats.weighted == pytest.approx([v / sum(w) for v in w])


# ---------------------------------------------------------------- the controller, unit level


def probe_step(net: PlasticResNet, x: torch.Tensor, y: torch.Tensor) -> None:
    net.probe = True
    F.cross_entropy(net(x), y).backward()
    net.probe = False


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_grown_paths_start_at_zero_with_reset_optimizer_state(optimizer: str) -> None:
    net = tiny(candidates="skip12", max_active=6)  # every path active: all get optimizer state
    opt = (torch.optim.Adam(net.parameters(), lr=0.01) if optimizer == "adam"
           else torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9))
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.deactivate([0, 1, 2])  # now 3 active, 3 inactive with stale state and non-zero blocks
    assert all(len(opt.state[p]) > 0 for p in net.candidate_parameters(0))
    cb = PathPlasticity(every=1, n_swap=2, criterion="gate")
    opt.zero_grad()
    probe_step(net, x, y)
    rec = cb.swap(net, opt)
    assert len(net.active_indices()) == 3
    assert set(rec["grown"]) <= {0, 1, 2} and set(rec["dropped"]) <= {3, 4, 5}
    assert set(rec["grown"]).isdisjoint(rec["dropped"])
    for k in rec["grown"] + rec["dropped"]:
        assert net.candidates[k].gate.item() == 0.0
        for p in net.candidate_parameters(k):
            assert p.grad is None and len(opt.state.get(p, {})) == 0
    for k in rec["dropped"]:
        assert not net.active[k]
    kept = [k for k in net.active_indices() if k not in rec["grown"]]
    before = {k: net.candidates[k].gate.item() for k in kept}
    opt.step()  # the update step: grown gates skip it, the kept paths move
    for k in rec["grown"]:
        assert net.candidates[k].gate.item() == 0.0
        assert all(len(opt.state.get(p, {})) == 0 for p in net.candidate_parameters(k))
    assert all(net.candidates[k].gate.item() != before[k] for k in kept)


def test_gradient_scores_come_from_the_current_step_only() -> None:
    net = tiny(max_active=2, gate_init=0.3)
    randomize(net)
    net.train()
    x1, y1 = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    x2, y2 = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    fresh = copy.deepcopy(net)  # same weights and BN state as `net` before the second step
    probe_step(net, x1, y1)  # no zero_grad in between: .grad accumulates over both steps
    fresh.load_state_dict(net.state_dict())
    probe_step(net, x2, y2)
    probe_step(fresh, x2, y2)
    current = fresh.probe_grad
    assert current is not None and bool((current != 0).all())
    torch.testing.assert_close(net.probe_grad, current)
    accumulated = torch.stack([c.gate.grad for c in net.candidates])
    assert not torch.allclose(accumulated, current)  # what the original bug would have scored
    cb = PathPlasticity(every=1, n_swap=1, criterion="gradient")
    rec = cb.swap(net, None)
    scores = current.abs().tolist()
    active = fresh.active_indices()
    inactive = [k for k in range(net.n_candidates) if k not in active]
    assert rec["dropped"] == [min(active, key=lambda k: scores[k])]
    assert rec["grown"] == [max(inactive, key=lambda k: scores[k])]
    assert rec["drop_scores"] == pytest.approx([scores[rec["dropped"][0]]])
    assert net.probe_grad is None  # consumed: a missing probe is an error, never a stale score
    with pytest.raises(RuntimeError, match="probe"):
        cb.swap(net, None)


@settings(max_examples=25, deadline=None)
@given(pattern=st.sampled_from(["skip1", "skip12", "all"]), data_=st.data(),
       criterion=st.sampled_from(["gate", "gradient"]), grow=st.sampled_from(["gradient", "random"]))
def test_swaps_keep_the_active_count_and_the_zero_gate_invariants(pattern: str, data_: Any, criterion: str,
                                                                  grow: str) -> None:
    net = PlasticResNet(3, widths=(2,), blocks_per_stage=3, candidates=pattern, max_active=None,
                        seed=data_.draw(st.integers(0, 100)))
    n_active = len(net.active_indices())
    n_swap = data_.draw(st.integers(1, min(n_active, net.n_candidates - n_active)))
    cb = PathPlasticity(every=1, n_swap=n_swap, criterion=criterion, grow=grow)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    for step in range(1, 4):
        cb.step = step
        opt.zero_grad()
        probe_step(net, x, y)
        before = set(net.active_indices())
        rec = cb.swap(net, opt)
        opt.step()
        after = set(net.active_indices())
        assert len(after) == n_active and len(rec["grown"]) == len(rec["dropped"]) == n_swap
        assert set(rec["dropped"]) <= before and set(rec["grown"]).isdisjoint(before)
        assert after == (before - set(rec["dropped"])) | set(rec["grown"])
        gates = net.gates()
        assert all(gates[k] == 0 for k in range(net.n_candidates) if k not in after or k in rec["grown"])


def test_random_growth_is_seeded() -> None:
    recs = []
    for _ in range(2):
        net = tiny(max_active=3)
        probe_step(net, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
        recs.append(PathPlasticity(every=1, n_swap=2, grow="random", seed=5).swap(net))
    assert recs[0]["grown"] == recs[1]["grown"] and len(recs[0]["grown"]) == 2


def test_reset_optimizer_state_accepts_a_lightning_optimizer_wrapper() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(2)
    opt.step()

    class Wrapper:
        optimizer = opt

    reset_optimizer_state(Wrapper(), [p])  # type: ignore[arg-type]
    assert len(opt.state[p]) == 0


# ---------------------------------------------------------------- the controller, through engine.fit


def test_controller_keeps_active_count_constant_and_trains_grown_paths(tmp_path: Path) -> None:
    net = tiny(max_active=2, initial_active=[0, 3])
    init = copy.deepcopy(net)
    cb = PathPlasticity(every=3, n_swap=1, t_end=1.0, criterion="gradient")
    rec = Record(cb)
    c = cfg(epochs=2, batches_per_step=2)
    fit(net, data(), data(24, seed=1), c, workdir=tmp_path, callbacks=[cb, rec])
    # on_before_optimizer_step fires once per optimizer step (5 minibatches per epoch, in chunks of 2)
    assert rec.steps == cb.step == cb.total_steps == 2 * 5
    assert [s["step"] for s in cb.swaps] == [3, 6, 9]
    assert cb.n_probes == 3
    assert set(rec.n_active) == {2}
    assert rec.checks.count("swap") == 3 and rec.checks.count("after") >= 2
    assert [e["epoch"] for e in cb.epochs] == [0, 1]
    assert all(len(e["active"]) == 2 for e in cb.epochs)
    grown = {k for s in cb.swaps for k in s["grown"]} - {0, 3}
    assert grown
    changed = [k for k in grown if any(not torch.equal(a, b) for a, b in zip(
        net.candidate_parameters(k), init.candidate_parameters(k), strict=True))]
    assert changed  # a path grown during training was trained (PlasticNet's first bug)
    json.dumps(cb.history)
    out = plot_path_lengths(cb.history, tmp_path / "fig" / "paths.png")
    assert out.is_file() and out.stat().st_size > 0


def test_static_mode_never_changes(tmp_path: Path) -> None:
    net = tiny(mode="static", max_active=2)
    active = net.active_indices()
    cb = PathPlasticity(every=1, n_swap=1, t_end=1.0)
    fit(net, data(), None, cfg(), workdir=tmp_path, callbacks=[cb])
    assert cb.swaps == [] and cb.n_probes == 0 and net.probe_grad is None
    assert net.active_indices() == active
    assert [e["active"] for e in cb.epochs] == [active, active]
    assert cb.epochs[0]["model_mode"] == "static"


class Interrupted(Exception):
    pass


class StopAt(L.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise Interrupted


@pytest.mark.parametrize("with_val", [True, False], ids=["val", "no_val"])
def test_resumed_run_is_identical(tmp_path: Path, with_val: bool) -> None:
    train, val = data(), (data(16, seed=1) if with_val else None)
    c = cfg(epochs=2)

    def controller() -> PathPlasticity:
        return PathPlasticity(every=2, n_swap=1, t_end=0.9, criterion="gate")

    full, cb_full = tiny(), controller()
    fit(full, train, val, c, workdir=tmp_path / "full", callbacks=[cb_full])
    assert len(cb_full.swaps) == 4 and {s["epoch"] for s in cb_full.swaps} == {0, 1}

    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        fit(tiny(), train, val, c, workdir=run, callbacks=[controller(), StopAt(1)])
    ck = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert ck["epoch"] == 0
    resumed, cb = tiny(seed=7), controller()  # other weights and active set: all from the checkpoint
    fit(resumed, train, val, c, workdir=run, resume=True, callbacks=[cb])
    assert resumed.active_indices() == full.active_indices()
    a, b = resumed.state_dict(), full.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cb.swaps == cb_full.swaps and cb.step == cb_full.step
    assert cb.epochs == cb_full.epochs and [e["epoch"] for e in cb.epochs] == [0, 1]


def test_callback_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    cb = PathPlasticity(every=2)
    cb.step, cb.n_probes = 7, 3
    cb.swaps = [{"step": 2, "epoch": 0, "dropped": [1], "grown": [4], "dropped_gates": [0.1],
                 "drop_scores": [0.1], "grow_scores": [0.2]}]
    cb.epochs = [{"epoch": 0, "counts": [1, 2**70], "distribution": [0.5, 0.5]}]
    save_checkpoint({"cb": cb.state_dict()}, tmp_path / "c.safetensors")
    other = PathPlasticity(every=2)
    other.load_state_dict(load_checkpoint(tmp_path / "c.safetensors")["cb"])
    assert other.state_dict() == cb.state_dict()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_active": 7}, "max_active=7"),
    ({"max_active": -1}, "max_active=-1"),
    ({"mode": "dense"}, "unknown mode 'dense'"),
    ({"candidates": "skip3"}, "unknown candidates pattern 'skip3'"),
    ({"candidates": [(0, 2, 1)]}, "0 <= i < j"),
    ({"candidates": [(5, 0, 1)]}, "stage 5"),
    ({"candidates": [(0, 0, 1), (0, 0, 1)]}, "twice"),
    ({"candidate_block": "huge"}, "candidate_block 'huge'"),
    ({"survival_last": 0.0}, "survival_last"),
    ({"blocks_per_stage": [2]}, "blocks_per_stage"),
    ({"initial_active": [0], "max_active": 2}, "initial_active"),
    ({"initial_active": [0, 9], "max_active": 2}, "index 9"),
])
def test_model_rejects_bad_input(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"every": 0}, "every must be"),
    ({"every": 1.5}, "every must be"),
    ({"n_swap": 0}, "n_swap must be"),
    ({"criterion": "loss"}, "unknown criterion 'loss'"),
    ({"grow": "magnitude"}, "unknown grow rule 'magnitude'"),
    ({"t_end": 1.5}, r"\(0, 1\]"),
    ({"t_end": 0}, "t_end"),
])
def test_controller_rejects_bad_input(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PathPlasticity(**kwargs)


@pytest.mark.parametrize(("net_kw", "cb_kw", "match"), [
    ({}, {"every": 2, "t_end": 1000}, "t_end=1000 is beyond the end of training"),
    ({"max_active": 5}, {"every": 2, "n_swap": 2}, "n_swap=2"),
    ({}, {"every": 9, "t_end": 5}, "no update would ever happen"),
])
def test_controller_rejects_a_plan_that_does_not_fit_the_run(
        tmp_path: Path, net_kw: dict[str, Any], cb_kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit(tiny(**net_kw), data(), None, cfg(), workdir=tmp_path, callbacks=[PathPlasticity(**cb_kw)])


def test_path_stats_and_plot_reject_wrong_input(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="PlasticResNet"):
        path_length_distribution(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        plot_path_lengths({"epochs": []}, tmp_path / "x.png")
