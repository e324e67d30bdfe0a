"""Omniglot (Lake et al. 2015): reading the alphabet archives, scaling, and splits.

Accepted sources (one or more; zip/tar archives or extracted directories)::

    [top/]<alphabet>/<character>/<id>_<drawer>.png      e.g.
    images_background_small1/Greek/character01/0394_07.png

Images are decoded once (greyscale, resized with Pillow's bilinear filter when
``image_size`` differs from the native 105 x 105) and cached as uint8 arrays in a safetensors
file with JSON metadata (no pickle), keyed by the sources' sha256 checksums (for a directory:
relative paths, sizes and mtimes) and the image size — the cache machinery of
:mod:`branchnet.data.imagefolder`.

Several sources may hold the same characters: the two ``images_background_small*`` archives
both hold Greek and Latin, byte for byte. An image found twice (same alphabet, character and
file name) with identical bytes is kept once (``info["duplicates"]`` counts the copies
dropped); the same name with different bytes is an error.

Pixels stay as drawn — black strokes (0) on white (255) — and :func:`scale_images` maps them
to float32 in [-1, 1] (stroke -1, paper +1). Training (:class:`~branchnet.virtual.embedding.PKBatches`)
and evaluation (:mod:`branchnet.virtual.oneshot`) both go through it, so the two cannot
disagree (the original forgot to rescale at evaluation).

Example:
    >>> import tempfile, zipfile, io
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> with zipfile.ZipFile(root / "tiny.zip", "w") as zf:
    ...     for a, c, d in [("Greek", "character01", 1), ("Greek", "character01", 2),
    ...                     ("Latin", "character01", 1)]:
    ...         buf = io.BytesIO(); Image.new("L", (105, 105), 255).save(buf, "PNG")
    ...         zf.writestr(f"tiny/{a}/{c}/0001_{d:02d}.png", buf.getvalue())
    >>> s = load_omniglot(root / "tiny.zip", image_size=28, cache_dir=root / "cache")
    >>> s.x.shape, s.characters, s.drawer.tolist()
    ((3, 1, 28, 28), ['Greek/character01', 'Latin/character01'], [1, 2, 1])
    >>> float(scale_images(s.x).max())
    1.0
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from branchnet.data import images
from branchnet.data.dataset import DataError
from branchnet.data.imagefolder import (
    _cache_paths,
    _directory_hash,
    _list_directory,
    _load_cache,
    _read_archive,
    _save_cache,
    archive_stem,
    default_cache_dir,
    is_archive,
)
from branchnet.fileio import sha256_file, write_json

__all__ = [
    "OmniglotSet",
    "load_omniglot",
    "make_oneshot_runs",
    "scale_images",
    "split_by_alphabet",
    "split_by_character",
]

CACHE_FORMAT = 1
FILE_PATTERN = re.compile(r"^(\d+)_(\d+)\.png$", re.IGNORECASE)
LAYOUT = "<alphabet>/<character>/<id>_<drawer>.png"


def scale_images(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (``x / 127.5 - 1``): the one scaling of Omniglot inputs.

    Only uint8 input is accepted, so already-scaled floats cannot be scaled twice.

    >>> scale_images(np.array([0, 255], dtype=np.uint8)).tolist()
    [-1.0, 1.0]
    """
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        x = np.asarray(x)
    if x.dtype not in (np.uint8, torch.uint8):
        raise DataError(
            f"scale_images expects uint8 pixels (0..255), got dtype {x.dtype}; inputs that are "
            "already float are assumed scaled and must not be scaled again"
        )
    t = torch.from_numpy(x.astype(np.float32)) if isinstance(x, np.ndarray) else x.to(torch.float32)
    return t.div_(127.5).sub_(1.0)


