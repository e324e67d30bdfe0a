"""Tests for branchnet.cache: round trips, reuse, invalidation, atomicity, corruption, loaders."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from branchnet.cache import (
    ActivationCache,
    CachedActivations,
    CachedDataset,
    CacheError,
    _EntryWriter,
    collate_batch,
)
from branchnet.data import Split
from branchnet.taps import extract


class Counting(nn.Module):
    """A small parent that counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.fc1 = nn.Linear(5, 12)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc2(self.act(self.fc1(x)))


@pytest.fixture
def parent() -> Counting:
    torch.manual_seed(0)
    return Counting()


@pytest.fixture
def split() -> Split:
    g = torch.Generator().manual_seed(1)
    return Split(torch.randn(103, 5, generator=g), torch.randint(0, 3, (103,), generator=g))


def get(cache: ActivationCache, model: nn.Module, data: object, **kw: object) -> CachedActivations:
    return cache.get(model, "act", data, progress=False, batch_size=16, **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- round trips


def test_round_trip_float32_exact(tmp_path: Path, parent: Counting, split: Split) -> None:
    cache = ActivationCache(tmp_path, dtype=torch.float32, shard_rows=40)
    acts = get(cache, parent, split)
    direct = extract(parent, "act", split.x)
    assert len(acts) == 103 and acts.shape == (103, 12) and acts.dtype == torch.float32
    assert len(acts.meta["shards"]) == 3
    assert torch.equal(acts.as_tensor(), direct)
    assert torch.equal(acts[:], direct)


def test_round_trip_float16_within_tolerance(
    tmp_path: Path, parent: Counting, split: Split
) -> None:
    acts = get(ActivationCache(tmp_path, shard_rows=50), parent, split)
    assert acts.dtype == torch.float16
    out = acts.as_tensor()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, extract(parent, "act", split.x), rtol=1e-3, atol=1e-3)
    assert acts.nbytes == 103 * 12 * 2


def test_bfloat16_storage(tmp_path: Path, parent: Counting, split: Split) -> None:
    acts = get(ActivationCache(tmp_path, dtype=torch.bfloat16, shard_rows=30), parent, split)
    expected = extract(parent, "act", split.x, dtype=torch.bfloat16).float()
    assert torch.equal(acts.as_tensor(), expected)
    assert torch.equal(acts[[3, 90, 3]], expected[[3, 90, 3]])


def test_multidimensional_activations(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU())
    x = torch.randn(9, 1, 4, 4)
    acts = ActivationCache(tmp_path, dtype=torch.float32, shard_rows=4).get(
        net, "0", x, progress=False
    )
    assert acts.shape == (9, 2, 4, 4)
    torch.testing.assert_close(acts[[8, 0]], extract(net, "0", x)[[8, 0]])


def test_empty_data(tmp_path: Path, parent: Counting) -> None:
    acts = get(ActivationCache(tmp_path), parent, torch.zeros(0, 5))
    assert acts.shape == (0, 12) and acts.as_tensor().shape == (0, 12)
    assert acts[[]].shape == (0, 12)


# ----------------------------------------------------------------------------- keys, reuse


def test_reuse_without_recomputation(tmp_path: Path, parent: Counting, split: Split) -> None:
    cache = ActivationCache(tmp_path, shard_rows=50)
    first = get(cache, parent, split)
    calls = parent.calls
    assert calls == 7  # ceil(103 / 16) batches, whatever the shard size
    assert cache.has(parent, "act", split)
    again = get(cache, parent, split)
    fresh = get(ActivationCache(tmp_path, shard_rows=50), parent, split)  # e.g. a new process
    assert parent.calls == calls
    assert again.key == first.key == fresh.key
    assert torch.equal(again.as_tensor(), first.as_tensor())
    assert [e.key for e in cache.entries()] == [first.key]


def test_recompute_after_weights_change(tmp_path: Path, parent: Counting, split: Split) -> None:
    cache = ActivationCache(tmp_path, dtype=torch.float32)
    old = get(cache, parent, split)
    with torch.no_grad():
        parent.fc1.weight.mul_(2)
    assert not cache.has(parent, "act", split)
    calls = parent.calls
    new = get(cache, parent, split)
    assert parent.calls > calls and new.key != old.key
    assert torch.equal(new.as_tensor(), extract(parent, "act", split.x))
    assert not torch.equal(new.as_tensor(), old.as_tensor())
    assert len(cache.entries()) == 2


