"""Fused virtual-branch layers (branchnet.virtual.layers) against the loop reference, plain
PyTorch layers and the parameter formulas of REFERENCE 2.2."""

from __future__ import annotations

import copy
import math
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from branchnet.virtual.layers import (
    PerBranch,
    VBatchNorm1d,
    VBatchNorm2d,
    VConv2d,
    VFlatten,
    VGlobalAvgPool2d,
    VInput,
    VLinear,
    check_branches,
    shared_units,
    vcat,
)
from branchnet.virtual.models import expected_linear_params
from branchnet.virtual.reference import LoopVBatchNorm, LoopVConv2d, LoopVLinear

SETTINGS = settings(max_examples=30, deadline=None)
SHARED_NAMES = ("weight_ss", "bias_shared", "gamma_shared", "beta_shared")


pytestmark = pytest.mark.usefixtures("one_thread")


def _input(B: int, K: int, shape: tuple[int, ...], broadcast: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if broadcast:
        return torch.randn(B, *shape, generator=g).unsqueeze(1).expand(B, K, *shape)
    return torch.randn(B, K, *shape, generator=g)


def _grad_of(p: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    assert p.numel() > 0, "empty blocks are skipped, never zero-size parameters"
    assert g is not None, "every parameter gets a gradient"
    return g.clone()


def _grads(module: nn.Module, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Output, parameter gradients and input gradient of ``sum(module(x) * r)``."""
    if x.stride(1) == 0:  # broadcast: the leaf is the one batch, expanded (no copy) for the layer
        leaf = x[:, 0].detach().requires_grad_(True)
        x = leaf.unsqueeze(1).expand(x.shape)
    else:
        leaf = x = x.detach().requires_grad_(True)
    module.zero_grad()
    y = module(x)
    (y * r).sum().backward()
    grads = {n: _grad_of(p, p.grad) for n, p in module.named_parameters()}
    return y.detach(), grads, leaf.grad


def _compare_with_loop(fused: nn.Module, loop_cls: type, x: torch.Tensor, seed: int) -> None:
    """Fused (shared_grad='sum') and loop give the same outputs, parameter and input gradients."""
    loop = loop_cls.from_fused(copy.deepcopy(fused))
    loop.train(fused.training)
    with torch.no_grad():
        shape = copy.deepcopy(fused)(x).shape
    r = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    y_f, g_f, gx_f = _grads(fused, x, r)
    y_l, g_l, gx_l = _grads(loop, x, r)
    torch.testing.assert_close(y_f, y_l, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx_f, gx_l, atol=1e-5, rtol=1e-4)
    assert set(g_l) == {f"fused.{n}" for n in g_f}
    for n, g in g_f.items():
        torch.testing.assert_close(g, g_l[f"fused.{n}"], atol=1e-4, rtol=1e-4, msg=n)


# ---------------------------------------------------------------- shared_units


def test_shared_units_floors_fractions_and_takes_counts() -> None:
    assert shared_units(0.5, 7) == 3
    assert shared_units(0.0, 7) == 0 and shared_units(1.0, 7) == 7
    assert shared_units(0.99, 10) == 9
    assert shared_units(3, 7) == 3 and shared_units(0, 7) == 0 and shared_units(7, 7) == 7


@pytest.mark.parametrize(("frac", "units", "match"), [
    (1.5, 10, r"fraction 1\.5 is outside \[0, 1\]"),
    (-0.1, 10, r"fraction -0\.1 is outside \[0, 1\]"),
    (float("nan"), 10, r"outside \[0, 1\]"),
    (11, 10, r"count 11 is outside \[0, 10\]"),
    (-1, 10, r"count -1 is outside \[0, 10\]"),
    ("half", 10, r"got 'half'"),
    (True, 10, r"got True"),
    (0.5, 0, r"units must be an int >= 1, got 0"),
])
def test_shared_units_rejects_bad_values(frac: Any, units: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        shared_units(frac, units)


@pytest.mark.parametrize("k", [0, -2, 1.0, True])
def test_branches_must_be_positive_ints(k: Any) -> None:
    with pytest.raises(ValueError, match=r"branches must be an int >= 1"):
        check_branches(k)
    with pytest.raises(ValueError, match=r"branches must be an int >= 1"):
        VLinear(4, 4, k, 0, 0)


def test_layers_reject_bad_shared_and_options() -> None:
    with pytest.raises(ValueError, match=r"count 5 is outside \[0, 4\]"):
        VLinear(4, 6, 2, 5, 0)
    with pytest.raises(ValueError, match=r"fraction 1\.5"):
        VConv2d(4, 6, 3, 2, 0, 1.5)
    with pytest.raises(ValueError, match=r"shared_grad must be one of \['mean', 'sum'\], got 'avg'"):
        VBatchNorm1d(4, 2, 0, shared_grad="avg")
    with pytest.raises(ValueError, match=r"kernel_size must be"):
        VConv2d(4, 6, 0, 2, 0, 0)
    with pytest.raises(ValueError, match=r"momentum"):
        VBatchNorm2d(4, 2, 0, momentum=0.0)


# ---------------------------------------------------------------- fused == loop


@st.composite
def _dense_case(draw: Any) -> dict[str, Any]:
    n_in, n_out = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    return {"K": draw(st.integers(1, 4)), "n_in": n_in, "n_out": n_out,
            "s_in": draw(st.integers(0, n_in)), "s_out": draw(st.integers(0, n_out)),
            "B": draw(st.integers(2, 4)), "bias": draw(st.booleans()), "broadcast": draw(st.booleans()),
            "seed": draw(st.integers(0, 10_000))}


@SETTINGS
@given(_dense_case())
def test_vlinear_matches_loop_outputs_and_gradients(c: dict[str, Any]) -> None:
    torch.manual_seed(c["seed"])
    layer = VLinear(c["n_in"], c["n_out"], c["K"], c["s_in"], c["s_out"], bias=c["bias"], shared_grad="sum")
    x = _input(c["B"], c["K"], (c["n_in"],), c["broadcast"], c["seed"])
    _compare_with_loop(layer, LoopVLinear, x, c["seed"])


@SETTINGS
@given(_dense_case(), st.sampled_from([1, 3]), st.sampled_from([1, 2]), st.sampled_from([0, 1]),
       st.integers(3, 6), st.sampled_from(["grouped", "split"]))
def test_vconv2d_matches_loop_outputs_and_gradients(c: dict[str, Any], k: int, stride: int, padding: int,
                                                     hw: int, impl: str) -> None:
    torch.manual_seed(c["seed"])
    layer = VConv2d(c["n_in"], c["n_out"], k, c["K"], c["s_in"], c["s_out"], stride=stride, padding=padding,
                    bias=c["bias"], shared_grad="sum")
    layer.conv_impl = impl
    x = _input(c["B"], c["K"], (c["n_in"], hw, hw), c["broadcast"], c["seed"])
    _compare_with_loop(layer, LoopVConv2d, x, c["seed"])


@SETTINGS
@given(_dense_case(), st.booleans(), st.booleans())
def test_vbatchnorm_matches_loop_in_train_and_eval(c: dict[str, Any], image: bool, train: bool) -> None:
    torch.manual_seed(c["seed"])
    n, K = c["n_in"], c["K"]
    layer = (VBatchNorm2d if image else VBatchNorm1d)(n, K, c["s_in"], shared_grad="sum")
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    layer.train(train)
    x = _input(c["B"], K, (n, 3, 3) if image else (n,), c["broadcast"], c["seed"]) * 2 + 1
    _compare_with_loop(layer, LoopVBatchNorm, x, c["seed"])
    # running statistics: a forward updates them identically (train) or leaves them (eval)
    fused, loop = copy.deepcopy(layer), LoopVBatchNorm.from_fused(copy.deepcopy(layer))
    with torch.no_grad():
        fused(x), loop(x)
    for name in ("running_mean", "running_var"):
        after, before = getattr(fused, name), getattr(layer, name)
        torch.testing.assert_close(after, getattr(loop.fused, name))
        assert torch.equal(after, before) != train


@SETTINGS
@given(_dense_case(), st.sampled_from(["linear", "conv", "bn"]))
def test_shared_gradient_is_the_mean_of_the_branch_gradients(c: dict[str, Any], kind: str) -> None:
    """Fused default ('mean') with loss = sum_i L_i: shared params get mean_i dL_i, unique params dL_i."""
    torch.manual_seed(c["seed"])
    K = c["K"]
    if kind == "bn":
        fused = VBatchNorm1d(c["n_in"], K, c["s_in"])
        x = _input(c["B"], K, (c["n_in"],), c["broadcast"], c["seed"])
        loop = LoopVBatchNorm.from_fused(copy.deepcopy(fused))
    elif kind == "conv":
        fused = VConv2d(c["n_in"], c["n_out"], 3, K, c["s_in"], c["s_out"], padding=1, bias=c["bias"])
        x = _input(c["B"], K, (c["n_in"], 4, 4), c["broadcast"], c["seed"])
        loop = LoopVConv2d.from_fused(copy.deepcopy(fused))
    else:
        fused = VLinear(c["n_in"], c["n_out"], K, c["s_in"], c["s_out"], bias=c["bias"])
        x = _input(c["B"], K, (c["n_in"],), c["broadcast"], c["seed"])
        loop = LoopVLinear.from_fused(copy.deepcopy(fused))
    r = torch.randn(fused(x).shape)
    (fused(x) * r).sum().backward()
    params = dict(loop.fused.named_parameters())
    per_branch = []  # gradients of each branch's own loss L_i, from the loop reference
    for i in range(K):
        loss_i = (loop(x)[:, i] * r[:, i]).sum()
        grads = torch.autograd.grad(loss_i, list(params.values()))
        per_branch.append({n: _grad_of(p, g) for (n, p), g in zip(params.items(), grads, strict=True)})
    for name, p in fused.named_parameters():
        total = torch.stack([g[name] for g in per_branch])
        expected = total.mean(0) if name in SHARED_NAMES else total.sum(0)
        torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-4, msg=name)
    if K > 1 and getattr(fused, "weight_ss", None) is not None and fused.weight_ss.grad.abs().sum() > 0:
        summed = torch.stack([g["weight_ss"] for g in per_branch]).sum(0)
        assert not torch.allclose(fused.weight_ss.grad, summed)


def test_mean_gradient_survives_deepcopy() -> None:
    torch.manual_seed(0)
    layer = copy.deepcopy(VLinear(3, 2, 4, 3, 2))
    x = torch.randn(5, 3)
    layer(x.unsqueeze(1).expand(5, 4, 3)).sum().backward()
    g_mean = layer.weight_ss.grad.clone()
    twin = VLinear(3, 2, 4, 3, 2, shared_grad="sum")
    twin.load_state_dict(layer.state_dict())
    twin(x.unsqueeze(1).expand(5, 4, 3)).sum().backward()
    torch.testing.assert_close(g_mean * 4, twin.weight_ss.grad)


# ---------------------------------------------------------------- fused: one op for all branches


def test_each_layer_runs_one_op_for_all_branches() -> None:
    x = torch.randn(4, 3, 5, 6, 6)
    conv = VConv2d(5, 4, 3, 3, 2, 1, padding=1)
    assert conv.conv_impl == "grouped"
    with mock.patch.object(F, "conv2d", wraps=F.conv2d) as spy:
        grouped = conv(x)
    assert spy.call_count == 1 and spy.call_args.kwargs["groups"] == 3
    conv.conv_impl = "split"  # one dense conv per branch, the same result
    with mock.patch.object(F, "conv2d", wraps=F.conv2d) as spy:
        torch.testing.assert_close(conv(x), grouped)
    assert spy.call_count == 3
    bn = VBatchNorm2d(5, 3, 2)
    with mock.patch.object(F, "batch_norm", wraps=F.batch_norm) as spy:
        bn(x)
    assert spy.call_count == 1
    lin = VLinear(5, 4, 3, 2, 1)
    with mock.patch.object(torch, "baddbmm", wraps=torch.baddbmm) as spy:
        lin(torch.randn(4, 3, 5))
    assert spy.call_count == 1


def test_broadcast_input_is_not_copied_and_gives_the_same_result() -> None:
    torch.manual_seed(0)
    conv = VConv2d(3, 4, 3, 4, 3, 2, padding=1)
    x = torch.randn(2, 3, 5, 5)
    xb = VInput(4, (3, 5, 5))(x)
    assert xb.stride(1) == 0 and xb.data_ptr() == x.data_ptr()
    torch.testing.assert_close(conv(xb), conv(xb.contiguous()))


# ---------------------------------------------------------------- s = 0 and s = 1


@pytest.mark.parametrize("first", [False, True])
def test_unshared_vlinear_is_k_independent_linears(first: bool) -> None:
    torch.manual_seed(0)
    K, n_in, n_out = 3, 5, 4
    layer = VLinear(n_in, n_out, K, n_in if first else 0, 0)
    with torch.no_grad():
        layer.bias_unique.normal_()
    x = torch.randn(6, K, n_in)
    y = layer(x)
    for i in range(K):
        lin = nn.Linear(n_in, n_out)
        with torch.no_grad():
            lin.weight.copy_(layer.weight_su[i] if first else layer.weight_uu[i])
            lin.bias.copy_(layer.bias_unique[i])
        torch.testing.assert_close(y[:, i], lin(x[:, i]))
    # empty blocks are skipped: only the per-branch block that maps input to output is there
    assert {n for n, _ in layer.named_parameters()} == {"weight_su" if first else "weight_uu", "bias_unique"}
    assert layer.weight_ss is None and layer.bias_shared is None


def test_unshared_vconv2d_is_k_independent_convolutions() -> None:
    torch.manual_seed(0)
    K = 3
    layer = VConv2d(2, 4, 3, K, 0, 0, stride=2, padding=1)
    with torch.no_grad():
        layer.bias_unique.normal_()
    x = torch.randn(2, K, 2, 7, 7)
    y = layer(x)
    for i in range(K):
        conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        with torch.no_grad():
            conv.weight.copy_(layer.weight_uu[i])
            conv.bias.copy_(layer.bias_unique[i])
        torch.testing.assert_close(y[:, i], conv(x[:, i]))


def test_fully_shared_layers_give_identical_branches_on_a_broadcast_input() -> None:
    torch.manual_seed(0)
    K = 4
    net = nn.Sequential(VConv2d(3, 6, 3, K, 3, 6, padding=1), VBatchNorm2d(6, K, 6), nn.ReLU(),
                        VGlobalAvgPool2d(), VLinear(6, 5, K, 6, 5), VBatchNorm1d(5, K, 5),
                        VLinear(5, 2, K, 5, 2))
    x = VInput(K, (3, 6, 6))(torch.randn(8, 3, 6, 6))
    for mode in (True, False):
        y = net.train(mode)(x)
        for i in range(1, K):
            torch.testing.assert_close(y[:, i], y[:, 0])
    # with per-branch inputs the branches differ
    y = net.train()(torch.randn(8, K, 3, 6, 6))
    assert not torch.allclose(y[:, 0], y[:, 1])


# ---------------------------------------------------------------- parameter counts


def _count(m: nn.Module, weights_only: bool = False) -> int:
    return sum(p.numel() for n, p in m.named_parameters() if not weights_only or "weight" in n)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.integers(1, 40), st.floats(0.0, 1.0))
def test_vlinear_parameter_count_matches_the_formulas(K: int, n_in: int, n_out: int, s: float) -> None:
    s_in, s_out = int(s * n_in), int(s * n_out)
    inner = VLinear(n_in, n_out, K, s, s)
    assert (inner.shared_in, inner.shared_out) == (s_in, s_out)
    weights = s_in * s_out + K * (n_in * n_out - s_in * s_out)
    biases = s_out + K * (n_out - s_out)
    assert _count(inner, weights_only=True) == weights == expected_linear_params(n_in, n_out, K, s)
    assert _count(inner) == weights + biases == expected_linear_params(n_in, n_out, K, s, bias=True)
    first = VLinear(n_in, n_out, K, n_in, s)
    assert _count(first, weights_only=True) == n_in * (s_out + K * (n_out - s_out)) \
        == expected_linear_params(n_in, n_out, K, s, first=True)
    conv = VConv2d(n_in, n_out, 3, K, s, s, bias=False)
    assert _count(conv) == 9 * weights


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 10), st.integers(1, 10),
       st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]))
def test_parameter_count_matches_the_reference_closed_forms(K: int, a: int, b: int, s: float) -> None:
    """REFERENCE 2.2: inner n_in*n_out*(s^2 + K(1-s^2)), first layer n_in*n_out*(s + K(1-s))
    (exact when s*n is an integer)."""
    n_in, n_out = 4 * a, 4 * b
    inner = _count(VLinear(n_in, n_out, K, s, s), weights_only=True)
    assert math.isclose(inner, n_in * n_out * (s**2 + K * (1 - s**2)))
    first = _count(VLinear(n_in, n_out, K, n_in, s), weights_only=True)
    assert math.isclose(first, n_in * n_out * (s + K * (1 - s)))
    bn = VBatchNorm1d(n_out, K, s)
    assert _count(bn) == 2 * (int(s * n_out) + K * (n_out - int(s * n_out)))


def test_parameter_names_and_shapes_follow_the_convention() -> None:
    layer = VConv2d(5, 4, 3, 3, 2, 1)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"weight_ss": (1, 2, 3, 3), "weight_su": (3, 3, 2, 3, 3), "weight_us": (3, 1, 3, 3, 3),
                      "weight_uu": (3, 3, 3, 3, 3), "bias_shared": (1,), "bias_unique": (3, 3)}
    assert layer.full_weight().shape == (3, 4, 5, 3, 3)
    bn = VBatchNorm2d(5, 3, 2)
    assert not any("weight" in n for n, _ in bn.named_parameters())
    assert (bn.shared, bn.branches) == (2, 3)


def test_he_normal_initialisation_uses_the_whole_input_width() -> None:
    torch.manual_seed(0)
    lin = VLinear(400, 300, 2, 200, 150)
    conv = VConv2d(40, 60, 3, 2, 20, 30)
    for layer, fan_in in ((lin, 400), (conv, 360)):
        for name in ("weight_ss", "weight_su", "weight_us", "weight_uu"):
            std = getattr(layer, name).std().item()
            assert abs(std / math.sqrt(2 / fan_in) - 1) < 0.05, name
        assert layer.bias_shared.abs().sum() == 0 and layer.bias_unique.abs().sum() == 0


# ---------------------------------------------------------------- BatchNorm statistics


def test_batchnorm_eval_uses_running_statistics_per_branch() -> None:
    torch.manual_seed(0)
    K = 3
    bn = VBatchNorm1d(4, K, 2)
    shift = torch.tensor([0.0, 5.0, -5.0]).view(1, K, 1)
    x = torch.randn(64, K, 4) + shift
    bn.train()(x)
    # one update with momentum 0.1 from (0, 1): running mean = 0.1 * each branch's own batch mean
    torch.testing.assert_close(bn.running_mean, 0.1 * x.mean(0))
    bn.eval()
    a = bn(x[:5])
    b = bn(torch.cat([x[:1], torch.randn(7, K, 4) * 100]))
    torch.testing.assert_close(a[:1], b[:1])  # an example's output does not depend on the batch
    expected = (x[:5] - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(a, expected)
    with pytest.raises(ValueError, match=r"VBatchNorm1d expects \(B, K, F\) with K=3 and C=4, got shape"):
        bn(torch.zeros(2, 4))


# ---------------------------------------------------------------- pass-through, input, concat


def test_perbranch_applies_a_stateless_module_to_each_branch() -> None:
    x = torch.randn(2, 3, 4, 6, 6)
    for module in (nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.ZeroPad2d(1)):
        y = PerBranch(module)(x)
        for i in range(3):
            torch.testing.assert_close(y[:, i], module(x[:, i]))
    torch.testing.assert_close(PerBranch(nn.Flatten())(x), VFlatten()(x))
    torch.testing.assert_close(VGlobalAvgPool2d()(x), PerBranch(nn.AdaptiveAvgPool2d(1))(x).flatten(2))
    drop = PerBranch(nn.Dropout(0.5)).train()
    y = drop(torch.ones(1, 2, 1000))
    assert not torch.equal(y[:, 0], y[:, 1])  # independent masks per branch
    with pytest.raises(ValueError, match=r"stateless modules only; Linear has parameters"):
        PerBranch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"K=2, got shape \(2, 3, 4, 6, 6\)"):
        PerBranch(nn.ReLU(), branches=2)(x)


def test_vinput_accepts_the_three_forms() -> None:
    inp = VInput(3, (2, 4))
    x = torch.randn(5, 2, 4)
    b = inp(x)
    assert b.shape == (5, 3, 2, 4) and b.stride(1) == 0 and b.data_ptr() == x.data_ptr()
    per = torch.randn(5, 3, 2, 4)
    assert inp(per) is per
    parts = [torch.randn(5, 2, 4) for _ in range(3)]
    torch.testing.assert_close(inp(parts), torch.stack(parts, 1))
    torch.testing.assert_close(inp(tuple(parts)), torch.stack(parts, 1))


def test_vinput_errors_name_the_shape_and_what_is_accepted() -> None:
    inp = VInput(2, 4)
    with pytest.raises(ValueError, match=r"per-branch batches of different sizes: \[32, 31\]"):
        inp([torch.zeros(32, 4), torch.zeros(31, 4)])
    with pytest.raises(ValueError, match=r"\(B, 4\) \(one batch for all branches\) or \(B, 2, 4\).*"
                                         r"got shape \(3, 5\)"):
        inp(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"got shape \(3, 3, 4\)"):
        inp(torch.zeros(3, 3, 4))
    with pytest.raises(ValueError, match=r"got a list of 3 items"):
        inp([torch.zeros(2, 4)] * 3)
    with pytest.raises(ValueError, match=r"per-branch shapes \[\(2, 4\), \(2, 5\)\]"):
        inp([torch.zeros(2, 4), torch.zeros(2, 5)])
    with pytest.raises(ValueError, match=r"got ndarray"):
        inp(torch.zeros(2, 4).numpy())
    with pytest.raises(ValueError, match=r"input_shape must be positive ints"):
        VInput(2, (0, 3))


def test_layers_reject_inputs_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"VLinear expects \(B, K, in_features\) with K=2 and C=4, "
                                         r"got shape \(3, 4\)"):
        VLinear(4, 3, 2, 0, 0)(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"VConv2d expects \(B, K, C, H, W\) with K=2 and C=4, "
                                         r"got shape \(3, 3, 4, 5, 5\)"):
        VConv2d(4, 3, 3, 2, 0, 0)(torch.zeros(3, 3, 4, 5, 5))


def test_vcat_keeps_shared_pieces_first() -> None:
    a = torch.arange(5.0).view(1, 1, 5, 1, 1).expand(2, 3, 5, 2, 2)  # shared 0, 1 | unique 2, 3, 4
    b = torch.arange(10.0, 13.0).view(1, 1, 3, 1, 1).expand(2, 3, 3, 2, 2)  # shared 10 | unique 11, 12
    out = vcat([a, b], [2, 1])
    assert out[0, 0, :, 0, 0].tolist() == [0, 1, 10, 2, 3, 4, 11, 12]
    with pytest.raises(ValueError, match=r"shared count 4 is outside \[0, 3\]"):
        vcat([a, b], [2, 4])
