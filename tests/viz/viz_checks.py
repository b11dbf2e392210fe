"""What the picture tests of tests/viz share: reading a PNG back and finding a data
point's pixel in it."""
from __future__ import annotations

import os

import numpy as np


def read_png(path):
    from PIL import Image

    assert os.path.getsize(path) > 0
    return np.asarray(Image.open(path).convert("RGB"))


def expected_size(fig):
    w, h = fig.get_size_inches() * fig.dpi
    return int(round(h)), int(round(w))


def pixel(png, ax, x, y):
    """The PNG pixel at data point (x, y) of ``ax`` (display y runs upwards)."""
    X, Y = ax.transData.transform((x, y))
    return png[int(png.shape[0] - Y), int(X)].astype(int)