def test_key_depends_on_each_input(parent: Counting, split: Split) -> None:
    cache = ActivationCache("unused")
    k = cache.key(parent, "act", split)
    assert k == cache.key(parent, "act", split, truncate=True)
    assert k.startswith("act-")
    others = {
        cache.key(parent, "fc1", split),
        cache.key(parent, "act", split.x),  # tensor vs split: different data fingerprint
        cache.key(parent, "act", split.subset(torch.arange(10))),
        cache.key(parent, "act", split, {"mean": 0.5}),
        ActivationCache("unused", dtype=torch.float32).key(parent, "act", split),
    }
    assert k not in others and len(others) == 5
    assert cache.key(parent, "act", split, {"a": 1, "b": 2}) == cache.key(
        parent, "act", split, {"b": 2, "a": 1}
    )


def test_truncated_get_matches(tmp_path: Path, parent: Counting, split: Split) -> None:
    a = get(ActivationCache(tmp_path / "a", dtype=torch.float32), parent, split, truncate=True)
    b = get(ActivationCache(tmp_path / "b", dtype=torch.float32), parent, split)
    assert a.key == b.key and torch.equal(a.as_tensor(), b.as_tensor())


def test_parent_training_mode_restored(tmp_path: Path, parent: Counting, split: Split) -> None:
    parent.train()
    get(ActivationCache(tmp_path), parent, split)
    assert all(m.training for m in parent.modules())


def test_float16_overflow_is_an_error(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Identity())
    cache = ActivationCache(tmp_path)
    with pytest.raises(CacheError, match=r"float16 range.*float32"):
        cache.get(net, "0", torch.full((3, 2), 1e6), progress=False)
    assert cache.entries() == []
    acts = ActivationCache(tmp_path, dtype=torch.bfloat16).get(
        net, "0", torch.full((3, 2), 1e6), progress=False
    )
    assert torch.isfinite(acts.as_tensor()).all()


def test_constructor_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        ActivationCache(tmp_path, dtype=torch.int8)
    with pytest.raises(ValueError, match="shard_rows"):
        ActivationCache(tmp_path, shard_rows=0)


# ----------------------------------------------------------------------------- atomicity


def test_failed_write_leaves_no_entry(
    tmp_path: Path, parent: Counting, split: Split, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ActivationCache(tmp_path, shard_rows=20)
    real = _EntryWriter._write_shard
    written = []

    def failing(*args: object) -> dict:
        if written:
            raise KeyboardInterrupt  # e.g. Ctrl-C after the first shard
        written.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_EntryWriter, "_write_shard", staticmethod(failing))
    with pytest.raises(KeyboardInterrupt):
        get(cache, parent, split)
    left = [p.name for p in tmp_path.iterdir() if not p.name.startswith(".lock-")]
    assert left == [], "the temporary folder is removed (only the fill's lock file stays)"
    assert not cache.has(parent, "act", split)
    monkeypatch.undo()
    assert torch.allclose(
        get(cache, parent, split).as_tensor(), extract(parent, "act", split.x), atol=1e-2
    )


