"""ImageFolder layouts (directories and archives), decoded once and cached as uint8 arrays.

Accepted layouts (class names are the folder names, sorted alphabetically like torchvision;
images may sit in sub-folders of a class folder)::

    root/<class>/*.png|jpg|jpeg|bmp
    root/train/<class>/...   root/test/<class>/...   (and optionally root/val/<class>/...)

``root`` is a directory or an archive (``.tar.gz``, ``.tgz``, ``.tar``, ``.zip``, ...) holding
that layout, possibly inside one top-level folder. Archive members are read directly (never
extracted); unsafe member paths (absolute, ``..``) are refused.

Decoded arrays are cached in ``cache_dir`` (default ``$BRANCHNET_CACHE_DIR`` or
``~/.cache/branchnet``) as a safetensors file plus a JSON metadata file, keyed by the archive's
sha256 (for a directory: relative paths, sizes and mtimes) and the image size and mode.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> for cls in ["dog", "cat"]:
    ...     (root / cls).mkdir()
    ...     Image.new("RGB", (4, 4)).save(root / cls / "0.png")
    >>> raw = read_image_folder(root, cache_dir=root / ".cache", progress=False)
    >>> raw.classes, raw.splits["train"][0].shape
    (['cat', 'dog'], (2, 3, 4, 4))
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from branchnet.data import images
from branchnet.data.dataset import DataError
from branchnet.data.prepare import RawData
from branchnet.fileio import atomic_write, read_json, sha256_file, write_json

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
SPLIT_NAMES = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}
CACHE_FORMAT = 1


def is_archive(path: str | Path) -> bool:
    """Whether ``path`` has an archive suffix this module reads.

    >>> is_archive("cifar10-jpg.tar.gz"), is_archive("x.zip"), is_archive("x.npz")
    (True, True, False)
    """
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(path: str | Path) -> str:
    """File name without its archive suffix: ``"a/cifar10-jpg.tar.gz"`` -> ``"cifar10-jpg"``."""
    name = Path(path).name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def default_cache_dir() -> Path:
    """``$BRANCHNET_CACHE_DIR`` if set, else ``~/.cache/branchnet``."""
    env = os.environ.get("BRANCHNET_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "branchnet"


def _is_image(rel: str) -> bool:
    parts = rel.split("/")
    hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
    return not hidden and rel.lower().endswith(images.IMAGE_EXTENSIONS)


def _safe_member(name: str, archive: Path) -> str:
    """Normalise an archive member name; refuse absolute paths and ``..`` components."""
    rel = name.replace("\\", "/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel) or ".." in parts:
        raise DataError(
            f"archive {archive} has a member with an unsafe path {name!r} (absolute or with "
            "'..'); refusing to read it — check where the archive comes from"
        )
    return "/".join(parts)


# --- listing sources -------------------------------------------------------------------------


def _list_directory(root: Path) -> list[tuple[str, Path]]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            path = Path(dirpath) / f
            rel = path.relative_to(root).as_posix()
            if _is_image(rel):
                found.append((rel, path))
    return sorted(found)


def _iter_tar(path: Path) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, "r:*") as tf:
        for member in tf:
            rel = _safe_member(member.name, path)
            if member.isfile() and _is_image(rel):
                f = tf.extractfile(member)
                if f is not None:
                    yield rel, f.read()


def _iter_zip(path: Path) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            rel = _safe_member(info.filename, path)
            if not info.is_dir() and _is_image(rel):
                yield rel, zf.read(info)


def _read_archive(path: Path) -> list[tuple[str, bytes]]:
    try:
        members = _iter_zip(path) if str(path).lower().endswith(".zip") else _iter_tar(path)
        return sorted(members)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise DataError(f"cannot read archive {path}: {e}; is it complete and not corrupt?") from e


# --- layout --------------------------------------------------------------------------------


def parse_layout(paths: list[str], source: str | Path = "") -> dict[str, list[tuple[int, str]]]:
    """Map image paths to ``{split: [(path_index, class_name), ...]}``.

    Strips one (or more) common top-level folders, then recognises ``<split>/<class>/...``
    (splits train/test/val) or ``<class>/...`` (everything is ``"train"``).

    >>> parse_layout(["top/train/b/1.png", "top/train/a/2.png", "top/test/a/3.png"])
    {'train': [(0, 'b'), (1, 'a')], 'test': [(2, 'a')]}
    """
    split_paths = [p.split("/") for p in paths]
    if not split_paths:
        raise DataError(
            f"no images (*.png, *.jpg, *.jpeg, *.bmp) found in {source}; expected "
            "<class>/<image> or train|test|val/<class>/<image>"
        )
    while (
        all(len(p) >= 3 for p in split_paths)
        and len({p[0] for p in split_paths}) == 1
        and split_paths[0][0].lower() not in SPLIT_NAMES
    ):
        split_paths = [p[1:] for p in split_paths]
    firsts = {p[0].lower() for p in split_paths if len(p) >= 2}
    by_split = firsts & SPLIT_NAMES.keys()
    out: dict[str, list[tuple[int, str]]] = {}
    for i, p in enumerate(split_paths):
        if by_split:
            if len(p) < 3 or p[0].lower() not in SPLIT_NAMES:
                raise DataError(
                    f"{source} mixes split folders ({sorted(by_split)}) with other entries such "
                    f"as {paths[i]!r}; expected train|test|val/<class>/<image> throughout"
                )
            out.setdefault(SPLIT_NAMES[p[0].lower()], []).append((i, p[1]))
        elif len(p) >= 2:
            out.setdefault("train", []).append((i, p[0]))
    if "train" not in out:
        raise DataError(
            f"{source} has split folders {sorted(out)} but no 'train' folder; expected "
            "train/<class>/<image> (and optionally test/ and val/)"
        )
    return out


# --- cache ---------------------------------------------------------------------------------


def _directory_hash(root: Path, files: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for rel, path in files:
        st = path.stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _array_hash(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).data).hexdigest()


def _cache_paths(cache_dir: Path, stem: str, key: str) -> tuple[Path, Path]:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:60] or "images"
    base = f"imagefolder-{safe}-{key}"
    return cache_dir / f"{base}.safetensors", cache_dir / f"{base}.json"


def _damaged(data_path: Path, meta_path: Path, detail: str) -> DataError:
    return DataError(
        f"image cache file {data_path} is damaged ({detail}); delete it and {meta_path.name} "
        "(or the whole cache directory) and load again to rebuild it"
    )


def _load_cache(data_path: Path, meta_path: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    if not meta_path.exists():
        return None
    try:
        meta = read_json(meta_path)
        arrays_meta = meta["arrays"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _damaged(meta_path, meta_path, f"unreadable metadata: {e}") from e
    if not data_path.exists():
        raise _damaged(data_path, meta_path, "the data file is missing")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(data_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _damaged(data_path, meta_path, f"cannot read it: {e}") from e
    if set(arrays) != set(arrays_meta):
        raise _damaged(data_path, meta_path, f"arrays {sorted(arrays)} != {sorted(arrays_meta)}")
    for k, a in arrays.items():
        m = arrays_meta[k]
        if list(a.shape) != m.get("shape") or a.dtype.name != m.get("dtype"):
            raise _damaged(data_path, meta_path, f"{k} has shape {a.shape}, dtype {a.dtype}")
        if _array_hash(a) != m.get("hash"):
            raise _damaged(data_path, meta_path, f"content hash of {k} does not match")
    return arrays, meta


def _save_cache(data_path: Path, meta_path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    from safetensors.numpy import save_file

    try:
        data_path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            **meta,
            "data_file": data_path.name,
            "arrays": {
                k: {"shape": list(a.shape), "dtype": a.dtype.name, "hash": _array_hash(a)}
                for k, a in arrays.items()
            },
        }
        atomic_write(data_path, lambda tmp: save_file(arrays, tmp))
        write_json(meta_path, meta)
    except OSError as e:
        warnings.warn(f"could not write image cache {data_path}: {e}", stacklevel=3)


# --- reading -------------------------------------------------------------------------------


def _label(source: Path, rel: str, src: bytes | Path) -> str:
    """How an image is named in error messages: its path, or ``archive:member``."""
    return str(src) if isinstance(src, Path) else f"{source}:{rel}"


def _decode(
    listing: list[tuple[str, bytes | Path]],
    source: Path,
    size: tuple[int, int] | None,
    mode: str,
    progress: bool,
) -> tuple[dict[str, np.ndarray], list[str]]:
    layout = parse_layout([rel for rel, _ in listing], source)
    classes = sorted({c for _, c in layout["train"]})
    for split, entries in layout.items():
        extra = sorted({c for _, c in entries} - set(classes))
        if extra:
            raise DataError(
                f"{source}: classes {extra} appear in {split}/ but not in train/; every class "
                f"needs training images (train has {classes})"
            )
    index = {c: i for i, c in enumerate(classes)}
    order = [(split, layout[split]) for split in ("train", "val", "test") if split in layout]
    items, labels = [], []
    for _, entries in order:
        entries = sorted(entries, key=lambda e: (e[1], listing[e[0]][0]))
        items += [(_label(source, *listing[i]), listing[i][1]) for i, _ in entries]
        labels.append(np.array([index[c] for _, c in entries], dtype=np.int64))
    x = images.decode_many(items, size=size, mode=mode, progress=progress, desc=f"decoding {source.name}")
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # NHWC -> NCHW, cached as such
    arrays, start = {}, 0
    for (split, _), y in zip(order, labels, strict=True):
        arrays[f"{split}.x"] = x[start : start + len(y)]
        arrays[f"{split}.y"] = y
        start += len(y)
    return arrays, classes


def read_image_folder(
    source: str | Path,
    *,
    image_size: images.ImageSize | None = None,
    mode: str = "RGB",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    use_cache: bool = True,
) -> RawData:
    """Read an ImageFolder directory or archive into :class:`RawData` (uint8 ``[N, C, H, W]``).

    Splits found as folders (train/test/val) are kept; otherwise everything is ``"train"``.
    Decoded arrays are cached (see the module docstring); a damaged cache raises
    :class:`DataError` naming the file to delete.
    """
    src = Path(source)
    if not src.exists():
        raise DataError(f"image folder or archive {src} does not exist")
    size = images.parse_size(image_size)
    images._check_mode(mode)
    if src.is_dir():
        files = _list_directory(src)
        content_key = _directory_hash(src, files)
        listing: list[tuple[str, bytes | Path]] | None = list(files)
        stem = src.resolve().name
    else:
        if not is_archive(src):
            raise DataError(f"{src} is not a directory or an archive ({', '.join(ARCHIVE_SUFFIXES)})")
        content_key = sha256_file(src)
        listing = None
        stem = archive_stem(src)
    size_tag = f"{size[0]}x{size[1]}" if size else "native"
    key = hashlib.sha256(f"{content_key}|{size_tag}|{mode}|v{CACHE_FORMAT}".encode()).hexdigest()
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    data_path, meta_path = _cache_paths(cdir, stem, key[:20])
    cached = _load_cache(data_path, meta_path) if use_cache else None
    if cached is not None:
        arrays, meta = cached
        classes = list(meta["classes"])
    else:
        if listing is None:
            listing = list(_read_archive(src))
        arrays, classes = _decode(listing, src, size, mode, progress)
        if use_cache:
            meta = {
                "format": CACHE_FORMAT,
                "source": str(src.resolve()),
                "source_hash": content_key,
                "image_size": list(size) if size else None,
                "mode": mode,
                "layout": "NCHW",
                "classes": classes,
            }
            _save_cache(data_path, meta_path, arrays, meta)
    splits = {s: (arrays[f"{s}.x"], arrays[f"{s}.y"]) for s in ("train", "val", "test") if f"{s}.x" in arrays}
    return RawData(
        splits=splits,
        classes=classes,
        name=stem,
        kind="image",
        scale=1.0 / 255.0,
        default_normalize="channel",
        info={
            "image_mode": mode,
            "resample": images.RESAMPLE if size else None,
        },
    )
