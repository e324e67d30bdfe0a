"""Tests for branchnet.virtual.embedding: batch-hard triplet loss (against a brute-force loop and
pytorch-metric-learning), P x K batches per branch, scores, and embeddings of a trained model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from branchnet.data.batches import TensorPairs, make_loader
from branchnet.data.omniglot import scale_images
from branchnet.engine import TrainConfig, fit
from branchnet.virtual.embedding import (
    BranchTripletLoss,
    PKBatches,
    PKSampler,
    batch_hard_triplet_loss,
    embed,
    embedding_fn,
    embedding_score,
    ensemble_embedding,
)

# --- batch-hard triplet loss ---------------------------------------------------------------


def brute_force_loss(emb: torch.Tensor, labels: list[int], margin) -> torch.Tensor:
    """Hermans et al.'s batch-hard loss written as plain loops over anchors, positives, negatives."""
    terms = []
    for a in range(len(labels)):
        pos = [torch.sqrt(((emb[a] - emb[p]) ** 2).sum()) for p in range(len(labels))
               if p != a and labels[p] == labels[a]]
        neg = [torch.sqrt(((emb[a] - emb[n]) ** 2).sum()) for n in range(len(labels))
               if labels[n] != labels[a]]
        if not pos or not neg:
            continue
        x = max(pos) - min(neg)
        terms.append(torch.log1p(torch.exp(x)) if margin == "soft" else torch.clamp(x + margin, min=0))
    return torch.stack(terms).mean()


@settings(max_examples=30, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=3, max_size=12),
    dim=st.integers(1, 5),
    margin=st.sampled_from(["soft", 0.0, 0.2, 1.0]),
    seed=st.integers(0, 10_000),
)
def test_batch_hard_matches_brute_force(labels, dim, margin, seed):
    y = torch.tensor(labels)
    same = y[:, None] == y[None, :]
    has_valid = bool(((same.sum(1) > 1) & (~same).any(1)).any())
    emb = torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a = emb.clone().requires_grad_()
    loss = batch_hard_triplet_loss(a, y, margin)
    if not has_valid:
        assert loss.item() == 0.0 and loss.requires_grad
        return
    b = emb.clone().requires_grad_()
    ref = brute_force_loss(b, labels, margin)
    assert torch.allclose(loss, ref, atol=1e-10)
    loss.backward()
    ref.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-8)


@pytest.mark.parametrize("margin", ["soft", 0.3])
def test_batch_hard_equals_pytorch_metric_learning_with_overrides(margin):
    from pytorch_metric_learning import distances, losses, miners, reducers

    g = torch.Generator().manual_seed(0)
    emb, y = torch.randn(32, 8, generator=g), torch.arange(32) % 8
    dist = distances.LpDistance(normalize_embeddings=False, p=2, power=1)
    pml = losses.TripletMarginLoss(margin=0.0 if margin == "soft" else margin, distance=dist,
                                   reducer=reducers.MeanReducer(), smooth_loss=margin == "soft")
    ref = pml(emb, y, miners.BatchHardMiner(distance=dist)(emb, y))
    assert torch.allclose(batch_hard_triplet_loss(emb, y, margin), ref, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(1.0, 1e15), seed=st.integers(0, 1000))
def test_soft_margin_never_nan_for_very_negative_x(scale, seed):
    # two tight, far-apart clusters: x = d_ap - d_an is very negative (log(1 + x) would be NaN)
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [1.0, 1.0]]) * scale
    emb = (centres.repeat_interleave(3, 0) + 1e-3 * torch.randn(6, 2, generator=g)).requires_grad_()
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    loss = batch_hard_triplet_loss(emb, y, "soft")
    loss.backward()
    assert torch.isfinite(loss) and loss.item() >= 0
    assert torch.isfinite(emb.grad).all()
    x = -scale * math.sqrt(2) + 2e-2  # about the hardest x of any anchor
    assert loss.item() <= math.log1p(math.exp(x)) + 1e-6


def test_identical_embeddings_have_finite_gradients():
    emb = torch.zeros(4, 3, requires_grad=True)
    loss = batch_hard_triplet_loss(emb, torch.tensor([0, 0, 1, 1]), "soft")
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2)) and torch.isfinite(emb.grad).all()


def test_margin_and_shape_validation():
    emb = torch.zeros(4, 2)
    for bad in ("hard", -0.1, True, None):
        with pytest.raises(ValueError, match="margin"):
            batch_hard_triplet_loss(emb, torch.zeros(4, dtype=torch.long), bad)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        batch_hard_triplet_loss(emb, torch.zeros(3, dtype=torch.long))