@dataclass
class OmniglotSet:
    """Omniglot images with their character, alphabet and drawer.

    ``x`` uint8 ``(N, 1, S, S)`` (strokes 0, paper 255); ``character`` ``(N,)`` indexes
    ``characters`` (``"alphabet/character"``, sorted); ``alphabet`` ``(N,)`` indexes ``alphabets``
    (sorted); ``drawer`` ``(N,)`` is the drawer number from the file name (1..20).
    Rows are sorted by (character, drawer).
    """

    x: np.ndarray
    character: np.ndarray
    alphabet: np.ndarray
    drawer: np.ndarray
    characters: list[str]
    alphabets: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.x)
        for name in ("character", "alphabet", "drawer"):
            if len(getattr(self, name)) != n:
                raise DataError(f"OmniglotSet.{name} has {len(getattr(self, name))} rows, x has {n}")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def image_size(self) -> int:
        return int(self.x.shape[-1])

    def float_x(self) -> torch.Tensor:
        """``x`` scaled to [-1, 1] (:func:`scale_images`)."""
        return scale_images(self.x)

    def counts(self) -> dict[str, dict[str, int]]:
        """Per alphabet: number of characters and of images.

        >>> s = OmniglotSet(np.zeros((2, 1, 2, 2), np.uint8), np.array([0, 1]), np.array([0, 0]),
        ...                 np.array([1, 1]), ["A/c1", "A/c2"], ["A"])
        >>> s.counts()
        {'A': {'characters': 2, 'images': 2}}
        """
        out = {}
        for a, name in enumerate(self.alphabets):
            rows = self.alphabet == a
            out[name] = {"characters": len(np.unique(self.character[rows])), "images": int(rows.sum())}
        return out

    def subset(self, index: np.ndarray | Sequence[int] | Sequence[bool]) -> OmniglotSet:
        """Rows ``index`` (indices or a boolean mask); character and alphabet labels are
        renumbered to the ones present, so ``characters[label]`` stays valid."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            if len(idx) != len(self):
                raise DataError(f"boolean mask has {len(idx)} entries, the set has {len(self)} rows")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        chars, char_y = np.unique(self.character[idx], return_inverse=True)
        alphs, alph_y = np.unique(self.alphabet[idx], return_inverse=True)
        return OmniglotSet(
            x=self.x[idx], character=char_y.astype(np.int64), alphabet=alph_y.astype(np.int64),
            drawer=self.drawer[idx], characters=[self.characters[c] for c in chars],
            alphabets=[self.alphabets[a] for a in alphs], info=dict(self.info),
        )

    def select_alphabets(self, names: Sequence[str]) -> OmniglotSet:
        """Only the alphabets ``names`` (unknown names raise :class:`DataError`)."""
        wanted = _alphabet_indices(self, names)
        return self.subset(np.isin(self.alphabet, wanted))


def _alphabet_indices(s: OmniglotSet, names: Sequence[str]) -> list[int]:
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in s.alphabets]
    if unknown:
        raise DataError(f"unknown alphabet(s) {unknown}; the set has {s.alphabets}")
    return [s.alphabets.index(n) for n in names]


def split_by_alphabet(
    s: OmniglotSet, held_out: Sequence[str] | int, seed: int = 0
) -> tuple[OmniglotSet, OmniglotSet]:
    """``(background, held_out)``: whole alphabets held out, given by name or as a number drawn
    at random (seeded), like Omniglot's background / evaluation alphabets.

    >>> s = OmniglotSet(np.zeros((3, 1, 2, 2), np.uint8), np.array([0, 1, 2]), np.array([0, 0, 1]),
    ...                 np.array([1, 1, 1]), ["A/c1", "A/c2", "B/c1"], ["A", "B"])
    >>> bg, ev = split_by_alphabet(s, ["B"])
    >>> bg.alphabets, ev.characters
    (['A'], ['B/c1'])
    """
    if isinstance(held_out, (int, np.integer)) and not isinstance(held_out, bool):
        if not 1 <= held_out < len(s.alphabets):
            raise DataError(
                f"held_out={held_out} alphabets: must be between 1 and {len(s.alphabets) - 1} "
                f"(the set has {len(s.alphabets)} alphabets)"
            )
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(len(s.alphabets), size=int(held_out), replace=False).tolist())
    else:
        chosen = _alphabet_indices(s, held_out)
        if not chosen or len(chosen) == len(s.alphabets):
            raise DataError(
                f"held_out={list(held_out)} must name some but not all of the alphabets {s.alphabets}"
            )
    held = np.isin(s.alphabet, chosen)
    return s.subset(~held), s.subset(held)


def split_by_character(
    s: OmniglotSet, held_out_fraction: float = 0.2, seed: int = 0
) -> tuple[OmniglotSet, OmniglotSet]:
    """``(train, held_out)``: in every alphabet, ``round(fraction * characters)`` characters
    (at least one, at most all but one) are held out at random (seeded); all drawers of a
    character stay on the same side.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise DataError(f"held_out_fraction must be in (0, 1), got {held_out_fraction!r}")
    rng = np.random.default_rng(seed)
    held_chars: list[int] = []
    for a in range(len(s.alphabets)):
        chars = np.unique(s.character[s.alphabet == a])
        if len(chars) < 2:
            raise DataError(
                f"alphabet {s.alphabets[a]!r} has {len(chars)} character(s); splitting by character "
                "needs at least 2 per alphabet"
            )
        n = min(max(round(held_out_fraction * len(chars)), 1), len(chars) - 1)
        held_chars += rng.choice(chars, size=n, replace=False).tolist()
    held = np.isin(s.character, held_chars)
    return s.subset(~held), s.subset(held)


