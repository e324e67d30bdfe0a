"""Text classification files: JSON lines or CSV with a header, optionally gzipped, one example a
row (a text column, a label column, optionally a group column).

Labels are strings (other JSON scalars are turned into strings) and the classes are the sorted
distinct labels of the training file. Every problem is one :class:`DataError` line naming the
file, the line and the value.

Example:
    >>> import json, tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> rows = [{"text": "a cat", "label": "pet"}, {"text": "an oak", "label": "tree"}]
    >>> _ = (folder / "tiny.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
    >>> raw = read_text(folder / "tiny.jsonl")
    >>> raw.name, raw.classes, raw.splits["train"][0].tolist(), raw.splits["train"][1].tolist()
    ('tiny', ['pet', 'tree'], ['a cat', 'an oak'], [0, 1])
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from branchnet.data.errors import DataError
from branchnet.data.prepare import RawData
from branchnet.data.texts import Texts

#: the file name endings of text classification files
TEXT_SUFFIXES = (".jsonl.gz", ".csv.gz", ".jsonl", ".csv")
_SHOW_CHARS = 80


def is_text_file(path: str | Path) -> bool:
    """Whether ``path`` names a text classification file (by its ending).

    >>> is_text_file("a/train.jsonl.gz"), is_text_file("x.CSV"), is_text_file("x.npz")
    (True, True, False)
    """
    return Path(path).name.lower().endswith(TEXT_SUFFIXES)


def _stem(path: Path) -> str:
    """The file name without its text-file ending: ``train.jsonl.gz`` -> ``train``."""
    suffix = next(s for s in TEXT_SUFFIXES if path.name.lower().endswith(s))
    return path.name[: -len(suffix)]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS] + "..."


@dataclass(frozen=True)
class _Row:
    where: str  # "FILE, line N"
    text: str
    label: str
    group: str | None


def _open(path: Path) -> IO[str]:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _json_records(f: IO[str], path: Path) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}, line {n}: malformed JSON ({e.msg}, column {e.colno}): {_show(line.strip())}"
            ) from None


def _csv_records(f: IO[str], path: Path, columns: list[str]) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(f)
    if reader.fieldnames is None:  # an empty file
        return
    missing = [c for c in columns if c not in reader.fieldnames]
    if missing:
        raise DataError(
            f"don't know how to read {path} as text data: its header (line 1) has no column "
            f"{missing[0]!r}; its columns are {reader.fieldnames}"
        )
    last = reader.line_num
    for rec in reader:  # short rows lack columns; the cells of long rows (key None) are ignored
        yield last + 1, {k: v for k, v in rec.items() if k is not None and v is not None}
        last = reader.line_num


def _category(value: Any, column: str, where: str) -> str:
    """A label or group value as a non-empty string."""
    if value is None:
        raise DataError(f"{where}: column {column!r} is missing (null)")
    if isinstance(value, (dict, list)):
        raise DataError(f"{where}: column {column!r} must be a string or a number, got {_show(value)}")
    text = value if isinstance(value, str) else json.dumps(value)
    if not text.strip():
        raise DataError(f"{where}: column {column!r} is empty ({_show(text)})")
    return text


def _text(rec: Any, where: str, *columns: str | None) -> str:
    """The text of a record (its first column) once it has every one of ``columns``."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object with columns, got {_show(rec)}")
    for column in columns:
        if column is not None and column not in rec:  # a JSON object or a short CSV row
            raise DataError(f"{where}: no column {column!r}; the row has columns {list(rec)}")
    text = rec[columns[0]]
    if not isinstance(text, str):
        raise DataError(
            f"{where}: column {columns[0]!r} is {type(text).__name__} {_show(text)}, not a string"
        )
    if not text.strip():
        raise DataError(f"{where}: column {columns[0]!r} is empty ({_show(text)})")
    return text


def _row(rec: Any, where: str, text_column: str, label_column: str, group_column: str | None) -> _Row:
    text = _text(rec, where, text_column, label_column, group_column)
    label = _category(rec[label_column], label_column, where)
    group = None if group_column is None else _category(rec[group_column], group_column, where)
    return _Row(where, text, label, group)


def _records(path: Path, columns: list[str]) -> Iterator[tuple[int, Any]]:
    """``(line, record)`` of a text file (JSON lines or CSV, maybe gzipped), opened and checked."""
    if not is_text_file(path):
        raise DataError(
            f"don't know how to read {path} as a text file; text files end in "
            f"{', '.join(sorted(TEXT_SUFFIXES))}"
        )
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    try:
        with _open(path) as f:
            yield from (_csv_records(f, path, columns) if _is_csv(path)
                        else _json_records(f, path))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _is_csv(path: Path) -> bool:
    return path.name.lower().endswith((".csv", ".csv.gz"))


def read_texts(path: str | Path, text_column: str = "text") -> Texts:
    """The texts of a text file's ``text_column``, no labels needed (what ``tree predict``
    routes), checked as :func:`read_text` checks them."""
    path = Path(path)
    return Texts(_text(rec, f"{path}, line {n}", text_column)
                 for n, rec in _records(path, [text_column]))


def _read_rows(path: Path, text_column: str, label_column: str, group_column: str | None) -> list[_Row]:
    columns = [c for c in (text_column, label_column, group_column) if c is not None]
    rows = [_row(rec, f"{path}, line {n}", text_column, label_column, group_column)
            for n, rec in _records(path, columns)]
    if not rows:
        layout = "a CSV header and rows" if _is_csv(path) else "one JSON object a line"
        raise DataError(f"{path} has no rows; expected {layout} with columns "
                        f"{text_column!r} and {label_column!r}")
    return rows


def _split(rows: list[_Row], index: dict[str, int]) -> tuple[Texts, np.ndarray]:
    return Texts(r.text for r in rows), np.array([index[r.label] for r in rows], dtype=np.int64)


def _groups(rows: list[_Row], classes: list[str]) -> dict[str, list[str]]:
    """Group name (sorted) -> its classes (in class order); a label in two groups is an error."""
    first: dict[str, _Row] = {}
    for r in rows:
        seen = first.setdefault(r.label, r)
        if seen.group != r.group:
            raise DataError(
                f"{r.where}: label {r.label!r} is in group {r.group!r} here but in group "
                f"{seen.group!r} at {seen.where}; each label must belong to exactly one group"
            )
    group_of = {c: str(first[c].group) for c in classes}
    return {g: [c for c in classes if group_of[c] == g] for g in sorted(set(group_of.values()))}


def read_text(
    path: str | Path,
    test_path: str | Path | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
) -> RawData:
    """Read a text classification file (and a separate test file in the same format) as
    :class:`RawData` of ``kind="text"``: a train split (and a test split), the classes, and,
    with ``group_column``, the groups of classes."""
    path = Path(path).expanduser()
    train = _read_rows(path, text_column, label_column, group_column)
    classes = sorted({r.label for r in train})
    index = {c: i for i, c in enumerate(classes)}
    splits = {"train": _split(train, index)}
    test: list[_Row] = []
    if test_path is not None:
        test_path = Path(test_path).expanduser()
        test = _read_rows(test_path, text_column, label_column, group_column)
        for r in test:
            if r.label not in index:
                raise DataError(
                    f"{r.where}: label {r.label!r} is not a class of the training file {path}; "
                    f"its classes are {classes}"
                )
        splits["test"] = _split(test, index)
    return RawData(
        splits=splits,
        classes=classes,
        name=_stem(path),
        kind="text",
        default_normalize="none",
        info={"text_column": text_column, "label_column": label_column},
        groups=_groups(train + test, classes) if group_column is not None else None,
    )