def test_branch_triplet_loss_sums_branches():
    g = torch.Generator().manual_seed(1)
    out = torch.randn(8, 3, 4, generator=g)
    y = torch.randint(0, 3, (8, 3), generator=g)
    loss = BranchTripletLoss("soft")(out, y)
    expected = sum(batch_hard_triplet_loss(out[:, k], y[:, k]) for k in range(3))
    assert torch.allclose(loss, expected)
    shared = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert torch.allclose(BranchTripletLoss(0.2)(out, shared),
                          sum(batch_hard_triplet_loss(out[:, k], shared, 0.2) for k in range(3)))
    assert torch.allclose(BranchTripletLoss()(out[:, 0], shared), batch_hard_triplet_loss(out[:, 0], shared))
    with pytest.raises(ValueError, match="labels must be"):
        BranchTripletLoss()(out, torch.zeros(8, 2, dtype=torch.long))


def brute_force_p_at_1(emb: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    correct = count = 0
    for i in range(len(y)):
        if not any(y[j] == y[i] for j in range(len(y)) if j != i):
            continue
        d = [(float(torch.dist(emb[i], emb[j])), j) for j in range(len(y)) if j != i]
        count += 1
        correct += int(y[min(d)[1]] == y[i])
    return correct, count


def test_embedding_score_ensemble_and_per_branch():
    g = torch.Generator().manual_seed(2)
    out = torch.randn(12, 2, 3, generator=g)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 5])  # 4 and 5: singletons, not counted
    c, n = embedding_score(out, y)
    assert (int(c), n) == brute_force_p_at_1(ensemble_embedding(out), y)
    assert n == 10
    yk = torch.stack([y, y.flip(0)], 1)
    c, n = embedding_score(out, yk)
    per = [brute_force_p_at_1(torch.nn.functional.normalize(out[:, k], dim=-1), yk[:, k]) for k in range(2)]
    assert (int(c), n) == (per[0][0] + per[1][0], per[0][1] + per[1][1])


# --- P x K batches -------------------------------------------------------------------------


@st.composite
def pk_setups(draw):
    n_groups = draw(st.integers(1, 4))
    branches = draw(st.integers(1, 3))
    disjoint = draw(st.booleans()) and n_groups >= branches
    use_groups = disjoint or draw(st.booleans())
    P = draw(st.integers(2, 3))
    K = draw(st.integers(2, 3))
    # every group gets at least P classes so that every branch has an eligible group
    classes_per_group = [draw(st.integers(P, P + 2)) for _ in range(n_groups)]
    rows_per_class = draw(st.lists(st.integers(1, 5), min_size=sum(classes_per_group),
                                   max_size=sum(classes_per_group)))
    return dict(n_groups=n_groups, branches=branches, disjoint=disjoint, use_groups=use_groups, P=P, K=K,
                classes_per_group=classes_per_group, rows_per_class=rows_per_class,
                steps=draw(st.integers(1, 4)), seed=draw(st.integers(0, 100)))


def build(setup) -> tuple[PKBatches, np.ndarray, np.ndarray]:
    labels, groups, c = [], [], 0
    for gi, n_classes in enumerate(setup["classes_per_group"]):
        for _ in range(n_classes):
            labels += [c] * setup["rows_per_class"][c]
            groups += [gi] * setup["rows_per_class"][c]
            c += 1
    perm = np.random.default_rng(0).permutation(len(labels))  # rows not sorted by class
    labels, groups = np.array(labels)[perm], np.array(groups)[perm]
    x = torch.arange(len(labels), dtype=torch.float32).view(-1, 1)  # x[i] = i: rows traceable
    ds = PKBatches(x, labels, setup["branches"], setup["P"], setup["K"], setup["steps"],
                   groups=groups if setup["use_groups"] else None, disjoint_groups=setup["disjoint"],
                   seed=setup["seed"])
    return ds, labels, groups


