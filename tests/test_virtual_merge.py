"""Tests for branchnet.virtual.merge (merges, per-branch loss, score) and
branchnet.virtual.uncertainty (torch-uncertainty layout), with a tiny end-to-end fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from branchnet.data.batches import TensorPairs
from branchnet.engine import TrainConfig, fit
from branchnet.virtual.bagging import BaggedPairs, BranchBags
from branchnet.virtual.merge import (
    MERGES,
    EnsembleLoss,
    branch_probs,
    check_merge,
    ensemble_score,
    merge,
    merge_embeddings,
    merge_probs,
    per_branch_loss,
)
from branchnet.virtual.uncertainty import (
    TorchUncertaintyAdapter,
    from_estimator_major,
    repeat_target,
    to_estimator_major,
)


def _logits(B=4, K=3, C=5, seed=0, scale=3.0):
    return torch.randn(B, K, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# --------------------------------------------------------------------------- merges


def test_before_and_after_mean():
    out = _logits()
    before, after = merge_probs(out, "before_mean"), merge_probs(out, "after_mean")
    assert before.shape == after.shape == (4, 5)
    manual_before = torch.stack([F.softmax(sum(out[b, k] for k in range(3)) / 3, -1) for b in range(4)])
    manual_after = torch.stack([sum(F.softmax(out[b, k], -1) for k in range(3)) / 3 for b in range(4)])
    torch.testing.assert_close(before, manual_before)
    torch.testing.assert_close(after, manual_after)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(branch_probs(out), out.softmax(-1))
    assert merge_probs(out).equal(before)  # before_mean is the default


def test_one_branch_merges_agree():
    out = _logits(K=1)
    torch.testing.assert_close(merge_probs(out, "before_mean"), merge_probs(out, "after_mean"))


def test_merge_names_and_heads_are_checked():
    assert MERGES == ("before_mean", "after_mean", "concat")
    with pytest.raises(ValueError, match=r"unknown merge 'median'; allowed: \['before_mean', 'after_mean', "
                                         r"'concat'\]"):
        merge_probs(_logits(), "median")
    with pytest.raises(ValueError, match=r"merge 'concat' does not match a classifier head; use one of "
                                         r"\['before_mean', 'after_mean'\]"):
        merge_probs(_logits(), "concat")
    with pytest.raises(ValueError, match=r"merge 'after_mean' does not match an embedding head; use one "
                                         r"of \['concat'\]"):
        merge(_logits(), "after_mean", head="embedding")
    with pytest.raises(ValueError, match=r"head must be one of \['classifier', 'embedding'\], got 'tree'"):
        check_merge("concat", "tree")
    with pytest.raises(ValueError, match=r"shape \(B, K, C\), got \(4, 5\)"):
        merge_probs(torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"emb must be per-branch outputs"):
        merge_embeddings(torch.zeros(4, 5))


def test_merge_embeddings_concatenates_branch_major():
    emb = _logits(B=2, K=3, C=4)
    cat = merge_embeddings(emb)
    assert cat.shape == (2, 12)
    for k in range(3):
        assert torch.equal(cat[:, 4 * k:4 * (k + 1)], emb[:, k])
    unit = merge_embeddings(emb, normalize=True).view(2, 3, 4)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(2, 3, dtype=torch.float64))
    assert torch.equal(merge(emb, "concat", head="embedding"), cat)
    assert torch.equal(merge(emb, "after_mean"), merge_probs(emb, "after_mean"))


# --------------------------------------------------------------------------- loss and score


def test_per_branch_loss_sums_each_branch_mean_ce():
    out = _logits(B=6, K=3, C=4)
    y = torch.randint(0, 4, (6, 3), generator=torch.Generator().manual_seed(1))
    expected = sum(F.cross_entropy(out[:, k], y[:, k]) for k in range(3))
    torch.testing.assert_close(per_branch_loss(out, y), expected)
    y1 = y[:, 0]
    torch.testing.assert_close(per_branch_loss(out, y1), per_branch_loss(out, y1[:, None].expand(6, 3)))
    torch.testing.assert_close(EnsembleLoss("mean")(out, y), expected / 3)
    torch.testing.assert_close(EnsembleLoss()(out, y), expected)


def test_each_branch_gets_only_its_own_gradient():
    out = _logits(B=5, K=2, C=3).requires_grad_()
    y = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 0], [1, 1]])
    per_branch_loss(out, y).backward()
    for k in range(2):
        own = out.detach()[:, k].clone().requires_grad_()
        F.cross_entropy(own, y[:, k]).backward()
        torch.testing.assert_close(out.grad[:, k], own.grad)


def test_loss_and_score_check_target_shapes():
    out = _logits(B=4, K=3)
    with pytest.raises(ValueError, match=r"targets must have shape \(4,\) or \(4, 3\) for outputs of shape "
                                         r"\(4, 3, 5\), got \(4, 2\)"):
        per_branch_loss(out, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got \(3,\)"):
        ensemble_score(out, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean', got 'max'"):
        EnsembleLoss("max")


def test_ensemble_score():
    # branch 0 votes class 0 strongly, branches 1 and 2 vote class 1 weakly:
    # majority says 1, the before-mean ensemble says 0
    out = torch.tensor([[[6.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    assert ensemble_score(out, torch.tensor([0])) == (1, 1)
    assert ensemble_score(out, torch.tensor([1])) == (0, 1)
    correct, count = ensemble_score(out, torch.tensor([[0, 1, 0]]))
    assert (int(correct), count) == (2, 3)


# --------------------------------------------------------------------------- torch-uncertainty layout


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 6), K=st.integers(1, 5), C=st.integers(1, 4), seed=st.integers(0, 1000))
def test_estimator_major_round_trip(B, K, C, seed):
    out = _logits(B, K, C, seed)
    flat = to_estimator_major(out)
    assert flat.shape == (K * B, C)
    for k in range(K):
        for b in range(B):
            assert torch.equal(flat[k * B + b], out[b, k])
    assert torch.equal(from_estimator_major(flat, K), out)
    y = torch.arange(B)
    # repeated targets line up with the estimator-major rows
    assert torch.equal(repeat_target(y, K), to_estimator_major(y[:, None].expand(B, K)))


def test_estimator_major_errors_and_extra_dims():
    with pytest.raises(ValueError, match="out has 10 rows, not a multiple of num_estimators=3"):
        from_estimator_major(torch.zeros(10, 2), 3)
    with pytest.raises(ValueError, match="num_estimators must be an integer >= 1, got 0"):
        repeat_target(torch.zeros(3), 0)
    with pytest.raises(ValueError, match=r"shape \(B, K, \.\.\.\)"):
        to_estimator_major(torch.zeros(3))
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(from_estimator_major(to_estimator_major(x), 3), x)
    assert repeat_target(torch.zeros(2, 7), 3).shape == (6, 7)


class _ToyVirtual(nn.Module):
    """K independent linear classifiers: (B, D) or (B, K, D) -> (B, K, C)."""

    def __init__(self, d=4, k=3, c=2):
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.randn(k, d, c) * 0.1)
        self.bias = nn.Parameter(torch.zeros(k, c))

    def forward(self, x):
        if x.ndim == 2:
            x = x.unsqueeze(1).expand(-1, self.k, -1)
        return torch.einsum("bkd,kdc->bkc", x, self.weight) + self.bias


def test_adapter_matches_torch_uncertainty_evaluation():
    model = _ToyVirtual()
    x = torch.randn(5, 4)
    tu = TorchUncertaintyAdapter(model, 3)
    assert tu.num_estimators == 3
    flat = tu(x)
    assert flat.shape == (15, 2)
    # torch-uncertainty: "(m b) c -> b m c", softmax, mean over estimators
    probs = from_estimator_major(flat, tu.num_estimators).softmax(-1).mean(1)
    torch.testing.assert_close(probs, merge_probs(model(x), "after_mean"))
    with pytest.raises(ValueError, match=r"must return \(B, 4, \.\.\.\) per-branch outputs"):
        TorchUncertaintyAdapter(model, 4)(x)


# --------------------------------------------------------------------------- end to end


def test_fit_a_virtual_model_on_bags(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    y = (x[:, 0] > 0).long()
    bags = BranchBags.make(96, 3, mode="bootstrap", seed=0)
    model = _ToyVirtual()
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, progress=False)
    res = fit(model, BaggedPairs(x, y, bags), TensorPairs(x, y), cfg, workdir=tmp_path,
              loss_fn=per_branch_loss, score_fn=ensemble_score)
    assert res.epochs_run == 3
    last = res.history[-1]
    assert last["val_acc"] > 0.8 and last["train_acc"] > 0.8
    assert res.history[0]["train_loss"] > last["train_loss"]
