"""One entry point, :func:`load`, for every supported data source.

Example:
    >>> data = load("digits", seed=0, progress=False)
    >>> data.summary()
    'digits: 10 classes, input (1, 8, 8), train 1293 / val 144 / test 360'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from branchnet.data.cifar import find_cifar_dir, read_cifar
from branchnet.data.dataset import Data, DataError, Split, restrict_groups, stratified_split
from branchnet.data.digits import read_digits
from branchnet.data.imagefolder import is_archive, read_image_folder
from branchnet.data.images import ImageSize, parse_size
from branchnet.data.prepare import (
    NORMALIZE_MODES,
    RawData,
    fit_normalization,
    normalize_,
    to_float,
)
from branchnet.data.text import is_text_file, read_text

ACCEPTED = (
    '"digits"; a CIFAR-10/100 python folder (cifar-10-batches-py, cifar-100-python); an '
    "ImageFolder directory or archive (.tar.gz, .tgz, .tar, .zip) with <class>/<image> or "
    "train|test|val/<class>/<image>; a .npz file with arrays x, y (optional classes); a text "
    "classification file (.jsonl, .jsonl.gz, .csv, .csv.gz) with a text and a label column; a "
    "tuple (x, y); or a dict with x, y (optional classes, x_test/y_test, x_val/y_val)"
)


# --- arrays --------------------------------------------------------------------------------


def _np(a: Any, what: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.dtype == object:
        raise DataError(f"{what} must be a numeric array, got objects (dtype=object)")
    return arr


def _images_nchw(x: np.ndarray) -> np.ndarray:
    """uint8 images [N, H, W], [N, H, W, C] or [N, C, H, W] (C in 1, 3, 4) -> [N, C, H, W]."""
    if x.ndim == 3:
        return x[:, None]
    if x.shape[1] in (1, 3, 4):
        return x
    if x.shape[3] in (1, 3, 4):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise DataError(
        f"uint8 images of shape {x.shape} have no channel axis of size 1, 3 or 4 at position 1 "
        "or 3; pass [N, C, H, W] or [N, H, W, C]"
    )


def _from_arrays(src: Mapping[str, Any], name: str) -> RawData:
    """Arrays -> RawData. uint8 with 3-4 dims are images (scale 1/255); else features as given."""
    if "x" not in src or "y" not in src:
        raise DataError(f"{name} needs arrays 'x' and 'y'; got keys {sorted(src)}")
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, suffix in (("train", ""), ("val", "_val"), ("test", "_test")):
        if f"x{suffix}" in src or f"y{suffix}" in src:
            if f"x{suffix}" not in src or f"y{suffix}" not in src:
                raise DataError(f"{name}: give both x{suffix} and y{suffix}, or neither")
            x = _np(src[f"x{suffix}"], f"x{suffix}")
            y = _np(src[f"y{suffix}"], f"y{suffix}")
            splits[split] = (x, y)
    x0 = splits["train"][0]
    image = x0.dtype == np.uint8 and x0.ndim in (3, 4)
    if image:
        splits = {k: (_images_nchw(x), y) for k, (x, y) in splits.items()}
    classes = src.get("classes")
    if classes is not None:
        classes = [str(c) for c in np.asarray(classes).tolist()]
    else:
        top = max((int(np.max(y)) for _, y in splits.values() if np.size(y)), default=-1)
        classes = [str(i) for i in range(top + 1)]
    return RawData(
        splits=splits,
        classes=classes,
        name=name,
        kind="image" if image else "features",
        scale=1.0 / 255.0 if image else 1.0,
        default_normalize="channel" if image else "feature",
        info={"image_mode": None, "resample": None},
    )


def _from_npz(path: Path) -> RawData:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        raise DataError(
            f"cannot read {path} without pickle ({e}); store plain numeric arrays x, y and a "
            "string array classes"
        ) from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    return _from_arrays(arrays, path.stem)


# --- validation and selection --------------------------------------------------------------


def _validate(raw: RawData) -> None:
    n_cls = len(raw.classes)
    if n_cls == 0:
        raise DataError(f"{raw.name}: no classes")
    for split, (x, y) in raw.splits.items():
        if y.ndim != 1:
            raise DataError(f"{raw.name}: {split} labels must be 1-D, got shape {y.shape}")
        if x.ndim < 2 and not (x.ndim == 1 and x.shape[0] == 0):
            raise DataError(
                f"{raw.name}: {split} inputs must be [N, ...] with at least 2 dims, got shape "
                f"{x.shape}; for one feature use x.reshape(-1, 1)"
            )
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"{raw.name}: {split} has {x.shape[0]} inputs but {y.shape[0]} labels; "
                "they must have the same length"
            )
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise DataError(f"{raw.name}: {split} inputs must be numeric, got dtype {x.dtype}")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
            raise DataError(f"{raw.name}: {bad} {split} input(s) contain NaN or infinite values")
        integral = np.issubdtype(y.dtype, np.number) and bool(np.all(np.mod(y, 1) == 0))
        if not np.issubdtype(y.dtype, np.integer) and not integral:
            raise DataError(f"{raw.name}: {split} labels must be integers, got {y.dtype}")
        if y.size and (y.min() < 0 or y.max() >= n_cls):
            bad = y[(y < 0) | (y >= n_cls)][0].item()
            raise DataError(
                f"{raw.name}: {split} label {bad!r} out of range 0..{n_cls - 1} "
                f"({n_cls} classes: {raw.classes[:20]}); fix the labels or the class list"
            )
        raw.splits[split] = (x, y.astype(np.int64))
    if len(raw.splits["train"][1]) == 0:
        raise DataError(f"{raw.name}: the training data is empty")


def _class_indices(wanted: Sequence[str | int], classes: list[str]) -> list[int]:
    idx = []
    for c in wanted:
        if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
            if not 0 <= int(c) < len(classes):
                raise DataError(
                    f"class index {c} out of range 0..{len(classes) - 1}; valid classes: {classes}"
                )
            idx.append(int(c))
        elif str(c) in classes:
            idx.append(classes.index(str(c)))
        else:
            raise DataError(f"unknown class {c!r}; valid classes are {classes}")
    if len(set(idx)) != len(idx):
        raise DataError(f"class list {list(wanted)} names a class twice")
    if not idx:
        raise DataError("classes=[] selects nothing; pass None for all classes")
    return idx


def _select(raw: RawData, wanted: Sequence[str | int]) -> dict[str, np.ndarray]:
    """Keep only the wanted classes (renumbered); returns the kept rows of each split."""
    idx = _class_indices(wanted, raw.classes)
    lut = np.full(len(raw.classes), -1, dtype=np.int64)
    lut[idx] = np.arange(len(idx))
    rows = {}
    for split, (x, y) in raw.splits.items():
        new = lut[y]
        rows[split] = np.flatnonzero(new >= 0)
        raw.splits[split] = (x, new)
    raw.classes = [raw.classes[i] for i in idx]
    return rows


def _max_per_class(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise DataError(f"max_per_class must be a positive int, got {k!r}")
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        keep.append(rng.choice(members, k, replace=False) if len(members) > k else members)
    return np.sort(np.concatenate(keep))


# --- entry point ---------------------------------------------------------------------------


def _read(
    source: Any,
    image_size: ImageSize | None,
    image_mode: str,
    label_set: str,
    cache_dir: str | Path | None,
    progress: bool,
) -> RawData:
    if isinstance(source, tuple):
        if len(source) != 2:
            raise DataError(f"a tuple source must be (x, y), got {len(source)} items")
        return _from_arrays({"x": source[0], "y": source[1]}, "arrays")
    if isinstance(source, Mapping):
        return _from_arrays(source, str(source.get("name", "arrays")))
    if not isinstance(source, (str, Path)):
        raise DataError(f"unsupported data source of type {type(source).__name__}; accepted: {ACCEPTED}")
    if isinstance(source, str) and source.lower() == "digits":
        return read_digits()
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"data source {str(source)!r} is not a known name or an existing path; accepted: {ACCEPTED}"
        )
    if path.is_dir() and find_cifar_dir(path) is not None:
        return read_cifar(path, label_set=label_set)
    if path.is_dir() or is_archive(path):
        return read_image_folder(
            path, image_size=image_size, mode=image_mode, cache_dir=cache_dir, progress=progress
        )
    if path.suffix.lower() == ".npz":
        return _from_npz(path)
    raise DataError(f"don't know how to read {path}; accepted: {ACCEPTED}")


def _text_only_options(source: Any, **given: tuple[Any, Any]) -> None:
    """DataError for options of text files given (not at their default) for another source."""
    named = [k for k, (value, default) in given.items() if value != default]
    if named:
        what = str(source) if isinstance(source, (str, Path)) else type(source).__name__
        raise DataError(
            f"{', '.join(named)} {'applies' if len(named) == 1 else 'apply'} only to text files "
            f"(.jsonl, .jsonl.gz, .csv, .csv.gz), not {what}"
        )


def _split_rows(
    raw: RawData,
    classes: Sequence[str | int] | None,
    val_fraction: float,
    test_fraction: float,
    max_per_class: int | None,
    seed: int,
) -> dict[str, np.ndarray]:
    """The rows of each split: selected classes, test (where the source has none), a
    subsample of train, val off train. Rows index the raw arrays; nothing is copied."""
    rows = {k: np.arange(len(y)) for k, (_, y) in raw.splits.items()}
    if classes is not None:
        rows = _select(raw, classes)
    y = raw.splits["train"][1]
    if "test" not in rows:
        keep, test = stratified_split(y[rows["train"]], test_fraction, seed)
        rows["test"], rows["train"] = rows["train"][test], rows["train"][keep]
    if max_per_class is not None:
        rows["train"] = rows["train"][_max_per_class(y[rows["train"]], max_per_class, seed)]
    if "val" not in rows:
        keep, val = stratified_split(y[rows["train"]], val_fraction, seed)
        rows["val"], rows["train"] = rows["train"][val], rows["train"][keep]
    return rows


def _given_statistics(statistics: dict[str, Any], scale: float) -> dict[str, Any]:
    """Another Data's normalisation (its ``preprocessing``), checked against this source."""
    missing = [k for k in ("mode", "scale", "mean", "std") if k not in statistics]
    if missing:
        raise DataError(f"statistics must be a Data.preprocessing dict with mode, scale, mean and "
                        f"std; it lacks {missing}")
    if not math.isclose(float(statistics["scale"]), scale):
        raise DataError(f"statistics were fitted on inputs scaled by {statistics['scale']}, but "
                        f"this source's inputs are scaled by {scale}: a different kind of data")
    return {k: statistics[k] for k in ("mode", "scale", "mean", "std")}


