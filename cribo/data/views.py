"""CrIBo's two augmented views of an image, with each patch's position (docs/method.md §1).

Each view is a random resized crop of the original image (torchvision's
``RandomResizedCrop`` sampling, bicubic), a horizontal flip with probability
0.5, colour jitter, grayscale, Gaussian blur, solarisation (view 2 only) and
ImageNet normalisation -- the augmentations of the CrIBo/DINO reference code,
in Pillow (resampling) and NumPy (everything else).  All randomness comes from
an explicit :class:`numpy.random.Generator`, so a view is a pure function of the
image and the generator's state.

Positions (the convention used throughout cribo): **continuous image
coordinates** of the ORIGINAL image, x to the right and y down, where pixel
``(row i, column j)`` covers ``[j, j+1) x [i, i+1)``, so its centre is
``(j + 0.5, i + 0.5)``.  A crop ``(top, left, height, width)`` covers
``[left, left + width) x [top, top + height)`` and is resized to ``S x S``:
output coordinate ``u`` (continuous, ``[0, S)``) maps to
``x = left + u * width / S``, likewise ``y = top + v * height / S`` -- the same
pixel-centre convention Pillow resamples with.  A flip maps ``u`` to ``S - u``
before that.  Patch ``(r, c)`` of size ``p`` covers output ``[c p, (c+1) p)``,
so its centre is ``u = (c + 0.5) p``, ``v = (r + 0.5) p``::

    x = left + (c + 0.5) * p * width / S                 (no flip)
    x = left + width - (c + 0.5) * p * width / S         (flip)
    y = top + (r + 0.5) * p * height / S

Positions are listed row-major over the ``(S/p) x (S/p)`` patch grid
(``n = r * S/p + c``), as the ViT lays out its patch tokens.  The reference code
instead crops a map holding each pixel's integer index and averages it over
each patch; that is this position minus 0.5 up to interpolation rounding, and
only distances between positions matter to the clustering.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "Crop", "View", "ViewAugment", "ViewTransform",
    "TwoViewTransform", "sample_crop", "resized_crop", "patch_positions",
    "color_jitter", "gaussian_blur", "grayscale", "solarize", "normalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}

ImageLike = Union[np.ndarray, Image.Image]


# --------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class Crop:
    """Where a view came from: a crop of the original image, maybe flipped.

    Attributes:
        top, left: the crop's first row and column (pixels).
        height, width: its size in pixels (>= 1).
        flip: whether the resized crop was mirrored left-right.
    """
    top: int
    left: int
    height: int
    width: int
    flip: bool = False


def sample_crop(rng: np.random.Generator, height: int, width: int,
                scale: Tuple[float, float] = (0.25, 1.0),
                ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``, drawn from ``rng``.

    Up to 10 tries of an area fraction uniform in ``scale`` and an aspect ratio
    (width / height) log-uniform in ``ratio``; the first crop that fits gets a
    uniform position.  If none fits, the largest centred crop whose aspect
    ratio is clamped into ``ratio``.

    Returns:
        ``(top, left, h, w)`` in pixels.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: np.ndarray, crop: Crop, size: int,
                 interpolation: str = "bicubic") -> np.ndarray:
    """The crop of ``image`` resized to ``size x size`` (then flipped if ``crop.flip``).

    Resamples with Pillow over the whole image (``resize(box=...)``), so the
    filter sees the pixels just outside the crop, as continuous resampling
    should; downscaling is antialiased.

    Args:
        image: (H, W, 3) uint8, or (H, W, C) float (any C; each channel is
            resampled in float32, Pillow mode ``"F"``).
        crop: the crop and flip.
        size: output side S.
        interpolation: one of nearest, bilinear, bicubic, lanczos, box, hamming.

    Returns:
        (S, S, 3) uint8 for a uint8 image, else (S, S, C) float32.
    """
    resample = _RESAMPLE[interpolation]
    box = (crop.left, crop.top, crop.left + crop.width, crop.top + crop.height)
    if image.dtype == np.uint8:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"resized_crop: a uint8 image must be (H, W, 3), got {image.shape}")
        out = np.asarray(Image.fromarray(image, "RGB").resize((size, size), resample, box=box))
    else:
        img = np.asarray(image, np.float32)
        if img.ndim == 2:
            img = img[:, :, None]
        chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[:, :, k]), "F")
                            .resize((size, size), resample, box=box))
                 for k in range(img.shape[2])]
        out = np.stack(chans, axis=-1)
    if crop.flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def patch_positions(crop: Crop, size: int, patch_size: int) -> np.ndarray:
    """Each patch centre of the view, in the original image frame (module docstring).

    Args:
        crop: the view's crop and flip.
        size: the view's side S (a multiple of ``patch_size``).
        patch_size: p.

    Returns:
        (N, 2) float32, N = (S/p)^2, rows ``(x, y)``, row-major over the patch grid.
    """
    if size % patch_size:
        raise ValueError(f"patch_positions: size {size} is not a multiple of "
                         f"patch_size {patch_size}")
    g = size // patch_size
    centre = (np.arange(g, dtype=np.float64) + 0.5) * patch_size  # output pixels
    x = centre * (crop.width / size)
    if crop.flip:
        x = crop.width - x
    x = crop.left + x
    y = crop.top + centre * (crop.height / size)
    xx, yy = np.meshgrid(x, y)  # (g, g), row r = y index
    return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float32)


# --------------------------------------------------------------------------- colour
# All on float32 (H, W, 3) RGB in [0, 1]; each clamps to [0, 1] like torchvision.

def grayscale(img: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma (Pillow's ``convert("L")``), (H, W, 3) -> (H, W, 3)."""
    lum = img @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(lum[:, :, None], 3, axis=2)


