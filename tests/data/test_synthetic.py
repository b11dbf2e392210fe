"""cribo.data.synthetic: the embedded scenes are deterministic, pinned and varied."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from cribo.data import (SyntheticScenes)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# Regression pin: SHA-256 of a few rendered images and masks, computed once from
# this implementation.  A change here means every synthetic data set (and the
# results measured on it) changed; update the digests only deliberately.
PINNED = [
    ("train", 0, 96, "4afcd29699490d915f90d28798ae0102eba45320729daafdac108a50ce53a278",
     "0b87a87e676b29be492d60c5264f90cdc6e580f5d4bddeb50e1725e199c62a76"),
    ("train", 1, 96, "c0793f615ef7c9f4dcfc78889ba6b659e9e15a047172672521b091cd93fe84ca",
     "0d6d67cfeaed38afec3e251c264833732b410e823651f8c8848575448c0a59f0"),
    ("val", 0, 96, "c7a3b8714ca054f4000163aab03ce7aa4bfaf3a327d7bf700fb587826cd14ee8",
     "fe7a72b68ca0927ba67d73f3ddf188cd0cb064d331b32ea77ebfb398c2d3c364"),
    ("train", 2, 64, "d9d9681e6893375d55897b8b9e82b4365e6942f0ae100026962fe9197da331f4",
     "a7d30bcc2e2b1e8bc201f9939497d4a74d0e4719399e6bd0d8a6d83fb3c2f608"),
]


def _digests():
    out = []
    for split, i, size, _, _ in PINNED:
        image, mask = SyntheticScenes(split, 4, size=size, seed=0)[i]
        out.append((sha(image), sha(mask.astype("<i8"))))
    return out


def test_synthetic_pinned_hashes():
    assert _digests() == [(im, m) for *_, im, m in PINNED]


def test_synthetic_deterministic_across_calls_and_processes():
    a = SyntheticScenes("train", 5, size=48, seed=3)
    b = SyntheticScenes("train", 5, size=48, seed=3)
    for i in range(5):
        np.testing.assert_array_equal(a[i][0], b[i][0])
        np.testing.assert_array_equal(a[i][1], a[i][1])
    code = ("import hashlib, numpy as np; from cribo.data import SyntheticScenes; "
            "ims = [SyntheticScenes(s, 4, size=n, seed=0)[i] for s, i, n in "
            f"{[(s, i, n) for s, i, n, _, _ in PINNED]}]; "
            "print(' '.join(hashlib.sha256(x.tobytes()).hexdigest() + ' ' + "
            "hashlib.sha256(m.astype('<i8').tobytes()).hexdigest() for x, m in ims))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.split() == [h for *_, im, m in PINNED for h in (im, m)]


def test_synthetic_splits_and_seeds_differ():
    tr, va = SyntheticScenes("train", 3, size=32), SyntheticScenes("val", 3, size=32)
    other = SyntheticScenes("train", 3, size=32, seed=1)
    for i in range(3):
        assert not np.array_equal(tr[i][0], va[i][0])
        assert not np.array_equal(tr[i][0], other[i][0])
    assert not np.array_equal(tr[0][0], tr[1][0])


def test_synthetic_items_shapes_labels_and_objects():
    sc = SyntheticScenes("train", 40, size=96, n_classes=12)
    assert len(sc) == 40 and sc.n_classes == 12 and len(sc.class_names) == 13
    assert sc.class_names[0] == "background" and sc.class_names[1] == "disc/stripes"
    sizes = []
    for i in range(0, 40, 4):
        image, mask = sc[i]
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        assert mask.shape == (96, 96) and mask.dtype == np.int64
        assert mask.min() >= 0 and mask.max() <= 12
        _, objects = sc.describe(i)
        assert 2 <= len(objects) <= 5
        assert {o.label for o in objects} >= set(np.unique(mask)) - {0}
        sizes += [2 * o.radius * 96 / 8 for o in objects]  # diameter in 8 px patches
    assert 2.5 <= min(sizes) and max(sizes) <= 5  # several patches across
    assert sc[-1][0].shape == (96, 96, 3)
    with pytest.raises(IndexError):
        sc[40]


def test_synthetic_renders_the_same_scene_at_any_resolution():
    sc = SyntheticScenes("val", 4, size=48)
    for i in range(4):
        small, m_small = sc.render(i)
        big, m_big = sc.render(i, size=96)
        down = big.astype(np.float64).reshape(48, 2, 48, 2, 3).mean(axis=(1, 3))
        assert np.abs(down - small).mean() < 6  # same scene; differs only at edges
        assert (m_big[::2, ::2] == m_small).mean() > 0.95


def test_synthetic_colour_does_not_identify_the_class():
    # Per (image, class) mean colour: the share of its variance explained by the
    # class (eta^2) is ~0 when colours are drawn independently of the class
    # (here 0.03, sampling noise), ~1 if each class had its own colour.
    sc = SyntheticScenes("train", 200, size=32)
    colours, labels = [], []
    for i in range(len(sc)):
        image, mask = sc[i]
        for c in np.unique(mask[mask > 0]):
            colours.append(image[mask == c].mean(axis=0))
            labels.append(c)
    X, y = np.array(colours), np.array(labels)
    assert set(y) == set(range(1, 7))
    grand = X.mean(axis=0)
    total = ((X - grand) ** 2).sum()
    means = np.array([X[y == c].mean(axis=0) for c in range(1, 7)])
    between = sum((y == c).sum() * ((means[c - 1] - grand) ** 2).sum() for c in range(1, 7))
    assert between / total < 0.1
    nearest = ((X[:, None] - means[None]) ** 2).sum(-1).argmin(1) + 1
    assert (nearest == y).mean() < 2 / 6  # chance is 1/6


def test_synthetic_in_memory_and_errors():
    lazy = SyntheticScenes("train", 3, size=32)
    mem = SyntheticScenes("train", 3, size=32, in_memory=True)
    for i in range(3):
        np.testing.assert_array_equal(lazy[i][0], mem[i][0])
        np.testing.assert_array_equal(lazy[i][1], mem[i][1])
        assert mem[i][1].dtype == np.int64
    custom = SyntheticScenes("train", 2, size=32, classes=[("ring", "dots"), ("star", "plain")])
    assert custom.class_names == ("background", "ring/dots", "star/plain")
    for kwargs, match in [({"split": "test"}, "split"), ({"n_classes": 13}, "n_classes"),
                          ({"classes": [("blob", "plain")]}, "unknown class"),
                          ({"min_objects": 4, "max_objects": 3}, "min_objects"),
                          ({"antialias": 2}, "antialias")]:
        with pytest.raises(ValueError, match=match):
            SyntheticScenes(**{"n_images": 1, **kwargs})
