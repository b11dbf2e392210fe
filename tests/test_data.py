"""cribo.data: views and positions (SPEC §1), the data sets, the two-view loader."""
from __future__ import annotations

import colorsys
import hashlib
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from cribo.data import (IMAGENET_MEAN, IMAGENET_STD, Crop, EpochBatchSampler, ImageFolder,
                        SyntheticScenes, TwoViewDataset, TwoViewTransform,
                        UnreadableImageWarning, ViewAugment, ViewTransform, VOCSegmentation,
                        color_jitter, gaussian_blur, grayscale, make_loader, normalize,
                        patch_positions, resized_crop, sample_crop, set_epoch, solarize)
from cribo.data.views import _hsv_to_rgb, _rgb_to_hsv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def coordinate_image(h: int, w: int) -> np.ndarray:
    """(h, w, 2) float32: each pixel holds its own centre (x, y) = (j + 0.5, i + 0.5)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    return np.stack([xx, yy], axis=-1)


def patch_means(chw: np.ndarray, p: int) -> np.ndarray:
    """(C, S, S) -> (N, C): each patch's mean, row-major over the patch grid."""
    C, S, _ = chw.shape
    g = S // p
    return chw.reshape(C, g, p, g, p).mean(axis=(2, 4)).reshape(C, -1).T


# ================================================================== views (SPEC §1)

