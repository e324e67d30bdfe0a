"""Text classification data: :class:`Texts`, text splits, and text files read by ``load``."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from branchnet.data import Data, DataError, Split, Texts, load

SHARED_TEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "text"

# three classes in two groups, 20 rows each
ROWS = [{"text": f"{label} text number {i}", "label": label, "group": group}
        for label, group in (("cat", "animal"), ("oak", "plant"), ("dog", "animal"))
        for i in range(20)]


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as JSON lines or CSV (columns of the first row), gzipped for ``.gz``."""
    if ".csv" in path.name:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


# --- Texts ---------------------------------------------------------------------------------


def test_texts_check_their_items() -> None:
    with pytest.raises(DataError, match=r"^text #1 is int, not a string$"):
        Texts(["a", 3])
    with pytest.raises(DataError, match=r"^f.jsonl: text #2 is empty$"):
        Texts(["a", "b", " \t"], where="f.jsonl")
    with pytest.raises(DataError, match="text #0 is empty"):
        Texts([""])
    assert len(Texts()) == 0 and Texts(iter(["x"])).tolist() == ["x"]


def test_texts_index_like_a_tensor() -> None:
    t = Texts(["a", "b", "c", "d"])
    assert t[0] == "a" and t[-1] == "d" and t[np.int64(2)] == "c" and t[torch.tensor(1)] == "b"
    assert t[1:3] == Texts(["b", "c"]) and t[::-1].tolist() == ["d", "c", "b", "a"]
    assert t[[3, 0, 3]].tolist() == ["d", "a", "d"]
    assert t[np.array([-1, 1])].tolist() == ["d", "b"]
    assert t[torch.tensor([2, 0])].tolist() == ["c", "a"]
    assert t[np.array([True, False, False, True])].tolist() == ["a", "d"]
    assert t[torch.tensor([False, True, True, False])].tolist() == ["b", "c"]
    assert t[[]].tolist() == [] and isinstance(t[torch.tensor([], dtype=torch.long)], Texts)
    for bad in (4, -5, [0, 4], torch.tensor([-5])):
        with pytest.raises(IndexError, match="out of range for 4 texts"):
            t[bad]
    with pytest.raises(IndexError, match="does not match 4 texts"):
        t[torch.tensor([True, False])]
    with pytest.raises(IndexError, match="integer index or boolean mask"):
        t[np.array([0.5])]
    with pytest.raises(TypeError, match="got str"):
        t["a"]
    with pytest.raises(TypeError):
        t[0] = "z"  # type: ignore[index]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(min_size=1).filter(str.strip), min_size=1, max_size=12), st.data())
def test_texts_indexing_agrees_with_numpy(items: list[str], data: st.DataObject) -> None:
    n = len(items)
    texts, positions = Texts(items), np.arange(n)
    if data.draw(st.booleans(), label="mask"):
        index = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    else:
        index = np.array(data.draw(st.lists(st.integers(-n, n - 1), max_size=20)), dtype=np.int64)
    expected = [items[i] for i in positions[index]]
    assert texts[index].tolist() == expected
    assert texts[torch.from_numpy(index)].tolist() == expected
    assert texts[index.tolist()].tolist() == expected


def test_texts_shape_fingerprint_and_equality() -> None:
    t = Texts(["ab", "c"])
    assert t.shape == torch.Size([2]) and t.shape[0] == 2 and t.shape[1:] == ()
    assert t.fingerprint == Texts(["ab", "c"]).fingerprint and len(t.fingerprint) == 16
    assert t.fingerprint is t.fingerprint  # computed once
    assert t.fingerprint != Texts(["a", "bc"]).fingerprint  # length-prefixed
    assert t.fingerprint != Texts(["c", "ab"]).fingerprint  # order matters
    assert t.fingerprint != Texts(["ab", "d"]).fingerprint
    assert t == Texts(["ab", "c"]) and t != Texts(["ab"]) and t != ["ab", "c"]
    assert hash(t) == hash(Texts(["ab", "c"])) and "c" in t and t.index("c") == 1
    assert repr(Texts(["x" * 100, "y"])) == f"Texts(2 texts, first {'x' * 40 + '...'!r})"