def load(
    source: Any,
    *,
    classes: Sequence[str | int] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    normalize: str | None = None,
    image_size: ImageSize | None = None,
    max_per_class: int | None = None,
    label_set: str = "fine",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    image_mode: str = "RGB",
    test_source: str | Path | None = None,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    statistics: dict[str, Any] | None = None,
) -> Data:
    """Load a data source as a :class:`Data` with train / val / test splits.

    ``source``: ``"digits"``; a CIFAR-10/100 python folder; an ImageFolder directory or archive;
    a ``.npz`` file (x, y, optional classes); a text classification file (``.jsonl``,
    ``.jsonl.gz``, ``.csv``, ``.csv.gz``); a tuple ``(x, y)``; or a dict with x, y (optional
    classes, x_test/y_test, x_val/y_val). uint8 arrays with 3-4 dims are images; other arrays
    are features kept in their shape.

    Steps: read raw train (and test/val where the source has them; otherwise split
    ``test_fraction`` off, stratified and seeded) -> keep ``classes`` (names or indices,
    renumbered in the given order) -> seeded ``max_per_class`` subsample of train -> split
    ``val_fraction`` off train -> scale (uint8 / 255, digits / 16) -> normalise with statistics
    of the train split only (``normalize``: ``"channel"`` default for images, ``"feature"`` for
    features and digits, or ``"none"``). Images come out as float32 ``[N, C, H, W]``.

    ``image_size`` (int or (height, width)) and ``image_mode`` ("RGB" or "L") apply to image
    folders; ``label_set`` ("fine" or "coarse") to CIFAR-100. ``Data.preprocessing`` holds all
    that :func:`~branchnet.data.prepare.apply_preprocessing` needs for new raw inputs.

    Text files (:mod:`branchnet.data.text`) give :class:`~branchnet.data.texts.Texts` inputs,
    not normalised: ``text_column`` and ``label_column`` name their columns, ``group_column``
    (optional) a group of each label (``Data.groups``), and ``test_source`` a separate test
    file in the same format (then no test split is cut off). These four apply only to text.

    ``statistics`` (another Data's ``preprocessing``) normalises with that data's training
    statistics instead of this train split's: new classes (novel inputs, classes grown into a
    tree) then reach a parent exactly as its own training data did.

    >>> x = np.arange(40, dtype=np.float32).reshape(20, 2); y = np.arange(20) % 2
    >>> d = load((x, y), classes=[1, 0], val_fraction=0.25, test_fraction=0.2, seed=1)
    >>> d.classes, len(d.train), len(d.val), len(d.test), d.preprocessing["mode"]
    (['1', '0'], 12, 4, 4, 'feature')
    """
    if normalize is not None and normalize not in NORMALIZE_MODES:
        raise DataError(f"normalize must be one of {NORMALIZE_MODES} or None, got {normalize!r}")
    text = isinstance(source, (str, Path)) and is_text_file(source)
    if text:
        if normalize is not None or image_size is not None:
            raise DataError(
                f"normalize and image_size do not apply to text data ({source}); leave them unset"
            )
        raw = read_text(source, test_source, text_column=text_column, label_column=label_column,
                        group_column=group_column)
    else:
        _text_only_options(source, test_source=(test_source, None), text_column=(text_column, "text"),
                           label_column=(label_column, "label"), group_column=(group_column, None))
        raw = _read(source, image_size, image_mode, label_set, cache_dir, progress)
    if image_size is not None and raw.info.get("resample") is None:
        raise DataError(f"image_size only applies to image folders and archives, not {raw.name}")
    if image_mode != "RGB" and raw.info.get("image_mode") != image_mode:
        raise DataError(f"image_mode only applies to image folders and archives, not {raw.name}")
    if label_set != "fine" and not raw.name.startswith("cifar100"):
        raise DataError(f"label_set={label_set!r} only applies to CIFAR-100, not {raw.name}")
    if not text:  # the text reader checks its rows itself
        _validate(raw)
    rows = _split_rows(raw, classes, val_fraction, test_fraction, max_per_class, seed)
    src = {k: raw.splits.get(k, raw.splits["train"]) for k in ("train", "val", "test")}
    labels = {k: np.ascontiguousarray(src[k][1][rows[k]]) for k in src}
    if text:
        out = {k: Split(src[k][0][rows[k]], torch.from_numpy(labels[k])) for k in src}
        preprocessing = {"layout": "text", "input_shape": [], **raw.info}
        return Data(out["train"], out["val"], out["test"], list(raw.classes), raw.name,
                    preprocessing, restrict_groups(raw.groups, raw.classes))
    mode = normalize or raw.default_normalize
    xf = {k: to_float(src[k][0], raw.scale, rows=rows[k]) for k in src}
    stats = (fit_normalization(xf["train"], mode, scale=raw.scale) if statistics is None
             else _given_statistics(statistics, raw.scale))
    out = {k: Split(torch.from_numpy(normalize_(xf[k], stats)), torch.from_numpy(labels[k])) for k in src}
    shape = list(xf["train"].shape[1:])
    image = raw.kind == "image"
    size = parse_size(image_size)
    preprocessing = {
        **stats,
        "layout": "image" if image else "features",
        "input_shape": shape,
        "channels": shape[0] if image else None,
        "image_size": shape[1:] if image else None,
        "image_mode": raw.info.get("image_mode") if image else None,
        "resample": raw.info.get("resample") if image and size else None,
    }
    return Data(out["train"], out["val"], out["test"], list(raw.classes), raw.name, preprocessing)