@settings(max_examples=40, deadline=None)
@given(setup=pk_setups())
def test_pk_blocks_invariants(setup):
    ds, labels, groups = build(setup)
    P, K, B = setup["P"], setup["K"], setup["branches"]
    sampler = ds.make_sampler(seed=5)
    positions = list(sampler)
    assert len(positions) == len(ds) == setup["steps"] * P * K == len(sampler)
    assert all(len(p) == B for p in positions)
    rows = np.array(positions)  # (steps * P * K, branches)
    groups_seen: list[set] = [set() for _ in range(B)]
    for block in rows.reshape(setup["steps"], P * K, B):
        for b in range(B):
            cls = labels[block[:, b]]
            values, counts = np.unique(cls, return_counts=True)
            assert len(values) == P and (counts == K).all()  # exactly P classes x K each
            # class-major: each class's K rows are contiguous
            assert all(len(set(cls[p * K : (p + 1) * K])) == 1 for p in range(P))
            for c in values:  # without replacement whenever the class has K rows
                picked = block[:, b][cls == c]
                if (labels == c).sum() >= K:
                    assert len(set(picked)) == K
            if setup["use_groups"]:
                assert len(set(groups[block[:, b]])) == 1  # within one group
                groups_seen[b] |= set(groups[block[:, b]])
    if setup["disjoint"]:
        assert all(groups_seen[b] <= set(ds.branch_groups[b]) for b in range(B))
        flat = [g for gs in ds.branch_groups for g in gs]
        assert len(flat) == len(set(flat)) == setup["n_groups"]  # a partition of the groups
        sizes = [len(gs) for gs in ds.branch_groups]
        assert max(sizes) - min(sizes) <= 1
    # deterministic per (seed, epoch); set_epoch changes the draw (unless only one draw is possible)
    assert list(ds.make_sampler(seed=5)) == positions
    sampler.set_epoch(1)
    again = ds.make_sampler(seed=5)
    again.set_epoch(1)
    assert list(sampler) == list(again)
    # the batch: x (B, branches, ...), y (B, branches), rows as sampled
    x, y = ds.__getitems__(positions[: P * K])
    assert x.shape == (P * K, B, 1) and y.shape == (P * K, B)
    assert torch.equal(x[..., 0].long(), torch.as_tensor(rows[: P * K]))
    assert torch.equal(y, torch.as_tensor(labels[rows[: P * K]]))


def test_epochs_and_seeds_differ():
    labels = np.repeat(np.arange(10), 4)
    ds = PKBatches(torch.zeros(40, 1), labels, branches=2, P=3, K_per_class=2, steps_per_epoch=5)
    s = ds.make_sampler(seed=0)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != e0
    assert list(ds.make_sampler(seed=1)) != e0
    # the two branches draw independently
    rows = np.array(e0)
    assert not np.array_equal(rows[:, 0], rows[:, 1])


def test_small_classes_are_sampled_with_replacement():
    labels = np.array([0, 1, 1, 1, 2, 2, 2])
    ds = PKBatches(torch.zeros(7, 1), labels, branches=1, P=3, K_per_class=3, steps_per_epoch=2)
    rows = np.array(list(ds.make_sampler(0)))[:, 0]
    assert (rows[labels[rows] == 0] == 0).all() and (labels[rows] == 0).sum() == 6


def test_uint8_inputs_are_scaled_floats_pass_through():
    x8 = torch.randint(0, 256, (12, 1, 3, 3), dtype=torch.uint8)
    labels = np.repeat(np.arange(4), 3)
    ds = PKBatches(x8, labels, branches=2, P=2, K_per_class=2, steps_per_epoch=1)
    pos = list(ds.make_sampler(0))
    x, _ = ds.__getitems__(pos)
    rows = torch.as_tensor(np.array(pos))
    assert x.dtype == torch.float32 and torch.equal(x, scale_images(x8[rows]))
    xf = torch.randn(12, 2)
    dsf = PKBatches(xf, labels, branches=2, P=2, K_per_class=2, steps_per_epoch=1)
    assert torch.equal(dsf.__getitems__(pos)[0], xf[rows])


def test_int_positions_use_the_fixed_epoch_zero_order():
    labels = np.repeat(np.arange(5), 3)
    ds = PKBatches(torch.arange(15.0).view(-1, 1), labels, branches=2, P=2, K_per_class=2,
                   steps_per_epoch=3, seed=4)
    fixed = list(PKSampler(ds, 4))
    _, y = ds.__getitems__([0, 1, 5])
    assert torch.equal(y, torch.as_tensor(labels[np.array([fixed[0], fixed[1], fixed[5]])]))
    x2, y2 = next(iter(make_loader(ds, batch_size=4)))  # a loader without shuffle
    assert x2.shape == (4, 2, 1) and torch.equal(y2, torch.as_tensor(labels[np.array(fixed[:4])]))
    with pytest.raises(IndexError):
        ds.__getitems__([12])
    with pytest.raises(ValueError, match="2-tuples"):
        ds.__getitems__([(0, 1, 2)])


