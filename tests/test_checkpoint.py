"""Tests for branchnet.checkpoint: safetensors + JSON round trips, refusals, damage, atomicity,
and that loading never unpickles."""

from __future__ import annotations

import json
import math
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import branchnet.checkpoint as ckmod
from branchnet.checkpoint import (
    CheckpointError,
    SafetensorsCheckpointIO,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)

# ---------------------------------------------------------------- helpers


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Structural equality that also checks types, NaN, the sign of zero and tensor dtypes."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert b.dtype == a.dtype and b.shape == a.shape, where
        assert not b.requires_grad, where
        assert torch.equal(torch.isnan(b), torch.isnan(a)) if a.is_floating_point() else True, where
        if a.is_floating_point():
            keep = ~torch.isnan(a)
            assert torch.equal(a[keep], b[keep]), where
        else:
            assert torch.equal(a, b), where
        return
    assert type(a) is type(b), f"{where}: {type(a).__name__} became {type(b).__name__}"
    if isinstance(a, float):
        if math.isnan(a):
            assert math.isnan(b), where
        else:
            assert a == b and math.copysign(1, a) == math.copysign(1, b), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert len(a) == len(b), where
        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True):
            assert_same(ka, kb, f"{where} key")
            assert_same(va, vb, f"{where}[{ka!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (va, vb) in enumerate(zip(a, b, strict=True)):
            assert_same(va, vb, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def roundtrip(obj: Any, path: Path) -> Any:
    save_checkpoint(obj, path)
    return load_checkpoint(path)


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


# ---------------------------------------------------------------- round trips

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (2, 0, 4), (1, 2, 3, 1)], ids=str)
def test_tensor_dtypes_and_shapes(tmp_path: Path, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(shape, generator=g) * 50).to(dtype)
    back = roundtrip({"t": t}, tmp_path / "c.safetensors")["t"]
    assert_same(t, back)


def test_nested_structure_round_trip(tmp_path: Path) -> None:
    w = torch.randn(3, 4, requires_grad=True)
    obj = {
        "state_dict": {"model.fc.weight": w, "model.fc.bias": torch.zeros(4), "step": torch.tensor(7)},
        # optimizer state: int keys, nested tuples (betas), lists of ints
        "optimizer_states": [{
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(3, 4)}, 1: {}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "params": [0, 1],
                              "amsgrad": False, "foreach": None}],
        }],
        "scalars": [None, True, False, 0, -1, 2**70, 1.5, -0.0, math.inf, -math.inf, math.nan],
        "strings": ["", "ascii", "ünïcödé ✓ 🤖", "quote\"back\\slash\nnewline", "\x00nul"],
        "keys": {1: "int", -2: "neg", 2.5: "float", None: "none", (1, "a"): "tuple", "s": "str"},
        "empty": {"d": {}, "l": [], "t": ()},
        "tuples": ((1, (2, (3,))), [(), ((),)]),
        "zero_dim": [torch.tensor(1.5), torch.tensor(True), torch.tensor(-3, dtype=torch.int8)],
        "nan_tensor": torch.tensor([1.0, math.nan, math.inf, -math.inf]),
        "non_contiguous": torch.arange(12.0).view(3, 4).t(),
        "epoch": 4,
    }
    back = roundtrip(obj, tmp_path / "c.safetensors")
    expected = dict(obj)
    expected["state_dict"] = {**obj["state_dict"], "model.fc.weight": w.detach()}
    assert_same(expected, back)
    assert back["non_contiguous"].is_contiguous()
    assert torch.equal(back["non_contiguous"], torch.arange(12.0).view(3, 4).t())


def test_same_tensor_twice_and_views_are_independent_copies(tmp_path: Path) -> None:
    base = torch.arange(10.0)
    obj = {"a": base, "b": base, "view": base[2:5], "strided": base[::3]}
    back = roundtrip(obj, tmp_path / "c.safetensors")
    assert torch.equal(back["a"], base) and torch.equal(back["b"], base)
    assert torch.equal(back["view"], base[2:5]) and torch.equal(back["strided"], base[::3])
    back["a"][0] = 99.0
    assert back["b"][0] == 0.0