# --- reading -------------------------------------------------------------------------------


def _strip_top(rels: list[str]) -> list[list[str]]:
    """Split paths and strip common top folders until ``alphabet/character/file`` remains."""
    parts = [r.split("/") for r in rels]
    while parts and all(len(p) > 3 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    return parts


def _source_key(src: Path) -> tuple[str, str]:
    """``(content key, stem)`` of one source: sha256 of an archive, or a listing hash of a folder."""
    if not src.exists():
        raise DataError(f"Omniglot source {src} does not exist; give a .zip archive or a folder "
                        f"laid out as {LAYOUT}")
    if src.is_dir():
        return _directory_hash(src, _list_directory(src)), src.resolve().name
    if is_archive(src):
        return sha256_file(src), archive_stem(src)
    raise DataError(f"Omniglot source {src} is neither a folder nor an archive (.zip, .tar.gz, ...)")


def _read_source(src: Path) -> list[tuple[str, bytes]]:
    """``[(alphabet/character/file, png bytes)]`` of one source, the layout checked."""
    if src.is_dir():
        listing = [(rel, p.read_bytes()) for rel, p in _list_directory(src)]
    else:
        listing = _read_archive(src)
    listing = [(rel, data) for rel, data in listing if rel.lower().endswith(".png")]
    if not listing:
        raise DataError(f"no .png images found in {src}; expected {LAYOUT}")
    parts = _strip_top([rel for rel, _ in listing])
    out = []
    for (rel, data), p in zip(listing, parts, strict=True):
        if len(p) != 3:
            raise DataError(
                f"{src}: {rel!r} does not fit the Omniglot layout {LAYOUT} (below at most one "
                "common top folder)"
            )
        if not FILE_PATTERN.match(p[2]):
            raise DataError(f"{src}: file name {rel!r} is not <id>_<drawer>.png (e.g. 0394_07.png)")
        out.append(("/".join(p), data))
    return out


def _decode_sources(sources: list[tuple[Path, list[tuple[str, bytes]]]],
                    size: tuple[int, int] | None, progress: bool) -> tuple[dict[str, np.ndarray], dict]:
    entries: dict[str, tuple[bytes, str]] = {}
    duplicates = 0
    for src, listing in sources:
        for rel, data in listing:
            if rel in entries:
                if hashlib.sha256(entries[rel][0]).digest() != hashlib.sha256(data).digest():
                    raise DataError(
                        f"{rel} is in {entries[rel][1]} and in {src} with different contents; "
                        "the sources disagree about this image — use only one of them"
                    )
                duplicates += 1
                continue
            entries[rel] = (data, str(src))

    def sort_key(rel: str) -> tuple[str, str, int, str]:
        a, c, f = rel.split("/")
        m = FILE_PATTERN.match(f)
        assert m is not None
        return a, c, int(m.group(2)), f

    rels = sorted(entries, key=sort_key)
    characters = sorted({"/".join(r.split("/")[:2]) for r in rels})
    alphabets = sorted({r.split("/")[0] for r in rels})
    char_index = {c: i for i, c in enumerate(characters)}
    alph_index = {a: i for i, a in enumerate(alphabets)}
    items = [(f"{entries[r][1]}:{r}", entries[r][0]) for r in rels]
    x = images.decode_many(items, size=size, mode="L", progress=progress, desc="decoding Omniglot")
    arrays = {
        "x": np.ascontiguousarray(x.transpose(0, 3, 1, 2)),
        "character": np.array([char_index["/".join(r.split("/")[:2])] for r in rels], dtype=np.int64),
        "alphabet": np.array([alph_index[r.split("/")[0]] for r in rels], dtype=np.int64),
        "drawer": np.array([int(FILE_PATTERN.match(r.split("/")[2]).group(2)) for r in rels],  # type: ignore[union-attr]
                           dtype=np.int64),
    }
    meta = {"characters": characters, "alphabets": alphabets, "duplicates": duplicates}
    return arrays, meta


def load_omniglot(
    paths: str | Path | Sequence[str | Path],
    image_size: int | None = 105,
    cache_dir: str | Path | None = None,
    *,
    progress: bool = False,
    use_cache: bool = True,
) -> OmniglotSet:
    """Read Omniglot from zip archives or extracted folders (several are merged).

    ``image_size`` resizes to ``S x S`` (bilinear; e.g. 28 or 32 for CPU work); ``None`` keeps
    the native size. The decoded arrays are cached in ``cache_dir`` (default
    ``$BRANCHNET_CACHE_DIR`` or ``~/.cache/branchnet``) keyed by the sources' checksums and the
    size; the result does not depend on the order of ``paths``. Missing files, unknown
    formats and a wrong layout raise :class:`DataError`.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    srcs = [Path(p) for p in paths]
    if not srcs:
        raise DataError("load_omniglot needs at least one source (zip archive or folder)")
    size = images.parse_size(image_size)
    keys = [_source_key(s) for s in srcs]
    size_tag = f"{size[0]}x{size[1]}" if size else "native"
    content = "|".join(sorted(k for k, _ in keys))
    key = hashlib.sha256(f"omniglot|{content}|{size_tag}|v{CACHE_FORMAT}".encode()).hexdigest()
    stem = "omniglot-" + "+".join(sorted({stem for _, stem in keys}))
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    data_path, meta_path = _cache_paths(cdir, stem, key[:20])
    cached = _load_cache(data_path, meta_path) if use_cache else None
    if cached is not None:
        arrays, meta = cached
    else:
        arrays, meta = _decode_sources([(s, _read_source(s)) for s in srcs], size, progress)
        meta = {**meta, "format": CACHE_FORMAT, "sources": [str(s.resolve()) for s in srcs],
                "image_size": list(size) if size else None, "layout": "NCHW"}
        if use_cache:
            _save_cache(data_path, meta_path, arrays, meta)
    return OmniglotSet(
        x=arrays["x"], character=arrays["character"], alphabet=arrays["alphabet"],
        drawer=arrays["drawer"], characters=list(meta["characters"]),
        alphabets=list(meta["alphabets"]),
        info={"sources": [str(s) for s in srcs], "duplicates": int(meta["duplicates"]),
              "image_size": meta.get("image_size"), "cache": str(data_path) if use_cache else None},
    )


# --- one-shot runs -------------------------------------------------------------------------


def make_oneshot_runs(
    s: OmniglotSet,
    out_dir: str | Path,
    n_runs: int = 20,
    ways: int = 20,
    seed: int = 0,
    *,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Write ``n_runs`` within-alphabet ``ways``-way one-shot runs in Lake's layout.

    ``s`` should hold only held-out alphabets (see :func:`split_by_alphabet`). Each run takes
    one alphabet with at least ``ways`` characters (alphabets with fewer are skipped — e.g.
    Tagalog's 17 characters for 20-way runs — and listed in ``runs.json``; none eligible is an
    error); runs cycle through the eligible alphabets in a seeded random order, so they are
    spread evenly over them. A run picks ``ways`` characters of its alphabet and two distinct
    drawers who drew all of them: one drawer's images become ``training/classNN.png`` and the
    other's ``test/itemNN.png``, both numbered in independent random orders. Written::

        out_dir/runNN/class_labels.txt      "runNN/test/itemMM.png runNN/training/classKK.png"
        out_dir/runNN/training/classNN.png  out_dir/runNN/test/itemNN.png
        out_dir/runs.json                   alphabet, characters and drawers of every run

    The label lines are paths relative to ``out_dir``, as in Lake's ``all_runs``; images are
    written as greyscale PNG at the set's image size. Returns the ``runs.json`` entries.
    An ``out_dir`` that already holds ``run*`` folders is refused unless ``overwrite=True``.
    """
    if not (isinstance(n_runs, int) and n_runs >= 1 and isinstance(ways, int) and ways >= 2):
        raise DataError(f"n_runs must be an int >= 1 and ways an int >= 2, got n_runs={n_runs!r}, "
                        f"ways={ways!r}")
    from PIL import Image

    out = Path(out_dir)
    existing = sorted(out.glob("run*")) if out.exists() else []
    if existing and not overwrite:
        raise DataError(f"{out} already holds one-shot runs ({existing[0].name}, ...); pass "
                        "overwrite=True or choose an empty folder")
    chars_of = {a: np.unique(s.character[s.alphabet == a]) for a in range(len(s.alphabets))}
    eligible = [a for a, c in chars_of.items() if len(c) >= ways]
    skipped = {s.alphabets[a]: len(c) for a, c in chars_of.items() if len(c) < ways}
    if not eligible:
        counts = {s.alphabets[a]: len(c) for a, c in chars_of.items()}
        raise DataError(f"no alphabet has {ways} characters for {ways}-way runs (characters per "
                        f"alphabet: {counts}); lower ways or add alphabets")
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < n_runs:
        order += rng.permutation(eligible).tolist()
    width = max(2, len(str(n_runs)))
    iwidth = max(2, len(str(ways)))
    manifest = []
    for r in range(n_runs):
        a = order[r]
        chars = np.sort(rng.choice(chars_of[a], size=ways, replace=False))
        drawer_sets = [set(s.drawer[s.character == c].tolist()) for c in chars]
        common = sorted(set.intersection(*drawer_sets))
        if len(common) < 2:
            raise DataError(f"alphabet {s.alphabets[a]!r}: fewer than two drawers drew all of "
                            f"{[s.characters[c] for c in chars]}; cannot build a run")
        d_train, d_test = (int(d) for d in rng.choice(common, size=2, replace=False))
        class_pos = rng.permutation(ways)  # character j -> training/class{class_pos[j] + 1}
        item_pos = rng.permutation(ways)  # character j -> test/item{item_pos[j] + 1}
        name = f"run{r + 1:0{width}d}"
        run_dir = out / name
        (run_dir / "training").mkdir(parents=True)
        (run_dir / "test").mkdir()
        lines: list[tuple[str, str]] = []
        for j, c in enumerate(chars):
            row_train = np.flatnonzero((s.character == c) & (s.drawer == d_train))[0]
            row_test = np.flatnonzero((s.character == c) & (s.drawer == d_test))[0]
            train_rel = f"training/class{class_pos[j] + 1:0{iwidth}d}.png"
            test_rel = f"test/item{item_pos[j] + 1:0{iwidth}d}.png"
            Image.fromarray(s.x[row_train, 0]).save(run_dir / train_rel)
            Image.fromarray(s.x[row_test, 0]).save(run_dir / test_rel)
            lines.append((f"{name}/{test_rel}", f"{name}/{train_rel}"))
        (run_dir / "class_labels.txt").write_text("".join(f"{t} {c}\n" for t, c in sorted(lines)))
        manifest.append({
            "run": name, "alphabet": s.alphabets[a], "train_drawer": d_train, "test_drawer": d_test,
            "characters": {f"class{class_pos[j] + 1:0{iwidth}d}": s.characters[c]
                           for j, c in enumerate(chars)},
        })
    write_json(out / "runs.json",
               {"ways": ways, "seed": seed, "skipped_alphabets": skipped, "runs": manifest})
    return manifest
