"""Normalisation statistics, and preparing raw inputs like training data.

Statistics are always fitted on the training split only and recorded in a JSON-able dict
(``Data.preprocessing``), so that :func:`apply_preprocessing` can prepare new raw inputs
(e.g. images to predict on) exactly like the training data.

Example:
    >>> import numpy as np
    >>> x = np.array([[0.0, 1.0], [2.0, 1.0]])
    >>> stats = fit_normalization(x, "feature")
    >>> stats["mean"], stats["std"]
    ([1.0, 1.0], [1.0, 1.0])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from branchnet.data.dataset import DataError
from branchnet.data.texts import Texts

NORMALIZE_MODES = ("feature", "channel", "none")
_CHUNK_ELEMENTS = 1 << 18  # statistics are computed over chunks of ~2 MB (float64)


@dataclass
class RawData:
    """Inputs as read from a source, before scaling, splitting and normalisation.

    ``splits`` maps ``"train"`` (required), ``"val"`` and ``"test"`` (optional) to ``(x, y)``
    numpy arrays. For ``kind="image"`` x is ``[N, C, H, W]`` (usually uint8); for
    ``kind="features"`` it is ``[N, ...]`` as given; for ``kind="text"`` it is a
    :class:`~branchnet.data.texts.Texts`. ``scale`` turns raw values into [0, 1] (1/255 for
    uint8 images). ``info`` holds extra entries for ``Data.preprocessing``; ``groups`` becomes
    ``Data.groups``.
    """

    splits: dict[str, tuple[np.ndarray | Texts, np.ndarray]]
    classes: list[str]
    name: str
    kind: str = "features"
    scale: float = 1.0
    default_normalize: str = "feature"
    info: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, list[str]] | None = None


def _reduce_axes(x: np.ndarray, mode: str) -> tuple[int, ...]:
    if mode == "feature":
        return (0,)
    if x.ndim < 2:
        raise DataError(
            f"normalize='channel' needs inputs shaped [N, C, ...], got shape {x.shape}; "
            "use normalize='feature'"
        )
    return (0, *range(2, x.ndim))


def _mean_std(x: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) std over ``axes`` in float64: two passes over small row chunks."""
    n = int(np.prod([x.shape[a] for a in axes])) if x.size else 0
    if n == 0:
        raise DataError("cannot fit normalisation statistics on an empty training split")
    rows = max(1, _CHUNK_ELEMENTS // max(1, int(np.prod(x.shape[1:]))))
    chunks = [x[i : i + rows] for i in range(0, x.shape[0], rows)]
    mean = sum(c.sum(axis=axes, dtype=np.float64, keepdims=True) for c in chunks) / n
    buf = np.empty((min(rows, x.shape[0]), *x.shape[1:]), dtype=np.float64)  # reused
    sq = np.zeros_like(mean)
    for c in chunks:
        d = np.subtract(c, mean, out=buf[: len(c)])
        sq += np.square(d, out=d).sum(axis=axes, keepdims=True)
    std = np.sqrt(sq / n)
    return mean.squeeze(axis=axes), std.squeeze(axis=axes)


def fit_normalization(x_train: np.ndarray, mode: str, *, scale: float = 1.0) -> dict[str, Any]:
    """Fit normalisation statistics on (already scaled, float) training inputs.

    ``mode``: ``"feature"`` — z-score each feature (every position of ``x.shape[1:]``), as the
    Neural-Branching original; ``"channel"`` — one mean/std per channel over N, H, W for
    ``[N, C, H, W]``; ``"none"``. A (numerically) zero std is replaced by 1. Returns a JSON-able
    dict ``{"mode", "scale", "mean", "std"}`` with nested lists (None for ``"none"``).

    >>> x = np.zeros((2, 2, 1, 1)); x[:, 1] = [[[1.0]], [[3.0]]]
    >>> s = fit_normalization(x, "channel")
    >>> s["mean"], s["std"]
    ([0.0, 2.0], [1.0, 1.0])
    """
    if mode not in NORMALIZE_MODES:
        raise DataError(f"unknown normalize mode {mode!r}; expected one of {NORMALIZE_MODES}")
    x = np.asarray(x_train)
    if mode == "none":
        return {"mode": "none", "scale": float(scale), "mean": None, "std": None}
    mean, std = _mean_std(x, _reduce_axes(x, mode))
    std = np.where(std <= 1e-8 * np.maximum(1.0, np.abs(mean)), 1.0, std)
    return {"mode": mode, "scale": float(scale), "mean": mean.tolist(), "std": std.tolist()}


def to_float(x: np.ndarray, scale: float, rows: np.ndarray | None = None) -> np.ndarray:
    """Raw values (optionally only ``rows``) -> a new float32 array times ``scale``.

    >>> to_float(np.array([[0, 255]], dtype=np.uint8), 1 / 255).tolist()
    [[0.0, 1.0]]
    """
    x = np.asarray(x)
    factor = np.float32(scale)
    if rows is None:
        return np.multiply(x, factor, dtype=np.float32)
    out = np.empty((len(rows), *x.shape[1:]), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // max(1, int(np.prod(x.shape[1:]))))
    for i in range(0, len(rows), step):  # gather in chunks: no full-size copy of raw rows
        np.multiply(x[rows[i : i + step]], factor, out=out[i : i + step], dtype=np.float32)
    return out


def normalize_(x: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """Apply statistics from :func:`fit_normalization` to float32 ``x`` in place; returns x."""
    mode = stats.get("mode", "none")
    if mode == "none" or x.size == 0:
        return x
    mean = np.asarray(stats["mean"], dtype=np.float32)
    std = np.asarray(stats["std"], dtype=np.float32)
    if mode == "channel":
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean, std = mean.reshape(shape), std.reshape(shape)
    elif mode != "feature":
        raise DataError(f"unknown normalize mode {mode!r}; expected one of {NORMALIZE_MODES}")
    x -= mean
    x /= std
    return x


def _resize_uint8(x: np.ndarray, size: tuple[int, int], image_mode: str | None) -> np.ndarray:
    """Resize NHWC uint8 images like the loader does (Pillow, bilinear)."""
    from PIL import Image

    h, w = size
    out = np.empty((x.shape[0], h, w, x.shape[3]), dtype=np.uint8)
    for i, img in enumerate(x):
        im = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        if image_mode and im.mode != image_mode:
            im = im.convert(image_mode)
        arr = np.asarray(im.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)
        out[i] = arr[:, :, None] if arr.ndim == 2 else arr
    return out


def _as_batch_nhwc(x: np.ndarray, c: int, h: int, w: int) -> np.ndarray:
    """Bring one image or a batch, in either channel layout (or flat rows), to NHWC."""
    if x.ndim == 2:
        if x.shape[1] == c * h * w and not (c == 1 and tuple(x.shape) == (h, w)):
            return x.reshape(-1, c, h, w).transpose(0, 2, 3, 1)  # flat rows, C-major
        if c == 1:
            return x[None, :, :, None]  # one grey image [H, W]
    elif x.ndim == 3:
        if tuple(x.shape) == (c, h, w):
            return x[None].transpose(0, 2, 3, 1)
        if tuple(x.shape) == (h, w, c) or x.shape[2] == c != 1:
            return x[None]
        if c == 1:
            return x[:, :, :, None]  # grey batch [N, H, W]
        if x.shape[0] == c:
            return x[None].transpose(0, 2, 3, 1)
    elif x.ndim == 4:
        if tuple(x.shape[1:]) == (c, h, w):
            return x.transpose(0, 2, 3, 1)
        if x.shape[3] == c:
            return x
        if x.shape[1] == c:
            return x.transpose(0, 2, 3, 1)
    raise DataError(
        f"expected images shaped [N, H, W, C] or [N, C, H, W] with C={c} "
        f"(training images were {c}x{h}x{w}), got shape {tuple(x.shape)}"
    )


def _images_to_nchw(x: np.ndarray, prep: dict[str, Any]) -> np.ndarray:
    c, h, w = (int(v) for v in prep["input_shape"])
    x = _as_batch_nhwc(x, c, h, w)
    if tuple(x.shape[1:3]) != (h, w):
        if prep.get("resample") is None or x.dtype != np.uint8:
            raise DataError(
                f"images are {x.shape[1]}x{x.shape[2]} (HxW) but the training images were "
                f"{h}x{w}; resize them to {h}x{w} first"
            )
        x = _resize_uint8(x, (h, w), prep.get("image_mode"))
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def apply_preprocessing(raw: Any, preprocessing: dict[str, Any]) -> torch.Tensor:
    """Prepare NEW raw inputs exactly like the training data of a loaded :class:`Data`.

    ``raw`` is in the source's units: uint8 images ``[N, H, W, C]`` or ``[N, C, H, W]`` (a single
    image without N is accepted too), image file paths (decoded like the loader did), or float
    arrays shaped like the training inputs. Steps: scale -> ``[N, C, H, W]`` -> normalise with
    the training statistics. Returns a float32 tensor.

    >>> import numpy as np
    >>> prep = {"layout": "features", "input_shape": [2], "scale": 0.5,
    ...         "mode": "feature", "mean": [1.0, 0.0], "std": [1.0, 2.0]}
    >>> apply_preprocessing(np.array([[4.0, 4.0]]), prep).tolist()
    [[1.0, 1.0]]
    """
    prep = preprocessing
    if "input_shape" not in prep:
        raise DataError("preprocessing dict lacks 'input_shape'; pass Data.preprocessing")
    image = prep.get("layout") == "image"
    if isinstance(raw, (str, Path)) or (
        isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], (str, Path))
    ):
        if not image:
            raise DataError("file paths can only be given for image data")
        from branchnet.data.images import read_image_files

        paths = [raw] if isinstance(raw, (str, Path)) else list(raw)
        size = prep.get("image_size") if prep.get("resample") else None
        mode = prep.get("image_mode") or ("L" if prep.get("channels") == 1 else "RGB")
        raw = read_image_files(paths, size=size, mode=mode, progress=False)
    x = raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"inputs must be numeric arrays, got dtype {x.dtype}")
    shape = tuple(int(v) for v in prep["input_shape"])
    if image:
        x = _images_to_nchw(x, prep)
    elif tuple(x.shape) == shape:
        x = x[None]
    elif tuple(x.shape[1:]) != shape:
        if x.ndim >= 2 and int(np.prod(x.shape[1:])) == int(np.prod(shape)):
            x = x.reshape(-1, *shape)
        else:
            dims = ", ".join(map(str, shape))
            raise DataError(f"inputs have shape {x.shape}; expected [N, {dims}]")
    out = to_float(x, float(prep.get("scale", 1.0)))
    if not np.isfinite(out).all():
        raise DataError("inputs contain NaN or infinite values")
    return torch.from_numpy(normalize_(out, prep))
