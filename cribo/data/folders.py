"""Images from disk: any folder of images, and Pascal-VOC-style segmentation folders."""
from __future__ import annotations

import os
import warnings
from typing import List, Optional, Sequence, Set, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageFolder", "VOCSegmentation", "UnreadableImageWarning", "IMAGE_EXTENSIONS",
           "VOC_CLASSES", "load_rgb"]

IMAGE_EXTENSIONS: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff",
                                     ".gif", ".ppm", ".pgm", ".pbm", ".jfif")

VOC_CLASSES: Tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

PathLike = Union[str, "os.PathLike[str]"]


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and was skipped."""


def load_rgb(path: PathLike, exif: bool = True) -> np.ndarray:
    """Decodes an image file fully, with its EXIF orientation applied if ``exif``.

    Returns:
        (H, W, 3) uint8 RGB.

    Raises:
        OSError (or another Pillow error) if the file cannot be decoded.
    """
    with Image.open(path) as im:
        if exif:
            im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB")).copy()


class ImageFolder:
    """Every image under a folder, recursively (for pretraining on unlabelled images).

    Files are found by extension (case-insensitive, :data:`IMAGE_EXTENSIONS`)
    and sorted by their path relative to ``root``, so the indices do not depend
    on the file system.  Hidden files and folders (names starting with '.') are
    left out.

    Unreadable files are detected **on load** by default (construction only
    lists names, so it is fast on large folders): loading one emits an
    :class:`UnreadableImageWarning` naming it, remembers it in this process,
    and returns the next readable image instead (wrapping around), so a bad
    file never crashes a DataLoader worker; only when no file at all can be
    read does loading raise.  With ``check=True`` every file is decoded once at
    construction and the unreadable ones are dropped from ``paths`` (with the
    same warning).

    Args:
        root: the folder.
        extensions: the accepted file extensions (with the dot).
        check: decode every file at construction.

    Items: ``folder[i]`` -> (H, W, 3) uint8 RGB (sizes vary between images).
    """

    def __init__(self, root: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 check: bool = False) -> None:
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"ImageFolder: no such folder: {self.root}")
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        found: List[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.startswith(".") and os.path.splitext(name)[1].lower() in exts:
                    found.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        found.sort(key=lambda p: p.replace(os.sep, "/"))
        self.paths: List[str] = [os.path.join(self.root, p) for p in found]
        self._bad: Set[int] = set()
        if check:
            good = []
            for p in self.paths:
                try:
                    load_rgb(p)
                    good.append(p)
                except Exception as e:  # noqa: BLE001 -- any decoder failure means unreadable
                    self._warn(p, e)
            self.paths = good
        if not self.paths:
            raise ValueError(f"ImageFolder: no {'readable ' if check else ''}images with "
                             f"extensions {', '.join(exts)} under {self.root}")

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r}, {len(self)} images)"

    @staticmethod
    def _warn(path: str, err: BaseException) -> None:
        warnings.warn(f"ImageFolder: skipping unreadable image {path} "
                      f"({type(err).__name__}: {err})", UnreadableImageWarning, stacklevel=3)

    def __getitem__(self, index: int) -> np.ndarray:
        n = len(self.paths)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"ImageFolder: index {index} out of range for {n} images")
        for k in range(n):
            j = (i + k) % n
            if j in self._bad:
                continue
            try:
                return load_rgb(self.paths[j])
            except Exception as e:  # noqa: BLE001 -- skip it, never crash a worker
                self._bad.add(j)
                self._warn(self.paths[j], e)
        raise RuntimeError(f"ImageFolder: none of the {n} files under {self.root} is readable")


class VOCSegmentation:
    """A Pascal-VOC-style segmentation folder (for dense evaluation).

    Expected layout under ``root`` (``root`` may also be a folder holding
    ``VOCdevkit/VOC2012``, or ``VOCdevkit`` holding ``VOC2012``)::

        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png          palette (mode "P") or 8-bit gray
                                            class indices, 255 = ignore
        ImageSets/Segmentation/<split>.txt  one <id> per line

    Every listed image and mask is checked to exist at construction; a missing
    folder, list or file raises ``FileNotFoundError`` naming it.

    Args:
        root: the folder.
        split: the name of the list, usually ``"train"`` or ``"val"``.
        class_names: names of the labels, index 0 = background (default: the
            21 of VOC 2012).

    Items: ``voc[i] -> (image, mask)``: (H, W, 3) uint8 RGB and (H, W) int64
    labels (0 = background, 1..C = classes, 255 = ignore).
    """

    ignore_index = 255

    def __init__(self, root: PathLike, split: str = "train",
                 class_names: Optional[Sequence[str]] = None) -> None:
        root = os.fspath(root)
        for sub in (os.path.join("VOCdevkit", "VOC2012"), "VOC2012"):
            if (not os.path.isdir(os.path.join(root, "JPEGImages"))
                    and os.path.isdir(os.path.join(root, sub, "JPEGImages"))):
                root = os.path.join(root, sub)
        self.root, self.split = root, split
        if not os.path.isdir(root):
            raise FileNotFoundError(f"VOCSegmentation: no such folder: {root}")
        for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
            if not os.path.isdir(os.path.join(root, sub)):
                raise FileNotFoundError(f"VOCSegmentation: missing folder "
                                        f"{os.path.join(root, sub)} "
                                        f"(expected JPEGImages/, SegmentationClass/, "
                                        f"ImageSets/Segmentation/)")
        listing = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        if not os.path.isfile(listing):
            have = sorted(f[:-4] for f in os.listdir(os.path.dirname(listing))
                          if f.endswith(".txt"))
            raise FileNotFoundError(f"VOCSegmentation: missing split list {listing} "
                                    f"(splits present: {', '.join(have) or 'none'})")
        with open(listing) as f:
            self.ids: List[str] = [line.split()[0] for line in f if line.strip()]
        if not self.ids:
            raise ValueError(f"VOCSegmentation: {listing} lists no images")
        missing = [p for i in self.ids for p in (self._image_path(i), self._mask_path(i))
                   if not os.path.isfile(p)]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise FileNotFoundError(f"VOCSegmentation: missing file {missing[0]}{more} "
                                    f"(listed in {listing})")
        self.class_names: Tuple[str, ...] = tuple(class_names or VOC_CLASSES)

    @property
    def n_classes(self) -> int:
        """C, the number of object classes (labels 1..C)."""
        return len(self.class_names) - 1

    def _image_path(self, i: str) -> str:
        return os.path.join(self.root, "JPEGImages", i + ".jpg")

    def _mask_path(self, i: str) -> str:
        return os.path.join(self.root, "SegmentationClass", i + ".png")

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"VOCSegmentation({self.root!r}, split={self.split!r}, {len(self)} images)"

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        n = len(self.ids)
        k = int(index)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"VOCSegmentation: index {index} out of range for {n} images")
        i = self.ids[k]
        image = load_rgb(self._image_path(i), exif=False)  # masks ignore EXIF too
        path = self._mask_path(i)
        with Image.open(path) as m:
            if m.mode not in ("P", "L"):
                raise ValueError(f"VOCSegmentation: {path} must be a palette or 8-bit gray PNG "
                                 f"of class indices, got mode {m.mode!r}")
            mask = np.asarray(m).astype(np.int64)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"VOCSegmentation: mask {path} is {mask.shape[1]}x{mask.shape[0]}, "
                             f"its image is {image.shape[1]}x{image.shape[0]}")
        return image, mask
