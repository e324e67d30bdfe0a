"""Virtual-branch models (branchnet.virtual.models): shapes, gradients, parameter counts against
plain networks and published counts, spec round trips, per-depth fractions and bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from branchnet.virtual.layers import VLinear
from branchnet.virtual.models import (
    VDenseLayer,
    build_vmodel,
    count_parameters,
    expected_linear_params,
    plain_width,
    vcnn,
    vdensenet_bc,
    vmlp,
    vresnet,
    vresnet18,
)

pytestmark = pytest.mark.usefixtures("one_thread")


C = 3  # classes
TINY: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "vmlp": (lambda K, s: vmlp([12, 8, 6], C, K, s, input_shape=(3, 2, 2), dropout=0.1), (3, 2, 2)),
    "vcnn": (lambda K, s: vcnn((4, 6), C, K, s, input_shape=(2, 8, 8)), (2, 8, 8)),
    "vcnn_stem": (lambda K, s: vcnn((4,), C, K, s, input_shape=(1, 12, 12), stem=4, convs_per_stage=1),
                  (1, 12, 12)),
    "vresnet": (lambda K, s: vresnet(8, C, K, s, width=4, input_shape=(3, 8, 8)), (3, 8, 8)),
    "vresnet18": (lambda K, s: vresnet18(C, K, s, width=2, input_shape=(3, 8, 8)), (3, 8, 8)),
    "vdensenet_bc": (lambda K, s: vdensenet_bc(10, 4, C, K, s, input_shape=(3, 8, 8)), (3, 8, 8)),
}
# the last layer of every model but the MLP is a per-branch (unshared) Dense
UNSHARED_HEAD = {"vcnn": "head", "vcnn_stem": "head", "vresnet": "fc", "vresnet18": "fc",
                 "vdensenet_bc": "fc"}


def _model(kind: str, K: int, s: Any, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TINY[kind][0](K, s)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_forward_shapes_for_every_input_form_and_backward(kind: str) -> None:
    K, shape = 3, TINY[kind][1]
    net = _model(kind, K, 0.5)
    x = torch.randn(4, *shape)
    per = torch.randn(4, K, *shape)
    assert net(x).shape == (4, K, C)
    assert net(list(per.unbind(1))).shape == (4, K, C)
    y = net(per)
    assert y.shape == (4, K, C)
    F.cross_entropy(y.flatten(0, 1), torch.arange(4 * K) % C, reduction="sum").backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if p.numel():
            assert p.grad.abs().sum() > 0, name
    assert net.branches == K and net.spec["branches"] == K and net.spec["kind"] == kind.removesuffix("_stem")


@pytest.mark.parametrize("kind", sorted(TINY))
def test_broadcast_input_equals_the_materialised_batch(kind: str) -> None:
    """The fast path for one batch shared by all branches computes what per-branch batches would."""
    net = _model(kind, 2, 0.5)
    for m in net.modules():  # dropout draws differ between two calls; compare without it
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    x = torch.randn(4, *TINY[kind][1])
    for mode in (False, True):
        net.train(mode)
        materialised = x.unsqueeze(1).expand(4, 2, *x.shape[1:]).contiguous()
        torch.testing.assert_close(net(x), net(materialised), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_spec_round_trip_through_json_rebuilds_the_same_model(kind: str) -> None:
    net = _model(kind, 2, 0.25).eval()
    spec = json.loads(json.dumps(net.spec))
    again = build_vmodel(spec)
    assert again.spec == net.spec
    again.load_state_dict(net.state_dict())  # strict: same names and shapes
    again.eval()
    x = torch.randn(3, *TINY[kind][1])
    torch.testing.assert_close(again(x), net(x))
    assert count_parameters(again) == count_parameters(net)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_sharing_sets_the_parameter_count(kind: str) -> None:
    """s = 0: K independent networks; s = 1: one network (plus K per-branch heads where unshared)."""
    one = count_parameters(_model(kind, 1, 0.0))
    assert count_parameters(_model(kind, 1, 1.0)) == one  # K = 1: shared_frac is irrelevant
    for K in (2, 3):
        assert count_parameters(_model(kind, K, 0.0)) == K * one
        full = _model(kind, K, 1.0)
        head = UNSHARED_HEAD.get(kind)
        extra = (K - 1) * count_parameters(getattr(full, head)) // K if head else 0
        assert count_parameters(full) == one + extra
        assert one < count_parameters(_model(kind, K, 0.5)) < K * one


def test_plain_counts_match_plain_networks_and_published_numbers() -> None:
    plain_mlp = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Linear(8, 6), nn.BatchNorm1d(6),
                              nn.Linear(6, C))
    assert count_parameters(_model("vmlp", 1, 0.5)) == count_parameters(plain_mlp)
    # vbranch's MNIST CNN [16, 32] (16-16-32-32): 18,010 parameters (REFERENCE 2.4)
    assert count_parameters(vcnn((16, 32), 10, 1, input_shape=(1, 28, 28))) == 18_010
    # CIFAR ResNet-20 (0.27M with option-A shortcuts: 269,722) + option-B 1x1 conv + BN shortcuts
    assert count_parameters(vresnet(20, 10, 1)) == 269_722 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert count_parameters(vresnet18(10, 1)) == 11_173_962  # CIFAR ResNet-18
    assert count_parameters(vdensenet_bc(100, 12, 10, 1)) == 769_162  # DenseNet-BC-100-12 ("0.8M")


def test_fcn_weights_match_the_reference_example() -> None:
    """REFERENCE 2.2: FCN 784-512-10, K 4, s 0.5: 1,020,160 weights vs 1.63M (4 models), 0.41M (one)."""
    def weights(m: nn.Module) -> int:
        return sum(p.numel() for n, p in m.named_parameters() if "weight" in n)

    assert weights(vmlp([784, 512], 10, 4, 0.5, input_shape=(1, 28, 28))) == 1_020_160 == (
        expected_linear_params(784, 512, 4, 0.5, first=True) + expected_linear_params(512, 10, 4, 0.5))
    assert weights(vmlp([784, 512], 10, 4, 0.0)) == 4 * weights(vmlp([784, 512], 10, 1)) == 4 * 406_528


def test_per_depth_fractions() -> None:
    net = vmlp([12, 8, 6], C, 2, [0.5, 0.25, 1.0])
    hidden = [layer.linear for layer in net.hidden]
    assert [hidden[0].shared_out, hidden[1].shared_out, net.head.shared_out] == [4, 1, 3]
    assert net.hidden[1].linear.shared_in == 4 and net.hidden[0].linear.shared_in == 12
    assert net.shared_fracs == [0.5, 0.25, 1.0] and net.spec["shared_frac"] == [0.5, 0.25, 1.0]
    res = vresnet(8, C, 2, [1.0, 0.5, 0.0], width=4)
    assert [stage[0].shared_out for stage in res.stages] == [4, 4, 0]
    assert res.stem.shared_out == 4 and res.fc.shared_out == 0 and res.fc.shared_in == 0
    cnn = vcnn((4, 6), C, 2, [0.0, 0.5, 1.0, 1.0, 0.5], input_shape=(1, 8, 8))
    convs = [m.conv for stage in cnn.features for m in stage if hasattr(m, "conv")]
    assert [c.shared_out for c in convs] == [0, 2, 6, 6] and cnn.hidden.shared_out == 3


def test_densenet_concatenation_tracks_the_shared_channels() -> None:
    net = _model("vdensenet_bc", 2, [0.5, 0.25, 1.0])
    layers = [m for m in net.modules() if isinstance(m, VDenseLayer)]
    for layer in layers:
        assert layer.shared_out == layer.shared_in + layer.conv2.shared_out
        assert layer.bn1.shared == layer.shared_in
    assert net.bn.shared == net.fc.shared_in == layers[-1].shared_out
    # fully shared: every branch computes the same thing on a broadcast batch (before the unshared fc)
    full = _model("vdensenet_bc", 3, 1.0).eval()
    feats = full.pool(full.act(full.bn(full.features(full.conv0(full.input(torch.randn(2, 3, 8, 8)))))))
    torch.testing.assert_close(feats[:, 1], feats[:, 0])
    torch.testing.assert_close(feats[:, 2], feats[:, 0])


def test_fully_shared_mlp_gives_identical_branches_and_unshared_ones_differ() -> None:
    x = torch.randn(6, 3, 2, 2)
    for mode in (True, False):
        same = _model("vmlp", 3, 1.0).train(mode)
        for m in same.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        y = same(x)
        torch.testing.assert_close(y[:, 1], y[:, 0])
        y = _model("vmlp", 3, 0.0).train(mode)(x)
        assert not torch.allclose(y[:, 1], y[:, 0])


def test_a_few_training_steps_fit_every_branch() -> None:
    torch.manual_seed(0)
    K = 2
    x = torch.randn(64, 4)
    y = (x[:, 0] + x[:, 1] > 0).long()
    net = vmlp([4, 16], 2, K, 0.5)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)

    def loss() -> torch.Tensor:  # sum of the per-branch mean losses
        out = net(x)
        return sum(F.cross_entropy(out[:, k], y) for k in range(K))

    start = loss().item()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.3 * start
    net.eval()
    assert ((net(x).argmax(-1) == y[:, None]).float().mean(0) > 0.9).all()


def test_plain_width_matches_flops() -> None:
    assert plain_width(16, 1) == 16 and plain_width(16, 4) == 32 and plain_width(16, 2) == 23
    assert vresnet(8, C, 1, width=plain_width(4, 4), input_shape=(3, 8, 8)).spec["width"] == 8
    with pytest.raises(ValueError, match=r"width must be an int >= 1, got 0"):
        plain_width(0, 2)


@pytest.mark.parametrize(("build", "match"), [
    (lambda: vmlp([12, 8], C, 2, 1.5), r"fractions in \[0, 1\], got 1\.5"),
    (lambda: vmlp([12, 8], C, 2, -0.5), r"got -0\.5"),
    (lambda: vmlp([12, 8], C, 2, True), r"got True"),
    (lambda: vmlp([12, 8], C, 0, 0.5), r"branches must be an int >= 1, got 0"),
    (lambda: vmlp([12, 8], C, 2, [0.5]), r"shared_frac has 1 values but vmlp needs 2 \(one per Dense"),
    (lambda: vmlp([12, 8], C, 2, 0.5, input_shape=(3, 5)), r"input_shape \(3, 5\) must be positive ints "
                                                           r"whose product is sizes\[0\] = 12"),
    (lambda: vmlp([], C, 2), r"non-empty list"),
    (lambda: vmlp([12, 0], C, 2), r"every vmlp size must be an int >= 1, got 0"),
    (lambda: vcnn((4, 6), C, 2, [0.5] * 4, input_shape=(2, 8, 8)), r"has 4 values but vcnn needs 5"),
    (lambda: vcnn((4, 0), C, 2, input_shape=(2, 8, 8)), r"every vcnn width must be an int >= 1, got 0"),
    (lambda: vcnn((4, 6, 8, 8), C, 2, input_shape=(2, 4, 4)), r"input_shape needs height and width >= 8, "
                                                              r"got 4x4"),
    (lambda: vcnn((4,), C, 2, input_shape=(8, 8)), r"input_shape \(channels, height, width\)"),
    (lambda: vresnet(21, C, 2), r"depth must be 6n\+2 .* got 21"),
    (lambda: vresnet(8, C, 2, width=0), r"width must be an int >= 1, got 0"),
    (lambda: vresnet(8, C, 2, [0.5, 0.5]), r"has 2 values but vresnet needs 3 \(one per stage\)"),
    (lambda: vresnet18(C, 2, [0.5] * 3), r"has 3 values but vresnet18 needs 4"),
    (lambda: vdensenet_bc(11, 4, C, 2), r"depth must be 6n\+4 .* got 11"),
    (lambda: vdensenet_bc(10, 0, C, 2), r"growth must be an int >= 1, got 0"),
    (lambda: vdensenet_bc(10, 4, C, 2, compression=0.0), r"compression must be in \(0, 1\], got 0\.0"),
    (lambda: vdensenet_bc(10, 1, C, 2, compression=0.1), r"leaves no channels"),
    (lambda: build_vmodel({"kind": "vgg"}), r"unknown virtual model kind 'vgg'"),
    (lambda: build_vmodel({"kind": "vmlp", "sizes": [4], "num_classes": 2, "colour": 1}), r"invalid spec"),
])
def test_bad_arguments_raise_clear_errors(build: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("kind", sorted(TINY))
def test_wrong_input_shapes_are_rejected(kind: str) -> None:
    net = _model(kind, 2, 0.5)
    shape = TINY[kind][1]
    with pytest.raises(ValueError, match=r"VInput expects .* got shape \(4, 9\)"):
        net(torch.zeros(4, 9))
    with pytest.raises(ValueError, match=r"got shape \(4, 3, " + ", ".join(map(str, shape))):
        net(torch.zeros(4, 3, *shape))  # three per-branch batches for two branches
    with pytest.raises(ValueError, match=r"per-branch batches of different sizes: \[4, 3\]"):
        net([torch.zeros(4, *shape), torch.zeros(3, *shape)])


def test_unshared_heads_are_per_branch() -> None:
    net = _model("vresnet", 3, 1.0)
    assert isinstance(net.fc, VLinear) and net.fc.shared_out == 0 and net.fc.weight_su.shape[0] == 3
    assert net.stages[-1][-1].shared_out == net.fc.shared_in == 16
