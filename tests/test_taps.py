"""Tests for branchnet.taps: hooked vs truncated taps, eval mode, errors, fingerprints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from branchnet.data import Split
from branchnet.taps import Tap, TapError, extract, layer_names, module_fingerprint, tap


class Boom(nn.Module):
    """A layer that must never run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a layer after the tap was computed")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x)) + x


class Net(nn.Module):
    def __init__(self, tail: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.block = Block()
        self.fc2 = nn.Linear(6, 3)
        self.tail = tail or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = self.relu(h)  # in-place: overwrites fc1's output tensor
        h = self.drop(h)
        h = self.block(h)
        h += 1.0  # in-place on the block's output
        return self.tail(self.fc2(h))


class Branchy(nn.Module):
    """Data-dependent control flow: not traceable by torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h if h.sum() > 0 else -h


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


def reference(net: Net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Activations computed by hand, in eval mode."""
    with torch.no_grad():
        a = net.fc1(x)
        r = torch.relu(a)
        b = net.block(r)
        return {"fc1": a, "relu": r, "block": b, "block.fc": net.block.fc(r), "fc2": net.fc2(b + 1)}


def test_layer_names(net: Net) -> None:
    assert layer_names(net) == [
        "fc1",
        "relu",
        "drop",
        "block",
        "block.fc",
        "block.act",
        "fc2",
        "tail",
    ]


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("layer", ["fc1", "relu", "block", "block.fc", "fc2"])
def test_tap_matches_reference(net: Net, layer: str, truncate: bool) -> None:
    x = torch.randn(16, 4)
    out = tap(net, layer, truncate=truncate)(x)
    torch.testing.assert_close(out, reference(net, x)[layer], rtol=0, atol=0)


def test_hooked_and_truncated_identical(net: Net) -> None:
    x = torch.randn(64, 4)
    for layer in layer_names(net):
        if layer in ("drop", "tail"):
            continue
        assert torch.equal(tap(net, layer)(x), tap(net, layer, truncate=True)(x)), layer


def test_inplace_relu_does_not_overwrite_tapped_linear(net: Net) -> None:
    x = torch.randn(32, 4)
    out = tap(net, "fc1")(x)
    assert (out < 0).any(), "fc1 output must keep its negative (pre-ReLU) values"
    torch.testing.assert_close(out, reference(net, x)["fc1"], rtol=0, atol=0)
    # Same for an in-place `+=` after the tapped block.
    torch.testing.assert_close(tap(net, "block")(x), reference(net, x)["block"], rtol=0, atol=0)


def test_truncated_does_not_run_later_layers() -> None:
    torch.manual_seed(0)
    net = Net(tail=Boom())
    x = torch.randn(8, 4)
    with pytest.raises(AssertionError, match="after the tap"):
        tap(net, "fc1")(x)  # the hook runs the whole model
    out = tap(net, "block", truncate=True)(x)
    torch.testing.assert_close(out, reference(net, x)["block"], rtol=0, atol=0)
    assert torch.equal(extract(net, "fc1", x, truncate=True), reference(net, x)["fc1"])


def test_eval_mode_during_tap_and_modes_restored(net: Net) -> None:
    seen: list[bool] = []
    net.drop.register_forward_hook(lambda m, i, o: seen.append(m.training))
    net.train()
    net.block.eval()  # a mixed state must survive exactly
    before = {name: m.training for name, m in net.named_modules()}
    x = torch.randn(50, 4)
    a, b = tap(net, "fc2")(x), tap(net, "fc2")(x)
    assert torch.equal(a, b), "dropout must be off while tapping"
    assert seen == [False, False]
    assert {name: m.training for name, m in net.named_modules()} == before
    tap(net, "fc2", truncate=True)(x)
    assert {name: m.training for name, m in net.named_modules()} == before


def test_modes_restored_after_error() -> None:
    net = Net(tail=Boom()).train()
    with pytest.raises(AssertionError):
        tap(net, "fc1")(torch.randn(2, 4))
    assert all(m.training for m in net.modules())
    assert not net.fc1._forward_hooks, "the hook must be removed after an error"


def test_output_is_a_normal_tensor_usable_for_training(net: Net) -> None:
    h = tap(net, "fc1")(torch.randn(4, 4))
    assert not h.is_inference() and not h.requires_grad
    branch = nn.Linear(6, 2)
    branch(h).sum().backward()  # would fail on an inference tensor
    assert branch.weight.grad is not None
    assert not tap(net, "fc1", truncate=True)(torch.randn(4, 4)).is_inference()


def test_unknown_layer_lists_names(net: Net) -> None:
    with pytest.raises(TapError) as e:
        tap(net, "fc3")
    msg = str(e.value)
    assert "'fc3'" in msg and "Net" in msg
    for name in layer_names(net):
        assert name in msg
    with pytest.raises(TapError):
        tap(net, "")


def test_unknown_layer_in_big_model_suggests_close_matches() -> None:
    big = nn.Sequential(*[nn.Linear(2, 2) for _ in range(60)])
    big.add_module("encoder_out", nn.Identity())
    with pytest.raises(TapError) as e:
        tap(big, "encoder_ot")
    msg = str(e.value)
    assert "encoder_out" in msg and "61 layers" in msg and "layer_names" in msg
    assert "37" not in msg  # not the whole list


def test_untraceable_model_explains_truncate_false() -> None:
    m = Branchy()
    with pytest.raises(TapError, match="truncate=False"):
        tap(m, "fc", truncate=True)
    assert tap(m, "fc")(torch.randn(3, 3)).shape == (3, 3)


def test_truncate_only_traces_ancestors_of_the_tap() -> None:
    # Branchy (data-dependent control flow) is a sibling before the tap: it is called, not traced.
    torch.manual_seed(0)
    m = nn.Sequential(Branchy(), nn.Sequential(nn.Linear(3, 4), nn.ReLU()), Boom())
    x = torch.randn(5, 3)
    out = tap(m, "1.0", truncate=True)(x)
    with torch.no_grad():
        expected = m[1][0](m[0](x))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_layer_called_twice_or_never() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.unused = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    m = Twice()
    with pytest.raises(TapError, match="called 2 times"):
        tap(m, "fc")(torch.randn(1, 2))
    with pytest.raises(TapError, match="2 times"):
        tap(m, "fc", truncate=True)
    with pytest.raises(TapError, match="never called"):
        tap(m, "unused")(torch.randn(1, 2))


def test_tuple_output_takes_first_element() -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 5, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0][:, -1]

    m = Seq()
    x = torch.randn(4, 7, 3)
    with torch.no_grad():
        expected = m.rnn(x)[0]
    torch.testing.assert_close(tap(m, "rnn")(x), expected, rtol=0, atol=0)