def test_pk_validation_errors():
    labels = np.repeat(np.arange(4), 3)
    x = torch.zeros(12, 1)
    with pytest.raises(ValueError, match="fewer than 5 classes in total"):
        PKBatches(x, labels, 1, 5, 2, 1)
    with pytest.raises(ValueError, match="P"):
        PKBatches(x, labels, 1, 1, 2, 1)
    with pytest.raises(ValueError, match="K_per_class"):
        PKBatches(x, labels, 1, 2, 1, 1)
    with pytest.raises(ValueError, match="needs groups"):
        PKBatches(x, labels, 2, 2, 2, 1, disjoint_groups=True)
    groups = np.array([0] * 6 + [1] * 6)  # 2 classes per group
    with pytest.raises(ValueError, match="in any group of branch 0"):
        PKBatches(x, labels, 1, 3, 2, 1, groups=groups)
    with pytest.raises(ValueError, match="one group per branch"):
        PKBatches(x, labels, 3, 2, 2, 1, groups=groups, disjoint_groups=True)
    mixed = groups.copy()
    mixed[0] = 1
    with pytest.raises(ValueError, match="several groups"):
        PKBatches(x, labels, 1, 2, 2, 1, groups=mixed)
    with pytest.raises(ValueError, match="labels has 11"):
        PKBatches(x, labels[:11], 1, 2, 2, 1)


# --- embeddings and training ---------------------------------------------------------------


class TinyVirtualEmbedder(nn.Module):
    """K independent linear embedders: (B, K, C, H, W) per-branch inputs, or (B, C, H, W) shared."""

    def __init__(self, branches: int = 2, in_features: int = 16, dim: int = 4):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(in_features, dim) for _ in range(branches))
        self.bn = nn.BatchNorm1d(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(1).expand(-1, len(self.heads), *x.shape[1:])
        return torch.stack([h(self.bn(x[:, k].flatten(1))) for k, h in enumerate(self.heads)], 1)


def test_embed_eval_mode_scaling_and_shapes():
    torch.manual_seed(0)
    model = TinyVirtualEmbedder()
    model.train()
    x8 = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    e = embed(model, x8, batch_size=3)
    assert e.shape == (10, 2, 4) and model.training  # mode restored
    model.eval()
    with torch.no_grad():
        assert torch.allclose(e, model(scale_images(x8)))  # uint8 scaled like training
    assert torch.allclose(embed(model, scale_images(x8)), e)
    one = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    assert embed(one, x8).shape == (10, 1, 3)
    with pytest.raises(ValueError, match="expected"):
        embed(nn.Flatten(0), x8)


def test_ensemble_embedding_and_embedding_fn():
    e = torch.tensor([[[3.0, 4.0], [0.0, 5.0]], [[1.0, 0.0], [0.0, -2.0]]])
    cat = ensemble_embedding(e)
    assert cat.shape == (2, 4)
    assert torch.allclose(cat.view(2, 2, 2).norm(dim=-1), torch.ones(2, 2))
    assert torch.equal(ensemble_embedding(e, normalize=False), e.reshape(2, 4))
    with pytest.raises(ValueError):
        ensemble_embedding(torch.zeros(2))
    model = TinyVirtualEmbedder(branches=3).eval()
    x = torch.randn(5, 1, 4, 4)
    assert embedding_fn(model)(x).shape == (5, 12)
    b1 = embedding_fn(model, branch=1, normalize=False)(x)
    assert torch.allclose(b1, embed(model, x)[:, 1])
    with pytest.raises(ValueError, match="out of range"):
        embedding_fn(model, branch=3)(x)


def test_fit_with_pk_batches_and_branch_triplet_loss(tmp_path):
    g = np.random.default_rng(0)
    centres = g.integers(0, 256, (6, 1, 4, 4))
    labels = np.repeat(np.arange(6), 5)
    x = np.clip(centres[labels] + g.integers(-20, 21, (30, 1, 4, 4)), 0, 255).astype(np.uint8)
    train = PKBatches(x, labels, branches=2, P=3, K_per_class=2, steps_per_epoch=4,
                      groups=labels // 3, disjoint_groups=True)
    val = TensorPairs(scale_images(x), torch.as_tensor(labels))
    torch.manual_seed(0)
    model = TinyVirtualEmbedder(branches=2)
    cfg = TrainConfig(epochs=2, batch_size=train.batch_size, lr=1e-2, progress=False)
    result = fit(model, train, val, cfg, workdir=tmp_path, loss_fn=BranchTripletLoss("soft"),
                 score_fn=embedding_score)
    assert result.epochs_run == 2
    for row in result.history:
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
        assert 0.0 <= row["val_acc"] <= 1.0
