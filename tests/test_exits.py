"""Early exits: staged parents (Sequential, torch.fx, fallback), exit heads trained on the
cache, staged inference equal to the cached simulation, calibration, FLOPs, save / load."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from branchnet import models, zoo
from branchnet.data import Split, load
from branchnet.exits import ExitError, MultiExit, StageError, split
from branchnet.exits.stages import FullStages, FxStages, SequentialStages
from branchnet.taps import extract_many


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 1e9:  # data-dependent control flow: fx cannot trace this
            h = h * 0
        return self.b(h)


class SideBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.side, self.b = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        self.side(h)  # computed, never used
        return self.b(h)


def _check_stages(model: nn.Module, taps: list[str], x: torch.Tensor) -> None:
    model.eval()
    st = split(model, taps)
    feats, out = st(x)
    ref = extract_many(model, taps, x)
    for f, t in zip(feats, taps, strict=True):
        torch.testing.assert_close(f, ref[t])
    torch.testing.assert_close(out, model(x))
    rows = torch.tensor([3, 0])  # a subset after the first stage goes on alone
    state, _ = st.run(0, st.start(x))
    state = st.select(state, rows)
    for k in range(1, len(taps)):
        state, f = st.run(k, state)
        torch.testing.assert_close(f, ref[taps[k]][rows])
    torch.testing.assert_close(st.finish(state), model(x)[rows])


def test_sequential_stages() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    assert isinstance(split(net, ["1", "3"]), SequentialStages)
    _check_stages(net, ["1", "3"], torch.randn(5, 4))


def test_fx_stages_cnn_and_resnet() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 3, 16, 16)
    cnn = zoo.build({"kind": "cnn", "widths": [8, 16, 32], "hidden": 32}, num_classes=10,
                    input_shape=(3, 16, 16))
    assert isinstance(split(cnn, ["features.3"]), FxStages)
    _check_stages(cnn, ["features.3", "features.7", "hidden.linear"], x)
    res = zoo.build({"kind": "vresnet", "depth": 20}, num_classes=10, input_shape=(3, 16, 16))
    # taps inside the stages: the residual blocks' skip inputs cross the cuts
    _check_stages(res, ["stages.0.1", "stages.1.0", "stages.2.2"], x)


def test_untraceable_parent_falls_back_and_says_why() -> None:
    st = split(Untraceable(), ["a"])
    assert isinstance(st, FullStages) and not st.splittable
    assert "cannot trace" in st.reason
    _check_stages(Untraceable(), ["a"], torch.randn(5, 4))


@pytest.mark.parametrize(("model", "taps", "match"), [
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), ["2", "0"], "order"),
    (models.mlp([4, 8, 8], 2), ["hidden.1", "hidden.0"], "order"),
    (SideBranch(), ["side"], "not on the parent's path"),
    (SideBranch(), ["nope"], "taps must be layers"),
    (SideBranch(), [], "at least one"),
    (SideBranch(), ["a", "a"], "different"),
])
def test_bad_taps(model: nn.Module, taps: list[str], match: str) -> None:
    with pytest.raises(StageError, match=match):
        split(model, taps)


@pytest.fixture(scope="module")
def digits_exits(tmp_path_factory: pytest.TempPathFactory) -> tuple[MultiExit, object]:
    data = load("digits", seed=0, progress=False)
    torch.manual_seed(0)
    parent = models.mlp([64, 64, 64, 32], 10)
    from branchnet.data.batches import TensorPairs
    from branchnet.engine import TrainConfig, fit
    fit(parent, TensorPairs(data.train.x, data.train.y), None,
        TrainConfig(epochs=15, progress=False), workdir=tmp_path_factory.mktemp("parent"))
    parent.eval().requires_grad_(False)
    me = MultiExit(parent, ["hidden.0", "hidden.1"], head={"hidden": 16},
                   head_train={"epochs": 20}, cache_dir=tmp_path_factory.mktemp("cache"),
                   progress=False).fit(data)
    return me, data


@pytest.mark.parametrize(("rule", "threshold"), [("msp", 0.9), ("entropy", -0.3),
                                                  ("margin", [0.5, 0.9]), ("patience", 1.0)])
def test_staged_predict_equals_cached_simulation(digits_exits, rule, threshold) -> None:
    me, data = digits_exits
    me.rule = rule
    try:
        pred = me.predict(data.test.x, batch_size=64, threshold=threshold)
        answers, exits = me.decide(me.exit_probs(data.test), threshold)
    finally:
        me.rule = "msp"
    assert torch.equal(pred.exits, exits)
    assert torch.equal(pred.labels, answers)
    assert len(set(exits.tolist())) >= 2  # the test means something: inputs leave early


def test_flops_grow_along_the_exits_and_predictions_record_them(digits_exits) -> None:
    me, data = digits_exits
    f = me.exit_flops
    assert f == sorted(f) and f[-1] > me.parent_flops > f[0] > 0
    # the MLP's Linear layers: 64*64, 64*64, 64*32, 32*10 multiply-adds, 2 FLOPs each
    assert me.parent_flops == 2 * (64 * 64 + 64 * 64 + 64 * 32 + 32 * 10)
    pred = me.predict(data.test.x, threshold=0.9)
    assert torch.equal(pred.flops, torch.tensor(f)[pred.exits])
    assert sum(pred.histogram().values()) == len(data.test)


def test_calibrate_bounds_the_disagreement_and_saves(digits_exits, tmp_path) -> None:
    me, data = digits_exits
    me.calibrate(data.val, epsilon=0.1, delta=0.2)
    cal = me.calibration_
    assert cal["feasible"] and cal["empirical_risk"] <= 0.1
    pred = me.predict(data.test.x)
    full = me.exit_probs(data.test)[:, -1].argmax(1)
    assert (pred.labels != full).float().mean() <= 0.2  # ε plus slack for 360 test inputs
    back = MultiExit.load(me.save(tmp_path / "exits"), cache_dir=me.cache_dir, progress=False)
    again = back.predict(data.test.x)
    assert torch.equal(again.exits, pred.exits) and torch.equal(again.labels, pred.labels)


def test_infeasible_target_falls_back_to_the_full_model(digits_exits) -> None:
    me, data = digits_exits
    tiny = Split(data.val.x[:10], data.val.y[:10])  # 10 inputs cannot show risk <= 0.01
    me.calibrate(tiny, epsilon=0.01, delta=0.05)
    try:
        assert not me.calibration_["feasible"] and me.calibration_["threshold"] == float("inf")
        assert set(me.predict(data.test.x).exits.tolist()) == {2}
    finally:
        me.calibration_ = None


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"epsilon": 0.0}, "epsilon must be a number in"),
    ({"epsilon": 1.5}, "epsilon must be a number in"),
    ({"delta": 1.0}, "delta must be a number in"),
    ({"kind": "speed"}, "kind must be one of"),
])
def test_bad_calibration_targets(digits_exits, kwargs, match) -> None:
    me, data = digits_exits
    with pytest.raises(ExitError, match=match):
        me.calibrate(data.val, **kwargs)


def test_bad_constructor_arguments() -> None:
    net = models.mlp([4, 8], 2)
    with pytest.raises(ExitError, match="rule must be one of"):
        MultiExit(net, ["hidden.0"], rule="fast")
    with pytest.raises(ExitError, match="threshold must be a number or a list of 1"):
        MultiExit(net, ["hidden.0"], threshold=[0.5, 0.5])
    with pytest.raises(ExitError, match="head takes hidden, pool and dropout"):
        MultiExit(net, ["hidden.0"], head={"width": 3})
    with pytest.raises(ExitError, match="needs a parent with a probe"):
        MultiExit(net, ["hidden.0"], train_probe=True)
    with pytest.raises(ExitError, match="not fitted"):
        MultiExit(net, ["hidden.0"]).predict(torch.zeros(2, 4), threshold=0.5)


@settings(max_examples=25, deadline=None)
@given(depth=st.integers(2, 5), data=st.data())
def test_any_cut_and_any_rows_give_the_parent_s_answers(depth: int, data) -> None:
    """Property: for any taps (in order) of an MLP parent, through fx or Sequential slices, and
    any rows kept after any stage, the staged outputs equal the parent's on those rows."""
    torch.manual_seed(depth)
    parent = models.mlp([6] + [8] * depth, 3).eval()
    names = [f"hidden.{i}" for i in range(depth)]
    taps = sorted(data.draw(st.sets(st.sampled_from(names), min_size=1)),
                  key=names.index)
    x = torch.randn(7, 6)
    keep = data.draw(st.lists(st.integers(0, 6), min_size=1, max_size=7, unique=True))
    at = data.draw(st.integers(0, len(taps) - 1))
    st_ = split(parent, taps)
    state, rows = st_.start(x), torch.arange(7)
    for k in range(len(taps)):
        state, _ = st_.run(k, state)
        if k == at:
            state, rows = st_.select(state, torch.tensor(keep)), rows[keep]
    torch.testing.assert_close(st_.finish(state), parent(x)[rows])