def test_extract_batches_dtype_and_split(net: Net) -> None:
    x = torch.randn(103, 4)
    full = extract(net, "block", x, batch_size=1000)
    assert full.dtype == torch.float32 and full.shape == (103, 6)
    torch.testing.assert_close(extract(net, "block", x, batch_size=10), full, rtol=0, atol=0)
    half = extract(net, "block", Split(x, torch.zeros(103)), batch_size=7, dtype=torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), full, rtol=1e-3, atol=1e-3)
    assert extract(tap(net, "fc1"), None, x[:5]).shape == (5, 6)
    assert extract(net, "fc1", x[:0]).shape == (0, 6)


def test_extract_rejects_non_batch_first_output() -> None:
    m = nn.Sequential(nn.Linear(3, 3), nn.Flatten(0))
    with pytest.raises(TapError, match="batch-first"):
        extract(m, "1", torch.randn(4, 3))


def test_tap_repr(net: Net) -> None:
    assert isinstance(tap(net, "fc1"), Tap)
    assert "hooked" in repr(tap(net, "fc1")) and "truncated" in repr(tap(net, "fc1", truncate=True))


def test_module_fingerprint_tracks_weights_and_structure() -> None:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    fp = module_fingerprint(a)
    assert fp == module_fingerprint(a) and len(fp) == 16
    b = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    b.load_state_dict(a.state_dict())
    assert module_fingerprint(b) != fp, "a different activation must change the fingerprint"
    c = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    c.load_state_dict(a.state_dict())
    assert module_fingerprint(c) == fp, "same class, structure and weights -> same fingerprint"
    with torch.no_grad():
        a[2].bias[0] += 1e-3
    assert module_fingerprint(a) != fp
    bn = nn.BatchNorm1d(3)
    fp_bn = module_fingerprint(bn)
    bn.train()(torch.randn(8, 3))  # running statistics are buffers: they count too
    assert module_fingerprint(bn) != fp_bn


def test_truncated_tap_shares_weights_and_leaves_model_intact(net: Net) -> None:
    names = layer_names(net)
    t = tap(net, "block.fc", truncate=True)
    assert layer_names(net) == names
    x = torch.randn(8, 4)
    with torch.no_grad():
        net.block.fc.weight.add_(1.0)
    torch.testing.assert_close(t(x), reference(net, x)["block.fc"], rtol=0, atol=0)
