"""FLOP counting per prunable weight, training / inference FLOP formulas (REFERENCE 4.3),
export to torch.nn.utils.prune and CSR Linear layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from branchnet.plastic.export import CSRLinear, remove_prune, to_csr, to_torch_prune
from branchnet.plastic.flops import (
    flops_summary,
    inference_flops,
    layer_flops,
    sparse_flops,
    summarize_flops,
    training_flops,
)
from branchnet.plastic.masks import SparseMasks, SparsityError


class ViewVirtual(nn.Module):
    """K branches: a tied shared block used by every branch, per-branch blocks read as views."""

    def __init__(self, k: int = 3, n_in: int = 4, n_out: int = 5):
        super().__init__()
        self.k = k
        self.weight_ss = nn.Parameter(torch.randn(n_out, n_in))
        self.weight_uu = nn.Parameter(torch.randn(k, n_out, n_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, K, in)
        shared = torch.stack([x[:, i] @ self.weight_ss.t() for i in range(self.k)], 1)
        unique = torch.einsum("bki,koi->bko", x, self.weight_uu)
        return shared + unique


class CatVirtual(ViewVirtual):
    """The same layer multiplying by a concatenated copy of its blocks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = torch.cat([self.weight_ss.unsqueeze(0).expand(self.k, -1, -1), self.weight_uu], 2)
        return torch.einsum("bki,koi->bko", torch.cat([x, x], 2), big)


class ElementwiseOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4) -> (B, 6), no matmul op
        return (x.unsqueeze(1) * self.weight).sum(-1)


def test_linear_and_conv_flops_are_two_macs_per_example() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 4, 1, groups=2), nn.Flatten(), nn.Linear(4 * 25, 7))
    f = layer_flops(net, torch.randn(4, 3, 10, 10))
    assert f == {"0.weight": 2 * 8 * 3 * 9 * 25, "3.weight": 2 * 4 * 4 * 25, "5.weight": 2 * 100 * 7}
    assert net.training and net[1].training  # flags restored; BN statistics untouched
    assert torch.equal(net[1].running_mean, torch.zeros(8))


def test_virtual_blocks_are_attributed_per_block() -> None:
    f = layer_flops(ViewVirtual(), torch.randn(2, 3, 4))
    # the tied block runs once per branch; the per-branch blocks once each
    assert f == {"weight_ss": 3 * 2 * 5 * 4, "weight_uu": 3 * 2 * 5 * 4}
    # a copy: the module's FLOPs split by the weights each block contributes (the tied block
    # is in every branch: 3 x 20 vs 60)
    g = layer_flops(CatVirtual(), torch.randn(2, 3, 4))
    assert g == pytest.approx({"weight_ss": 3 * 2 * 5 * 4, "weight_uu": 3 * 2 * 5 * 4})
    assert layer_flops(ElementwiseOnly(), torch.randn(3, 4)) == {"weight": 2 * 24}  # the fallback
    with pytest.raises(SparsityError, match="no parameters"):
        layer_flops(ElementwiseOnly(), torch.randn(3, 4), names=["nope"])


def test_training_flop_formulas() -> None:
    f_d, f_s = 1000.0, 100.0
    assert training_flops("dense", f_d, f_s) == 3000.0
    assert training_flops("static", f_d, f_s) == training_flops("set", f_d, f_s) == 300.0
    assert training_flops("snfs", f_d, f_s) == 1200.0
    assert training_flops("rigl", f_d, f_s, delta_t=100) == pytest.approx((300 * 100 + 200 + 1000) / 101)
    assert training_flops("rigl", f_d, f_d, delta_t=7) == pytest.approx(3 * f_d)  # dense: no extra
    with pytest.raises(SparsityError, match="'lottery'"):
        training_flops("lottery", f_d, f_s)
    assert sparse_flops({"a": 10.0, "b": 30.0}, {"a": 0.5}) == 35.0
    assert inference_flops({"a": 10.0}) == 10.0


def test_summary_of_a_masked_model() -> None:
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    masks = SparseMasks.from_model(net, 0.1, "erk", dense_last=True)
    s = flops_summary(net, masks, torch.zeros(3, 10), "rigl", delta_t=10, steps=50, batch_size=8)
    d = masks.densities()
    f_s = 400 * d["0.weight"] + 200 * 1.0
    assert s["dense_forward"] == 600 and s["sparse_forward"] == pytest.approx(f_s)
    assert s["train_step"] == pytest.approx((3 * f_s * 10 + 2 * f_s + 600) / 11)
    assert s["train_total"] == pytest.approx(s["train_step"] * 50 * 8)
    assert s["layers"]["2.weight"] == {"dense_forward": 200.0, "density": 1.0}
    assert summarize_flops({"a": 4.0}, {"a": 0.25})["inference_ratio"] == 0.25


