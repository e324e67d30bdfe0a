"""The fast-training pieces of the engine: batch augmentation (crop and flip), the one-cycle
schedule, label smoothing, Nesterov SGD, channels-last and bfloat16 training, the per-epoch
clock and the record-only monitor split, and the plain CIFAR ResNet."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from branchnet import models, zoo
from branchnet.data.augment import augment_batch, flip_crop
from branchnet.data.batches import TensorPairs
from branchnet.engine import TrainConfig, TrainingError, fit

pytestmark = pytest.mark.usefixtures("one_thread")


def images(n: int = 16, c: int = 3, hw: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 256, (n, c, hw, hw), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.int32).to(torch.uint8)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), padding=st.integers(0, 4), flip=st.booleans(),
       floating=st.booleans())
def test_flip_crop_is_a_shift_and_a_mirror(seed: int, padding: int, flip: bool,
                                           floating: bool) -> None:
    """Every output image is its input shifted by at most ``padding`` pixels (zeros coming in),
    mirrored or not: compared with each candidate, exactly one matches."""
    x = images(6, seed=seed)
    x = x.float() if floating else x
    out = flip_crop(x, padding, flip=flip, generator=torch.Generator().manual_seed(seed))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    h = w = x.shape[-1]
    for i in range(len(x)):
        candidates = [padded[i, :, dy:dy + h, dx:dx + w]
                      for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]
        candidates += [c.flip(-1) for c in candidates] if flip else []
        assert sum(bool((out[i] == c).all()) for c in candidates) >= 1


def test_flip_crop_draws_every_shift_and_flips_half() -> None:
    x = torch.zeros(4000, 1, 5, 5)
    x[:, :, 2, 2] = 1  # a single bright pixel: where it lands is the shift
    out = flip_crop(x, 2, flip=False, generator=torch.Generator().manual_seed(1))
    where = out.flatten(1).argmax(1)
    assert len(torch.unique(where)) == 25  # all 5 x 5 shifts of the pixel occur
    asym = torch.zeros(4000, 1, 1, 2)
    asym[..., 0] = 1
    flipped = flip_crop(asym, 0, generator=torch.Generator().manual_seed(2))[..., 1].mean()
    assert 0.45 < float(flipped) < 0.55


def test_augment_kinds_and_bad_input() -> None:
    x = images(4)
    assert torch.equal(augment_batch(x, "crop", 0), x)
    with pytest.raises(ValueError, match="augment must be one of"):
        augment_batch(x, "rotate")
    with pytest.raises(ValueError, match=r"expects images \[N, C, H, W\], got shape \(4, 3\)"):
        flip_crop(torch.zeros(4, 3))


def test_onecycle_rises_then_falls_to_zero() -> None:
    cfg = TrainConfig(lr=0.2, lr_schedule="onecycle", warmup_epochs=2, epochs=10)
    lrs = [cfg.lr_at(e / 4) for e in range(41)]
    top = lrs.index(max(lrs))
    assert lrs[0] == 0 and top == 8 and max(lrs) == pytest.approx(0.2) and lrs[-1] == 0
    assert all(a < b for a, b in itertools.pairwise(lrs[:top + 1]))
    assert all(a > b for a, b in itertools.pairwise(lrs[top:]))


def test_bad_fast_options() -> None:
    with pytest.raises(TrainingError, match="warmup_epochs must be below epochs"):
        TrainConfig(lr_schedule="onecycle", warmup_epochs=5, epochs=5)
    with pytest.raises(TrainingError, match="nesterov needs optimizer 'sgd'"):
        TrainConfig(nesterov=True)
    with pytest.raises(TrainingError, match="augment"):
        TrainConfig(augment="rotate")
    with pytest.raises(TrainingError, match="precision"):
        TrainConfig(precision="fp8")


def tiny_images(n: int = 64, seed: int = 0) -> TensorPairs:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorPairs(x, y)


def train(tmp: Path, monitor: TensorPairs | None = None, **kw) -> tuple:
    torch.manual_seed(0)
    net = models.resnet(8, width=4, num_classes=3)
    cfg = TrainConfig(epochs=2, batch_size=16, optimizer="sgd", lr=0.05, progress=False, **kw)
    res = fit(net, tiny_images(), tiny_images(32, 1), cfg, workdir=tmp, monitor=monitor)
    return net, res


def test_channels_last_trains_the_same_and_hands_back_contiguous_weights(tmp_path: Path) -> None:
    a, ra = train(tmp_path / "a", channels_last=False)
    b, rb = train(tmp_path / "b", channels_last=True)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-4), name
    assert all(p.is_contiguous() for p in b.parameters())
    assert [r["train_loss"] for r in ra.history] == pytest.approx(
        [r["train_loss"] for r in rb.history], rel=1e-4)


def test_fast_recipe_options_train(tmp_path: Path) -> None:
    """Nesterov, one cycle, label smoothing, crop-and-flip and bfloat16 together still learn."""
    _, res = train(tmp_path, nesterov=True, lr_schedule="onecycle", warmup_epochs=0.5,
                   label_smoothing=0.1, augment="flip-crop", crop_padding=1, precision="bf16")
    assert res.epochs_run == 2 and all(torch.isfinite(torch.tensor(r["train_loss"]))
                                       for r in res.history)


def test_monitor_is_recorded_but_changes_nothing(tmp_path: Path) -> None:
    _, plain = train(tmp_path / "plain")
    _, mon = train(tmp_path / "mon", monitor=tiny_images(40, 2))
    assert all("monitor_acc" in r and 0 <= r["monitor_acc"] <= 1 for r in mon.history)
    strip = [{k: v for k, v in r.items() if not k.startswith("monitor")} for r in mon.history]
    assert strip == plain.history and mon.best_epoch == plain.best_epoch
    assert len(mon.epoch_seconds) == 2 and 0 < mon.epoch_seconds[0] < mon.epoch_seconds[1]


def test_augment_needs_images(tmp_path: Path) -> None:
    ds = TensorPairs(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    with pytest.raises(TrainingError, match=r"augment='flip' needs image inputs \[C, H, W\]"):
        fit(torch.nn.Linear(4, 2), ds, None, TrainConfig(augment="flip", progress=False),
            workdir=tmp_path)


def test_resnet_layout_spec_and_rebuild() -> None:
    net = zoo.build({"kind": "resnet", "depth": 20}, num_classes=10, input_shape=(3, 32, 32))
    assert zoo.num_parameters(net) == 272_474  # He et al.'s ResNet-20 (0.27 M)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    names = dict(net.named_modules())
    assert "pool" in names and "stages.2.2" in names
    again = models.build(net.spec)
    again.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    net.eval(), again.eval()
    assert torch.equal(net(x), again(x))
    with pytest.raises(ValueError, match="depth must be 6n\\+2"):
        models.resnet(21)
