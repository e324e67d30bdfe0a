"""Tests for ActivationCache.get_many and taps.MultiTap: one forward pass fills the entries of
several layers, shared with get; partial hits, locks, damaged entries, non-tensor (text) inputs."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock
from torch import nn

from branchnet.cache import ActivationCache, CacheError, _data_of
from branchnet.data import Split
from branchnet.taps import MultiTap, TapError, extract, extract_many, tap

LAYERS = ["fc1", "act", "fc2"]


class Counting(nn.Module):
    """A small parent that counts its forward calls."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.calls, self.delay = 0, delay
        self.fc1 = nn.Linear(5, 12)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.delay)
        return self.fc2(self.act(self.fc1(x)))


class Texts(list):
    """A stand-in for branchnet.data.Texts: strings, slicing keeps the type, shape, fingerprint."""

    def __getitem__(self, index: Any) -> Any:
        out = super().__getitem__(index)
        return Texts(out) if isinstance(index, slice) else out

    @property
    def shape(self) -> torch.Size:
        return torch.Size([len(self)])

    @property
    def fingerprint(self) -> str:
        return hashlib.blake2b("\0".join(self).encode(), digest_size=8).hexdigest()


def _codes(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """EmbeddingBag input for texts: all character codes, and where each text starts."""
    codes = torch.tensor([ord(c) % 128 for t in texts for c in t], dtype=torch.long)
    offsets = torch.tensor([0, *[len(t) for t in texts]][:-1], dtype=torch.long).cumsum(0)
    return codes, offsets


class TextNet(nn.Module):
    """A text parent: mean of character-code embeddings, then Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.bag = nn.EmbeddingBag(128, 6, mode="mean")
        self.fc1 = nn.Linear(6, 4)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(4, 2)

    def forward(self, texts: list[str]) -> torch.Tensor:
        assert isinstance(texts, list) and all(isinstance(t, str) for t in texts), type(texts)
        self.calls += 1
        return self.fc2(self.act(self.fc1(self.bag(*_codes(texts)))))


@pytest.fixture
def parent() -> Counting:
    torch.manual_seed(0)
    return Counting()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(103, 5, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def texts() -> Texts:
    return Texts(f"word {i} " * (i % 4) + "z" * (i % 3) for i in range(37))


@pytest.fixture
def cache(tmp_path: Path) -> ActivationCache:
    return ActivationCache(tmp_path / "cache", dtype=torch.float32, shard_rows=40)


def many(cache: ActivationCache, model: nn.Module, layers: list[str], data: Any,
         **kw: Any) -> dict:
    return cache.get_many(model, layers, data, progress=False, batch_size=16, **kw)


def get(cache: ActivationCache, model: nn.Module, layer: str, data: Any, **kw: Any) -> Any:
    return cache.get(model, layer, data, progress=False, batch_size=16, **kw)


def stamp(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of a folder and each of its files: changes if it is rewritten."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [folder, *folder.iterdir()]}


def computed(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The entries (folder names) the cache logged computing."""
    return [Path(r.args[0]).name for r in caplog.records  # type: ignore[index]
            if r.msg.startswith("computing activation cache entry")]


# ----------------------------------------------------------------------------- one pass


def test_one_forward_per_batch_for_all_layers(cache: ActivationCache, parent: Counting,
                                              x: torch.Tensor) -> None:
    acts = many(cache, parent, LAYERS, x)
    assert parent.calls == 7  # ceil(103 / 16), not 3 times that
    assert list(acts) == LAYERS
    assert {a.key for a in acts.values()} == {e.key for e in cache.entries()}
    direct = extract_many(parent, LAYERS, x, batch_size=16)
    for layer, a in acts.items():
        assert a.key == cache.key(parent, layer, x) and a.layer == layer
        assert torch.equal(a.as_tensor(), direct[layer])
        assert torch.equal(a.as_tensor(), extract(parent, layer, x, batch_size=16))
    assert acts["fc1"].shape == (103, 12) and acts["fc2"].shape == (103, 3)
    assert len(acts["fc1"].meta["shards"]) == 3  # 40 + 40 + 23 rows


def test_entries_are_shared_with_get(tmp_path: Path, cache: ActivationCache, parent: Counting,
                                     x: torch.Tensor) -> None:
    acts = many(cache, parent, LAYERS, x)
    calls = parent.calls
    for layer in LAYERS:  # a later get is a hit ...
        assert get(cache, parent, layer, x).key == acts[layer].key
    assert many(cache, parent, list(reversed(LAYERS)), x)["act"].key == acts["act"].key
    assert parent.calls == calls
    # ... and get_many's values equal get's (computed alone, in another cache)
    other = ActivationCache(tmp_path / "other", dtype=torch.float32, shard_rows=40)
    for layer in LAYERS:
        alone = get(other, parent, layer, x, truncate=layer != "fc2")
        assert alone.key == acts[layer].key
        assert alone.meta["shards"] == acts[layer].meta["shards"]  # same bytes, same hashes


def test_partial_hit_computes_only_missing_layers(cache: ActivationCache, parent: Counting,
                                                  x: torch.Tensor,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    first = get(cache, parent, "act", x)
    before = stamp(first.path)
    calls = parent.calls
    with caplog.at_level(logging.INFO, logger="branchnet.cache"):
        acts = many(cache, parent, LAYERS, x)
    assert parent.calls == calls + 7  # one pass for the two missing layers
    assert sorted(computed(caplog)) == sorted(acts[k].key for k in ("fc1", "fc2"))
    assert stamp(first.path) == before and acts["act"].key == first.key
    assert len(cache.entries()) == 3


def test_split_and_empty_data(cache: ActivationCache, parent: Counting, x: torch.Tensor) -> None:
    split = Split(x, torch.zeros(103, dtype=torch.long))
    acts = many(cache, parent, ["act", "fc2"], split)
    assert acts["act"].key == cache.key(parent, "act", split) != cache.key(parent, "act", x)
    empty = many(cache, parent, ["fc1", "fc2"], torch.zeros(0, 5))
    assert empty["fc1"].shape == (0, 12) and empty["fc2"].shape == (0, 3)


# ----------------------------------------------------------------------------- errors


def test_bad_layers_fail_before_any_work(cache: ActivationCache, parent: Counting,
                                         x: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"duplicate layers.*act"):
        many(cache, parent, ["act", "fc1", "act"], x)
    with pytest.raises(TapError, match=r"unknown layer 'fc3'.*valid layers are: fc1, act, fc2"):
        many(cache, parent, ["fc1", "fc3"], x)
    with pytest.raises(TypeError, match="sequence of layer names"):
        many(cache, parent, "act", x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one layer"):
        many(cache, parent, [], x)
    with pytest.raises(ValueError, match="batch_size"):
        cache.get_many(parent, ["act"], x, batch_size=0)
    assert parent.calls == 0 and not cache.root.exists()


def test_damaged_entry_among_several_is_rebuilt(cache: ActivationCache, parent: Counting,
                                                x: torch.Tensor,
                                                caplog: pytest.LogCaptureFixture) -> None:
    acts = many(cache, parent, LAYERS, x)
    expected = {layer: a.as_tensor() for layer, a in acts.items()}
    shard = acts["act"].path / acts["act"].meta["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    kept = {layer: stamp(acts[layer].path) for layer in ("fc1", "fc2")}
    calls = parent.calls
    with caplog.at_level(logging.INFO, logger="branchnet.cache"), \
            pytest.warns(RuntimeWarning, match=r"shard_00001.safetensors has .* removing"):
        again = many(cache, parent, LAYERS, x)
    assert parent.calls == calls + 7 and computed(caplog) == [acts["act"].key]
    assert {layer: stamp(again[layer].path) for layer in ("fc1", "fc2")} == kept
    for layer in LAYERS:
        assert torch.equal(again[layer].as_tensor(), expected[layer])
    assert all(v is None for v in cache.verify().values())
    assert not list(cache.root.glob(".tmp-*"))


def test_failed_fill_leaves_no_entry(cache: ActivationCache, x: torch.Tensor) -> None:
    net = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    with torch.no_grad():
        net[1].weight.fill_(1e5)
    f16 = ActivationCache(cache.root)
    with pytest.raises(CacheError, match="float16 range"):
        f16.get_many(net, ["0", "1"], x, progress=False)
    assert f16.entries() == [] and not list(f16.root.glob(".tmp-*"))


# ----------------------------------------------------------------------------- taps


def test_multitap_one_forward_and_checks(parent: Counting, x: torch.Tensor) -> None:
    t = MultiTap(parent, ["fc2", "fc1"])
    out = t(x[:5])
    assert parent.calls == 1 and list(out) == ["fc2", "fc1"]
    assert torch.equal(out["fc1"], tap(parent, "fc1")(x[:5]))
    assert repr(t) == "MultiTap(Counting, ['fc2', 'fc1'])"
    h = extract_many(t, None, x, batch_size=50)
    assert parent.calls == 2 + 3 and torch.equal(h["fc2"], extract(parent, "fc2", x, batch_size=50))

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(2, 2), nn.ReLU(), nn.ReLU()

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(self.b(z)))

    MultiTap(Twice(), ["a"])(torch.ones(1, 2))
    with pytest.raises(TapError, match="'b' was called 2 times"):
        MultiTap(Twice(), ["a", "b"])(torch.ones(1, 2))
    with pytest.raises(TapError, match="'unused' was never called"):
        MultiTap(Twice(), ["unused", "a"])(torch.ones(1, 2))


# ----------------------------------------------------------------------------- texts


def test_texts_through_taps_and_cache(cache: ActivationCache, texts: Texts) -> None:
    torch.manual_seed(0)
    net = TextNet()
    with torch.no_grad():
        expected = net.fc1(net.bag(*_codes(list(texts))))
    assert torch.allclose(tap(net, "fc1")(texts[:37]), expected)
    assert torch.allclose(extract(net, "fc1", texts, batch_size=8), expected)
    many_direct = extract_many(net, ["bag", "fc1", "fc2"], texts, batch_size=8)
    assert torch.allclose(many_direct["fc1"], expected)

    net.calls = 0
    acts = cache.get_many(net, ["bag", "fc1", "fc2"], texts, batch_size=8, progress=False)
    assert net.calls == 5  # ceil(37 / 8)
    assert acts["bag"].shape == (37, 6) and acts["fc2"].shape == (37, 2)
    for layer, a in acts.items():
        assert torch.equal(a.as_tensor(), many_direct[layer])
        assert a.key == cache.key(net, layer, texts)
    assert get(cache, net, "fc1", texts).key == acts["fc1"].key and net.calls == 5
    act = get(cache, net, "act", texts)  # a single layer of texts through get
    assert net.calls == 8 and torch.allclose(act.as_tensor(), torch.tanh(expected))
    assert cache.key(net, "fc1", texts[:-1]) != acts["fc1"].key  # the fingerprint is the data
    assert len(texts[0:0]) == 0 and cache.get_many(net, ["fc1"], texts[0:0],
                                                   progress=False)["fc1"].shape == (0, 4)


def test_data_must_be_a_tensor_split_or_fingerprinted(parent: Counting) -> None:
    assert _data_of(Texts(["a", "b"]))[1] == Texts(["a", "b"]).fingerprint
    for bad in (["a", "b"], 3, {"fingerprint": "x"}):
        with pytest.raises(TypeError, match=rf"fingerprint.*got {type(bad).__name__}"):
            ActivationCache("unused").key(parent, "act", bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- locks


def _run(target: Any) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(target()), daemon=True)
    thread.start()
    return thread, result


def _wait_for(condition: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_entry_filled_while_waiting_for_its_lock_is_read(
    tmp_path: Path, cache: ActivationCache, parent: Counting, x: torch.Tensor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another holder of one key's lock (flock: any other process, or here a second open of the
    lock file) fills that entry meanwhile: get_many then reads it and computes only the rest."""
    key = cache.key(parent, "act", x)
    elsewhere = get(ActivationCache(tmp_path / "elsewhere", dtype=torch.float32, shard_rows=40),
                    parent, "act", x)
    cache.root.mkdir(parents=True)
    calls = parent.calls
    with caplog.at_level(logging.INFO, logger="branchnet.cache"):
        with FileLock(str(cache.root / f".lock-{key}")):
            thread, result = _run(lambda: many(cache, parent, LAYERS, x))
            _wait_for(lambda: any("waiting for another process" in r.msg
                                  for r in caplog.records))
            assert parent.calls == calls and not cache.path(key).exists()
            os.replace(elsewhere.path, cache.path(key))  # "the other process" fills it
        thread.join(10)
    assert not thread.is_alive() and result
    assert parent.calls == calls + 7
    assert sorted(computed(caplog)) == sorted(cache.key(parent, k, x) for k in ("fc1", "fc2"))
    assert any("filled by another process" in r.msg for r in caplog.records)
    assert result[0]["act"].key == key


def test_overlapping_sets_in_two_threads_no_deadlock_each_entry_once(
    cache: ActivationCache, x: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    a = Counting(delay=0.02)
    b = copy.deepcopy(a)  # same weights, same keys; its own hooks
    with caplog.at_level(logging.INFO, logger="branchnet.cache"):
        ta, ra = _run(lambda: many(cache, a, ["fc2", "act"], x))
        tb, rb = _run(lambda: many(cache, b, ["act", "fc1", "fc2"], x))
        ta.join(20)
        tb.join(20)
    assert not ta.is_alive() and not tb.is_alive() and ra and rb
    assert sorted(computed(caplog)) == sorted(e.key for e in cache.entries())  # each once
    assert len(cache.entries()) == 3 and a.calls + b.calls <= 14
    assert all(ra[0][k].key == rb[0][k].key for k in ("fc2", "act"))
