"""Branch-specialization analysis of virtual-branch models (branchnet.virtual): partitions,
shared/unique unit labels, activations, ablation of a branch, the end-to-end report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from torch import nn

from branchnet.analysis import (
    AnalysisError,
    Partition,
    ablation,
    infer_partition,
    specialization,
    unit_activations,
)
from branchnet.analysis.partitions import (
    VirtualLayout,
    ensemble_logits,
    units_view,
    virtual_branches,
    virtual_layout,
    virtual_unit_kinds,
)
from branchnet.virtual.layers import VConv2d, VFlatten, VInput, VLinear
from branchnet.virtual.merge import merge_probs
from branchnet.virtual.models import vcnn, vdensenet_bc, vmlp, vresnet

K = 2


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    """sklearn's 8x8 digits: grey (1, 8, 8), a 3-channel tinted copy, flat (64,); 400 train, 200 test."""
    d = load_digits()
    x = torch.tensor(d.images[:600], dtype=torch.float32)[:, None] / 16
    rgb = torch.cat([x, 0.5 * x, 1 - x], dim=1)
    return {"rgb": rgb, "flat": x.flatten(1), "y": torch.tensor(d.target[:600])}


def _train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    """Full-batch Adam on the sum of the branches' cross-entropies (as vbranch trains)."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    net.train()
    for _ in range(steps):
        out = net(x)
        loss = sum(F.cross_entropy(out[:, k], y) for k in range(out.shape[1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def cnn(digits: dict[str, torch.Tensor]) -> nn.Module:
    torch.manual_seed(0)
    net = vcnn((4, 8), 10, branches=K, shared_frac=0.5, input_shape=(3, 8, 8))
    return _train(net, digits["rgb"][:400], digits["y"][:400], steps=40)


@pytest.fixture(scope="module")
def mlp(digits: dict[str, torch.Tensor]) -> nn.Module:
    torch.manual_seed(0)
    net = vmlp([64, 16], 10, branches=K, shared_frac=0.25)
    return _train(net, digits["flat"][:400], digits["y"][:400], steps=40)


def _expected(k: int, c: int, s: int) -> tuple[list[list[int]], list[str]]:
    members = [list(range(b * c, (b + 1) * c)) for b in range(k)]
    return members, (["shared"] * s + ["unique"] * (c - s)) * k


# --------------------------------------------------------------------------- partitions


@pytest.mark.parametrize(
    ("layer", "c", "s"),
    [
        ("input", 3, 3),  # the raw input: the same in every branch
        ("features.0.0.conv", 4, 2),  # VConv2d, read off its attributes
        ("features.0.0.bn", 4, 2),  # VBatchNorm2d
        ("features.0.0", 4, 2),  # a VConvBN block: probed
        ("features.0.0.act", 4, 2),  # the ReLU inside it: the split comes from the BN before it
        ("features.0", 4, 2),  # a stage ending in a per-branch pool
        ("features.1.1", 8, 4),
        ("pool", 8, 4),  # VGlobalAvgPool2d
        ("hidden", 8, 4),  # VDense
        ("head", 10, 0),  # unshared head: every unit unique
    ],
)
def test_infer_partition_vcnn(cnn: nn.Module, layer: str, c: int, s: int) -> None:
    p = infer_partition(cnn, layer)
    members, kinds = _expected(K, c, s)
    assert p.names == ["branch 0", "branch 1"]
    assert [m.tolist() for m in p.members] == members
    assert p.kinds == tuple(kinds)
    assert virtual_unit_kinds(cnn, layer) == kinds
    assert virtual_layout(cnn, layer) == VirtualLayout(K, c, s)


def test_infer_partition_other_virtual_models() -> None:
    res = vresnet(8, num_classes=3, branches=3, shared_frac=0.5, width=4, input_shape=(3, 8, 8))
    assert virtual_layout(res, "stages.0.0") == VirtualLayout(3, 4, 2)
    assert virtual_layout(res, "stages.0.0.act") == VirtualLayout(3, 4, 2)  # after the residual add
    assert virtual_layout(res, "stages.2") == VirtualLayout(3, 16, 8)
    assert infer_partition(res, "stem.conv").sizes == [4, 4, 4]
    dense = vdensenet_bc(10, 4, num_classes=3, branches=2, shared_frac=0.5, input_shape=(3, 8, 8))
    layer = dense.features[0]  # a dense layer: vcat of its input (8, 4 shared) and 4 new (2 shared)
    assert virtual_layout(dense, "features.0") == VirtualLayout(2, layer.out_channels, layer.shared_out)
    assert (layer.out_channels, layer.shared_out) == (12, 6)
    mlp = vmlp([6, 5], 2, branches=2, shared_frac=[0.4, 0.0])
    assert virtual_layout(mlp, "flatten") == VirtualLayout(2, 6, 6)
    assert virtual_layout(mlp, "hidden.0.act") == VirtualLayout(2, 5, 2)


def test_flattened_conv_maps_keep_the_shared_features_first() -> None:
    net = nn.Sequential(VInput(2, (3, 4, 4)), VConv2d(3, 4, 3, 2, 3, 1, padding=1), VFlatten(),
                        VLinear(64, 5, 2, 16, 0))
    # VFlatten of (C=4, 4, 4) with 1 shared channel: 16 shared features, then 48 unique
    assert virtual_layout(net, "2") == VirtualLayout(2, 64, 16)
    assert virtual_unit_kinds(net, "2")[:17] == ["shared"] * 16 + ["unique"]


@settings(max_examples=30, deadline=None)
@given(k=st.integers(2, 4), out=st.integers(1, 6), data=st.data())
def test_vlinear_partition_and_units_view(k: int, out: int, data: st.DataObject) -> None:
    s = data.draw(st.integers(0, out))
    net = nn.Sequential(VInput(k, (3,)), VLinear(3, out, k, 3, s))
    p = infer_partition(net, "1")
    assert p.labels().tolist() == np.repeat(np.arange(k), out).tolist()
    assert p.kinds == tuple((["shared"] * s + ["unique"] * (out - s)) * k)
    x = torch.randn(10, 3)
    with torch.no_grad():
        direct = net(x)  # (10, k, out)
    acts = unit_activations(net, "1", x, rectify=False)
    assert acts.shape == (10, k * out)
    for u in range(k * out):  # unit u is channel u % out of branch u // out
        np.testing.assert_allclose(acts[:, u], direct[:, u // out, u % out].double().numpy(), rtol=1e-5,
                                   atol=1e-6)
    assert units_view(direct, k).shape == (10, k * out) and units_view(direct, None) is direct


def test_unbranched_and_non_virtual_layers_are_refused() -> None:
    one = vmlp([4, 3], 2, branches=1)
    with pytest.raises(AnalysisError, match="1 branch: it is not branched"):
        infer_partition(one, "hidden.0")
    plain = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    assert virtual_branches(plain) is None and virtual_layout(plain, "0") is None
    with pytest.raises(AnalysisError, match="not a virtual-branch layer"):
        virtual_unit_kinds(plain, "0")
    with pytest.raises(AnalysisError, match="not branched"):
        infer_partition(plain, "0")


def test_partition_kinds_are_checked_and_do_not_change_equality() -> None:
    p = Partition.from_sizes([2, 2])
    q = p.with_kinds(["shared", "unique", "shared", "unique"])
    assert q == p and hash(q) == hash(p) and q.kinds == ("shared", "unique", "shared", "unique")
    assert p.kinds is None and q.with_kinds(None).kinds is None
    with pytest.raises(AnalysisError, match=r"one label per unit \(4\), got 3"):
        p.with_kinds(["shared"] * 3)
    with pytest.raises(AnalysisError, match="one label per unit"):
        p.with_kinds("shared")


# --------------------------------------------------------------------------- activations


def test_unit_activations_flatten_branches(cnn: nn.Module, digits: dict[str, torch.Tensor]) -> None:
    x = digits["rgb"][400:430]
    acts = unit_activations(cnn, "features.0.0", x, batch_size=7)
    assert acts.shape == (30, K * 4)
    with torch.no_grad():
        maps = cnn.features[0][0](cnn.input(x))  # (30, K, 4, 8, 8)
    np.testing.assert_allclose(acts, maps.flatten(1, 2).mean(dim=(2, 3)).double().numpy(), rtol=1e-5,
                               atol=1e-6)


def test_ensemble_logits() -> None:
    out = torch.randn(5, 3, 4)
    merged = ensemble_logits(out, 3)
    assert torch.equal(merged.argmax(1), merge_probs(out, "before_mean").argmax(1))
    assert ensemble_logits(out, 2) is out and ensemble_logits(out, None) is out


# --------------------------------------------------------------------------- ablation


def _per_class(pred: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return np.array([(pred[y == c] == c).float().mean().item() for c in range(10)])


def test_ablation_of_a_branch(cnn: nn.Module, digits: dict[str, torch.Tensor]) -> None:
    x, y = digits["rgb"][400:], digits["y"][400:]
    with torch.no_grad():
        out = cnn(x)
    ensemble = merge_probs(out, "before_mean").argmax(1)
    # at the head, zeroing branch 0's logits leaves branch 1's: the ensemble predicts as branch 1
    head = ablation(cnn, "head", infer_partition(cnn, "head"), x, y, n_classes=10)
    np.testing.assert_allclose(head["baseline"], _per_class(ensemble, y))
    np.testing.assert_allclose(head["ablated"][0], _per_class(out[:, 1].argmax(1), y))
    np.testing.assert_allclose(head["ablated"][1], _per_class(out[:, 0].argmax(1), y))
    # an early layer: the trained ensemble needs both branches
    early = ablation(cnn, "features.0.0", infer_partition(cnn, "features.0.0"), x, y, n_classes=10)
    np.testing.assert_allclose(early["baseline"], _per_class(ensemble, y))
    assert early["baseline_overall"] > 0.5
    assert (early["ablated_overall"] < early["baseline_overall"]).all()
    assert np.abs(early["drop"]).max() > 0
    with torch.no_grad():  # ablating nothing: hooks are gone, the model predicts as before
        assert torch.equal(cnn(x), out)
    with pytest.raises(AnalysisError, match="partition has 4 units"):
        ablation(cnn, "features.0.0", Partition.from_sizes([2, 2]), x, y, n_classes=10)


# --------------------------------------------------------------------------- end to end


def test_specialization_vcnn_first_layer(cnn: nn.Module, digits: dict[str, torch.Tensor],
                                         tmp_path: Path) -> None:
    x, y = digits["rgb"][400:], digits["y"][400:]
    r = specialization(cnn, "features.0.0", (x, y), input_layer="features.0.0.conv", n_permutations=200)
    assert r.partition.sizes == [4, 4] and r.activations.shape == (200, 8)
    assert sorted(r.tests) == ["clusters", "colourfulness", "frequency", "selectivity"]
    full = cnn.features[0][0].conv.full_weight().detach()  # (K, 4, 3, 3, 3)
    np.testing.assert_allclose(r.filters, full.reshape(8, 3, 3, 3).double().numpy())
    assert [u["kind"] for u in r.units] == ["shared", "shared", "unique", "unique"] * 2
    # shared filters of a first layer are one tied weight: the same in both branches
    np.testing.assert_allclose(r.filters[:2], r.filters[4:6])
    assert [b["shared_units"] for b in r.branches] == [2, 2]
    assert r.summary["virtual"] is True and r.summary["unit_kinds"] == {"shared": 4, "unique": 4}
    with torch.no_grad():
        acc = (cnn(x).mean(1).argmax(1) == y).float().mean().item()
    assert r.summary["baseline_accuracy"] == pytest.approx(acc)
    html = r.write_report(tmp_path)
    assert html.is_file() and (tmp_path / "figures" / "filters.png").is_file()
    d = json.loads((tmp_path / "specialization.json").read_text())
    assert d["partition"] == {"branch 0": [0, 1, 2, 3], "branch 1": [4, 5, 6, 7]}
    assert "Virtual-branch model" in html.read_text()


def test_specialization_vmlp(mlp: nn.Module, digits: dict[str, torch.Tensor], tmp_path: Path) -> None:
    x, y = digits["flat"][400:], digits["y"][400:]
    r = specialization(mlp, "hidden.0", (x, y), n_permutations=100, max_samples=120)
    assert r.partition.sizes == [16, 16] and r.activations.shape == (120, 32)
    assert sorted(r.tests) == ["clusters", "selectivity"] and r.filters is None
    assert [u["kind"] for u in r.units[:5]] == ["shared"] * 4 + ["unique"]
    assert set(r.summary["accuracy_change_when_zeroed"]) == {"branch 0", "branch 1"}
    assert r.cka.shape == (2, 2)
    r.write_report(tmp_path)
    d = json.loads((tmp_path / "specialization.json").read_text())
    assert d["summary"]["n_units"] == 32
    assert (d["units"][17]["kind"], d["units"][20]["kind"]) == ("shared", "unique")  # branch 1, c = 1, 4
