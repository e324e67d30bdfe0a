"""Self-check branches (branchnet.selfcheck): targets, head, training, and the score in use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from branchnet import engine
from branchnet.cache import ActivationCache
from branchnet.selective import aurc, confidence, sgr_threshold
from branchnet.selfcheck import (
    TRAIN_DEFAULTS,
    SelfCheck,
    SelfCheckHead,
    fit_selfcheck,
    selfcheck_targets,
)

QUIET = {"progress": False}
#: fast settings for the synthetic problems (2,000 training rows)
FAST = {"progress": False, "epochs": 30, "lr": 3e-3, "batch_size": 256}

# The frozen "parent": a fixed linear classifier that reads feature 0 only.
PARENT = torch.tensor([[-2.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])


def draw(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two Gaussian classes along feature 0 (means +-1.5); labels are flipped with
    probability 0.5 where feature 1 > 1 (about 16% of the rows) and 0.02 elsewhere. The
    parent's max softmax cannot see feature 1, so its confident answers there are often wrong;
    a self-check on all features can. Returns (features, parent probabilities, labels)."""
    y_true = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 4, generator=g)
    x[:, 0] += 1.5 * (2 * y_true - 1)
    flip = torch.where(x[:, 1] > 1.0, 0.5, 0.02)
    y = torch.where(torch.rand(n, generator=g) < flip, 1 - y_true, y_true)
    return x, torch.softmax(x @ PARENT.T, dim=1), y


def right(probs: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return (probs.argmax(1) == y).numpy()


# --------------------------------------------------------------------------- targets


def test_targets_on_hand_examples():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 1, 1, 2])
    assert selfcheck_targets(probs, y, "tcp").tolist() == pytest.approx([0.7, 0.3, 0.5, 1.0])
    # a tie goes to the first class, as argmax does
    assert selfcheck_targets(probs, y, "correct").tolist() == [1.0, 0.0, 0.0, 1.0]
    t = selfcheck_targets(probs.double().numpy(), y.numpy())  # NumPy in, float32 tcp out
    assert t.dtype == torch.float32 and t.shape == (4,)


@pytest.mark.parametrize(("probs", "y", "target", "match"), [
    ([[1.0, 0.0]], [0], "prob", "target must be one of"),
    ([1.0, 0.0], [0], "tcp", r"probs must be a float tensor \[N, C\]"),
    ([[1.0, 0.0]], [0, 1], "tcp", r"y must be integer labels of shape \(1,\)"),
    ([[1.0, 0.0]], [0.0], "tcp", "y must be integer labels"),
    ([[1.0, 0.0]], [2], "tcp", r"class indices in \[0, 2\), got values in \[2, 2\]"),
    ([[1.0, 0.0], [2.0, -1.0]], [0, 0], "tcp", "row 1 sums to 1 with a negative entry"),
    ([[3.0, 1.0]], [0], "correct", "row 0 sums to 4; pass softmax"),
])
def test_target_errors(probs, y, target, match):
    with pytest.raises(ValueError, match=match):
        selfcheck_targets(torch.tensor(probs), torch.tensor(y), target)


# --------------------------------------------------------------------------- head


def test_head_shapes_modes_and_reset():
    head = SelfCheckHead(6, hidden=5, dropout=0.5)
    assert head(torch.randn(3, 2, 3)).shape == (3,)
    head.train()
    s = head.score(np.random.default_rng(0).normal(size=(4, 6)))  # NumPy float64 is converted
    assert s.shape == (4,) and ((s > 0) & (s < 1)).all() and head.training
    assert torch.equal(head.score(torch.ones(2, 6)), head.score(torch.ones(2, 6)))  # no dropout
    before = [p.clone() for p in head.parameters()]
    head.reset_parameters()
    assert not any(torch.equal(a, b) for a, b in zip(before, head.parameters(), strict=True))
    linear = SelfCheckHead(6, hidden=0, dtype=torch.float64)
    assert sum(p.numel() for p in linear.parameters()) == 7
    assert linear.score(torch.ones(1, 6)).dtype == torch.float64


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"in_features": 0}, "in_features must be an integer >= 1, got 0"),
    ({"in_features": 2.0}, "in_features must be an integer >= 1, got 2.0"),
    ({"in_features": 2, "hidden": -1}, "hidden must be an integer >= 0, got -1"),
    ({"in_features": 2, "dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
])
def test_head_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfCheckHead(**kwargs)