def test_keys_that_look_like_encoding_markers(tmp_path: Path) -> None:
    """User dicts whose keys are the encoder's own marker names must round-trip unchanged."""
    obj = {
        "a": {"__tuple__": [1, 2]},
        "b": {"__float__": "nan"},
        "c": {"__str__": "x"},
        "d": {"__items__": [[1, 2]]},
        "e": {"__tensor__": "t0", "other": 1},
        "f": [{"__tensor__": "t999"}],
    }
    assert_same(obj, roundtrip(obj, tmp_path / "c.safetensors"))


def test_paths_dtypes_devices_and_numpy_scalars_become_plain_values(tmp_path: Path) -> None:
    obj = {"p": Path("a/b.txt"), "dt": torch.float16, "dev": torch.device("cpu"),
           "np_f": np.float32(1.5), "np_i": np.int64(3), "np_b": np.bool_(True)}
    back = roundtrip(obj, tmp_path / "c.safetensors")
    assert back == {"p": str(Path("a/b.txt")), "dt": "torch.float16", "dev": "cpu",
                    "np_f": 1.5, "np_i": 3, "np_b": True}


def test_weights_helpers_and_lightning_plugin(tmp_path: Path) -> None:
    w = {"fc.weight": torch.randn(2, 3), "fc.bias": torch.randn(2)}
    save_weights(w, tmp_path / "w.safetensors", {"classes": ["a", "b"], "epoch": 3})
    tensors, meta = load_weights(tmp_path / "w.safetensors")
    assert_same(w, tensors)
    assert meta == {"classes": ["a", "b"], "epoch": 3}
    save_checkpoint({"no": "weights"}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_weights(tmp_path / "other.safetensors")

    io = SafetensorsCheckpointIO()
    ck = {"state_dict": w, "epoch": 1, "loops": {"x": (1, 2)}}
    io.save_checkpoint(ck, tmp_path / "l.ckpt")
    assert_same(ck, io.load_checkpoint(tmp_path / "l.ckpt"))
    io.remove_checkpoint(tmp_path / "l.ckpt")
    assert not (tmp_path / "l.ckpt").exists()
    io.remove_checkpoint(tmp_path / "l.ckpt")  # removing a missing file is fine


# ---------------------------------------------------------------- property test

_MARKER_KEYS = st.sampled_from(["__tensor__", "__tuple__", "__items__", "__float__", "__str__"])


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    seed = draw(st.integers(0, 2**31 - 1))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 10
    return t.to(dtype)


_scalars = (
    st.none() | st.booleans() | st.integers() | st.text(max_size=12)
    | st.floats(allow_nan=True, allow_infinity=True)
)
_keys = (
    st.text(max_size=8) | _MARKER_KEYS | st.integers(-5, 5) | st.booleans()
    | st.tuples(st.integers(0, 3), st.text(max_size=3))
)
_structures = st.recursive(
    _scalars | tensors(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=8) | _MARKER_KEYS, children, max_size=4)
        | st.dictionaries(_keys, children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(obj=_structures)
def test_property_any_nested_structure_round_trips(tmp_path: Path, obj: Any) -> None:
    assert_same(obj, roundtrip(obj, tmp_path / "p.safetensors"))


# ---------------------------------------------------------------- refusals


class Custom:
    pass


@pytest.mark.parametrize(
    ("obj", "where", "what"),
    [
        (lambda x: x, "top level", "function"),
        ({"a": {"b": [1, 2, Custom()]}}, ".a.b[2]", "Custom"),
        ({"opt": {0: {"fn": print}}}, ".opt[0].fn", "builtin_function_or_method"),
        ([{1, 2}], "[0]", "set"),
        ({"arr": np.zeros(3)}, ".arr", "ndarray"),
        ({"b": b"bytes"}, ".b", "bytes"),
    ],
)
def test_refuses_unsupported_objects_naming_where(tmp_path: Path, obj: Any, where: str, what: str) -> None:
    path = tmp_path / "c.safetensors"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(obj, path)
    msg = str(info.value)
    assert where in msg and what in msg
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


# ---------------------------------------------------------------- damage


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    save_checkpoint({"w": torch.randn(64, 8), "step": 1, "nested": {"b": torch.ones(3)}}, path)
    return path


def _expect_damaged(path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("keep", [0, 4, 8, 20, -100, -1])
def test_truncated_file_is_reported(good: Path, keep: int) -> None:
    raw = good.read_bytes()
    good.write_bytes(raw[:keep])
    _expect_damaged(good)


def test_random_bytes_are_reported(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i, n in enumerate([1, 8, 100, 5000]):
        path = tmp_path / f"junk{i}.safetensors"
        path.write_bytes(rng.bytes(n))
        _expect_damaged(path)
    # a plausible header length followed by garbage
    path = tmp_path / "junk-header.safetensors"
    path.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}")
    _expect_damaged(path)


def test_missing_file_and_directory_are_reported(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_checkpoint(tmp_path / "nope.safetensors")
    assert str(tmp_path / "nope.safetensors") in str(info.value)
    _expect_damaged(tmp_path)  # a directory is not a checkpoint


def test_plain_safetensors_without_structure_is_reported(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    _expect_damaged(path)
    save_file({"w": torch.ones(2)}, str(path), metadata={"branchnet.structure": "{broken"})
    _expect_damaged(path)
    # structure refers to a tensor the file does not hold
    save_file({"w": torch.ones(2)}, str(path),
              metadata={"branchnet.structure": json.dumps({"x": {"__tensor__": "t5"}})})
    _expect_damaged(path)


# ---------------------------------------------------------------- atomic writes


def test_failed_save_keeps_previous_file(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = good.read_bytes()

    def boom(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"half a file")  # a partial write, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(ckmod, "save_file", boom)
    with pytest.raises(OSError, match="disk full") as e:
        save_checkpoint({"w": torch.zeros(2), "step": 2}, good)
    assert isinstance(e.value, ckmod.CheckpointError) and str(good) in str(e.value)
    assert good.read_bytes() == before
    assert sorted(p.name for p in good.parent.iterdir()) == [good.name]  # temp file removed
    monkeypatch.undo()
    assert load_checkpoint(good)["step"] == 1


def test_unsupported_object_keeps_previous_file(good: Path) -> None:
    before = good.read_bytes()
    with pytest.raises(CheckpointError):
        save_checkpoint({"w": torch.zeros(2), "bad": Custom()}, good)
    assert good.read_bytes() == before


def test_save_overwrites_and_creates_parents(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c.safetensors"
    save_checkpoint({"v": 1}, path)
    save_checkpoint({"v": 2}, path)
    assert load_checkpoint(path) == {"v": 2}
    assert [p.name for p in path.parent.iterdir()] == ["c.safetensors"]


# ---------------------------------------------------------------- no pickle


def test_file_is_pure_safetensors(good: Path) -> None:
    """Header length + JSON header + tensor bytes account for the whole file: no room for a pickle."""
    n, header = read_header(good)
    meta = header.pop("__metadata__")
    assert set(meta) == {"branchnet.structure"}
    json.loads(meta["branchnet.structure"])
    end = max(info["data_offsets"][1] for info in header.values())
    assert good.stat().st_size == 8 + n + end
    assert {info["dtype"] for info in header.values()} == {"F32"}


def test_loading_never_unpickles(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickling during checkpoint load")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    ck = load_checkpoint(good)
    assert ck["step"] == 1 and ck["w"].shape == (64, 8)
    assert SafetensorsCheckpointIO().load_checkpoint(good)["step"] == 1


def test_a_pickle_file_is_rejected_not_executed(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path(tmp_path / "pwned").touch, ())

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"state_dict": Evil()}))
    torch.save({"x": torch.ones(1)}, tmp_path / "torch.ckpt")
    _expect_damaged(path)
    _expect_damaged(tmp_path / "torch.ckpt")
    assert not (tmp_path / "pwned").exists()