def _rgb_to_hsv(img: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(..., 3) RGB in [0, 1] -> hue in [0, 1), saturation, value (each (...))."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    maxc = np.maximum(np.maximum(r, g), b)
    delta = maxc - np.minimum(np.minimum(r, g), b)
    s = delta / np.where(maxc > 0, maxc, 1)
    safe = np.where(delta > 0, delta, 1)
    h = np.where(maxc == r, (g - b) / safe,
                 np.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    return (h / 6.0) % 1.0, s, maxc


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_rgb_to_hsv`: channel n is v - v s clip(min(k, 4 - k), 0, 1),
    k = (n + 6 h) mod 6 with n = 5, 3, 1 for R, G, B."""
    h6 = h * 6.0
    vs = v * s
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n) % 6.0
        out.append(v - vs * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    return np.stack(out, axis=-1)


def color_jitter(img: np.ndarray, rng: np.random.Generator, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1) -> np.ndarray:
    """torchvision's ``ColorJitter``: the four adjustments in a random order.

    Draws the order (a permutation of 4) first, then the factors: brightness,
    contrast and saturation uniform in ``[max(0, 1 - a), 1 + a]``, the hue shift
    uniform in ``[-hue, hue]`` (a fraction of the hue circle).  An amplitude of
    0 leaves that adjustment out (no draw).

    Args:
        img: (H, W, 3) float32 in [0, 1].

    Returns:
        (H, W, 3) float32 in [0, 1].
    """
    order = rng.permutation(4)
    fb = rng.uniform(max(0.0, 1 - brightness), 1 + brightness) if brightness > 0 else None
    fc = rng.uniform(max(0.0, 1 - contrast), 1 + contrast) if contrast > 0 else None
    fs = rng.uniform(max(0.0, 1 - saturation), 1 + saturation) if saturation > 0 else None
    fh = rng.uniform(-hue, hue) if hue > 0 else None
    for op in order:
        if op == 0 and fb is not None:
            img = np.clip(img * fb, 0, 1)
        elif op == 1 and fc is not None:
            mean = float((img @ np.array([0.299, 0.587, 0.114], np.float32)).mean())
            img = np.clip(fc * img + (1 - fc) * mean, 0, 1)
        elif op == 2 and fs is not None:
            img = np.clip(fs * img + (1 - fs) * grayscale(img), 0, 1)
        elif op == 3 and fh is not None:
            h, s, v = _rgb_to_hsv(img)
            img = np.clip(_hsv_to_rgb((h + fh) % 1.0, s, v), 0, 1)
    return img.astype(np.float32, copy=False)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur, kernel truncated at 3 sigma, reflected borders.

    Args:
        img: (H, W, C) float32.
        sigma: standard deviation in pixels (> 0).

    Returns:
        (H, W, C) float32.
    """
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    H, W = img.shape[:2]
    pad = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="symmetric")
    out = sum(k[i] * pad[i:i + H] for i in range(2 * r + 1))
    pad = np.pad(out, ((0, 0), (r, r), (0, 0)), mode="symmetric")
    out = sum(k[i] * pad[:, i:i + W] for i in range(2 * r + 1))
    return out.astype(np.float32, copy=False)


def solarize(img: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Inverts every value >= ``threshold`` (0.5 inverts the same 8-bit values as
    Pillow's ``solarize(128)``), (H, W, C) float32 in [0, 1]."""
    return np.where(img >= threshold, 1 - img, img).astype(np.float32, copy=False)


def _as_array(image: ImageLike) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    return np.asarray(image)


def normalize(image: ImageLike, mean: Optional[Tuple[float, ...]] = IMAGENET_MEAN,
              std: Optional[Tuple[float, ...]] = IMAGENET_STD) -> np.ndarray:
    """An un-augmented image as a network input (e.g. for evaluation).

    Args:
        image: (H, W, 3) uint8 (scaled by 1/255) or (H, W, C) float, or a PIL image.
        mean, std: per-channel normalisation; ``None`` for none.

    Returns:
        (C, H, W) float32, ``(x - mean) / std``.
    """
    x = _as_array(image)
    if x.ndim == 2:
        x = x[:, :, None]
    x = x.astype(np.float32) / np.float32(255) if x.dtype == np.uint8 else x.astype(np.float32)
    if mean is not None:
        x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# --------------------------------------------------------------------------- transforms

@dataclass(frozen=True)
class ViewAugment:
    """The augmentation parameters of one view (defaults: docs/method.md §1, view 1).

    Attributes:
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height), log-uniform.
        interpolation: resampling filter of the resize (Pillow name).
        flip_p: probability of a horizontal flip.
        jitter_p: probability of colour jitter; ``brightness``, ``contrast``,
            ``saturation``, ``hue`` its amplitudes (see :func:`color_jitter`).
        grayscale_p: probability of converting to gray (3 equal channels).
        blur_p: probability of a Gaussian blur with sigma uniform in ``blur_sigma``.
        solarize_p: probability of solarisation at ``solarize_threshold`` (in [0, 1]).
        mean, std: per-channel normalisation ``(x - mean) / std``; ``None`` for none.
    """
    scale: Tuple[float, float] = (0.25, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    mean: Optional[Tuple[float, ...]] = IMAGENET_MEAN
    std: Optional[Tuple[float, ...]] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("scale", "ratio", "blur_sigma", "mean", "std"):  # lists from config files
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"ViewAugment: {name} must be a probability in [0, 1], got {p}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"ViewAugment: scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ViewAugment: ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"ViewAugment: interpolation must be one of {sorted(_RESAMPLE)}, "
                             f"got {self.interpolation!r}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"ViewAugment: {name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"ViewAugment: hue must be in [0, 0.5], got {self.hue}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"ViewAugment: blur_sigma must satisfy 0 < lo <= hi, "
                             f"got {self.blur_sigma}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("ViewAugment: give mean and std together (or neither)")
        if self.mean is not None and (len(self.mean) != len(self.std)
                                      or any(s <= 0 for s in self.std)):
            raise ValueError(f"ViewAugment: mean and std must have equal lengths and std > 0, "
                             f"got {self.mean}, {self.std}")

    @property
    def uses_color(self) -> bool:
        """Whether any colour augmentation can fire (they need 3 channels)."""
        return self.jitter_p > 0 or self.grayscale_p > 0 or self.solarize_p > 0

    def geometric_only(self) -> "ViewAugment":
        """The same crop and flip, with every photometric step and normalisation off."""
        return replace(self, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0,
                       mean=None, std=None)


@dataclass(frozen=True)
class View:
    """One augmented view.

    Attributes:
        image: (C, S, S) float32 (C = 3 for RGB input), normalised.
        positions: (N, 2) float32, each patch centre's (x, y) in the original
            image frame (module docstring), N = (S/p)^2, row-major.
        crop: the crop and flip it was made with.
    """
    image: np.ndarray
    positions: np.ndarray
    crop: Crop


@dataclass(frozen=True)
class ViewTransform:
    """One view: crop, resize, flip, colour, blur, solarise, normalise (in that order).

    Args:
        size: output side S.
        patch_size: p; S must be a multiple of it.
        augment: the parameters (:class:`ViewAugment`).

    Call ``transform(image, rng)`` with an (H, W, 3) uint8 RGB image (or
    (H, W) gray, or a PIL image; values scaled by 1/255) or an (H, W, C) float
    image taken as is (values in [0, 1] for the colour steps, which need
    C = 3), and a ``numpy.random.Generator``.
    Returns a :class:`View`.  Draws, in order: the crop (variable number of
    draws), the flip, then for each photometric step its coin and, if it fires,
    its parameters.
    """
    size: int = 224
    patch_size: int = 16
    augment: ViewAugment = field(default_factory=ViewAugment)

    def __post_init__(self) -> None:
        if self.size < 1 or self.patch_size < 1 or self.size % self.patch_size:
            raise ValueError(f"ViewTransform: size ({self.size}) must be a positive multiple "
                             f"of patch_size ({self.patch_size})")

    @property
    def num_patches(self) -> int:
        """N = (S/p)^2."""
        return (self.size // self.patch_size) ** 2

    def __call__(self, image: ImageLike, rng: np.random.Generator) -> View:
        a = self.augment
        img = _as_array(image)
        if img.ndim == 2:
            img = img[:, :, None]
        if img.ndim != 3 or img.shape[0] < 1 or img.shape[1] < 1:
            raise ValueError(f"ViewTransform: image must be (H, W, C), got shape {img.shape}")
        if img.dtype == np.uint8 and img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)  # gray -> RGB
        if img.dtype == np.uint8 and img.shape[2] != 3:
            raise ValueError(f"ViewTransform: a uint8 image must be RGB (H, W, 3) or gray, "
                             f"got {img.shape}")
        if img.shape[2] != 3 and a.uses_color:
            raise ValueError(f"ViewTransform: colour augmentations need 3 channels, got "
                             f"{img.shape[2]}; set jitter_p, grayscale_p and solarize_p to 0")
        H, W = img.shape[:2]
        top, left, h, w = sample_crop(rng, H, W, a.scale, a.ratio)
        crop = Crop(top, left, h, w, bool(rng.random() < a.flip_p))
        out = resized_crop(img, crop, self.size, a.interpolation)
        x = out.astype(np.float32) / np.float32(255) if out.dtype == np.uint8 else out
        if rng.random() < a.jitter_p:
            x = color_jitter(x, rng, a.brightness, a.contrast, a.saturation, a.hue)
        if rng.random() < a.grayscale_p:
            x = grayscale(x)
        if rng.random() < a.blur_p:
            x = gaussian_blur(x, float(rng.uniform(a.blur_sigma[0], a.blur_sigma[1])))
        if rng.random() < a.solarize_p:
            x = solarize(x, a.solarize_threshold)
        if a.mean is not None:
            if len(a.mean) != x.shape[2]:
                raise ValueError(f"ViewTransform: mean/std have {len(a.mean)} channels, "
                                 f"the image has {x.shape[2]}")
            x = (x - np.asarray(a.mean, np.float32)) / np.asarray(a.std, np.float32)
        chw = np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
        return View(chw, patch_positions(crop, self.size, self.patch_size), crop)


def _default_view2() -> ViewAugment:
    return ViewAugment(blur_p=0.1, solarize_p=0.2)


@dataclass(frozen=True)
class TwoViewTransform:
    """CrIBo's two global views of an image (docs/method.md §1; no local crops).

    Args:
        size: side S of both views (reference: 224).
        patch_size: p (reference: 16); N = (S/p)^2 positions per view.
        view1: parameters of view 1 (default: blur p=1.0, no solarisation).
        view2: parameters of view 2 (default: blur p=0.1, solarisation p=0.2).

    ``transform(image, rng) -> (View, View)``; view 1 is drawn first from the
    same generator.  The image as in :class:`ViewTransform`.
    """
    size: int = 224
    patch_size: int = 16
    view1: ViewAugment = field(default_factory=ViewAugment)
    view2: ViewAugment = field(default_factory=_default_view2)

    def __post_init__(self) -> None:
        ViewTransform(self.size, self.patch_size, self.view1)  # validates size/patch

    @property
    def num_patches(self) -> int:
        """N = (S/p)^2."""
        return (self.size // self.patch_size) ** 2

    def geometric_only(self) -> "TwoViewTransform":
        """The same crops and flips, no photometric step, no normalisation."""
        return replace(self, view1=self.view1.geometric_only(),
                       view2=self.view2.geometric_only())

    def __call__(self, image: ImageLike, rng: np.random.Generator) -> Tuple[View, View]:
        img = _as_array(image)
        v1 = ViewTransform(self.size, self.patch_size, self.view1)(img, rng)
        v2 = ViewTransform(self.size, self.patch_size, self.view2)(img, rng)
        return v1, v2