# ---------------------------------------------------------------- export


def masked_net(density: float, seed: int = 0) -> tuple[nn.Module, SparseMasks]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 16),
                        nn.ReLU(), nn.Linear(16, 3))
    masks = SparseMasks.from_model(net, density, seed=seed)
    masks.apply(net)
    return net, masks


def test_torch_prune_round_trip() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    dense = [p.detach().clone() for p in net.parameters()]
    masks = SparseMasks.from_model(net, 0.3)
    x = torch.randn(5, 6)
    to_torch_prune(net, masks)
    assert {n for n, _ in net.named_parameters()} == {"0.weight_orig", "0.bias", "2.weight_orig", "2.bias"}
    assert torch.equal(net[0].weight, dense[0] * masks["0.weight"])
    expected = F.linear(F.relu(F.linear(x, dense[0] * masks["0.weight"], dense[1])),
                        dense[2] * masks["2.weight"], dense[3])
    assert torch.allclose(net(x), expected)
    remove_prune(net)
    assert {n for n, _ in net.named_parameters()} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert int((net[0].weight != 0).sum()) == masks.active_counts()["0.weight"]
    assert not net[0]._forward_pre_hooks


@settings(max_examples=25, deadline=None)
@given(density=st.floats(0.02, 1.0), seed=st.integers(0, 1000), batch=st.integers(1, 5))
def test_csr_linear_matches_the_dense_masked_model(density: float, seed: int, batch: int) -> None:
    net, masks = masked_net(density, seed)
    net.eval()
    fast = to_csr(net, masks)
    assert isinstance(fast[3], CSRLinear) and isinstance(fast[5], CSRLinear)
    assert isinstance(fast[0], nn.Conv2d)  # convolutions stay dense (masked)
    assert fast[3].weight.layout == torch.sparse_csr
    assert fast[3].weight._nnz() == masks.active_counts()["3.weight"]
    x = torch.randn(batch, 2, 3, 3)
    with torch.no_grad():
        assert torch.allclose(fast(x), net(x), atol=1e-5, rtol=1e-5)
    assert isinstance(net[3], nn.Linear)  # not in place by default


def test_csr_linear_on_extra_leading_dims_and_back() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    mask = torch.rand(4, 6) < 0.4
    csr = CSRLinear.from_linear(lin, mask)
    x = torch.randn(2, 3, 6)
    expected = F.linear(x, lin.weight * mask, lin.bias)
    assert torch.allclose(csr(x), expected, atol=1e-6)
    assert torch.allclose(csr.to_dense_linear()(x), expected, atol=1e-6)
    assert "nnz=" in repr(csr)
    with pytest.raises(SparsityError, match=r"\(\.\.\., 6\)"):
        csr(torch.randn(2, 5))
    nobias = CSRLinear.from_linear(nn.Linear(6, 4, bias=False))
    assert nobias(x).shape == (2, 3, 4)


def test_branchnet_virtual_layers_split_exactly_by_block() -> None:
    layers = pytest.importorskip("branchnet.virtual.layers")
    lin = layers.VLinear(6, 4, branches=3, shared_in=2, shared_out=1)
    f = layer_flops(lin, torch.randn(5, 3, 6))
    # each branch multiplies by its whole (4 x 6) weight; the tied 1 x 2 block serves all three
    assert sum(f.values()) == pytest.approx(2 * 3 * 4 * 6)
    assert f == pytest.approx({"weight_ss": 2 * 3 * 1 * 2, "weight_su": 2 * 3 * 3 * 2,
                               "weight_us": 2 * 3 * 1 * 4, "weight_uu": 2 * 3 * 3 * 4})
    conv = layers.VConv2d(2, 4, 3, branches=2, shared_in=1, shared_out=2, padding=1)
    g = layer_flops(conv, torch.randn(3, 2, 2, 5, 5))
    assert sum(g.values()) == pytest.approx(2 * 2 * 4 * 2 * 9 * 25)
    assert g["weight_ss"] == pytest.approx(2 * 2 * 2 * 1 * 9 * 25)
