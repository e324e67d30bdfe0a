"""Decoding image files with Pillow into uint8 arrays ``[N, H, W, C]``.

Example:
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> p = Path(tempfile.mkdtemp()) / "a.png"
    >>> Image.new("RGB", (4, 2), (255, 0, 0)).save(p)
    >>> x = read_image_files([p], progress=False)
    >>> x.shape, x.dtype.name, x[0, 0, 0].tolist()
    ((1, 2, 4, 3), 'uint8', [255, 0, 0])
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from branchnet.data.dataset import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
IMAGE_MODES = ("RGB", "L")
RESAMPLE = "bilinear"

ImageSize = int | tuple[int, int]


def parse_size(size: ImageSize | Sequence[int] | None) -> tuple[int, int] | None:
    """``None``, an int (square) or ``(height, width)`` -> ``(height, width)`` or None.

    >>> parse_size(32), parse_size((24, 32)), parse_size(None)
    ((32, 32), (24, 32), None)
    """
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        hw: tuple[int, ...] = (int(size), int(size))
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        hw = tuple(int(v) for v in size)
    else:
        raise DataError(f"image_size must be an int or (height, width), got {size!r}")
    if min(hw) < 1:
        raise DataError(f"image_size must be positive, got {size!r}")
    return hw[0], hw[1]


def _check_mode(mode: str) -> None:
    if mode not in IMAGE_MODES:
        raise DataError(f"image mode must be one of {IMAGE_MODES}, got {mode!r}")


def decode_image(
    source: bytes | str | Path,
    *,
    name: str | None = None,
    size: tuple[int, int] | None = None,
    mode: str = "RGB",
) -> np.ndarray:
    """Decode one image (file path or encoded bytes) to uint8 ``[H, W, C]``.

    ``size`` is ``(height, width)``; images of another size are resized (bilinear). ``name`` is
    used in error messages (defaults to the path).
    """
    label = name if name is not None else str(source)
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(stream) as im:
            img = im.convert(mode) if im.mode != mode else im
            img.load()
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(
            f"cannot read image {label}: {e}; the file is unreadable or corrupt — replace or remove it"
        ) from e
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_many(
    items: Sequence[tuple[str, bytes | str | Path]],
    *,
    size: tuple[int, int] | None = None,
    mode: str = "RGB",
    progress: bool = True,
    desc: str = "decoding images",
) -> np.ndarray:
    """Decode ``(name, path-or-bytes)`` items into one uint8 array ``[N, H, W, C]``.

    Without ``size`` all images must have the same size; a mismatch raises a
    :class:`DataError` naming both files and suggesting ``image_size=``.
    """
    _check_mode(mode)
    channels = 3 if mode == "RGB" else 1
    if not items:
        h, w = size or (0, 0)
        return np.zeros((0, h, w, channels), dtype=np.uint8)
    out: np.ndarray | None = None
    first = ""
    bar = tqdm(items, desc=desc, unit="img", disable=None if progress else True, leave=False)
    for i, (name, src) in enumerate(bar):
        arr = decode_image(src, name=name, size=size, mode=mode)
        if out is None:
            out = np.empty((len(items), *arr.shape), dtype=np.uint8)
            first = name
        elif arr.shape != out.shape[1:]:
            h, w = out.shape[1:3]
            raise DataError(
                f"image {name} is {arr.shape[0]}x{arr.shape[1]} (height x width) but {first} is "
                f"{h}x{w}; images must all have the same size. Pass image_size=({h}, {w}) "
                "(or any (height, width)) to resize them all"
            )
        out[i] = arr
    assert out is not None
    return out


def read_image_files(
    paths: Sequence[str | Path],
    size: ImageSize | None = None,
    mode: str = "RGB",
    *,
    progress: bool = True,
) -> np.ndarray:
    """Read image files into a uint8 array ``[N, H, W, C]`` (C = 3 for ``"RGB"``, 1 for ``"L"``).

    ``size`` (an int or ``(height, width)``) resizes every image (bilinear); without it all
    images must have the same size. Shows a progress bar on a terminal unless
    ``progress=False``. Raises :class:`DataError` naming an unreadable or corrupt file.

    >>> read_image_files([], size=8, progress=False).shape
    (0, 8, 8, 3)
    """
    items = [(str(p), Path(p)) for p in paths]
    return decode_many(items, size=parse_size(size), mode=mode, progress=progress)
