"""Per-unit properties of a layer: filter colour and frequency, activations, class preferences.

Weight-based properties (no data needed) describe first-layer filters ``[out, 3, kh, kw]``:

* :func:`colourfulness` — how much of a filter is colour contrast rather than luminance;
* :func:`dominant_frequency` — the FFT-magnitude centroid of its spatial frequency;
* :func:`svd_factors` — loadings of the units on the top factors of the next layer's ``|W|``
  (the Distill article's analysis of an *unbranched* network).

Activation-based properties read the layer on data: :func:`unit_activations` (conv outputs
global-average-pooled), :func:`class_means` and :func:`class_selectivity`.

Example:
    >>> import numpy as np
    >>> grey = np.ones((1, 3, 3, 3))                     # same in R, G and B
    >>> red_green = np.zeros((1, 3, 3, 3)); red_green[0, 0], red_green[0, 1] = 1.0, -1.0
    >>> colourfulness(np.concatenate([grey, red_green])).round(3).tolist()
    [0.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from branchnet.analysis.partitions import AnalysisError, units_view, virtual_branches
from branchnet.data.dataset import Split

__all__ = [
    "class_means",
    "class_selectivity",
    "colourfulness",
    "dominant_frequency",
    "svd_factors",
    "unit_activations",
]

MIN_SAMPLES = 10
"""Fewest samples the activation statistics (class means, CKA) accept."""

MIN_PER_CLASS = 2
"""Fewest samples per class :func:`class_means` accepts."""

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]


def _array(x: ArrayLike, name: str, ndim: int | tuple[int, ...]) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, float)
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if a.ndim not in dims:
        raise AnalysisError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise AnalysisError(f"{name} contains NaN or infinite values")
    return a


# --------------------------------------------------------------------------- weights


def colourfulness(weight: ArrayLike) -> np.ndarray:
    """Per filter: norm after removing the per-pixel RGB mean, divided by the total norm.

    ``weight`` is ``[out, 3, kh, kw]``. 0 means black-and-white (R = G = B at every pixel),
    values near 1 pure colour contrast (R + G + B = 0 at every pixel); an all-zero filter gets 0.

    >>> w = np.zeros((1, 3, 2, 2)); w[0, 0] = 1.0      # red only: 2/3 of its energy is colour
    >>> round(float(colourfulness(w)[0]) ** 2, 4)
    0.6667
    """
    w = _array(weight, "weight", 4)
    if w.shape[1] != 3:
        raise AnalysisError(
            f"colourfulness needs first-layer filters [out, 3, kh, kw] (RGB input), got shape "
            f"{w.shape}"
        )
    total = np.sqrt((w**2).sum(axis=(1, 2, 3)))
    chroma = np.sqrt(((w - w.mean(axis=1, keepdims=True)) ** 2).sum(axis=(1, 2, 3)))
    return np.divide(chroma, total, out=np.zeros_like(total), where=total > 0)


def dominant_frequency(weight: ArrayLike) -> np.ndarray:
    """Per filter: the FFT-magnitude-weighted mean radial spatial frequency, in cycles/pixel.

    Each channel's spatial mean (DC) is removed, the 2-D FFT magnitudes are averaged over
    channels, and the centroid of ``sqrt(fx² + fy²)`` is taken (0 .. ~0.71 for a
    checkerboard). Filters without any spatial variation get 0.

    >>> smooth = np.tile(np.arange(4.0), (1, 1, 4, 1))             # a ramp
    >>> checker = (np.indices((4, 4)).sum(0) % 2)[None, None] * 1.0
    >>> bool(dominant_frequency(checker)[0] > dominant_frequency(smooth)[0])
    True
    """
    w = _array(weight, "weight", (3, 4))
    if w.ndim == 3:  # [out, kh, kw]: one channel
        w = w[:, None]
    kh, kw = w.shape[2:]
    w = w - w.mean(axis=(2, 3), keepdims=True)
    mag = np.abs(np.fft.fft2(w, axes=(2, 3))).mean(axis=1)  # [out, kh, kw]
    fy, fx = np.fft.fftfreq(kh), np.fft.fftfreq(kw)
    radius = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    total = mag.sum(axis=(1, 2))
    centroid = (mag * radius).sum(axis=(1, 2))
    return np.divide(centroid, total, out=np.zeros_like(total), where=total > 1e-12 * (1 + total.max()))


def svd_factors(weight_next: ArrayLike, k: int = 2) -> np.ndarray:
    """Loadings ``[in_units, k]`` of a layer's input units on the top ``k`` factors of ``|W|``.

    ``weight_next`` is the weight of the layer that *reads* the units: ``[out, in, kh, kw]``
    (a conv, summed over its spatial dims) or ``[out, in]`` (a linear layer). Following
    Voss et al. (2021), ``|W|`` is taken, its rows are centred (a non-negative matrix's top
    singular vector has one sign and only says "everything connects"), and the right singular
    vectors, scaled by their singular values, are returned. Signs are fixed so that each
    factor's largest loading is positive.

    >>> w = np.zeros((4, 4)); w[:2, :2] = 1.0; w[2:, 2:] = 1.0     # two blocks of inputs
    >>> f = svd_factors(w, k=1)[:, 0]
    >>> bool(np.sign(f[0]) == np.sign(f[1]) != np.sign(f[2]) == np.sign(f[3]))
    True
    """
    w = _array(weight_next, "weight_next", (2, 4))
    a = np.abs(w)
    if a.ndim == 4:
        a = a.sum(axis=(2, 3))
    if not 1 <= k <= min(a.shape):
        raise AnalysisError(f"k must be in 1..{min(a.shape)} for a {a.shape} weight, got {k}")
    a = a - a.mean(axis=1, keepdims=True)
    _, s, vt = np.linalg.svd(a, full_matrices=False)
    loadings = vt[:k].T * s[:k]
    flip = np.sign(loadings[np.abs(loadings).argmax(axis=0), np.arange(k)])
    return loadings * np.where(flip == 0, 1.0, flip)


# --------------------------------------------------------------------------- activations


def unit_activations(
    model: nn.Module,
    layer: str,
    x: torch.Tensor | Split,
    batch_size: int = 256,
    max_samples: int | None = None,
    *,
    rectify: bool = False,
) -> np.ndarray:
    """``[N, units]`` activations of ``layer``; outputs with spatial dims are averaged over them.

    Units are dim 1 of the layer's output (channels of ``[N, C, H, W]``, features of
    ``[N, C]``); dims after it are global-average-pooled, one batch at a time, so full feature
    maps are never held for all inputs. A virtual-branch layer's ``[N, K, C, ...]`` output gives
    ``K*C`` units, branch-major (:func:`~branchnet.analysis.partitions.units_view`).
    With ``rectify=True`` a ReLU is applied before pooling
    (the mean *rectified* response). Only the first ``max_samples`` rows are used (shuffle
    first if the order matters). Reads through :func:`branchnet.taps.extract`: the model runs
    in eval mode without gradients and its training flags are restored.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    >>> unit_activations(net, "0", torch.randn(10, 3, 8, 8), batch_size=4).shape
    (10, 4)
    >>> from branchnet.virtual import vcnn
    >>> vnet = vcnn((4, 8), 3, branches=2, shared_frac=0.5, input_shape=(3, 8, 8))
    >>> unit_activations(vnet, "features.0.0", torch.randn(10, 3, 8, 8)).shape
    (10, 8)
    """
    from branchnet.taps import TapError, extract, tap

    if isinstance(x, Split):
        x = x.x
    x = torch.as_tensor(x)
    if max_samples is not None:
        x = x[: int(max_samples)]
    if batch_size < 1:
        raise AnalysisError(f"batch_size must be >= 1, got {batch_size}")
    try:
        t = tap(model, layer)
        branches = virtual_branches(model)
        chunks = []
        for start in range(0, len(x), batch_size):
            h = units_view(extract(t, None, x[start : start + batch_size], batch_size=batch_size), branches)
            if h.ndim < 2:
                raise AnalysisError(
                    f"layer {layer!r} returns shape {tuple(h.shape)}: expected [N, units, ...]"
                )
            if rectify:
                h = h.clamp_min(0)
            chunks.append(h.flatten(2).mean(dim=2) if h.ndim > 2 else h)
    except TapError as e:
        raise AnalysisError(str(e)) from None
    if not chunks:
        raise AnalysisError("no inputs: x is empty")
    return torch.cat(chunks).double().numpy()


def _labels(y: ArrayLike, n: int) -> np.ndarray:
    lab = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if lab.ndim != 1 or lab.shape[0] != n:
        raise AnalysisError(f"y must be 1-D with {n} labels (one per sample), got shape {lab.shape}")
    if lab.size and (not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0):
        raise AnalysisError("y must hold non-negative integer class indices")
    return lab.astype(np.int64)


def class_means(acts: ArrayLike, y: ArrayLike, n_classes: int) -> np.ndarray:
    """``[units, classes]``: each unit's mean activation over the samples of each class.

    Needs at least 10 samples and 2 per class.

    >>> a = np.arange(20.0).reshape(10, 2); y = np.array([0, 1] * 5)
    >>> class_means(a, y, 2).tolist()
    [[8.0, 10.0], [9.0, 11.0]]
    """
    a = _array(acts, "acts", 2)
    lab = _labels(y, a.shape[0])
    if a.shape[0] < MIN_SAMPLES:
        raise AnalysisError(
            f"class statistics need at least {MIN_SAMPLES} samples, got {a.shape[0]}"
        )
    if n_classes < 1 or (lab.size and lab.max() >= n_classes):
        raise AnalysisError(f"labels must be in 0..{n_classes - 1} (n_classes={n_classes})")
    counts = np.bincount(lab, minlength=n_classes)
    if counts.min() < MIN_PER_CLASS:
        few = np.flatnonzero(counts < MIN_PER_CLASS).tolist()
        raise AnalysisError(
            f"class means need at least {MIN_PER_CLASS} samples of every class; class(es) "
            f"{few} have {counts[few].tolist()}"
        )
    onehot = np.zeros((a.shape[0], n_classes))
    onehot[np.arange(a.shape[0]), lab] = 1.0
    return (a.T @ onehot) / counts


def class_selectivity(class_means: ArrayLike) -> np.ndarray:
    """Per unit ``(mu_max - mu_rest) / (mu_max + mu_rest)`` on ReLU-clipped class means.

    ``mu_max`` is the largest class mean, ``mu_rest`` the mean of the others. 0 = no class
    preference, 1 = responds to one class only; 0 where undefined (all means <= 0).

    >>> class_selectivity(np.array([[3.0, 1.0, 1.0], [2.0, 2.0, 2.0], [-1.0, -2.0, 0.0]])).tolist()
    [0.5, 0.0, 0.0]
    """
    m = np.clip(_array(class_means, "class_means", 2), 0.0, None)
    if m.shape[1] < 2:
        raise AnalysisError(f"class selectivity needs at least 2 classes, got {m.shape[1]}")
    top = m.max(axis=1)
    rest = (m.sum(axis=1) - top) / (m.shape[1] - 1)
    den = top + rest
    return np.divide(top - rest, den, out=np.zeros_like(den), where=den > 0)
