"""scikit-learn's handwritten digits (1,797 8x8 images, embedded: no download).

Example:
    >>> raw = read_digits()
    >>> raw.splits["train"][0].shape, raw.classes[:3], raw.scale
    ((1797, 1, 8, 8), ['0', '1', '2'], 0.0625)
"""

from __future__ import annotations

import numpy as np

from branchnet.data.prepare import RawData


def read_digits() -> RawData:
    """The digits as :class:`RawData`: x ``[N, 1, 8, 8]`` in 0..16 (scale 1/16), classes "0".."9".

    There is no separate test set; :func:`branchnet.data.load` splits one off. Normalised per
    feature by default, like the Neural-Branching original.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.asarray(d.images, dtype=np.float32).reshape(-1, 1, 8, 8)
    y = np.asarray(d.target, dtype=np.int64)
    return RawData(
        splits={"train": (x, y)},
        classes=[str(i) for i in range(10)],
        name="digits",
        kind="image",
        scale=1.0 / 16.0,
        default_normalize="feature",
        info={"image_mode": None, "resample": None},
    )
