"""Tests for branchnet.metrics: flat, probabilistic and hierarchical metrics, tables, figures."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from branchnet.metrics import (
    accuracy,
    ancestor_set,
    brier,
    confusion_matrix,
    ece,
    format_table,
    hierarchical_prf,
    nll,
    per_class_table,
    plot_confusion,
)

# --------------------------------------------------------------------------- hierarchical

#   root ─┬─ animal ─┬─ fish ─┬─ shark
#         │          │        └─ trout
#         │          └─ bird ─── owl
#         └─ plant ──── flower ─ rose
PARENT = {
    "animal": "root",
    "plant": "root",
    "fish": "animal",
    "bird": "animal",
    "shark": "fish",
    "trout": "fish",
    "owl": "bird",
    "flower": "plant",
    "rose": "flower",
}
#         (true,    predicted)   |a∩b| |a| |b|
CASES = [
    ("shark", "shark"),  # 3 3 3
    ("shark", "trout"),  # 2 3 3
    ("owl", "rose"),  # 0 3 3
    ("owl", "animal"),  # 1 1 3   stopped at an inner node
    ("rose", "root"),  # 0 0 3   abstained
]


def _sets(cases: list[tuple[str, str]]) -> tuple[list[set], list[set]]:
    pred = [ancestor_set(p, PARENT) for _, p in cases]
    true = [ancestor_set(t, PARENT) for t, _ in cases]
    return pred, true


def test_ancestor_set() -> None:
    assert ancestor_set("shark", PARENT) == {"animal", "fish", "shark"}
    assert ancestor_set("plant", PARENT) == {"plant"}
    assert ancestor_set("root", PARENT) == set()
    with pytest.raises(ValueError, match="'whale'"):
        ancestor_set("whale", PARENT)
    with pytest.raises(ValueError, match="cycle"):
        ancestor_set("a", {"a": "b", "b": "a"})


def test_hierarchical_prf_micro_by_hand() -> None:
    pred, true = _sets(CASES)
    m = hierarchical_prf(pred, true, average="micro")
    assert m["hP"] == pytest.approx(6 / 10)  # abstention adds nothing to hP's denominator
    assert m["hR"] == pytest.approx(6 / 15)
    assert m["hF"] == pytest.approx(2 * 0.6 * 0.4 / 1.0)


def test_hierarchical_prf_macro_by_hand() -> None:
    pred, true = _sets(CASES)
    m = hierarchical_prf(pred, true, average="macro")
    assert m["hP"] == pytest.approx((1 + 2 / 3 + 0 + 1) / 4)  # abstained example left out
    assert m["hR"] == pytest.approx((1 + 2 / 3 + 0 + 1 / 3 + 0) / 5)
    assert m["hF"] == pytest.approx((1 + 2 / 3 + 0 + 0.5 + 0) / 5)


def test_hierarchical_prf_micro_differs_from_macro() -> None:
    # micro weights examples by set size, macro weights examples equally
    pred = [{"animal"}, {"animal", "fish", "shark"}]
    true = [{"animal", "fish", "shark"}, {"animal", "fish", "trout"}]
    micro = hierarchical_prf(pred, true)
    macro = hierarchical_prf(pred, true, average="macro")
    assert micro["hP"] == pytest.approx(3 / 4) and macro["hP"] == pytest.approx((1 + 2 / 3) / 2)
    assert micro["hR"] == pytest.approx(3 / 6) == macro["hR"]


def test_hierarchical_prf_perfect_and_all_abstained() -> None:
    pred, true = _sets([("shark", "shark"), ("rose", "rose")])
    for avg in ("micro", "macro"):
        assert hierarchical_prf(pred, true, avg) == {"hP": 1.0, "hR": 1.0, "hF": 1.0}
        assert hierarchical_prf([set(), set()], true, avg) == {"hP": 0.0, "hR": 0.0, "hF": 0.0}


def test_hierarchical_prf_errors() -> None:
    with pytest.raises(ValueError, match="'weighted'"):
        hierarchical_prf([{"a"}], [{"a"}], average="weighted")
    with pytest.raises(ValueError, match="must match"):
        hierarchical_prf([{"a"}], [{"a"}, {"b"}])
    with pytest.raises(ValueError, match="true set is empty"):
        hierarchical_prf([{"a"}], [set()])
    with pytest.raises(ValueError, match="not bare node names"):
        hierarchical_prf(["shark"], [{"shark"}])
    with pytest.raises(ValueError, match="no examples"):
        hierarchical_prf([], [])


# --------------------------------------------------------------------------- flat metrics


def test_accuracy_counts_abstentions_as_wrong() -> None:
    assert accuracy(torch.tensor([0, 1, -1, 2]), torch.tensor([0, 1, 1, 1])) == 0.5
    assert accuracy(np.array([3, 3]), np.array([3, 3])) == 1.0
    with pytest.raises(ValueError, match="must match"):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="integer"):
        accuracy(torch.tensor([0.0]), torch.tensor([0]))


def test_confusion_matrix_ignores_abstained() -> None:
    pred = torch.tensor([0, 1, 2, -1, -1, 2, 0])
    y = torch.tensor([0, 1, 1, 2, 0, 2, 2])
    cm = confusion_matrix(pred, y, 3)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 1]]
    assert int(cm.sum()) == 5  # the two abstentions are not counted anywhere


def test_confusion_matrix_errors() -> None:
    with pytest.raises(ValueError, match=r"pred has values outside \[0, 3\)"):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="y has values outside"):
        confusion_matrix([0, 1], [0, -1], 3)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix([0], [0], 0)


def test_per_class_table_by_hand() -> None:
    pred = [0, 0, 1, -1, 1, 1]
    y = [0, 0, 0, 1, 1, 1]
    scores = [0.99, 0.5, 0.97, 0.2, 0.98, 0.6]
    rows = per_class_table(pred, y, ["crab", "shark", "fish"], scores, threshold=0.96)
    crab, shark, fish = rows
    assert crab == {
        "class": "crab",
        "support": 3,
        "accuracy": pytest.approx(2 / 3),
        "accepted": 2,
        "accuracy_on_accepted": 0.5,
        "mean_confidence": pytest.approx((0.99 + 0.5 + 0.97) / 3),
    }
    assert shark["accuracy"] == pytest.approx(2 / 3) and shark["accepted"] == 1
    assert shark["accuracy_on_accepted"] == 1.0
    assert fish == {
        "class": "fish",
        "support": 0,
        "accuracy": None,
        "accepted": 0,
        "accuracy_on_accepted": None,
        "mean_confidence": None,
    }
    # without scores, "accepted" = not abstained
    plain = per_class_table(pred, y, ["crab", "shark"])
    assert [r["accepted"] for r in plain] == [3, 2] and plain[0]["mean_confidence"] is None
    with pytest.raises(ValueError, match="threshold given without scores"):
        per_class_table(pred, y, ["crab", "shark"], threshold=0.5)


# --------------------------------------------------------------------------- probabilistic


def test_nll_and_brier_by_hand() -> None:
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1.0, 0.0, 0.0]])
    y = torch.tensor([0, 2, 0])
    assert nll(probs, y) == pytest.approx((np.log(2) + np.log(10) + 0) / 3)
    assert brier(probs, y) == pytest.approx(
        ((0.25 + 0.0625 + 0.0625) + (0.01 + 0.64 + 0.81) + 0.0) / 3
    )
    assert np.isfinite(nll(probs, torch.tensor([1, 0, 1])))  # p = 0 is clamped


def test_probability_validation() -> None:
    with pytest.raises(ValueError, match="softmax"):
        nll(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        brier(torch.tensor([[0.5, 0.5]]), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        ece(torch.tensor([0.5, 0.5]), torch.tensor([0]))


def _ece_reference(probs: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    right = pred == y
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):  # bins [lo, hi) as torchmetrics' bucketize
        inside = (conf >= lo) & ((conf < hi) | (hi == 1.0))
        if inside.any():
            total += inside.mean() * abs(right[inside].mean() - conf[inside].mean())
    return total


def _synthetic(n: int, shift: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes; top confidence q ~ U(0.4, 1); right with probability q - shift."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.4, 1.0, n)
    pred = rng.integers(0, 3, n)
    probs = np.repeat(((1 - q) / 2)[:, None], 3, axis=1)
    probs[np.arange(n), pred] = q
    right = rng.random(n) < q - shift
    y = np.where(right, pred, (pred + rng.integers(1, 3, n)) % 3)
    return torch.tensor(probs), torch.tensor(y)


def test_ece_calibrated_is_small_and_overconfident_is_not() -> None:
    probs, y = _synthetic(30_000, shift=0.0)
    assert ece(probs, y) < 0.015
    probs, y = _synthetic(30_000, shift=0.2)
    assert ece(probs, y) == pytest.approx(0.2, abs=0.02)


def test_ece_matches_reference_binning() -> None:
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(4) * 0.5, size=2000)
    y = rng.integers(0, 4, 2000)
    for n_bins in (5, 15):
        expected = _ece_reference(probs, y, n_bins)
        assert ece(torch.tensor(probs), torch.tensor(y), n_bins) == pytest.approx(
            expected, abs=1e-5
        )


# --------------------------------------------------------------------------- presentation


def test_format_table_alignment() -> None:
    rows = [
        {"class": "crab", "support": 100, "acc": 0.8},
        {"class": "aquarium_fish", "support": 7, "acc": None},
    ]
    assert format_table(rows).splitlines() == [
        "class          support     acc",
        "-------------  -------  ------",
        "crab               100  0.8000",
        "aquarium_fish        7       -",
    ]
    out = format_table(rows, columns=["acc", "missing"], floatfmt=".1%")
    assert out.splitlines()[2].split() == ["80.0%", "-"]
    assert format_table([]) == ""
    assert format_table([], columns=["a"]) == "a\n-"


def test_plot_confusion() -> None:
    cm = confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2], 3)
    fig = plot_confusion(cm, ["crab", "fish", "shark"], normalize=True, title="fish branch")
    assert isinstance(fig, Figure)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 9 and texts[0] == "1.00" and texts[-1] == "0.50"
    with pytest.raises(ValueError, match="len\\(classes\\) = 2"):
        plot_confusion(cm, ["a", "b"])