def test_head_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"expects \[N, 4\] features .* got shape \(2, 5\)"):
        SelfCheckHead(4)(torch.zeros(2, 5))


# --------------------------------------------------------------------------- training


def test_fit_selfcheck_errors():
    head, x, t = SelfCheckHead(3), torch.randn(8, 3), torch.rand(8)
    cases = [
        (dict(train_targets=None), ValueError, "train_targets is required"),
        (dict(val_features=None), ValueError, "val_targets given without val_features"),
        (dict(train_targets=t * 2), ValueError, r"train_targets must be in \[0, 1\] .* got values"),
        (dict(target="correct"), ValueError, "train_targets must be 0/1 for target='correct'"),
        (dict(train_targets=t[:5]), ValueError, r"must have shape \(8,\)"),
        (dict(resume=True), ValueError, "resume=True needs the workdir"),
        (dict(cfg=engine.TrainConfig().to_dict() | {"epoch": 3}), engine.TrainingError,
         "unknown training options"),
        (dict(cfg=3), TypeError, "cfg must be a TrainConfig, a dict or None, got int"),
    ]
    for change, error, match in cases:
        args = dict(train_features=x, train_targets=t, val_features=x, val_targets=t) | change
        with pytest.raises(error, match=match):
            fit_selfcheck(head, **args)


def test_defaults_are_valid_train_options():
    cfg = engine.TrainConfig.from_dict(TRAIN_DEFAULTS)
    assert cfg.patience and cfg.epochs >= 20 and cfg.weight_decay > 0


