"""Prunable-weight selection, layer densities (uniform / ER / ERK with the clamp), exact random
masks and the SparseMasks container."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from branchnet.checkpoint import load_checkpoint, save_checkpoint
from branchnet.plastic.masks import (
    LayerShape,
    SparseMasks,
    SparsityError,
    find_prunable,
    layer_counts,
    layer_densities,
    random_masks,
)


class VirtualLinear(nn.Module):
    """Shaped like branchnet's virtual layers: a tied shared block and per-branch blocks."""

    def __init__(self, k: int = 3, s_in: int = 4, u_in: int = 2, s_out: int = 5, u_out: int = 3):
        super().__init__()
        self.weight_ss = nn.Parameter(torch.randn(s_out, s_in))
        self.weight_su = nn.Parameter(torch.randn(k, u_out, s_in))
        self.weight_us = nn.Parameter(torch.randn(k, s_out, u_in))
        self.weight_uu = nn.Parameter(torch.randn(k, u_out, u_in))
        self.bias_s = nn.Parameter(torch.zeros(s_out))


class VirtualNorm(nn.Module):
    """A per-branch norm layer: its (K, C) weight must stay dense."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3, 8))


def mixed_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv1d(8, 4, 3), nn.LayerNorm(4), nn.Embedding(10, 4),
        VirtualLinear(), VirtualNorm(), nn.Linear(4, 2))


# ---------------------------------------------------------------- selection


def test_find_prunable_selects_linear_conv_and_virtual_blocks_only() -> None:
    found = find_prunable(mixed_net())
    assert list(found) == ["0.weight", "2.weight", "5.weight_ss", "5.weight_su", "5.weight_us",
                           "5.weight_uu", "7.weight"]
    assert found["0.weight"] == LayerShape((8, 3, 3, 3), 8, 3, (3, 3), 1)
    # a Conv1d weight is (out, in, k), not branched
    assert found["2.weight"] == LayerShape((4, 8, 3), 4, 8, (3,), 1)
    assert found["5.weight_su"] == LayerShape((3, 3, 4), 3, 4, (), 3)
    assert found["5.weight_ss"].branches == 1


def test_include_exclude_patterns() -> None:
    net = mixed_net()
    assert list(find_prunable(net, include=["5.*"], exclude=["*_uu"])) == [
        "5.weight_ss", "5.weight_su", "5.weight_us"]


def test_no_prunable_layer_names_the_model_and_rule() -> None:
    with pytest.raises(SparsityError, match=r"BatchNorm1d has no prunable weight.*ndim >= 2.*'weight'"):
        find_prunable(nn.BatchNorm1d(4))
    with pytest.raises(SparsityError, match=r"Sequential has no prunable weight.*include=\['nothing'\]"):
        find_prunable(mixed_net(), include=["nothing"])


def test_branched_shapes_score_per_branch() -> None:
    one, branched = LayerShape.from_shape((32, 16)), LayerShape.from_shape((4, 32, 16))
    assert branched.erk_score() == one.erk_score() and branched.numel == 4 * one.numel
    assert LayerShape.from_shape((4, 8, 3, 3, 3)).kernel == (3, 3)
    assert LayerShape.from_shape((8, 3, 3, 3, 3), branched=False).kernel == (3, 3, 3)
    with pytest.raises(SparsityError, match="shape"):
        LayerShape.from_shape((5,))


# ---------------------------------------------------------------- densities


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval_is_rejected(bad: float) -> None:
    with pytest.raises(SparsityError, match=r"\(0, 1\], got"):
        layer_densities({"a": (4, 4)}, bad)
    with pytest.raises(SparsityError, match=str(bad)):
        SparseMasks.from_model(nn.Linear(4, 4), bad)


def test_unknown_distribution_and_unknown_dense_layer() -> None:
    with pytest.raises(SparsityError, match=r"'erdos'.*uniform"):
        layer_densities({"a": (4, 4)}, 0.5, "erdos")
    with pytest.raises(SparsityError, match="'b'"):
        layer_densities({"a": (4, 4)}, 0.5, dense={"b"})


RESNET_LIKE = {  # stem, two 3x3 convs, the 32x16x1x1 shortcut, a big 3x3 conv, the classifier
    "stem": (16, 3, 3, 3), "c1": (16, 16, 3, 3), "c2": (32, 16, 3, 3), "shortcut": (32, 16, 1, 1),
    "c3": (64, 32, 3, 3), "c4": (64, 64, 3, 3), "fc": (10, 64)}


def _total(shapes: dict, dens: dict, names: list[str]) -> float:
    return sum(dens[n] * math.prod(shapes[n]) for n in names)


@pytest.mark.parametrize("density", [0.05, 0.1, 0.2, 0.5, 0.9])
def test_erk_clamp_keeps_every_layer_at_most_dense_and_hits_the_budget(density: float) -> None:
    dens = layer_densities(RESNET_LIKE, density, "erk")
    assert all(0 < d <= 1 for d in dens.values())
    total = sum(math.prod(s) for s in RESNET_LIKE.values())
    assert _total(RESNET_LIKE, dens, list(RESNET_LIKE)) == pytest.approx(density * total, rel=1e-12)


def test_the_shortcut_needs_the_clamp() -> None:
    # one-shot epsilon (no clamp) would give the 32x16x1x1 shortcut a density far above 1
    layers = {n: LayerShape.from_shape(s) for n, s in RESNET_LIKE.items()}
    total = sum(s.numel for s in layers.values())
    eps = 0.5 * total / sum(s.erk_score() * s.numel for s in layers.values())
    assert eps * layers["shortcut"].erk_score() > 1.5
    dens = layer_densities(RESNET_LIKE, 0.5, "erk")
    assert dens["shortcut"] == 1.0 and dens["stem"] == 1.0
    assert dens["c4"] < dens["c3"] < 1.0  # the rest share the remaining budget by ERK score


def test_erk_matches_hand_computed_values() -> None:
    # a: 1x1 conv 32x16 (score 50/512), b: dense 64x512 (576/32768); budget 0.5 * 33280 = 16640
    dens = layer_densities({"a": (32, 16, 1, 1), "b": (64, 512)}, 0.5, "erk")
    assert dens["a"] == 1.0  # 16640 / (50 + 576) * 50/512 = 2.6 > 1: clamped
    assert dens["b"] == pytest.approx((16640 - 512) / 32768)
    er = layer_densities({"a": (8, 4), "b": (16, 8)}, 0.25, "er")
    eps = 0.25 * (32 + 128) / (12 / 32 * 32 + 24 / 128 * 128)
    assert er == pytest.approx({"a": eps * 12 / 32, "b": eps * 24 / 128})


def test_dense_layers_are_outside_the_budget() -> None:
    shapes = {"first": (16, 3, 3, 3), "mid": (32, 16, 3, 3), "fc": (10, 32)}
    dens = layer_densities(shapes, 0.2, "uniform", dense={"first"})
    assert dens == {"first": 1.0, "mid": 0.2, "fc": 0.2}
    dens = layer_densities(shapes, 0.2, "erk", dense={"first"})
    assert dens["first"] == 1.0
    assert _total(shapes, dens, ["mid", "fc"]) == pytest.approx(0.2 * (32 * 16 * 9 + 320))


shape_st = st.one_of(
    st.tuples(st.integers(1, 64), st.integers(1, 64)),
    st.tuples(st.integers(1, 48), st.integers(1, 48), st.sampled_from([1, 3]), st.sampled_from([1, 3])),
    st.tuples(st.integers(1, 4), st.integers(1, 32), st.integers(1, 32)),
)


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(shape_st, min_size=1, max_size=7),
       density=st.floats(0.01, 1.0), distribution=st.sampled_from(["uniform", "er", "erk"]),
       power=st.sampled_from([0.5, 1.0]), n_dense=st.integers(0, 1))
def test_distributions_hit_the_target_with_densities_at_most_one(
        shapes: list, density: float, distribution: str, power: float, n_dense: int) -> None:
    named = {f"l{i}": s for i, s in enumerate(shapes)}
    dense = set(list(named)[:n_dense]) if len(named) > 1 else set()
    dens = layer_densities(named, density, distribution, erk_power=power, dense=dense)
    assert all(0 < d <= 1 for d in dens.values())
    assert all(dens[n] == 1.0 for n in dense)
    free = [n for n in named if n not in dense]
    budget = density * sum(math.prod(named[n]) for n in free)
    assert _total(named, dens, free) == pytest.approx(budget, rel=1e-9)
    # exact integer counts: round(density * n) each; the masks hold exactly those
    counts = layer_counts(named, dens)
    assert abs(sum(counts[n] for n in free) - budget) <= len(free) / 2 + 1e-6
    masks = random_masks(named, dens, seed=3)
    assert {n: int(m.sum()) for n, m in masks.items()} == counts
    assert all(tuple(masks[n].shape) == tuple(named[n]) for n in named)


# ---------------------------------------------------------------- random masks and container


def test_random_masks_are_seeded_and_exact() -> None:
    shapes = {"a": (20, 10), "b": (3, 5, 4)}
    dens = {"a": 0.3, "b": 0.5}
    one, again, other = (random_masks(shapes, dens, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(one[n], again[n]) for n in shapes)
    assert not torch.equal(one["a"], other["a"])
    assert layer_counts(shapes, dens) == {"a": 60, "b": 30} == {n: int(m.sum()) for n, m in one.items()}


def test_sparse_masks_apply_grads_density_and_state() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    masks = SparseMasks.from_model(net, 0.25, seed=4)
    assert masks.active_counts() == {"0.weight": 12, "2.weight": 6}
    assert masks.density() == 0.25 and masks.densities() == {"0.weight": 0.25, "2.weight": 0.25}
    masks.apply(net)
    assert int((net[0].weight != 0).sum()) == 12 and torch.all(net[2].weight[~masks["2.weight"]] == 0)
    net(torch.randn(4, 6)).sum().backward()
    masks.mask_grads(net)
    assert torch.all(net[0].weight.grad[~masks["0.weight"]] == 0)
    assert net[0].bias.grad.abs().sum() > 0  # biases stay dense
    state = masks.state_dict()
    other = SparseMasks.from_model(net, 0.25, seed=5)
    other.load_state_dict(state)
    assert all(torch.equal(other[n], masks[n]) for n in masks)
    with pytest.raises(SparsityError, match="names differ"):
        other.load_state_dict({"x": state["0.weight"]})
    with pytest.raises(SparsityError, match="bool tensor"):
        SparseMasks({"w": torch.ones(2)})
    with pytest.raises(SparsityError, match=r"does not fit Linear: parameter shape \(2, 3\)"):
        SparseMasks({"weight": torch.ones(3, 3, dtype=torch.bool)}).apply(nn.Linear(3, 2))


def test_masks_survive_a_safetensors_checkpoint(tmp_path) -> None:
    masks = SparseMasks.from_model(mixed_net(), 0.3, "erk")
    save_checkpoint({"masks": masks.state_dict()}, tmp_path / "m.safetensors")
    back = load_checkpoint(tmp_path / "m.safetensors")["masks"]
    assert all(back[n].dtype == torch.bool and torch.equal(back[n], masks[n]) for n in masks)


def test_dense_first_and_last_keep_whole_modules_dense() -> None:
    net = nn.Sequential(VirtualLinear(), nn.Linear(5, 8), nn.Linear(8, 2))
    masks = SparseMasks.from_model(net, 0.2, "erk", dense_first=True, dense_last=True)
    dens = masks.densities()
    assert all(dens[n] == 1.0 for n in ("0.weight_ss", "0.weight_su", "0.weight_us", "0.weight_uu",
                                        "2.weight"))
    assert dens["1.weight"] == 0.2