# --- Split and Data ------------------------------------------------------------------------


def test_split_of_texts() -> None:
    s = Split(["a", "b", "c", "d"], [0, 1, 0, 1])
    assert s.is_text and isinstance(s.x, Texts) and not Split(torch.zeros(2, 1), [0, 1]).is_text
    assert Split(("a", "b"), [0, 1]).x == Texts(["a", "b"])
    assert s.subset(torch.tensor([3, 0])).x.tolist() == ["d", "a"]
    assert s.subset(s.y == 1).x.tolist() == ["b", "d"]
    rest, held = s.split(0.5, seed=0)
    assert sorted(held.y.tolist()) == [0, 1] and sorted(rest.x.tolist() + held.x.tolist()) == list("abcd")
    r = s.relabel({1: 0})
    assert r.x.tolist() == ["b", "d"] and r.y.tolist() == [0, 0]
    with pytest.raises(DataError, match="x has 4 rows but y has 3 labels"):
        Split(["a", "b", "c", "d"], [0, 1, 0])


def test_split_fingerprint_of_texts() -> None:
    s = Split(["a", "b"], [0, 1])
    assert s.fingerprint == Split(["a", "b"], [0, 1]).fingerprint
    assert s.fingerprint != Split(["a", "b"], [1, 0]).fingerprint
    assert s.fingerprint != Split(["b", "a"], [0, 1]).fingerprint
    assert s.fingerprint != s.x.fingerprint


def test_data_of_texts_with_groups() -> None:
    s = Split(["a", "b", "c"], [0, 1, 2])
    d = Data(s, s, s, ["x", "y", "z"], name="t", groups={"g": ["x", "z"], "h": ["y"]})
    assert d.input_shape == () and d.summary() == "t: 3 classes, text, train 3 / val 3 / test 3"
    kept = d.select_classes(["z", "x"])
    assert kept.groups == {"g": ["z", "x"]} and kept.train.x.tolist() == ["a", "c"]
    assert kept.train.y.tolist() == [1, 0]
    assert d.select_classes(["y"]).groups == {"h": ["y"]}
    assert Data(s, s, s, ["x", "y", "z"]).select_classes(["y"]).groups is None


# --- files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".csv", ".csv.gz"])
def test_every_format_loads_the_same(tmp_path: Path, suffix: str) -> None:
    d = load(write(tmp_path / f"pets{suffix}", ROWS), seed=3, group_column="group")
    reference = load(write(tmp_path / "ref.jsonl", ROWS), seed=3, group_column="group")
    assert d.name == "pets" and d.classes == ["cat", "dog", "oak"]
    assert d.groups == {"animal": ["cat", "dog"], "plant": ["oak"]}
    assert d.preprocessing == {"layout": "text", "input_shape": [], "text_column": "text",
                               "label_column": "label"}
    for split in ("train", "val", "test"):
        a, b = d.splits()[split], reference.splits()[split]
        assert a.is_text and a.x == b.x and torch.equal(a.y, b.y) and a.y.dtype == torch.int64
    assert all(d.classes[int(y)] in x for x, y in zip(d.train.x, d.train.y, strict=True))


def test_splits_are_seeded_and_stratified(tmp_path: Path) -> None:
    path = write(tmp_path / "pets.jsonl", ROWS)
    d = load(path, seed=1, test_fraction=0.25, val_fraction=0.2)
    assert (len(d.train), len(d.val), len(d.test)) == (36, 9, 15)
    assert torch.bincount(d.test.y).tolist() == [5, 5, 5]
    assert torch.bincount(d.val.y).tolist() == [3, 3, 3]
    assert load(path, seed=1, test_fraction=0.25, val_fraction=0.2).test.x == d.test.x
    assert load(path, seed=2, test_fraction=0.25, val_fraction=0.2).test.x != d.test.x
    every = d.train.x.tolist() + d.val.x.tolist() + d.test.x.tolist()
    assert sorted(every) == sorted(r["text"] for r in ROWS)