def test_fit_on_cached_activations_then_resume_without_training(tmp_path, monkeypatch, one_thread):
    """Datasets of cached activations train like tensors; resume=True returns the finished run
    and its weights without training again."""
    g = torch.Generator().manual_seed(0)
    x, probs, y = draw(300, g)
    acts = ActivationCache(tmp_path / "cache").get(torch.nn.Sequential(torch.nn.Identity()), "0",
                                                   x, progress=False)
    t = selfcheck_targets(probs, y, "correct")
    train, val = acts.dataset(t[:200], rows=range(200)), acts.dataset(t[200:], rows=range(200, 300))
    with pytest.raises(ValueError, match="is a Dataset, which yields its own targets"):
        fit_selfcheck(SelfCheckHead(4), train, t[:200], None, None)

    cfg = {**QUIET, "epochs": 4, "patience": 2}
    head = SelfCheckHead(4, hidden=8)
    first = fit_selfcheck(head, train, None, val, None, target="correct", cfg=cfg,
                          workdir=tmp_path / "run")
    assert first.best_checkpoint and first.epochs_run >= 3
    # the accuracy column is the binary accuracy of the kept (best) weights on the validation rows
    best = next(r for r in first.history if r["epoch"] == first.best_epoch)
    acc = ((head.score(x[200:]) > 0.5).float() == t[200:]).float().mean().item()
    assert best["val_acc"] == pytest.approx(acc)

    def no_training(*args, **kwargs):
        raise AssertionError("resume=True trained a finished run again")

    monkeypatch.setattr(engine.L.Trainer, "fit", no_training)
    again = SelfCheckHead(4, hidden=8)
    again.reset_parameters()
    second = fit_selfcheck(again, train, None, val, None, target="correct", cfg=cfg,
                           workdir=tmp_path / "run", resume=True)
    assert second.to_dict() == first.to_dict()
    for (name, a), b in zip(head.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_estimator_checks_at_fit_and_score(one_thread):
    g = torch.Generator().manual_seed(1)
    x, probs, y = draw(100, g)
    sc = SelfCheck(target="probability", hidden=-2)  # stored as given
    assert (sc.target, sc.hidden) == ("probability", -2)
    with pytest.raises(ValueError, match=r"target must be one of .* got 'probability'"):
        sc.fit(x, probs, y)
    with pytest.raises(ValueError, match="hidden must be an integer >= 0, got -2"):
        SelfCheck(hidden=-2, train=QUIET).fit(x, probs, y)
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        SelfCheck(seed=-1).fit(x, probs, y)
    with pytest.raises(ValueError, match="features has 99 rows but probs and y have 100"):
        SelfCheck().fit(x[:99], probs, y)
    with pytest.raises(RuntimeError, match="not fitted yet"):
        SelfCheck().score_samples(x)

    sc = SelfCheck(hidden=4, train={**QUIET, "epochs": 2}).fit(x, probs, y, val=(x, probs, y))
    assert sc.n_features_in_ == 4 and sc.fit_result_.epochs_run == 2
    assert isinstance(sc.score_samples(x), torch.Tensor)
    with pytest.raises(ValueError, match=r"4 values per row, as in fit, got shape \(100, 3\)"):
        sc.score_samples(x[:, :3])


# --------------------------------------------------------------------------- the score in use


@pytest.mark.parametrize(("target", "seed"), [("tcp", 0), ("tcp", 1), ("tcp", 2), ("correct", 0)])
def test_selfcheck_ranks_errors_better_than_msp(target, seed, one_thread):
    """On fresh test data the self-check's AURC is well below the parent's max softmax
    (measured, tcp: 0.067-0.068 against msp 0.099-0.111; the Bayes score reaches 0.040-0.048)."""
    g = torch.Generator().manual_seed(seed)
    x, probs, y = draw(2000, g)        # held out from the (fixed) parent
    x_test, p_test, y_test = draw(5000, g)
    sc = SelfCheck(target, hidden=32, train=FAST, seed=seed).fit(x, probs, y)
    correct = right(p_test, y_test)
    msp = aurc(confidence(p_test, from_probs=True), correct)
    learned = aurc(sc.score_samples(x_test), correct)
    assert learned < 0.8 * msp, (learned, msp)


@pytest.fixture(scope="module")
def frozen_head() -> SelfCheckHead:
    x, probs, y = draw(2000, torch.Generator().manual_seed(100))
    return SelfCheck(hidden=32, train=FAST).fit(x, probs, y).head_


def test_sgr_guarantee_holds_with_selfcheck_scores(frozen_head):
    """SGR on self-check scores of fresh calibration sets (independent of the head's training
    rows): the selective risk of the chosen threshold exceeds the target in at most about
    ``delta`` of the draws. The risk is measured on one large test sample of the same
    distribution (200,000 rows, a close stand-in for the population risk the guarantee is
    about). Choosing the threshold by the empirical calibration risk alone fails often, which
    shows that the simulation can see a violation."""
    g = torch.Generator().manual_seed(7)
    x_ref, p_ref, y_ref = draw(200_000, g)
    s_ref = frozen_head.score(x_ref).numpy()
    order = np.argsort(-s_ref, kind="stable")
    s_desc, errors = s_ref[order], np.cumsum(~right(p_ref, y_ref)[order])

    def test_risk(theta: float) -> float:
        accepted = np.searchsorted(-s_desc, -theta, side="right")  # rows with score >= theta
        return errors[accepted - 1] / accepted

    target, delta, m, draws = 0.08, 0.1, 2000, 300
    violations = naive_violations = feasible = 0
    for _ in range(draws):
        x, probs, y = draw(m, g)
        s, c = frozen_head.score(x).numpy(), right(probs, y)
        r = sgr_threshold(s, c, target, delta)
        if r.feasible:
            feasible += 1
            violations += test_risk(r.threshold) > target
        ranked = np.argsort(-s, kind="stable")
        risk = np.cumsum(~c[ranked]) / np.arange(1, m + 1)
        naive_violations += test_risk(s[ranked][np.flatnonzero(risk <= target)[-1]]) > target
    assert feasible >= 0.9 * draws
    slack = 3 * np.sqrt(draws * delta * (1 - delta))
    assert violations <= delta * draws + slack, (violations, draws)
    assert naive_violations > 2 * (delta * draws + slack), naive_violations