@pytest.mark.parametrize("flip_p", [0.0, 1.0])
@pytest.mark.parametrize("hw,size,patch", [((80, 120), 32, 8), ((24, 20), 48, 8)])
def test_positions_are_the_mean_coordinate_over_each_patch(flip_p, hw, size, patch):
    # Crop an image whose pixels encode their own coordinates, with the real
    # transform (colour off): each patch's mean encoded coordinate is where the
    # patch came from.  Bicubic reproduces linear ramps up to rounding and the
    # image border; observed error <= 0.021 px, while a half-pixel slip, a
    # wrong flip or a swapped axis is >= 0.5 px.  The second case upsamples.
    img = coordinate_image(*hw)
    t = ViewTransform(size, patch, ViewAugment(flip_p=flip_p).geometric_only())
    rng = np.random.default_rng(7)
    for _ in range(60):
        v = t(img, rng)
        assert v.crop.flip == bool(flip_p)
        assert v.positions.shape == ((size // patch) ** 2, 2) and v.positions.dtype == np.float32
        np.testing.assert_allclose(patch_means(v.image, patch), v.positions, atol=0.05)


def test_positions_by_hand_and_flip_mirrors_them():
    crop = Crop(top=10, left=20, height=40, width=60)
    pos = patch_positions(crop, size=8, patch_size=4)  # 2 x 2 patches, each 30 x 20 px
    np.testing.assert_array_equal(pos, [[35, 20], [65, 20], [35, 40], [65, 40]])
    flipped = patch_positions(Crop(10, 20, 40, 60, flip=True), 8, 4)
    np.testing.assert_array_equal(flipped[:, 0], 2 * 20 + 60 - pos[:, 0])  # x mirrored in crop
    np.testing.assert_array_equal(flipped[:, 1], pos[:, 1])
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patch_positions(crop, 10, 4)


def test_resized_crop_flips_after_resizing():
    img = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    a = resized_crop(img, Crop(3, 5, 20, 24), 16)
    b = resized_crop(img, Crop(3, 5, 20, 24, flip=True), 16)
    assert a.dtype == np.uint8 and a.shape == (16, 16, 3)
    np.testing.assert_array_equal(b, a[:, ::-1])
    full = resized_crop(img, Crop(0, 0, 30, 40), 40)
    assert full.shape == (40, 40, 3)


def test_sample_crop_respects_scale_ratio_and_bounds():
    rng = np.random.default_rng(1)
    H, W = 60, 90
    for _ in range(300):
        top, left, h, w = sample_crop(rng, H, W, (0.25, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
        # the rounding of w and h to pixels moves area and ratio a little
        assert 0.25 * H * W * 0.9 <= h * w <= H * W
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_sample_crop_falls_back_to_the_centre_crop():
    rng = np.random.default_rng(0)
    # a full-area square crop never fits an 80 x 120 image: largest centred crop of ratio 1
    assert sample_crop(rng, 80, 120, (1.0, 1.0), (1.0, 1.0)) == (0, 20, 80, 80)
    assert sample_crop(rng, 120, 80, (1.0, 1.0), (1.0, 1.0)) == (20, 0, 80, 80)
    assert sample_crop(rng, 50, 60, (1.0, 1.0), (0.5, 2.0)) == (0, 0, 50, 60)


def test_two_views_shapes_dtypes_reproducibility():
    img = SyntheticScenes("train", 1, size=64)[0][0]
    t = TwoViewTransform(size=32, patch_size=8)
    v1, v2 = t(img, np.random.default_rng(3))
    for v in (v1, v2):
        assert v.image.shape == (3, 32, 32) and v.image.dtype == np.float32
        assert v.image.flags.c_contiguous and np.isfinite(v.image).all()
        assert v.positions.shape == (16, 2) and v.positions.dtype == np.float32
    w1, w2 = t(img, np.random.default_rng(3))
    np.testing.assert_array_equal(v1.image, w1.image)
    np.testing.assert_array_equal(v2.positions, w2.positions)
    u1, _ = t(img, np.random.default_rng(4))
    assert not np.array_equal(u1.image, v1.image)
    # SPEC §1 defaults: blur p=1 / 0.1, solarisation only on view 2
    assert (t.view1.blur_p, t.view1.solarize_p) == (1.0, 0.0)
    assert (t.view2.blur_p, t.view2.solarize_p) == (0.1, 0.2)
    a = t.view1
    assert (a.scale, a.interpolation, a.flip_p, a.jitter_p, a.grayscale_p, a.blur_sigma) == \
        ((0.25, 1.0), "bicubic", 0.5, 0.8, 0.2, (0.1, 2.0))
    assert (a.brightness, a.contrast, a.saturation, a.hue) == (0.4, 0.4, 0.2, 0.1)


def test_normalisation_is_imagenet_mean_std():
    img = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    geo = ViewAugment().geometric_only()
    norm = ViewTransform(16, 8, ViewAugment(jitter_p=0, grayscale_p=0, blur_p=0))(
        img, np.random.default_rng(5))
    raw = ViewTransform(16, 8, geo)(img, np.random.default_rng(5))
    assert raw.image.min() >= 0 and raw.image.max() <= 1  # uint8 scaled by 1/255
    expect = (raw.image - np.array(IMAGENET_MEAN, np.float32)[:, None, None]) \
        / np.array(IMAGENET_STD, np.float32)[:, None, None]
    np.testing.assert_allclose(norm.image, expect, rtol=1e-5, atol=1e-5)
    whole = normalize(img)
    assert whole.shape == (3, 40, 50) and whole.dtype == np.float32
    np.testing.assert_allclose(whole[:, 3, 4], (img[3, 4] / 255 - IMAGENET_MEAN) / IMAGENET_STD,
                               rtol=1e-5)


def test_colour_operations():
    rng = np.random.default_rng(0)
    x = rng.random((6, 7, 3)).astype(np.float32)
    g = grayscale(x)
    assert np.all(g[..., 0] == g[..., 1]) and np.all(g[..., 1] == g[..., 2])
    np.testing.assert_allclose(g[..., 0], x @ [0.299, 0.587, 0.114], rtol=1e-6)
    np.testing.assert_allclose(solarize(np.array([0.2, 0.5, 0.9], np.float32)),
                               [0.2, 0.5, 0.1], rtol=1e-6)
    h, s, v = _rgb_to_hsv(x)
    ref = np.array([colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3).astype(float)])
    np.testing.assert_allclose(np.stack([h, s, v], -1).reshape(-1, 3), ref, atol=1e-6)
    np.testing.assert_allclose(_hsv_to_rgb(h, s, v), x, atol=1e-6)
    shifted = np.array([colorsys.hsv_to_rgb((a + 0.3) % 1, b, c) for a, b, c in ref])
    np.testing.assert_allclose(_hsv_to_rgb((h + 0.3) % 1, s, v).reshape(-1, 3), shifted, atol=1e-6)
    red = np.array([[[1.0, 0.0, 0.0]]], np.float32)
    h, s, v = _rgb_to_hsv(red)
    np.testing.assert_allclose(_hsv_to_rgb((h + 1 / 3) % 1, s, v), [[[0, 1, 0]]], atol=1e-6)
    # zero amplitudes: identity; otherwise in range and changed
    np.testing.assert_array_equal(color_jitter(x, rng, 0, 0, 0, 0), x)
    y = color_jitter(x, rng)
    assert y.dtype == np.float32 and y.min() >= 0 and y.max() <= 1 and not np.allclose(y, x)
    const = np.full((9, 9, 3), 0.3, np.float32)
    np.testing.assert_allclose(gaussian_blur(const, 1.5), const, rtol=1e-6)
    impulse = np.zeros((21, 21, 1), np.float32)
    impulse[10, 10] = 1
    b = gaussian_blur(impulse, 2.0)
    assert abs(b.sum() - 1) < 1e-5 and b[10, 10] == b.max() and np.allclose(b, b[::-1, ::-1])


def test_view_config_errors_are_actionable():
    with pytest.raises(ValueError, match="flip_p must be a probability"):
        ViewAugment(flip_p=1.5)
    with pytest.raises(ValueError, match="scale"):
        ViewAugment(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="interpolation"):
        ViewAugment(interpolation="cubic")
    with pytest.raises(ValueError, match="mean and std together"):
        ViewAugment(mean=None)
    with pytest.raises(ValueError, match="multiple"):
        ViewTransform(size=30, patch_size=8)
    with pytest.raises(ValueError, match="colour augmentations need 3 channels"):
        ViewTransform(16, 8)(coordinate_image(20, 20), np.random.default_rng(0))
    gray = ViewTransform(16, 8)(np.zeros((20, 20), np.uint8), np.random.default_rng(0))
    assert gray.image.shape == (3, 16, 16)


# ================================================================== synthetic scenes

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


# ================================================================== folders

def _write_images(root, names, size=(12, 9)):
    for k, name in enumerate(names):
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        arr = np.full((size[1], size[0], 3), 20 * k, np.uint8)
        Image.fromarray(arr).save(path)


def test_image_folder_recursive_sorted_and_skips_unreadable(tmp_path):
    _write_images(tmp_path, ["b/2.png", "a.JPG", "b/1.bmp", "c/d/e.tif", "z.webp"])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"")
    (tmp_path / "b" / "3_broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    folder = ImageFolder(tmp_path)
    rel = [os.path.relpath(p, tmp_path).replace(os.sep, "/") for p in folder.paths]
    assert rel == ["a.JPG", "b/1.bmp", "b/2.png", "b/3_broken.jpg", "c/d/e.tif", "z.webp"]
    first = folder[0]
    assert first.shape == (9, 12, 3) and first.dtype == np.uint8
    with pytest.warns(UnreadableImageWarning, match="3_broken.jpg"):
        fallback = folder[3]  # the next readable image instead
    np.testing.assert_array_equal(fallback, folder[4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad: skipped silently from now on
        np.testing.assert_array_equal(folder[3], folder[4])
    with pytest.warns(UnreadableImageWarning, match="3_broken.jpg"):
        checked = ImageFolder(tmp_path, check=True)
    assert len(checked) == 5


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path)
    (tmp_path / "x.png").write_bytes(b"garbage")
    folder = ImageFolder(tmp_path)
    with pytest.warns(UnreadableImageWarning), pytest.raises(RuntimeError, match="none of the 1"):
        folder[0]


def _voc_tree(root, ids=("2007_000001", "2007_000002", "2007_000003")):
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    palette = [0] * 768
    palette[3:6] = [128, 0, 0]  # VOC-like palette: index 1 dark red, 255 light
    palette[765:768] = [224, 224, 192]
    masks = {}
    for k, i in enumerate(ids):
        h, w = 10 + k, 14
        Image.fromarray(np.full((h, w, 3), 50 * k, np.uint8)).save(
            os.path.join(root, "JPEGImages", i + ".jpg"))
        m = np.zeros((h, w), np.uint8)
        m[2:6, 3:9] = k + 1
        m[0, :] = 255
        im = Image.fromarray(m, "P")
        im.putpalette(palette)
        im.save(os.path.join(root, "SegmentationClass", i + ".png"))
        masks[i] = m
    with open(os.path.join(root, "ImageSets/Segmentation/train.txt"), "w") as f:
        f.write(f"{ids[0]}\n{ids[2]}\n")
    with open(os.path.join(root, "ImageSets/Segmentation/val.txt"), "w") as f:
        f.write(f"{ids[1]}\n")
    return masks


def test_voc_segmentation(tmp_path):
    masks = _voc_tree(tmp_path)
    train, val = VOCSegmentation(tmp_path, "train"), VOCSegmentation(tmp_path, "val")
    assert (len(train), len(val)) == (2, 1) and train.ids == ["2007_000001", "2007_000003"]
    image, mask = train[1]
    assert image.shape == (12, 14, 3) and image.dtype == np.uint8
    assert mask.dtype == np.int64
    np.testing.assert_array_equal(mask, masks["2007_000003"])
    assert set(np.unique(val[0][1])) == {0, 2, 255}
    assert train.n_classes == 20 and train.class_names[0] == "background"
    nested = tmp_path / "outer"
    os.makedirs(nested / "VOCdevkit")
    os.rename(tmp_path / "JPEGImages", nested / "VOCdevkit" / "JPEGImages")
    for sub in ("SegmentationClass", "ImageSets"):
        os.rename(tmp_path / sub, nested / "VOCdevkit" / sub)
    os.rename(nested / "VOCdevkit", tmp_path / "VOC2012")
    assert len(VOCSegmentation(tmp_path, "train")) == 2  # finds root/VOC2012


def test_voc_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="SegmentationClass"):
        os.makedirs(tmp_path / "JPEGImages")
        VOCSegmentation(tmp_path)
    _voc_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"test\.txt.*splits present: train, val"):
        VOCSegmentation(tmp_path, "test")
    os.remove(tmp_path / "SegmentationClass" / "2007_000003.png")
    with pytest.raises(FileNotFoundError, match="2007_000003.png"):
        VOCSegmentation(tmp_path, "train")
    Image.new("RGB", (14, 11)).save(tmp_path / "SegmentationClass" / "2007_000002.png")
    with pytest.raises(ValueError, match="palette or 8-bit gray"):
        VOCSegmentation(tmp_path, "val")[0]


# ================================================================== two views, loader

def test_two_view_dataset_items():
    ds = TwoViewDataset(SyntheticScenes("train", 6, size=48), TwoViewTransform(32, 8), seed=5)
    item = ds[4]
    assert set(item) == {"view1", "view2", "pos1", "pos2", "image_id"}
    assert item["view1"].shape == item["view2"].shape == (3, 32, 32)
    assert item["view1"].dtype == np.float32
    assert item["pos1"].shape == item["pos2"].shape == (16, 2) and item["pos1"].dtype == np.float32
    assert item["image_id"] == 4 and item["image_id"].dtype == np.int64
    assert ((item["pos1"] >= 0) & (item["pos1"] <= 48)).all()
    again = ds[4]
    np.testing.assert_array_equal(item["view2"], again["view2"])
    ds.set_epoch(1)
    assert not np.array_equal(ds[4]["pos1"], item["pos1"])
    with pytest.raises(ValueError, match="epoch"):
        ds.set_epoch(-1)
    with pytest.raises(TypeError, match="indexable"):
        TwoViewDataset(object())


def test_batch_sampler_epochs_and_process_blocks():
    one = EpochBatchSampler(23, 6, shuffle=True, seed=1)
    e0 = list(one)
    assert len(e0) == len(one) == 3 and all(len(b) == 6 for b in e0)
    assert len(set(sum(e0, []))) == 18
    one.set_epoch(1)
    assert list(one) != e0
    one.set_epoch(0)
    assert list(one) == e0
    # two processes with batch 3 = one process with batch 6, in rank order
    ranks = [EpochBatchSampler(23, 3, True, 1, rank=r, world_size=2) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == e0
    # without drop_last: one process keeps the short batch; several pad to equal steps
    assert [len(b) for b in EpochBatchSampler(23, 6, False, drop_last=False)] == [6, 6, 6, 5]
    padded = [list(EpochBatchSampler(23, 3, False, drop_last=False, rank=r, world_size=2))
              for r in range(2)]
    assert [len(b) for b in padded[0]] == [len(b) for b in padded[1]] == [3] * 4
    assert padded[1][-1] == [21, 22, 0]
    with pytest.raises(ValueError, match="rank"):
        EpochBatchSampler(10, 2, rank=2, world_size=2)


def test_loader_same_batches_with_0_and_2_workers():
    torch = pytest.importorskip("torch")
    ds = TwoViewDataset(SyntheticScenes("train", 10, size=32), TwoViewTransform(32, 8), seed=2)
    runs = []
    for workers in (0, 2):
        loader = make_loader(ds, batch_size=4, num_workers=workers, shuffle=True, seed=9)
        epochs = []
        for epoch in (0, 1):
            set_epoch(loader, epoch)
            epochs.append(list(loader))
        runs.append(epochs)
    first = runs[0][0][0]
    assert first["view1"].shape == (4, 3, 32, 32) and first["view1"].dtype == torch.float32
    assert first["pos2"].shape == (4, 16, 2) and first["image_id"].dtype == torch.int64
    assert len(runs[0][0]) == 2  # 10 items, batch 4, drop_last
    for e in (0, 1):
        for b0, b2 in zip(runs[0][e], runs[1][e]):
            for key in b0:
                assert torch.equal(b0[key], b2[key]), key
    assert not torch.equal(runs[0][0][0]["image_id"], runs[0][1][0]["image_id"])


def test_loader_workers_survive_an_unreadable_file(tmp_path):
    pytest.importorskip("torch")
    _write_images(tmp_path, [f"{k}.png" for k in range(5)], size=(20, 16))
    (tmp_path / "2_bad.png").write_bytes(b"\x89PNG truncated")
    ds = TwoViewDataset(ImageFolder(tmp_path), TwoViewTransform(16, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        batches = list(make_loader(ds, batch_size=3, num_workers=2, shuffle=False))
    assert [b["image_id"].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5]]


def test_loader_errors():
    pytest.importorskip("torch")
    ds = TwoViewDataset(SyntheticScenes("train", 3, size=16), TwoViewTransform(16, 8))
    with pytest.raises(ValueError, match="no full batch"):
        make_loader(ds, batch_size=4)
    with pytest.raises(RuntimeError, match="initialised process group"):
        make_loader(ds, batch_size=1, distributed=True)


def test_import_cribo_does_not_import_torch_or_data():
    code = ("import sys, cribo; assert 'torch' not in sys.modules; "
            "assert 'cribo.data' not in sys.modules; import cribo.data; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
