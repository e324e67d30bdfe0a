"""Tests for the loaders of branchnet.data: digits, arrays, npz, ImageFolder dirs and archives,
CIFAR pickles, splits, normalisation, the decode cache and apply_preprocessing."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from branchnet.data import DataError, apply_preprocessing, load, read_image_files
from branchnet.data import images as images_mod
from branchnet.data.cifar import RestrictedUnpickler, load_pickle
from branchnet.data.dataset import stratified_split
from branchnet.data.imagefolder import parse_layout, read_image_folder
from branchnet.data.prepare import fit_normalization

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

# --- helpers -------------------------------------------------------------------------------


def make_folder(root: Path, layout: dict, size=(4, 6), ext=".png") -> Path:
    """Write solid-colour images: ``layout`` maps [split/]class -> list of grey values.

    Image k of a class has pixel (0, 0) set to k so that images are distinguishable.
    """
    for rel, values in layout.items():
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        for k, v in enumerate(values):
            a = np.full((size[0], size[1], 3), v, dtype=np.uint8)
            a[0, 0] = k
            Image.fromarray(a).save(d / f"{k:03d}{ext}")
    return root


def tar_dir(src: Path, out: Path, top: str | None = None) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src).as_posix()
            tf.add(p, arcname=f"{top}/{rel}" if top else rel, recursive=False)
    return out


def zip_dir(src: Path, out: Path, top: str | None = None) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                rel = p.relative_to(src).as_posix()
                zf.write(p, f"{top}/{rel}" if top else rel)
    return out


SIMPLE = {"dog": [200, 210, 220], "cat": [10, 20, 30, 40], "bird": [100, 110, 120]}
SPLIT = {
    "train/b": [10, 10, 10, 10],
    "train/a": [30, 30, 30, 30],
    "val/a": [60],
    "val/b": [60],
    "test/a": [250, 250],
    "test/b": [250],
}


def two_class_arrays(n_per_class=10, value1=4.0):
    x = np.concatenate([np.zeros((n_per_class, 1)), np.full((n_per_class, 1), value1)])
    y = np.repeat([0, 1], n_per_class)
    return x.astype(np.float32), y


# --- splits and normalisation --------------------------------------------------------------


def test_stratified_split_keeps_proportions_and_is_seeded():
    y = np.repeat([0, 1], [80, 20])
    keep, split = stratified_split(y, 0.25, seed=3)
    assert len(split) == 25 and len(keep) == 75
    assert np.bincount(y[split]).tolist() == [20, 5]
    assert np.array_equal(split, stratified_split(y, 0.25, seed=3)[1])
    assert not np.array_equal(split, stratified_split(y, 0.25, seed=4)[1])


def test_stratified_split_falls_back_when_a_class_is_tiny():
    y = np.array([0] * 9 + [1])  # class 1 has a single member: cannot stratify
    keep, split = stratified_split(y, 0.3, seed=0)
    assert len(split) == 3 and len(keep) == 7


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_stratified_split_rejects_bad_fraction(fraction):
    with pytest.raises(DataError, match="fraction"):
        stratified_split(np.zeros(10), fraction, seed=0)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=5, max_size=60),
    st.floats(0.0, 0.6),
    st.integers(0, 10**6),
)
def test_stratified_split_partitions_indices(labels, fraction, seed):
    y = np.array(labels)
    keep, split = stratified_split(y, fraction, seed)
    assert sorted(np.concatenate([keep, split]).tolist()) == list(range(len(y)))
    assert len(split) == (int(np.ceil(fraction * len(y))) if fraction else 0)


def test_fit_normalization_feature_replaces_zero_std():
    x = np.array([[1.0, 5.0], [3.0, 5.0]])
    s = fit_normalization(x, "feature")
    assert s == {"mode": "feature", "scale": 1.0, "mean": [2.0, 5.0], "std": [1.0, 1.0]}


def test_fit_normalization_channel_matches_numpy():
    x = np.random.default_rng(0).normal(3, 2, size=(7, 3, 4, 5)).astype(np.float32)
    s = fit_normalization(x, "channel")
    np.testing.assert_allclose(s["mean"], x.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(s["std"], x.std(axis=(0, 2, 3)), rtol=1e-5)
    assert fit_normalization(x, "none")["mean"] is None
    with pytest.raises(DataError, match="normalize mode"):
        fit_normalization(x, "pixel")


# --- digits and arrays ---------------------------------------------------------------------


def test_digits_shapes_classes_and_feature_normalisation():
    d = load("digits", progress=False)
    assert d.name == "digits" and d.classes == [str(i) for i in range(10)]
    assert d.input_shape == (1, 8, 8) and d.train.x.dtype == torch.float32
    assert len(d.train) + len(d.val) + len(d.test) == 1797 and len(d.test) == 360
    assert d.preprocessing["mode"] == "feature" and d.preprocessing["scale"] == 1 / 16
    assert torch.allclose(d.train.x.mean(0), torch.zeros(1, 8, 8), atol=1e-5)


def test_digits_split_is_deterministic_by_seed():
    a, b = load("digits", seed=5), load("digits", seed=5)
    c = load("digits", seed=6)
    assert a.train.fingerprint == b.train.fingerprint and a.test.fingerprint == b.test.fingerprint
    assert a.test.fingerprint != c.test.fingerprint


def test_test_split_does_not_depend_on_val_fraction_or_max_per_class():
    a = load("digits", val_fraction=0.1)
    b = load("digits", val_fraction=0.3, max_per_class=50, normalize="none")
    a_raw = a.test.x * torch.tensor(a.preprocessing["std"]) + torch.tensor(a.preprocessing["mean"])
    assert torch.equal(a.test.y, b.test.y)
    assert torch.allclose(a_raw, b.test.x, atol=1e-5)


def test_stats_come_from_train_split_only():
    x, y = two_class_arrays(10, value1=4.0)
    src = {"x": x, "y": y, "x_test": np.full((3, 1), 100.0), "y_test": [0, 1, 1]}
    d = load(src, val_fraction=0.2)
    # stratified: 8 + 8 train rows of values 0 and 4 -> mean 2, std 2; test never counts
    assert d.preprocessing["mean"] == [2.0] and d.preprocessing["std"] == [2.0]
    assert d.test.x.flatten().tolist() == [49.0, 49.0, 49.0]
    assert sorted(d.train.x.flatten().tolist()) == [-1.0] * 8 + [1.0] * 8


def test_select_classes_renumbers_before_statistics():
    x = np.concatenate([np.full((10, 1), v) for v in (0.0, 4.0, 1000.0)]).astype(np.float32)
    y = np.repeat([0, 1, 2], 10)
    d = load((x, y), classes=[2, "0"], val_fraction=0.2, test_fraction=0.2)
    assert d.classes == ["2", "0"] and d.preprocessing["mean"] == [500.0]
    raw = d.train.x.flatten() * 500 + 500
    assert set(torch.unique(d.train.y).tolist()) == {0, 1}
    assert torch.equal(raw.round() == 1000, d.train.y == 0)


def test_unknown_class_lists_valid_classes():
    with pytest.raises(DataError, match=r"unknown class 'zebra'.*valid classes.*'9'"):
        load("digits", classes=["zebra"])
    with pytest.raises(DataError, match="out of range"):
        load("digits", classes=[10])


def test_max_per_class_subsamples_train_seeded():
    d = load("digits", max_per_class=20, val_fraction=0.0, seed=1)
    assert torch.bincount(d.train.y).tolist() == [20] * 10 and len(d.val) == 0
    assert d.train.fingerprint == load("digits", max_per_class=20, val_fraction=0.0, seed=1).train.fingerprint


def test_tuple_of_tensors_and_feature_default():
    x = torch.randn(30, 5)
    y = torch.arange(30) % 3
    d = load((x, y), test_fraction=0.2, val_fraction=0.0)
    assert d.classes == ["0", "1", "2"] and d.input_shape == (5,) and len(d.test) == 6
    assert d.preprocessing["layout"] == "features" and d.preprocessing["mode"] == "feature"


def test_uint8_arrays_are_images_nhwc_to_nchw_channel_norm():
    x = np.random.default_rng(0).integers(0, 256, size=(20, 5, 6, 3), dtype=np.uint8)
    d = load({"x": x, "y": np.arange(20) % 2, "classes": ["a", "b"]}, normalize="none")
    assert d.input_shape == (3, 5, 6) and d.classes == ["a", "b"]
    assert d.preprocessing["layout"] == "image" and float(d.train.x.max()) <= 1.0
    assert load({"x": x, "y": np.arange(20) % 2}).preprocessing["mode"] == "channel"


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ({"x": np.zeros((4, 2)), "y": [0, 1, 2, 5], "classes": list("abc")}, "label 5 out of"),
        ((np.zeros((4, 2)), np.array([0, 1, -2, 1])), "label -2 out of range"),
        ({"x": np.zeros((4, 2)), "y": [0, 1, 0, -1], "classes": ["a", "b"]}, "label -1"),
        ((np.array([[0.0], [np.nan], [1.0], [2.0]]), np.array([0, 1, 0, 1])), "NaN"),
        ((np.zeros((4, 2)), np.array([0, 1, 0])), "4 inputs but 3 labels"),
        ((np.zeros((4, 2)), np.array([0.5, 1, 0, 1])), "labels must be integers"),
        ((np.zeros(4), np.array([0, 1, 0, 1])), "at least 2 dims"),
        ({"x": np.zeros((4, 2))}, "needs arrays 'x' and 'y'"),
        ("no-such-dataset", "not a known name or an existing path.*digits"),
        (42, "unsupported data source"),
    ],
)
def test_bad_sources_raise_clear_errors(source, match):
    with pytest.raises(DataError, match=match):
        load(source)


def test_bad_options_raise_clear_errors():
    with pytest.raises(DataError, match="normalize must be one of"):
        load("digits", normalize="zscore")
    with pytest.raises(DataError, match="image_size only applies"):
        load("digits", image_size=16)
    with pytest.raises(DataError, match="image_mode only applies"):
        load("digits", image_mode="L")
    with pytest.raises(DataError, match="only applies to CIFAR-100"):
        load("digits", label_set="coarse")
    with pytest.raises(DataError, match="max_per_class"):
        load("digits", max_per_class=0)


def test_npz_source(tmp_path):
    x, y = two_class_arrays(10)
    np.savez(tmp_path / "d.npz", x=x, y=y, classes=np.array(["neg", "pos"]))
    d = load(tmp_path / "d.npz")
    assert d.classes == ["neg", "pos"] and d.name == "d"
    np.savez(tmp_path / "bad.npz", x=np.array([object()] * 2, dtype=object), y=[0, 1])
    with pytest.raises(DataError, match="without pickle"):
        load(tmp_path / "bad.npz")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="don't know how to read"):
        load(tmp_path / "x.csv")


# --- images and ImageFolder ----------------------------------------------------------------


def test_read_image_files_rgb_and_grey(tmp_path):
    make_folder(tmp_path, {"a": [7, 9]})
    paths = sorted((tmp_path / "a").glob("*.png"))
    x = read_image_files(paths, progress=False)
    assert x.shape == (2, 4, 6, 3) and x.dtype == np.uint8 and x[1, 1, 1, 0] == 9
    assert read_image_files(paths, mode="L", size=3, progress=False).shape == (2, 3, 3, 1)
    with pytest.raises(DataError, match="image mode"):
        read_image_files(paths, mode="CMYK")


def test_unreadable_image_names_the_file(tmp_path):
    make_folder(tmp_path, {"a": [1], "b": [2]})
    bad = tmp_path / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg.*unreadable or corrupt"):
        read_image_files([bad], progress=False)
    with pytest.raises(DataError, match=r"b/broken\.jpg"):
        load(tmp_path, cache_dir=tmp_path / ".c", progress=False)
    archive = tar_dir(tmp_path, tmp_path.parent / "broken.tar.gz")
    with pytest.raises(DataError, match=r"broken\.tar\.gz:b/broken\.jpg"):
        load(archive, cache_dir=tmp_path / ".c", progress=False)


def test_size_mismatch_suggests_image_size(tmp_path):
    make_folder(tmp_path, {"a": [1]}, size=(4, 6))
    make_folder(tmp_path, {"b": [2]}, size=(5, 5))
    with pytest.raises(DataError, match=r"b/000\.png is 5x5.*a/000\.png is 4x6.*image_size="):
        load(tmp_path, cache_dir=tmp_path / ".c", progress=False)
    d = load(tmp_path, image_size=8, test_fraction=0, val_fraction=0, cache_dir=tmp_path / ".c")
    assert d.input_shape == (3, 8, 8) and d.preprocessing["resample"] == "bilinear"


def test_imagefolder_directory_classes_sorted_and_pixels(tmp_path):
    make_folder(tmp_path / "pets", SIMPLE)
    d = load(
        tmp_path / "pets",
        normalize="none",
        test_fraction=0,
        val_fraction=0,
        cache_dir=tmp_path / "c",
        progress=False,
    )
    assert d.classes == ["bird", "cat", "dog"] and d.name == "pets"
    assert d.input_shape == (3, 4, 6) and len(d.train) == 10
    raw = (d.train.x * 255).round()
    assert raw[:, :, 1, 1].tolist() == [[v] * 3 for v in (100, 110, 120, 10, 20, 30, 40, 200, 210, 220)]
    assert d.train.y.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]


def test_imagefolder_split_folders_and_channel_stats(tmp_path):
    make_folder(tmp_path / "ds", SPLIT)
    d = load(tmp_path / "ds", cache_dir=tmp_path / "c", progress=False)
    assert d.classes == ["a", "b"] and (len(d.train), len(d.val), len(d.test)) == (8, 2, 3)
    # train pixels are 10 and 30 (except pixel (0,0) = k): mean/std from train only
    train_raw = np.array([[10] * 24] * 4 + [[30] * 24] * 4, dtype=np.float64)
    train_raw[:, 0] = [0, 1, 2, 3] * 2
    np.testing.assert_allclose(d.preprocessing["mean"], [train_raw.mean() / 255] * 3)
    np.testing.assert_allclose(d.preprocessing["std"], [train_raw.std() / 255] * 3, rtol=1e-6)
    assert d.preprocessing["mode"] == "channel" and d.preprocessing["channels"] == 3


@pytest.mark.parametrize("kind", ["tar.gz", "zip", "tar.gz-top", "zip-top"])
def test_archives_match_directory(tmp_path, kind):
    src = make_folder(tmp_path / "ds", SPLIT)
    ext, _, top = kind.partition("-")
    out = tmp_path / f"ds.{ext}"
    (tar_dir if ext == "tar.gz" else zip_dir)(src, out, top="inner" if top else None)
    a = load(src, cache_dir=tmp_path / "c", progress=False)
    b = load(out, cache_dir=tmp_path / "c", progress=False)
    assert b.classes == a.classes and b.name == "ds"
    for s in ("train", "val", "test"):
        assert torch.equal(getattr(a, s).x, getattr(b, s).x)
        assert torch.equal(getattr(a, s).y, getattr(b, s).y)


def test_jpeg_folder_and_grey_mode(tmp_path):
    make_folder(tmp_path / "j", {"x": [50, 60], "y": [200, 210]}, ext=".jpg")
    d = load(
        tmp_path / "j",
        image_mode="L",
        normalize="none",
        test_fraction=0.5,
        val_fraction=0,
        cache_dir=tmp_path / "c",
        progress=False,
    )
    assert d.input_shape == (1, 4, 6) and d.preprocessing["image_mode"] == "L"
    assert abs(float(d.test.x[d.test.y == 1].mean()) * 255 - 205) < 10


def test_parse_layout_errors():
    with pytest.raises(DataError, match="no images"):
        parse_layout([], "somewhere")
    with pytest.raises(DataError, match="mixes split folders"):
        parse_layout(["train/a/1.png", "cats/1.png"], "ds")
    with pytest.raises(DataError, match="no 'train' folder"):
        parse_layout(["test/a/1.png", "val/a/2.png"], "ds")
    assert parse_layout(["a/x/1.png", "a/y/2.png"]) == {"train": [(0, "x"), (1, "y")]}


def test_class_only_in_test_is_an_error(tmp_path):
    make_folder(tmp_path / "ds", {"train/a": [1], "train/b": [1], "test/c": [2]})
    with pytest.raises(DataError, match=r"classes \['c'\] appear in test/"):
        load(tmp_path / "ds", cache_dir=tmp_path / "c", progress=False)


def test_archive_path_traversal_is_refused(tmp_path):
    out = tmp_path / "evil.tar.gz"
    png = io.BytesIO()
    Image.new("RGB", (2, 2)).save(png, format="PNG")
    with tarfile.open(out, "w:gz") as tf:
        for name in ("a/1.png", "../../etc/b/2.png"):
            info = tarfile.TarInfo(name)
            info.size = len(png.getvalue())
            tf.addfile(info, io.BytesIO(png.getvalue()))
    with pytest.raises(DataError, match=r"unsafe path '\.\./\.\./etc/b/2\.png'"):
        load(out, cache_dir=tmp_path / "c", progress=False)
    zout = tmp_path / "evil.zip"
    with zipfile.ZipFile(zout, "w") as zf:
        zf.writestr("a/1.png", png.getvalue())
        zf.writestr("/abs/b/2.png", png.getvalue())
    with pytest.raises(DataError, match="unsafe path"):
        load(zout, cache_dir=tmp_path / "c", progress=False)


# --- decode cache --------------------------------------------------------------------------


def _refuse_decoding(*args, **kwargs):
    raise AssertionError("decoded an image although the cache should have been used")


@pytest.mark.parametrize("archive", [False, True])
def test_second_load_uses_cache(tmp_path, monkeypatch, archive):
    src = make_folder(tmp_path / "ds", SPLIT)
    if archive:
        src = tar_dir(src, tmp_path / "ds.tar.gz")
    cache = tmp_path / "cache"
    a = load(src, cache_dir=cache, progress=False)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    monkeypatch.setattr(images_mod, "decode_image", _refuse_decoding)
    b = load(src, cache_dir=cache, progress=False)
    assert torch.equal(a.train.x, b.train.x) and a.classes == b.classes
    with pytest.raises(AssertionError, match="decoded an image"):  # other size -> other key
        load(src, cache_dir=cache, image_size=3, progress=False)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "ds", SIMPLE)
    monkeypatch.setenv("BRANCHNET_CACHE_DIR", str(tmp_path / "envcache"))
    read_image_folder(src, progress=False)
    assert len(list((tmp_path / "envcache").glob("imagefolder-ds-*.safetensors"))) == 1


def test_directory_change_invalidates_cache(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "ds", SIMPLE)
    load(src, cache_dir=tmp_path / "c", progress=False)
    make_folder(src, {"cat": [10, 20, 30, 40, 50]})  # one more cat image
    monkeypatch.setattr(images_mod, "decode_image", _refuse_decoding)
    with pytest.raises(AssertionError, match="decoded an image"):
        load(src, cache_dir=tmp_path / "c", progress=False)


def test_damaged_cache_raises_naming_the_file(tmp_path):
    src = make_folder(tmp_path / "ds", SIMPLE)
    cache = tmp_path / "c"
    read_image_folder(src, cache_dir=cache, progress=False)
    data_file = next(cache.glob("*.safetensors"))
    blob = bytearray(data_file.read_bytes())
    blob[-5] ^= 0xFF  # flip pixel bits inside the stored array
    data_file.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=rf"{data_file.name} is damaged.*delete it"):
        read_image_folder(src, cache_dir=cache, progress=False)
    data_file.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"is damaged.*delete"):
        read_image_folder(src, cache_dir=cache, progress=False)
    meta = next(cache.glob("*.json"))
    meta.write_text("{not json")
    with pytest.raises(DataError, match=rf"{meta.name} is damaged"):
        read_image_folder(src, cache_dir=cache, progress=False)
    assert not list(cache.glob("*.tmp"))


# --- CIFAR pickles -------------------------------------------------------------------------


def _cifar_data(n, rng):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def make_cifar10(root: Path, n=4) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"data": _cifar_data(n, rng),
            b"labels": [i % 3 for i in range(n)],
        }
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"cat", b"dog", b"emu"], b"num_vis": 3072}, f)
    return d


def make_cifar100(root: Path, n=6) -> Path:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ("train", "test"):
        batch = {
            b"data": _cifar_data(n, rng),
            b"fine_labels": [i % 4 for i in range(n)],
            b"coarse_labels": [i % 2 for i in range(n)],
        }
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    meta = {b"fine_label_names": [b"f0", b"f1", b"f2", b"f3"], b"coarse_label_names": [b"c0", b"c1"]}
    with open(d / "meta", "wb") as f:
        pickle.dump(meta, f)
    return d


def test_cifar10_pickles(tmp_path):
    folder = make_cifar10(tmp_path)
    d = load(tmp_path, normalize="none", val_fraction=0)
    assert d.name == "cifar10" and d.classes == ["cat", "dog", "emu"]
    assert d.input_shape == (3, 32, 32) and (len(d.train), len(d.test)) == (20, 4)
    test = load_pickle(folder / "test_batch")
    expected = test[b"data"].reshape(-1, 3, 32, 32)
    assert torch.equal((d.test.x * 255).round().to(torch.uint8), torch.from_numpy(expected))
    assert d.test.y.tolist() == test[b"labels"]
    assert load(folder).preprocessing["mode"] == "channel"


def test_cifar100_fine_and_coarse(tmp_path):
    make_cifar100(tmp_path)
    fine = load(tmp_path / "cifar-100-python", val_fraction=0)
    coarse = load(tmp_path, label_set="coarse", val_fraction=0)
    assert fine.classes == ["f0", "f1", "f2", "f3"] and fine.name == "cifar100"
    assert coarse.classes == ["c0", "c1"] and coarse.name == "cifar100-coarse"
    assert coarse.train.y.tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.raises(DataError, match="label_set must be"):
        load(tmp_path, label_set="medium")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_malicious_pickle(tmp_path):
    folder = make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": []}, f)
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        load(tmp_path)
    assert not marker.exists()
    blob = pickle.dumps({b"f": Path("x")})
    with pytest.raises(DataError, match="refusing to unpickle pathlib"):
        RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()


def test_truncated_cifar_file(tmp_path):
    folder = make_cifar10(tmp_path)
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:100])
    with pytest.raises(DataError, match=r"cannot unpickle CIFAR file .*test_batch"):
        load(folder)


# --- apply_preprocessing -------------------------------------------------------------------


def test_apply_preprocessing_reproduces_test_split(tmp_path):
    src = make_folder(tmp_path / "ds", SPLIT)
    d = load(src, cache_dir=tmp_path / "c", progress=False)
    paths = sorted((src / "test" / "a").glob("*.png")) + sorted((src / "test" / "b").glob("*.png"))
    raw = read_image_files(paths, progress=False)  # NHWC uint8
    assert torch.equal(apply_preprocessing(raw, d.preprocessing), d.test.x)
    assert torch.equal(apply_preprocessing(raw.transpose(0, 3, 1, 2), d.preprocessing), d.test.x)
    assert torch.equal(apply_preprocessing(raw[0], d.preprocessing), d.test.x[:1])
    assert torch.equal(apply_preprocessing(paths, d.preprocessing), d.test.x)
    with pytest.raises(DataError, match="resize them to 4x6"):
        apply_preprocessing(np.zeros((1, 8, 8, 3), np.uint8), d.preprocessing)


def test_apply_preprocessing_resizes_like_the_loader(tmp_path):
    src = make_folder(tmp_path / "ds", SPLIT, size=(10, 12))
    d = load(src, image_size=(5, 6), cache_dir=tmp_path / "c", progress=False)
    paths = sorted((src / "test" / "a").glob("*.png")) + sorted((src / "test" / "b").glob("*.png"))
    raw = read_image_files(paths, progress=False)
    assert raw.shape[1:3] == (10, 12)
    assert torch.equal(apply_preprocessing(raw, d.preprocessing), d.test.x)


def test_apply_preprocessing_features_and_digits():
    x, y = two_class_arrays(10)
    x_test = np.array([[1.0], [3.0]], dtype=np.float32)
    d = load({"x": x, "y": y, "x_test": x_test, "y_test": [0, 1]})
    assert torch.equal(apply_preprocessing(x_test, d.preprocessing), d.test.x)
    assert torch.equal(apply_preprocessing(x_test[0], d.preprocessing), d.test.x[:1])
    with pytest.raises(DataError, match="expected"):
        apply_preprocessing(np.zeros((2, 3)), d.preprocessing)
    from sklearn.datasets import load_digits

    digits = load("digits")
    images = load_digits().images
    out = apply_preprocessing(images, digits.preprocessing)  # [N, 8, 8] grey batch
    assert out.shape == (1797, 1, 8, 8)
    assert torch.equal(apply_preprocessing(images.reshape(-1, 64), digits.preprocessing), out)
    # every test row is one of the prepared rows
    assert any(torch.equal(digits.test.x[0], row) for row in out)


# --- real data -----------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_cifar10_jpg_archive(tmp_path_factory):
    archive = SHARED_DATA / "cifar10-jpg.tar.gz"
    if not archive.exists():
        pytest.skip(f"real data not found at {archive.resolve()} (../shared/data is absent)")
    cache = tmp_path_factory.mktemp("cifar-cache")
    t0 = time.perf_counter()
    raw = read_image_folder(archive, cache_dir=cache, progress=False)
    t1 = time.perf_counter()
    raw2 = read_image_folder(archive, cache_dir=cache, progress=False)
    t2 = time.perf_counter()
    print(f"\ncifar10-jpg: first decode {t1 - t0:.1f} s, cached reload {t2 - t1:.2f} s")
    assert raw.splits["train"][0].shape == (50000, 3, 32, 32)
    assert raw.splits["test"][0].shape == (10000, 3, 32, 32)
    assert np.array_equal(raw.splits["test"][0], raw2.splits["test"][0])
    assert t2 - t1 < 2.0
    d = load(archive, cache_dir=cache, progress=False)
    assert d.classes[:3] == ["airplane", "automobile", "bird"] and d.num_classes == 10
    assert len(d.train) + len(d.val) == 50000 and len(d.test) == 10000
    assert d.input_shape == (3, 32, 32) and d.train.x.dtype == torch.float32
    assert torch.bincount(d.test.y).tolist() == [1000] * 10
