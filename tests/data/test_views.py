"""cribo.data.views: crops, flips, colour operations and patch positions (docs/method.md §1)."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest

from cribo.data import (IMAGENET_MEAN, IMAGENET_STD, Crop, SyntheticScenes, TwoViewTransform,
                        ViewAugment, ViewTransform, color_jitter, gaussian_blur, grayscale,
                        normalize, patch_positions, resized_crop, sample_crop, solarize)
from cribo.data.views import _hsv_to_rgb, _rgb_to_hsv


def coordinate_image(h: int, w: int) -> np.ndarray:
    """(h, w, 2) float32: each pixel holds its own centre (x, y) = (j + 0.5, i + 0.5)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    return np.stack([xx, yy], axis=-1)


def patch_means(chw: np.ndarray, p: int) -> np.ndarray:
    """(C, S, S) -> (N, C): each patch's mean, row-major over the patch grid."""
    C, S, _ = chw.shape
    g = S // p
    return chw.reshape(C, g, p, g, p).mean(axis=(2, 4)).reshape(C, -1).T


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
    # docs/method.md §1 defaults: blur p=1 / 0.1, solarisation only on view 2
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
