"""Tests for branchnet.analysis partitions, activations and the end-to-end specialization report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from branchnet.analysis import (
    AnalysisError,
    Partition,
    SpecializationResult,
    infer_partition,
    specialization,
    unit_activations,
)
from branchnet.data import Split

# --------------------------------------------------------------------------- partitions


def test_partition_constructors() -> None:
    p = Partition.from_sizes([2, 3])
    assert p.n_units == 5 and p.n_branches == 2 and p.sizes == [2, 3]
    assert p.labels().tolist() == [0, 0, 1, 1, 1]
    r = Partition.from_ranges({"colour": (3, 5), "bw": (0, 3)})
    assert r.names == ["colour", "bw"] and r.labels().tolist() == [1, 1, 1, 0, 0]
    lab = Partition.from_labels(np.array([2, 0, 2, 1]))
    assert lab.names == ["branch 0", "branch 1", "branch 2"] and lab.labels().tolist() == [2, 0, 2, 1]
    rnd = Partition.random([3, 4, 5], seed=7)
    assert rnd.sizes == [3, 4, 5] and sorted(rnd.order().tolist()) == list(range(12))
    assert not np.array_equal(rnd.labels(), Partition.from_sizes([3, 4, 5]).labels())
    assert Partition.random([3, 4, 5], seed=7) == rnd != Partition.random([3, 4, 5], seed=8)
    assert p == Partition.from_ranges({"branch 0": (0, 2), "branch 1": (2, 5)}) and len({p, p}) == 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=30))
def test_partition_label_round_trip(labels: list[int]) -> None:
    p = Partition.from_labels(labels)
    back = np.asarray(p.names)[p.labels()]
    assert back.tolist() == [f"branch {v}" for v in labels]
    assert sum(p.sizes) == len(labels)


def test_partition_validation_names_bad_units() -> None:
    with pytest.raises(AnalysisError, match=r"unit\(s\) 2 of 0..4 are in no branch"):
        Partition(["a", "b"], [[0, 1], [3, 4]])
    with pytest.raises(AnalysisError, match=r"unit\(s\) 1 appear in more than one branch"):
        Partition(["a", "b"], [[0, 1], [1, 2]])
    with pytest.raises(AnalysisError, match="no units"):
        Partition(["a", "b"], [[0, 1], []])
    with pytest.raises(AnalysisError, match="names must be unique"):
        Partition(["a", "a"], [[0], [1]])
    with pytest.raises(AnalysisError, match="positive"):
        Partition.from_sizes([2, 0])
    with pytest.raises(AnalysisError, match="start < stop"):
        Partition.from_ranges({"a": (3, 1)})


class TinyAlex(nn.Module):
    """conv1 (groups=1) feeds conv2 (groups=2): conv1's units are branched, AlexNet-style."""

    def __init__(self, groups: int = 2, n_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 8, 3, padding=1, groups=groups)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(8, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.head(self.flatten(self.pool(x)))


def test_infer_partition_alexnet_like() -> None:
    p = infer_partition(TinyAlex(groups=2), "conv1")
    assert p.sizes == [8, 8] and p.names == ["branch 0", "branch 1"]
    assert p.members[1].tolist() == list(range(8, 16))
    # a grouped conv is branched by its own groups
    assert infer_partition(TinyAlex(groups=2), "conv2").sizes == [4, 4]
    assert infer_partition(TinyAlex(groups=4), "conv1").sizes == [4, 4, 4, 4]


def test_infer_partition_unbranched_errors() -> None:
    with pytest.raises(AnalysisError, match=r"not branched.*partition="):
        infer_partition(TinyAlex(groups=1), "conv1")
    with pytest.raises(AnalysisError, match=r"only nn\.Conv2d and nn\.Linear"):
        infer_partition(TinyAlex(), "relu1")
    with pytest.raises(AnalysisError, match="unknown layer"):
        infer_partition(TinyAlex(), "conv9")
    # the first reader decides: an ungrouped conv reads conv1, so a later grouped one does not count
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(AnalysisError, match="not grouped"):
        infer_partition(net, "0")


def test_unit_activations_pool_and_restore_mode() -> None:
    net = TinyAlex().train()
    x = torch.randn(20, 3, 8, 8)
    a = unit_activations(net, "conv1", x, batch_size=7)
    assert a.shape == (20, 16)
    with torch.no_grad():
        expected = net.conv1(x).mean(dim=(2, 3)).double().numpy()
    np.testing.assert_allclose(a, expected, rtol=1e-5, atol=1e-6)
    r = unit_activations(net, "conv1", Split(x, torch.zeros(20)), max_samples=5, rectify=True)
    assert r.shape == (5, 16) and (r >= 0).all()
    assert net.training and net.conv1.training


# --------------------------------------------------------------------------- end to end


def _colour_data(n: int = 160, n_classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """3x8x8 images; class c adds a colour tint (classes 0-2: R, G, B) or stripes (class 3)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % n_classes
    x = 0.3 * torch.randn(n, 3, 8, 8, generator=g)
    for c in range(min(3, n_classes)):
        x[y == c, c] += 1.0
    if n_classes > 3:
        x[y == 3, :, ::2] += 1.0
    return x, y


def _trained_colour_model() -> TinyAlex:
    """Branch 0 of conv1 holds colour-opponent filters, branch 1 grey ones (set by hand, frozen);
    the rest is trained for a few steps."""
    torch.manual_seed(0)
    net = TinyAlex(groups=2)
    with torch.no_grad():
        w = torch.randn(16, 3, 3, 3)
        w[:8] -= w[:8].mean(dim=1, keepdim=True)  # R + G + B = 0: pure colour contrast
        w[8:] = w[8:, :1].expand(8, 3, 3, 3)  # R = G = B: black and white
        w[:8] += 0.05 * torch.randn(8, 3, 3, 3)
        net.conv1.weight.copy_(w)
    net.conv1.requires_grad_(False)
    x, y = _colour_data()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(15):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


@pytest.fixture(scope="module")
def result() -> SpecializationResult:
    net = _trained_colour_model()
    x, y = _colour_data(n=120, seed=1)
    return specialization(net, "conv1", Split(x, y), n_permutations=500, seed=0, batch_size=64)


def test_specialization_finds_the_colour_branch(result: SpecializationResult) -> None:
    assert result.partition.sizes == [8, 8]
    assert result.tests["colourfulness"].p_value < 0.01
    assert result.summary["p_values"]["colourfulness"] == result.tests["colourfulness"].p_value
    b0, b1 = result.branches
    assert b0["mean_colourfulness"] > 0.9 and b1["mean_colourfulness"] < 0.1
    assert result.enrichment is not None
    assert result.enrichment["branch"] == "branch 0" and result.enrichment["k_in_branch"] == 8
    assert result.enrichment["p_value"] == pytest.approx(1 / 12870)  # 1 / C(16, 8)
    assert set(result.tests) == {"colourfulness", "frequency", "selectivity", "clusters"}
    assert len(result.units) == 16 and {"colourfulness", "frequency", "selectivity"} <= set(result.units[0])
    assert result.cka.shape == (2, 2) and np.allclose(np.diag(result.cka), 1.0)
    assert result.ablation["drop"].shape == (2, 4)
    assert result.activations.shape == (120, 16)


def test_report_is_self_contained(result: SpecializationResult, tmp_path: Path) -> None:
    html_path = result.write_report(tmp_path / "spec")
    assert html_path == tmp_path / "spec" / "report.html"
    html = html_path.read_text()
    assert "data:image/png;base64" in html and "Permutation tests" in html
    data = json.loads((tmp_path / "spec" / "specialization.json").read_text())
    assert data["summary"]["n_units"] == 16 and len(data["units"]) == 16
    assert data["partition"] == {"branch 0": list(range(8)), "branch 1": list(range(8, 16))}
    pngs = {p.stem for p in (tmp_path / "spec" / "figures").glob("*.png")}
    assert {"filters", "correlation", "embedding", "ablation", "null"} <= pngs
    json.dumps(result.to_dict(), allow_nan=False)  # plain JSON, NaN-free


def test_specialization_with_input_layer_and_explicit_partition() -> None:
    torch.manual_seed(1)
    net = TinyAlex(groups=1)
    x, y = _colour_data(n=40)
    with pytest.raises(AnalysisError, match="not branched"):
        specialization(net, "conv1", (x, y), n_permutations=100)
    r = specialization(net, "relu1", (x, y), input_layer="conv1", partition=Partition.random([8, 8], seed=0),
                       n_permutations=100, max_samples=30)
    assert r.summary["n_samples"] == 30 and r.weight_layer == "conv1"
    assert r.svd is not None and r.svd.shape == (16, 2)  # conv2 is unbranched: SVD of |W|
    assert "svd" in r.figures()
    with pytest.raises(AnalysisError, match="pass input_layer="):
        specialization(net, "relu1", (x, y), n_permutations=100)


def test_specialization_sample_and_partition_checks() -> None:
    net = TinyAlex()
    x, y = _colour_data(n=40)
    with pytest.raises(AnalysisError, match="at least 10 samples"):
        specialization(net, "conv1", (x[:8], y[:8]))
    with pytest.raises(AnalysisError, match="at least 2 samples of every class"):
        specialization(net, "conv1", (x[:13], torch.tensor([0, 1, 2] * 4 + [3])))
    with pytest.raises(AnalysisError, match="partition covers 12"):
        specialization(net, "conv1", (x, y), partition=Partition.from_sizes([6, 6]))
    with pytest.raises(AnalysisError, match=">= 2 units"):
        specialization(net, "conv1", (x, y), partition=Partition.from_sizes([1, 15]))
    with pytest.raises(AnalysisError, match="n_permutations must be >= 100"):
        specialization(net, "conv1", (x, y), n_permutations=10)


def test_specialization_on_a_linear_layer_with_data(tmp_path: Path) -> None:
    from branchnet.data import Data

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3))
    split = Split(torch.randn(60, 5), torch.arange(60) % 3)
    r = specialization(net, "0", Data(split, split, split, ["a", "b", "c"]),
                       partition=Partition.from_sizes([4, 4, 4]), n_permutations=100)
    assert set(r.tests) == {"selectivity", "clusters"} and r.enrichment is None and r.filters is None
    assert r.units[0]["preferred_class"] in {"a", "b", "c"} and "colourfulness" not in r.units[0]
    assert set(r.figures()) == {"correlation", "embedding", "ablation", "null", "svd"}
    assert r.write_report(tmp_path).is_file()