def test_test_source_classes_and_max_per_class(tmp_path: Path) -> None:
    train = write(tmp_path / "train.csv", ROWS)
    test = write(tmp_path / "test.csv.gz", [{**r, "text": "held out " + r["text"]} for r in ROWS[::4]])
    d = load(train, test_source=test, val_fraction=0.25, group_column="group")
    assert len(d.test) == 15 and len(d.train) + len(d.val) == 60 and len(d.val) == 15
    assert all(x.startswith("held out") for x in d.test.x)
    assert torch.bincount(d.test.y).tolist() == [5, 5, 5]
    sub = load(train, test_source=test, classes=["oak", "cat"], max_per_class=8,
               group_column="group")
    assert sub.classes == ["oak", "cat"] and sub.groups == {"animal": ["cat"], "plant": ["oak"]}
    assert len(sub.train) + len(sub.val) == 16  # 8 of each class before val is split off
    assert [sub.classes[int(y)] in x for x, y in zip(sub.test.x, sub.test.y, strict=True)] == [True] * 10


def test_other_columns_and_scalar_labels(tmp_path: Path) -> None:
    rows = [{"body": f"row {i}", "y": i % 2 * 9 + 1, "kind": True} for i in range(10)]
    d = load(write(tmp_path / "n.jsonl", rows), text_column="body", label_column="y",
             group_column="kind", test_fraction=0.2, val_fraction=0.0)
    assert d.classes == ["1", "10"] and d.groups == {"true": ["1", "10"]}
    assert d.preprocessing["text_column"] == "body" and d.preprocessing["label_column"] == "y"
    assert len(d.val) == 0 and len(d.test) == 2


# --- errors --------------------------------------------------------------------------------


def _error(tmp_path: Path, name: str, rows: list[Any] | str, **kw: Any) -> str:
    path = tmp_path / name
    if isinstance(rows, str):
        path.write_text(rows)
    else:
        write(path, rows)
    with pytest.raises(DataError) as e:
        load(path, **kw)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


def test_row_errors_name_the_file_line_and_value(tmp_path: Path) -> None:
    ok = {"text": "fine", "label": "a", "group": "g"}
    m = _error(tmp_path, "a.jsonl", [ok, {"txt": "x", "label": "a"}])
    assert "line 2: no column 'text'; the row has columns ['txt', 'label']" in m
    m = _error(tmp_path, "b.jsonl", [ok, ok, {"text": "  ", "label": "a"}])
    assert "line 3: column 'text' is empty ('  ')" in m
    m = _error(tmp_path, "c.jsonl", [{"text": 12, "label": "a"}])
    assert "line 1: column 'text' is int 12, not a string" in m
    m = _error(tmp_path, "d.jsonl", [ok, {"text": "x", "label": None}])
    assert "line 2: column 'label' is missing (null)" in m
    m = _error(tmp_path, "e.jsonl", [{"text": "x", "label": ""}])
    assert "line 1: column 'label' is empty ('')" in m
    m = _error(tmp_path, "f.jsonl", [{"text": "x", "label": ["a"]}])
    assert "column 'label' must be a string or a number, got ['a']" in m
    m = _error(tmp_path, "g.jsonl", json.dumps(ok) + "\n\n{\"text\": oops}\n")
    assert "line 3: malformed JSON" in m and "oops" in m
    m = _error(tmp_path, "h.jsonl", "[1, 2]\n")
    assert "line 1: expected a JSON object with columns, got [1, 2]" in m
    m = _error(tmp_path, "i.jsonl", [ok, {"text": "y", "label": "a"}], group_column="group")
    assert "line 2: no column 'group'" in m


