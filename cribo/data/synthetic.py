"""Procedural multi-object scenes with per-pixel class masks: cribo's embedded data set.

Every image holds 2-5 objects on a textured background.  An object's class is
a (shape, texture) pair -- say a disc filled with stripes -- and its two
colours (the fill and the texture's ink) are drawn from one palette, the same
palette the background's two colours come from, independently of the class:
colour alone cannot tell the classes apart, shape and texture must.  Objects
are 2.5-5 patches of 8 px across at the default 96 px.

A scene is described in resolution-free units (the image is the unit square)
from a generator seeded by ``(seed, split, index)`` and drawn analytically, so
the same scene renders at any size and in any process.  Pixels are
antialiased by averaging ``antialias x antialias`` sub-samples; the mask is the
label at each pixel's centre (the middle sub-sample).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._index import image_index

__all__ = ["SyntheticScenes", "SceneObject", "CLASS_SPECS", "PALETTE", "SHAPES", "TEXTURES"]

# 12 well-separated colours (from Trubetskoy's list of distinct colours), uint8 RGB.
PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (0, 128, 128), (170, 110, 40), (240, 240, 240), (30, 30, 60),
], dtype=np.uint8)


def _frac(a: np.ndarray) -> np.ndarray:
    return a - np.floor(a)


# Shapes: (qx, qy) in units of the object's radius R, in the object's rotated
# frame -> inside.  All fit in the disc of radius 1.3.
SHAPES: Dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disc": lambda x, y: x * x + y * y <= 1.0,
    "square": lambda x, y: np.maximum(np.abs(x), np.abs(y)) <= 0.82,
    "triangle": lambda x, y: ((y <= 0.625) & (0.866 * x - 0.5 * y <= 0.625)
                              & (-0.866 * x - 0.5 * y <= 0.625)),
    "ring": lambda x, y: (x * x + y * y <= 1.1) & (x * x + y * y >= 0.3),
    "cross": lambda x, y: (((np.abs(x) <= 0.34) & (np.abs(y) <= 1.05))
                           | ((np.abs(y) <= 0.34) & (np.abs(x) <= 1.05))),
    "ellipse": lambda x, y: (x / 1.2) ** 2 + (y / 0.62) ** 2 <= 1.0,
    "star": lambda x, y: np.hypot(x, y) <= 0.75 + 0.35 * np.cos(5 * np.arctan2(y, x)),
}

# Textures: (sx, sy) in units of the texture period, phases (2,) -> ink (True)
# or fill (False).
TEXTURES: Dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "plain": lambda x, y, ph: np.zeros(np.broadcast(x, y).shape, bool),
    "stripes": lambda x, y, ph: _frac(x + ph[0]) < 0.5,
    "checker": lambda x, y, ph: (np.floor(x + ph[0]) + np.floor(y + ph[1])) % 2 == 1,
    "dots": lambda x, y, ph: (_frac(x + ph[0]) - 0.5) ** 2 + (_frac(y + ph[1]) - 0.5) ** 2 < 0.1,
    "waves": lambda x, y, ph: _frac(x + 0.3 * np.sin(np.pi * (y + ph[1])) + ph[0]) < 0.5,
    "grid": lambda x, y, ph: (_frac(x + ph[0]) < 0.28) | (_frac(y + ph[1]) < 0.28),
}

# The classes, in order; ``n_classes=C`` takes the first C.  The first six have
# six different shapes and six different textures; the next six recombine them.
CLASS_SPECS: Tuple[Tuple[str, str], ...] = (
    ("disc", "stripes"), ("square", "checker"), ("triangle", "dots"),
    ("ring", "waves"), ("cross", "plain"), ("ellipse", "grid"),
    ("star", "stripes"), ("disc", "checker"), ("square", "dots"),
    ("triangle", "waves"), ("ring", "plain"), ("cross", "grid"),
)

_SPLITS = {"train": 0, "val": 1}
_EXTENT = 1.3  # every shape lies within this many radii of its centre


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene, in unit-square coordinates (x right, y down).

    Attributes:
        label: class label, 1..C.
        cx, cy, radius: centre and size (fractions of the image side).
        angle: rotation of the shape (radians).
        fill, ink: palette indices of the two colours.
        period, texture_angle, phase: the texture's period (fraction of the
            image side), orientation (radians) and phase (2,) in periods.
    """
    label: int
    cx: float
    cy: float
    radius: float
    angle: float
    fill: int
    ink: int
    period: float
    texture_angle: float
    phase: Tuple[float, float]


