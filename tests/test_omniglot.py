"""Tests for branchnet.data.omniglot: reading archives and folders, the cache, scaling, splits and
writing one-shot runs. Synthetic alphabets are built in tmp_path in the exact Omniglot layout."""

from __future__ import annotations

import io
import json
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from branchnet.data import images as images_mod
from branchnet.data.dataset import DataError
from branchnet.data.omniglot import (
    OmniglotSet,
    load_omniglot,
    make_oneshot_runs,
    scale_images,
    split_by_alphabet,
    split_by_character,
)

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT_DIR = (REPO / ".." / "shared" / "data" / "omniglot").resolve()


# --- synthetic Omniglot ----------------------------------------------------------------------


def character_image(alphabet: int, char: int, drawer: int, size: int) -> np.ndarray:
    """A binary image (strokes 0 on paper 255): a per-character random pattern, with a few
    pixels flipped per drawer, so drawings of one character are close and characters far apart."""
    base = np.random.default_rng([alphabet, char]).random((size, size)) < 0.2
    flip = np.random.default_rng([alphabet, char, drawer]).random((size, size)) < 0.01
    return np.where(base ^ flip, 0, 255).astype(np.uint8)


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def omniglot_members(spec: dict[str, int], drawers: int = 4, size: int = 12,
                     top: str = "images_background") -> dict[str, bytes]:
    """``{member path: png bytes}``: ``spec`` maps alphabet name -> number of characters."""
    out = {}
    image_id = 1
    for ai, (alphabet, n_chars) in enumerate(spec.items()):
        for c in range(1, n_chars + 1):
            for d in range(1, drawers + 1):
                rel = f"{alphabet}/character{c:02d}/{image_id:04d}_{d:02d}.png"
                out[f"{top}/{rel}" if top else rel] = png_bytes(character_image(ai, c, d, size))
            image_id += 1
    return out


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def write_dir(root: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def write_omniglot(tmp: Path, spec: dict[str, int], drawers: int = 4, size: int = 12,
                   name: str = "omni.zip") -> Path:
    """A zip archive in the Omniglot layout (see :func:`omniglot_members`)."""
    return write_zip(tmp / name, omniglot_members(spec, drawers, size))


SPEC = {"Greek": 3, "Alpha": 2}


# --- reading -------------------------------------------------------------------------------


def test_load_zip_arrays_labels_and_names(tmp_path):
    z = write_omniglot(tmp_path, SPEC, drawers=3)
    s = load_omniglot(z, image_size=None, cache_dir=tmp_path / "c")
    assert s.x.shape == (15, 1, 12, 12) and s.x.dtype == np.uint8
    assert s.alphabets == ["Alpha", "Greek"]
    assert s.characters == ["Alpha/character01", "Alpha/character02", "Greek/character01",
                            "Greek/character02", "Greek/character03"]
    assert s.character.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert s.alphabet.tolist() == [0] * 6 + [1] * 9
    assert s.drawer.tolist() == [1, 2, 3] * 5
    # pixels as drawn: Greek character02, drawer 3 (Greek is alphabet 0 of the spec)
    assert np.array_equal(s.x[11, 0], character_image(0, 2, 3, 12))
    assert set(np.unique(s.x).tolist()) == {0, 255}
    assert s.counts() == {"Alpha": {"characters": 2, "images": 6}, "Greek": {"characters": 3, "images": 9}}


def test_directory_equals_zip_and_resizing(tmp_path):
    members = omniglot_members(SPEC, drawers=2, size=105)
    z = write_zip(tmp_path / "o.zip", members)
    d = write_dir(tmp_path / "extracted", members)
    a = load_omniglot(z, image_size=28, cache_dir=tmp_path / "c")
    b = load_omniglot(d / "images_background", image_size=28, cache_dir=tmp_path / "c")
    assert a.x.shape == (10, 1, 28, 28)
    assert np.array_equal(a.x, b.x) and a.characters == b.characters
    assert np.array_equal(a.drawer, b.drawer)
    native = load_omniglot(z, cache_dir=tmp_path / "c")  # default 105: no resize
    assert native.x.shape == (10, 1, 105, 105) and native.image_size == 105


def test_cache_is_used_and_keyed_by_size(tmp_path, monkeypatch):
    z = write_omniglot(tmp_path, SPEC)
    cache = tmp_path / "cache"
    first = load_omniglot(z, image_size=8, cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 1 and not list(cache.glob("*.pkl"))

    def fail(*a, **k):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(images_mod, "decode_many", fail)
    again = load_omniglot(z, image_size=8, cache_dir=cache)
    assert np.array_equal(first.x, again.x) and first.characters == again.characters
    with pytest.raises(AssertionError, match="decoded again"):
        load_omniglot(z, image_size=10, cache_dir=cache)  # another size: another key


def test_sources_merge_duplicates_and_order(tmp_path):
    a = write_zip(tmp_path / "a.zip", omniglot_members({"Greek": 2, "Latin": 2}, top="small1"))
    b = write_zip(tmp_path / "b.zip", omniglot_members({"Greek": 2, "Korean": 3}, top="small2"))
    s = load_omniglot([a, b], image_size=None, cache_dir=tmp_path / "c")
    assert s.alphabets == ["Greek", "Korean", "Latin"]
    assert len(s.characters) == 7 and len(s) == 7 * 4
    assert s.info["duplicates"] == 2 * 4  # Greek is in both, byte for byte
    t = load_omniglot([b, a], image_size=None, cache_dir=tmp_path / "c2")
    assert np.array_equal(s.x, t.x) and s.characters == t.characters


def test_conflicting_duplicate_is_an_error(tmp_path):
    a = write_zip(tmp_path / "a.zip", omniglot_members({"Greek": 1}))
    members = omniglot_members({"Greek": 1})
    first = next(iter(members))
    members[first] = png_bytes(np.zeros((12, 12), np.uint8))
    b = write_zip(tmp_path / "b.zip", members)
    with pytest.raises(DataError, match="different contents"):
        load_omniglot([a, b], image_size=None, cache_dir=tmp_path / "c")


def test_missing_and_malformed_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_omniglot(tmp_path / "nope.zip", cache_dir=tmp_path / "c")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="neither a folder nor an archive"):
        load_omniglot(tmp_path / "notes.txt", cache_dir=tmp_path / "c")
    empty = write_zip(tmp_path / "empty.zip", {"top/readme.txt": b"hi"})
    with pytest.raises(DataError, match=r"no \.png images"):
        load_omniglot(empty, cache_dir=tmp_path / "c")
    png = png_bytes(character_image(0, 1, 1, 12))
    flat = write_zip(tmp_path / "flat.zip", {"Greek/0001_01.png": png, "Latin/0002_01.png": png})
    with pytest.raises(DataError, match="does not fit the Omniglot layout"):
        load_omniglot(flat, cache_dir=tmp_path / "c")
    badname = write_zip(tmp_path / "bad.zip", {"t/Greek/character01/first.png": png,
                                               "t/Greek/character01/0001_02.png": png})
    with pytest.raises(DataError, match=r"is not <id>_<drawer>\.png"):
        load_omniglot(badname, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="image_size"):
        load_omniglot(write_omniglot(tmp_path, SPEC), image_size=0, cache_dir=tmp_path / "c")


# --- scaling and splits --------------------------------------------------------------------


def test_scale_images_maps_to_minus_one_one_and_refuses_floats():
    x = np.array([[0, 127, 255]], dtype=np.uint8)
    out = scale_images(x)
    assert out.dtype == torch.float32
    assert out.tolist()[0][0] == -1.0 and out.tolist()[0][2] == 1.0
    assert abs(out.tolist()[0][1] - (127 / 127.5 - 1)) < 1e-7
    with pytest.raises(DataError, match="uint8"):
        scale_images(out)


def test_subset_renumbers_labels(tmp_path):
    s = load_omniglot(write_omniglot(tmp_path, SPEC), image_size=None, cache_dir=tmp_path / "c")
    greek = s.select_alphabets(["Greek"])
    assert greek.alphabets == ["Greek"] and greek.characters[0] == "Greek/character01"
    assert greek.character.min() == 0 and greek.character.max() == 2
    assert np.array_equal(greek.x, s.x[s.alphabet == 1])
    with pytest.raises(DataError, match="unknown alphabet"):
        s.select_alphabets(["Klingon"])
    with pytest.raises(DataError, match="boolean mask"):
        s.subset(np.ones(3, dtype=bool))


def test_split_by_alphabet(tmp_path):
    s = load_omniglot(write_omniglot(tmp_path, {"A": 2, "B": 2, "C": 3, "D": 2}),
                      image_size=None, cache_dir=tmp_path / "c")
    bg, ev = split_by_alphabet(s, ["B", "D"])
    assert bg.alphabets == ["A", "C"] and ev.alphabets == ["B", "D"]
    assert len(bg) + len(ev) == len(s)
    bg2, ev2 = split_by_alphabet(s, 2, seed=3)
    assert len(ev2.alphabets) == 2 and not set(bg2.alphabets) & set(ev2.alphabets)
    assert split_by_alphabet(s, 2, seed=3)[1].alphabets == ev2.alphabets  # seeded
    for bad in (0, 4, ["A", "B", "C", "D"], ["Z"]):
        with pytest.raises(DataError):
            split_by_alphabet(s, bad)


def test_split_by_character_keeps_drawers_together(tmp_path):
    s = load_omniglot(write_omniglot(tmp_path, {"A": 5, "B": 4}), image_size=None, cache_dir=tmp_path / "c")
    tr, ho = split_by_character(s, 0.25, seed=1)
    assert not set(tr.characters) & set(ho.characters)
    assert len(tr) + len(ho) == len(s)
    assert tr.alphabets == ["A", "B"] and ho.alphabets == ["A", "B"]  # per alphabet
    assert len(ho.characters) == 1 + 1  # round(0.25 * 5) = 1, round(0.25 * 4) = 1
    assert np.bincount(ho.character).tolist() == [4] * len(ho.characters)  # every drawer
    with pytest.raises(DataError, match="held_out_fraction"):
        split_by_character(s, 1.0)


# --- one-shot runs -------------------------------------------------------------------------


def test_make_oneshot_runs_layout(tmp_path):
    s = load_omniglot(write_omniglot(tmp_path, {"A": 6, "B": 5, "Small": 3}, drawers=4),
                      image_size=None, cache_dir=tmp_path / "c")
    out = tmp_path / "runs"
    manifest = make_oneshot_runs(s, out, n_runs=4, ways=5, seed=0)
    assert [m["run"] for m in manifest] == ["run01", "run02", "run03", "run04"]
    meta = json.loads((out / "runs.json").read_text())
    assert meta["skipped_alphabets"] == {"Small": 3}
    assert sorted(m["alphabet"] for m in manifest) == ["A", "A", "B", "B"]  # cycles evenly
    for m in manifest:
        run = out / m["run"]
        assert m["train_drawer"] != m["test_drawer"]
        lines = (run / "class_labels.txt").read_text().splitlines()
        assert len(lines) == 5
        names = sorted(p.name for p in (run / "training").iterdir())
        assert names == [f"class{i:02d}.png" for i in range(1, 6)]
        assert sorted(p.name for p in (run / "test").iterdir()) == [f"item{i:02d}.png" for i in range(1, 6)]
        assert len({m["characters"][k].split("/")[0] for k in m["characters"]}) == 1  # one alphabet
        for line in lines:
            test_rel, train_rel = line.split()
            assert re.fullmatch(rf"{m['run']}/test/item\d\d\.png", test_rel)
            assert re.fullmatch(rf"{m['run']}/training/class\d\d\.png", train_rel)
            char = s.characters.index(m["characters"][Path(train_rel).stem])
            test_img = np.asarray(Image.open(out / test_rel))
            train_img = np.asarray(Image.open(out / train_rel))
            rows = s.character == char
            assert np.array_equal(train_img, s.x[rows & (s.drawer == m["train_drawer"])][0, 0])
            assert np.array_equal(test_img, s.x[rows & (s.drawer == m["test_drawer"])][0, 0])
    with pytest.raises(DataError, match="already holds"):
        make_oneshot_runs(s, out, n_runs=2, ways=5)
    make_oneshot_runs(s, out, n_runs=2, ways=5, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["run01", "run02", "runs.json"]


def test_make_oneshot_runs_needs_an_alphabet_with_enough_characters(tmp_path):
    s = load_omniglot(write_omniglot(tmp_path, {"A": 3, "B": 4}), image_size=None, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="no alphabet has 5 characters"):
        make_oneshot_runs(s, tmp_path / "runs", ways=5)
    with pytest.raises(DataError, match="n_runs"):
        make_oneshot_runs(s, tmp_path / "runs", n_runs=0, ways=3)


def test_omniglot_set_checks_lengths():
    with pytest.raises(DataError, match="character has 1 rows"):
        OmniglotSet(np.zeros((2, 1, 2, 2), np.uint8), np.zeros(1), np.zeros(2), np.zeros(2), [], [])


# --- real data -----------------------------------------------------------------------------


def _real_dir() -> Path:
    d = OMNIGLOT_DIR
    if (d / "images_background_small1.zip").is_file() and (d / "images_background_small2.zip").is_file():
        return d
    pytest.skip(f"real Omniglot zips not found in {d} (../shared/data/omniglot is absent)")


@pytest.mark.realdata
def test_real_omniglot_zips(tmp_path_factory):
    d = _real_dir()
    cache = tmp_path_factory.mktemp("omniglot-cache")
    zips = [d / "images_background_small1.zip", d / "images_background_small2.zip"]
    s1 = load_omniglot(zips[0], image_size=28, cache_dir=cache)
    assert s1.counts() == {
        "Balinese": {"characters": 24, "images": 480}, "Early_Aramaic": {"characters": 22, "images": 440},
        "Greek": {"characters": 24, "images": 480}, "Korean": {"characters": 40, "images": 800},
        "Latin": {"characters": 26, "images": 520},
    }
    s2 = load_omniglot(zips[1], image_size=28, cache_dir=cache)
    assert {a: c["characters"] for a, c in s2.counts().items()} == {
        "Greek": 24, "Japanese_(katakana)": 47, "Latin": 26, "Sanskrit": 42, "Tagalog": 17}
    t0 = time.perf_counter()
    both = load_omniglot(zips, image_size=28, cache_dir=cache)
    t1 = time.perf_counter()
    both_again = load_omniglot(zips, image_size=28, cache_dir=cache)
    assert time.perf_counter() - t1 < 2.0
    print(f"\nOmniglot small1+small2 at 28 px: decode {t1 - t0:.1f} s")
    # Greek and Latin are in both archives, byte for byte: kept once
    assert len(both.alphabets) == 8 and len(both.characters) == 242 and len(both) == 4840
    assert both.info["duplicates"] == 1000
    assert both.x.shape == (4840, 1, 28, 28) and np.array_equal(both.x, both_again.x)
    assert np.bincount(both.drawer).tolist() == [0] + [242] * 20
    assert both.x.mean() > 200  # mostly white paper, black strokes
    _, held = split_by_alphabet(both, ["Japanese_(katakana)", "Sanskrit", "Tagalog"])
    out = tmp_path_factory.mktemp("runs")
    manifest = make_oneshot_runs(held, out, n_runs=20, ways=20, seed=0)
    assert len(manifest) == 20 and {m["alphabet"] for m in manifest} == {"Japanese_(katakana)", "Sanskrit"}
    assert json.loads((out / "runs.json").read_text())["skipped_alphabets"] == {"Tagalog": 17}
    from branchnet.virtual.oneshot import read_oneshot_runs

    runs = read_oneshot_runs(out, image_size=28)
    assert len(runs) == 20 and all(r.ways == 20 and len(r.test_x) == 20 for r in runs)