def test_csv_errors(tmp_path: Path) -> None:
    m = _error(tmp_path, "a.csv", "text,lbl\nhello,a\n")
    assert "header (line 1) has no column 'label'; its columns are ['text', 'lbl']" in m
    m = _error(tmp_path, "b.csv", "text,label\nhello,a\nshort\n")
    assert "line 3: no column 'label'; the row has columns ['text']" in m
    m = _error(tmp_path, "c.csv", 'text,label\nhello,a\n"two\nlines",a\n,a\n')
    assert "line 5: column 'text' is empty ('')" in m


def test_files_without_rows(tmp_path: Path) -> None:
    assert "has no rows" in _error(tmp_path, "a.jsonl", "")
    assert "has no rows" in _error(tmp_path, "b.jsonl", "\n \n")
    assert "has no rows" in _error(tmp_path, "c.csv", "text,label\n")
    assert "has no rows" in _error(tmp_path, "d.csv", "")
    (tmp_path / "e.jsonl.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(DataError, match=r"e\.jsonl\.gz has no rows"):
        load(tmp_path / "e.jsonl.gz")


def test_file_errors(tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DataError, match=r"don't know how to read .*test\.txt as a text file"):
        load(train, test_source=tmp_path / "test.txt")
    with pytest.raises(DataError, match=r"text file .*nowhere\.jsonl does not exist"):
        load(train, test_source=tmp_path / "nowhere.jsonl")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"cannot read .*bad\.jsonl\.gz"):
        load(tmp_path / "bad.jsonl.gz")
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9", "label": "a"}\n')
    with pytest.raises(DataError, match=r"cannot read .*latin\.jsonl"):
        load(tmp_path / "latin.jsonl")


def test_test_labels_must_be_training_classes(tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl", ROWS)
    test = write(tmp_path / "test.jsonl", [*ROWS[:2], {"text": "a fern", "label": "fern"}])
    with pytest.raises(DataError) as e:
        load(train, test_source=test)
    assert str(e.value) == (f"{test}, line 3: label 'fern' is not a class of the training file "
                            f"{train}; its classes are ['cat', 'dog', 'oak']")


def test_a_label_in_two_groups(tmp_path: Path) -> None:
    rows = [*ROWS, {"text": "a wild cat", "label": "cat", "group": "wild"}]
    m = _error(tmp_path, "t.jsonl", rows, group_column="group")
    assert "line 61: label 'cat' is in group 'wild' here but in group 'animal' at " in m
    assert "t.jsonl, line 1" in m


def test_options_that_do_not_apply(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", ROWS)
    for kw in ({"normalize": "feature"}, {"image_size": 8}):
        with pytest.raises(DataError, match="normalize and image_size do not apply to text"):
            load(path, **kw)
    with pytest.raises(DataError, match="image_mode only applies to image folders"):
        load(path, image_mode="L")
    with pytest.raises(DataError, match=r"^test_source, group_column apply only to text files"):
        load("digits", test_source=path, group_column="group")
    x, y = np.zeros((4, 2), dtype=np.float32), np.array([0, 1, 0, 1])
    with pytest.raises(DataError, match=r"^text_column applies only to text files .* not tuple$"):
        load((x, y), text_column="body")
    with pytest.raises(DataError, match="label_column applies only to text files"):
        load("digits", label_column="y")


# --- real data -----------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_debian_packages() -> None:
    train = SHARED_TEXT / "debian-packages-train.jsonl.gz"
    test = SHARED_TEXT / "debian-packages-test.jsonl.gz"
    if not (train.exists() and test.exists()):
        pytest.skip(f"real data not found at {SHARED_TEXT.resolve()} (../shared/data is absent)")
    d = load(train, test_source=test, group_column="group")
    assert d.name == "debian-packages-train" and d.num_classes == 16
    assert sorted(d.groups or {}) == ["media", "network", "science", "system"]
    assert sorted(c for cs in (d.groups or {}).values() for c in cs) == d.classes
    assert len(d.train) + len(d.val) == 6272 and len(d.test) == 2090
    assert d.summary().startswith("debian-packages-train: 16 classes, text, train ")
    counts = Counter(d.classes[int(y)] for y in d.train.y)
    assert counts.most_common(1)[0][0] == "net"