def test_crash_mid_write_leaves_only_ignored_temp_folder(tmp_path: Path) -> None:
    """A process killed during the write (no cleanup runs) leaves only a .tmp-* folder."""
    script = textwrap.dedent(
        f"""
        import os, torch
        from torch import nn
        from branchnet.cache import ActivationCache, _EntryWriter
        real = _EntryWriter._write_shard
        def crash(folder, i, *rest):
            out = real(folder, i, *rest)
            if i == 1:
                os._exit(3)
            return out
        _EntryWriter._write_shard = staticmethod(crash)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        ActivationCache({str(tmp_path)!r}, shard_rows=10).get(net, "1", torch.ones(50, 4),
                                                              progress=False)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 3, proc.stderr.decode()
    leftovers = [p for p in tmp_path.iterdir() if not p.name.startswith(".lock-")]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-")
    assert len(list(leftovers[0].glob("shard_*"))) == 2

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    cache = ActivationCache(tmp_path, shard_rows=10)
    x = torch.ones(50, 4)
    assert cache.entries() == [] and not cache.has(net, "1", x)
    acts = cache.get(net, "1", x, progress=False)
    torch.testing.assert_close(acts.as_tensor(), extract(net, "1", x), rtol=1e-3, atol=1e-3)
    # the next fill of the key removed the killed fill's folder (it holds the key's lock)
    assert not leftovers[0].exists()
    assert cache.clear() == 1 and list(tmp_path.iterdir()) == []


def test_clear_and_remove_only_touch_cache_folders(
    tmp_path: Path, parent: Counting, split: Split
) -> None:
    cache = ActivationCache(tmp_path)
    acts = get(cache, parent, split)
    (tmp_path / "my_notes").mkdir()
    (tmp_path / "file.txt").write_text("keep")
    assert cache.remove(acts.key) and not cache.remove(acts.key)
    get(cache, parent, split)
    assert cache.clear() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "my_notes"]
    with pytest.raises(ValueError):
        cache.remove("../file.txt")


# ----------------------------------------------------------------------------- corruption


@pytest.fixture
def stored(tmp_path: Path, parent: Counting, split: Split) -> CachedActivations:
    return get(ActivationCache(tmp_path, shard_rows=40), parent, split)


def reopen_error(acts: CachedActivations) -> str:
    with pytest.raises(CacheError) as e:
        CachedActivations(acts.path)
    msg = str(e.value)
    assert "Delete the folder" in msg and str(acts.path) in msg
    return msg


def test_truncated_shard(stored: CachedActivations) -> None:
    shard = stored.path / "shard_00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-7])
    assert str(shard) in reopen_error(stored)
    shard.write_bytes(data[:5])
    assert str(shard) in reopen_error(stored)


def test_shard_with_garbage_header_same_size(stored: CachedActivations) -> None:
    shard = stored.path / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")
    shard.write_bytes(bytes(data))
    assert "header length" in reopen_error(stored)
    data[:8] = (20).to_bytes(8, "little")
    data[8:28] = b"\xff" * 20
    shard.write_bytes(bytes(data))
    assert "header" in reopen_error(stored)


def test_garbage_meta_json(stored: CachedActivations) -> None:
    meta = stored.path / "meta.json"
    meta.write_bytes(b"{not json\x00\xff")
    assert str(meta) in reopen_error(stored)
    meta.write_text("[1, 2]")
    assert "JSON object" in reopen_error(stored)
    meta.write_text(json.dumps({"format": "branchnet-activation-cache"}))
    assert "lacks the fields" in reopen_error(stored)


def test_meta_json_inconsistent_with_shards(stored: CachedActivations) -> None:
    file = stored.path / "meta.json"
    good = json.loads(file.read_text())
    for change in (
        {"dtype": "float32"},  # header says F16
        {"shape": [103, 11]},
        {"rows": 7},
        {"shards": good["shards"][:1]},
        {"shards": [{**good["shards"][0], "file": "../../etc/passwd"}, *good["shards"][1:]]},
    ):
        file.write_text(json.dumps({**good, **change}))
        reopen_error(stored)


def test_missing_shard_and_missing_meta(stored: CachedActivations, tmp_path: Path) -> None:
    shard = stored.path / "shard_00002.safetensors"
    shard.unlink()
    assert str(shard) in reopen_error(stored)
    (stored.path / "meta.json").unlink()
    msg = reopen_error(stored)
    assert "missing" in msg
    cache = ActivationCache(tmp_path)
    [entry] = cache.entries()
    assert entry.error is not None and cache.verify()[entry.key] == entry.error


def _empty_meta(entry: Path) -> Path:
    (entry / "meta.json").write_text("")
    return entry / "meta.json"


def _truncated_shard(entry: Path) -> Path:
    shard = entry / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    return shard


def _flipped_byte(entry: Path) -> Path:
    shard = entry / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same size, valid header: only the content hash can tell
    shard.write_bytes(bytes(data))
    return shard


@pytest.mark.parametrize("damage", [_empty_meta, _truncated_shard, _flipped_byte])
def test_damaged_entry_is_rebuilt_by_get(
    stored: CachedActivations, tmp_path: Path, parent: Counting, split: Split, damage: Any
) -> None:
    good = stored.as_tensor()
    bad_file = damage(stored.path)
    calls = parent.calls
    with pytest.warns(RuntimeWarning, match="computing it again") as record:
        acts = get(ActivationCache(tmp_path, shard_rows=40), parent, split)
    assert str(bad_file) in str(record[0].message)
    assert parent.calls > calls, "recomputed"
    acts.verify(full=True)
    assert torch.equal(acts.as_tensor(), good)
    assert [e.key for e in ActivationCache(tmp_path).entries()] == [stored.key]
    assert not list(tmp_path.glob(".tmp-*")), "the damaged entry is gone, not left aside"


def test_quick_verify_serves_an_entry_with_modified_bytes(
    stored: CachedActivations, tmp_path: Path, parent: Counting, split: Split
) -> None:
    _flipped_byte(stored.path)
    calls = parent.calls
    get(ActivationCache(tmp_path, shard_rows=40, verify="quick"), parent, split)
    assert parent.calls == calls  # sizes and headers are fine: served without hashing
    with pytest.raises(ValueError, match="verify"):
        ActivationCache(tmp_path, verify="none")


def test_modified_bytes_found_by_full_verify(stored: CachedActivations, tmp_path: Path) -> None:
    shard = stored.path / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size, valid header: only the content hash can tell
    shard.write_bytes(bytes(data))
    acts = CachedActivations(stored.path)  # opens fine
    acts.verify(full=False)
    with pytest.raises(CacheError, match="content hash") as e:
        acts.verify(full=True)
    assert str(shard) in str(e.value)
    report = ActivationCache(tmp_path).verify(full=True)
    assert report[acts.key] is not None and "content hash" in report[acts.key]


def test_verify_passes_on_good_entry(stored: CachedActivations, tmp_path: Path) -> None:
    stored.verify(full=True)
    assert ActivationCache(tmp_path).verify() == {stored.key: None}


# ----------------------------------------------------------------------------- indexing


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[CachedActivations, torch.Tensor]:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    x = torch.randn(57, 3)
    root = tmp_path_factory.mktemp("sharded")
    acts = ActivationCache(root, dtype=torch.float32, shard_rows=8).get(net, "1", x, progress=False)
    return acts, acts.as_tensor()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(-57, 56), max_size=80))
def test_gather_random_indices(
    sharded: tuple[CachedActivations, torch.Tensor], idx: list[int]
) -> None:
    acts, full = sharded
    expected = full[torch.tensor(idx, dtype=torch.long)]
    assert torch.equal(acts[np.array(idx, dtype=np.int64)], expected)
    assert torch.equal(acts[torch.tensor(idx, dtype=torch.long)], expected)
    assert torch.equal(acts[idx], expected)


@settings(max_examples=100, deadline=None)
@given(st.integers(-70, 70), st.integers(-70, 70), st.sampled_from([None, 1, 2, 5, -1, -3]))
def test_slices(
    sharded: tuple[CachedActivations, torch.Tensor], a: int, b: int, step: int | None
) -> None:
    acts, full = sharded
    expected = full.numpy()[a:b:step]
    assert np.array_equal(acts[a:b:step].numpy(), expected)


def test_indexing_forms(sharded: tuple[CachedActivations, torch.Tensor]) -> None:
    acts, full = sharded
    assert torch.equal(acts[9], full[9]) and torch.equal(acts[-1], full[-1])
    assert torch.equal(acts[torch.tensor(10)], full[10])
    assert torch.equal(acts[np.int64(3)], full[3])
    assert torch.equal(acts[8:24], full[8:24])  # contiguous range across shards
    assert torch.equal(acts[list(range(5, 30))], full[5:30])  # sorted contiguous fast path
    mask = torch.arange(57) % 3 == 0
    assert torch.equal(acts[mask], full[mask])
    assert torch.equal(acts[torch.tensor([[1, 2], [40, 0]])], full[torch.tensor([[1, 2], [40, 0]])])
    for bad in (57, -58, [0, 57]):
        with pytest.raises(IndexError):
            acts[bad]
    with pytest.raises(TypeError):
        acts[np.array([0.5])]
    assert "shape=(57, 4)" in repr(acts)


def test_pickle_reopens_lazily(sharded: tuple[CachedActivations, torch.Tensor]) -> None:
    acts, full = sharded
    blob = pickle.dumps(acts)
    assert len(blob) < 10_000, "pickling must not copy the data"
    assert torch.equal(pickle.loads(blob)[[3, 50]], full[[3, 50]])


# ----------------------------------------------------------------------------- datasets


def test_dataloader_batches_equal_direct_indexing(
    sharded: tuple[CachedActivations, torch.Tensor],
) -> None:
    acts, full = sharded
    y = torch.arange(57) * 10
    ds = acts.dataset(y)
    assert isinstance(ds, CachedDataset) and len(ds) == 57
    x0, y0 = ds[5]
    assert torch.equal(x0, full[5]) and int(y0) == 50
    loader = DataLoader(ds, batch_size=10, collate_fn=collate_batch)
    batches = list(loader)
    assert len(batches) == 6
    for i, (xb, yb) in enumerate(batches):
        assert torch.equal(xb, full[i * 10 : (i + 1) * 10])
        assert torch.equal(yb, y[i * 10 : (i + 1) * 10])

    torch.manual_seed(0)
    seen = torch.cat([yb for _, yb in ds.loader(batch_size=16, shuffle=True)])
    assert sorted(seen.tolist()) == y.tolist()
    for xb, yb in ds.loader(batch_size=16, shuffle=True, num_workers=2):
        assert torch.equal(xb, full[yb // 10])


def test_batched_fetch_uses_getitems(
    sharded: tuple[CachedActivations, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    acts, _ = sharded
    ds = acts.dataset(torch.zeros(57, dtype=torch.long))
    calls: list[int] = []
    real = CachedDataset.__getitems__

    def counted(self: CachedDataset, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(len(idx))
        return real(self, idx)

    monkeypatch.setattr(CachedDataset, "__getitems__", counted)
    list(ds.loader(batch_size=20))
    assert calls == [20, 20, 17]


def test_distributed_sampler_and_subset(sharded: tuple[CachedActivations, torch.Tensor]) -> None:
    acts, full = sharded
    y = torch.arange(57)
    ds = acts.dataset(y)
    covered = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        indices = list(sampler)
        got = list(DataLoader(ds, batch_size=7, sampler=sampler, collate_fn=CachedDataset.collate))
        xs, ys = torch.cat([b[0] for b in got]), torch.cat([b[1] for b in got])
        assert ys.tolist() == indices and torch.equal(xs, full[indices])
        covered += indices
    assert set(covered) == set(range(57))
    sub = Subset(ds, [4, 8, 15, 16, 23, 42])
    xb, yb = next(iter(DataLoader(sub, batch_size=6, collate_fn=collate_batch)))
    assert yb.tolist() == [4, 8, 15, 16, 23, 42] and torch.equal(xb, full[yb])


def test_dataset_label_length_checked(sharded: tuple[CachedActivations, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="57 rows"):
        sharded[0].dataset(torch.zeros(5))


def test_collate_batch_falls_back_to_default() -> None:
    samples = [(torch.zeros(2), torch.tensor(1)), (torch.ones(2), torch.tensor(0))]
    xb, yb = collate_batch(samples)
    assert xb.shape == (2, 2) and yb.tolist() == [1, 0]


def test_dataset_over_a_subset_of_rows_flattened(
        sharded: tuple[CachedActivations, torch.Tensor]) -> None:
    acts, _ = sharded
    rows = torch.tensor([50, 3, 17, 3])
    ds = acts.dataset(torch.tensor([0, 1, 2, 3]), rows=rows, flatten=True)
    assert len(ds) == 4
    xb, yb = ds.__getitems__([2, 0])
    assert torch.equal(xb, acts[torch.tensor([17, 50])].flatten(1)) and yb.tolist() == [2, 0]
    x1, y1 = ds[1]
    assert torch.equal(x1, acts[3].flatten()) and int(y1) == 1
    with pytest.raises(ValueError, match="2 labels but the dataset has 4 rows"):
        acts.dataset(torch.zeros(2), rows=rows)