class SyntheticScenes:
    """Deterministic procedural scenes with class masks (indexable data set).

    Args:
        split: ``"train"`` or ``"val"``: disjoint streams of scenes.
        n_images: number of images.
        size: side of the rendered square images, in pixels.
        seed: base seed; image ``i`` is a pure function of ``(seed, split, i)``.
        n_classes: number of object classes C (1..12), the first C of
            :data:`CLASS_SPECS`, unless ``classes`` is given.
        min_objects, max_objects: objects per image, uniform in this range.
        radius: range of object radii as fractions of the image side (the
            default gives objects 2.5-5 patches of 8 px across at 96 px).
        classes: optional explicit list of (shape, texture) pairs (names from
            :data:`SHAPES` and :data:`TEXTURES`), overriding ``n_classes``.
        antialias: sub-samples per pixel side (odd; 1 = none).
        in_memory: render every image once at construction and serve copies
            (``n_images * size^2 * 4`` bytes); worker processes forked later
            share it.

    Items: ``scenes[i] -> (image, mask)``, image ``(H, W, 3)`` uint8, mask
    ``(H, W)`` int64 with 0 = background, 1..C = the classes (this data set
    never emits the ignore value 255).  ``class_names[k]`` names label k
    (``class_names[0] == "background"``, so ``len(class_names) == C + 1``).
    """

    ignore_index = 255

    def __init__(self, split: str = "train", n_images: int = 1000, size: int = 96,
                 seed: int = 0, n_classes: int = 6, min_objects: int = 2, max_objects: int = 5,
                 radius: Tuple[float, float] = (0.11, 0.2),
                 classes: Optional[Sequence[Tuple[str, str]]] = None,
                 antialias: int = 3, in_memory: bool = False) -> None:
        if split not in _SPLITS:
            raise ValueError(f"SyntheticScenes: split must be 'train' or 'val', got {split!r}")
        if n_images < 0 or size < 1:
            raise ValueError(f"SyntheticScenes: need n_images >= 0 and size >= 1, "
                             f"got {n_images}, {size}")
        if classes is None:
            if not 1 <= n_classes <= len(CLASS_SPECS):
                raise ValueError(f"SyntheticScenes: n_classes must be in 1..{len(CLASS_SPECS)} "
                                 f"(or pass classes=[(shape, texture), ...]), got {n_classes}")
            classes = CLASS_SPECS[:n_classes]
        classes = tuple((str(s), str(t)) for s, t in classes)
        for s, t in classes:
            if s not in SHAPES or t not in TEXTURES:
                raise ValueError(f"SyntheticScenes: unknown class ({s!r}, {t!r}); shapes: "
                                 f"{sorted(SHAPES)}, textures: {sorted(TEXTURES)}")
        if len(set(classes)) != len(classes) or not classes:
            raise ValueError(f"SyntheticScenes: classes must be distinct and non-empty, "
                             f"got {classes}")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"SyntheticScenes: need 1 <= min_objects <= max_objects, "
                             f"got {min_objects}, {max_objects}")
        if not 0 < radius[0] <= radius[1] <= 0.5:
            raise ValueError(f"SyntheticScenes: radius must satisfy 0 < lo <= hi <= 0.5, "
                             f"got {radius}")
        if antialias < 1 or antialias % 2 == 0:
            raise ValueError(f"SyntheticScenes: antialias must be an odd number >= 1, "
                             f"got {antialias}")
        self.split, self.n_images, self.size, self.seed = split, int(n_images), int(size), int(seed)
        self.classes = classes
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.radius = (float(radius[0]), float(radius[1]))
        self.antialias = int(antialias)
        self.class_names: Tuple[str, ...] = ("background",) + tuple(f"{s}/{t}" for s, t in classes)
        self._images: Optional[np.ndarray] = None
        self._masks: Optional[np.ndarray] = None
        if in_memory:
            pairs = [self.render(i) for i in range(self.n_images)]
            self._images = np.stack([p[0] for p in pairs]) if pairs else None
            self._masks = np.stack([p[1].astype(np.uint8) for p in pairs]) if pairs else None

    @property
    def n_classes(self) -> int:
        """C, the number of object classes (labels 1..C)."""
        return len(self.classes)

    def __len__(self) -> int:
        return self.n_images

    def __repr__(self) -> str:
        return (f"SyntheticScenes(split={self.split!r}, n_images={self.n_images}, "
                f"size={self.size}, seed={self.seed}, n_classes={self.n_classes})")

    def _index(self, index: int) -> int:
        return image_index(index, self.n_images, "SyntheticScenes")

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        i = self._index(index)
        if self._images is not None:
            return self._images[i].copy(), self._masks[i].astype(np.int64)
        return self.render(i)

    # ----------------------------------------------------------------- description

    def describe(self, index: int) -> Tuple[Tuple[int, int, np.ndarray], List[SceneObject]]:
        """The scene of image ``index``, resolution-free.

        Returns:
            ``(background, objects)``: background ``(c0, c1, waves)`` -- two
            palette indices and a (3, 4) array of plane waves
            ``(fx, fy, phase, amplitude)`` blending them -- and the objects in
            drawing order (later ones occlude earlier ones).
        """
        i = self._index(index)
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], i])
        P = len(PALETTE)
        c0, c1 = (int(c) for c in rng.choice(P, 2, replace=False))
        freq = np.concatenate([rng.uniform(1.0, 3.0, 2), rng.uniform(5.0, 9.0, 1)])
        theta = rng.uniform(0, 2 * np.pi, 3)
        waves = np.stack([freq * np.cos(theta), freq * np.sin(theta),
                          rng.uniform(0, 2 * np.pi, 3), np.array([0.6, 0.6, 0.3])], axis=1)
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        objects: List[SceneObject] = []
        for _ in range(n):
            label = int(rng.integers(1, self.n_classes + 1))
            r = float(rng.uniform(*self.radius))
            lo, hi = 0.7 * r, 1 - 0.7 * r
            for _try in range(30):  # rejection: keep objects mostly apart
                cx, cy = (float(v) for v in rng.uniform(lo, hi, 2))
                if all(np.hypot(cx - o.cx, cy - o.cy) >= 0.8 * (r + o.radius) for o in objects):
                    break
            fill = int(rng.choice([k for k in range(P) if k not in (c0, c1)]))
            ink = int(rng.choice([k for k in range(P) if k != fill]))
            objects.append(SceneObject(
                label=label, cx=cx, cy=cy, radius=r, angle=float(rng.uniform(0, 2 * np.pi)),
                fill=fill, ink=ink, period=float(rng.uniform(0.05, 0.075)),
                texture_angle=float(rng.uniform(0, np.pi)),
                phase=(float(rng.uniform()), float(rng.uniform()))))
        return (c0, c1, waves), objects

    # ----------------------------------------------------------------- rendering

    def render(self, index: int, size: Optional[int] = None,
               antialias: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Draws image ``index`` at any resolution.

        Args:
            index: image index.
            size: side in pixels (default: the data set's ``size``).
            antialias: odd sub-samples per pixel side (default: the data set's).

        Returns:
            image (size, size, 3) uint8 and mask (size, size) int64.
        """
        size = self.size if size is None else int(size)
        a = self.antialias if antialias is None else int(antialias)
        if size < 1 or a < 1 or a % 2 == 0:
            raise ValueError(f"SyntheticScenes.render: need size >= 1 and odd antialias, "
                             f"got {size}, {a}")
        (c0, c1, waves), objects = self.describe(index)
        n = size * a
        coord = (np.arange(n, dtype=np.float64) + 0.5) / n  # sub-sample centres
        # sum of plane waves, separably: sin(a + b) = sin a cos b + cos a sin b
        t = np.full((n, n), 0.5)
        for fx, fy, ph, amp in waves:
            px, py = 2 * np.pi * fx * coord + ph, 2 * np.pi * fy * coord
            t += np.outer(np.cos(py), amp / 3.0 * np.sin(px))
            t += np.outer(np.sin(py), amp / 3.0 * np.cos(px))
        pal = PALETTE.astype(np.float64)
        img = pal[c0] + t[:, :, None] * (pal[c1] - pal[c0])  # (n, n, 3)
        slot = np.zeros((n, n), np.int16)  # which object (1-based) is on top
        for j, o in enumerate(objects):
            ext = _EXTENT * o.radius
            x0, x1 = max(0, int((o.cx - ext) * n)), min(n, int(np.ceil((o.cx + ext) * n)))
            y0, y1 = max(0, int((o.cy - ext) * n)), min(n, int(np.ceil((o.cy + ext) * n)))
            if x0 >= x1 or y0 >= y1:
                continue
            dx, dy = coord[None, x0:x1] - o.cx, coord[y0:y1, None] - o.cy
            ca, sa = np.cos(o.angle), np.sin(o.angle)
            shape, texture = self.classes[o.label - 1]
            inside = SHAPES[shape]((ca * dx + sa * dy) / o.radius, (-sa * dx + ca * dy) / o.radius)
            ct, st = np.cos(o.texture_angle), np.sin(o.texture_angle)
            ink = TEXTURES[texture]((ct * dx + st * dy) / o.period,
                                    (-st * dx + ct * dy) / o.period, o.phase)
            colour = np.where(ink[:, :, None], pal[o.ink], pal[o.fill])
            region = img[y0:y1, x0:x1]
            region[inside] = colour[inside]
            slot[y0:y1, x0:x1][inside] = j + 1
        if a > 1:
            img = img.reshape(size, a, size, a, 3).sum(axis=(1, 3)) / (a * a)
        image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        lut = np.array([0] + [o.label for o in objects], np.int64)
        mask = lut[slot[a // 2::a, a // 2::a]]
        return image, mask
