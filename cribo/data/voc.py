"""Pascal-VOC-style segmentation folders: images, masks and their class list.

:class:`VOCSegmentation` reads ``JPEGImages/`` + ``SegmentationClass/`` (+ the
``ImageSets/Segmentation/<split>.txt`` lists), checks every mask before any
work, and takes its class names from the folder's own list
(:func:`read_class_names`: ``classes.txt`` or ``labelmap.txt``) or VOC's 21.
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
from PIL import Image

from ._index import image_index
from .folders import PathLike, load_rgb

__all__ = ["VOCSegmentation", "VOC_CLASSES", "CLASS_LIST_FILES", "read_class_names"]

VOC_CLASSES: Tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

_VOC_ID = re.compile(r"^\d{4}_\d{6}$")   # PASCAL VOC image ids: 2007_000032
_MASK_MODES = ("P", "L", "I", "I;16", "I;16L", "I;16B", "I;16N")
#: the file names of a folder's own class list, in the order they are looked for
CLASS_LIST_FILES: Tuple[str, ...] = ("classes.txt", "labelmap.txt")


def read_class_names(path: PathLike) -> Tuple[str, ...]:
    """Class names from a file; the first name is label 0, the background.

    Two formats; blank lines and lines starting with ``#`` are skipped:

    * one name per line (``classes.txt``): line ``i`` names label ``i``;
    * a label map, ``name:r,g,b:parts:actions`` per line, as CVAT and other
      VOC exporters write ``labelmap.txt``: the name is the text before the
      first ``:``, the colours are not used (masks must hold class indices).

    A file is read as a label map when it is named ``labelmap.txt`` or when
    every line has a ``:``.

    Returns:
        The names, at least two (the background and one class), all distinct.

    Raises:
        FileNotFoundError: no such file.
        ValueError: fewer than two names, an empty or repeated name, or more
            than 255 (label 255 means "ignore").
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_class_names: no class list file at {path}")
    with open(path, encoding="utf-8") as fh:
        lines = [(k + 1, line.strip()) for k, line in enumerate(fh)]
    lines = [(k, line) for k, line in lines if line and not line.startswith("#")]
    labelmap = os.path.basename(path).lower() == "labelmap.txt" or (
        bool(lines) and all(":" in line for _, line in lines))
    names: List[str] = []
    for k, line in lines:
        name = line.split(":", 1)[0].strip() if labelmap else line
        if not name:
            raise ValueError(f"read_class_names: {path} line {k}: empty class name")
        if name in names:
            raise ValueError(f"read_class_names: {path} line {k}: {name!r} is listed twice")
        names.append(name)
    if len(names) < 2:
        raise ValueError(f"read_class_names: {path} lists {len(names)} name(s); expected the "
                         "background (label 0) and at least one class, one per line")
    if len(names) > 255:
        raise ValueError(f"read_class_names: {path} lists {len(names)} names; at most 255 "
                         "(label 255 means ignore)")
    return tuple(names)


class VOCSegmentation:
    """A Pascal-VOC-style segmentation folder (for dense evaluation).

    Expected layout under ``root`` (``root`` may also be a folder holding
    ``VOCdevkit/VOC2012``, or ``VOCdevkit`` holding ``VOC2012``)::

        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png          palette (mode "P"), 8- or 16-bit gray
                                            class indices, 255 = ignore
        ImageSets/Segmentation/<split>.txt  one <id> per line
        classes.txt or labelmap.txt         optional: the class list

    Every listed image and mask is checked to exist at construction; a missing
    folder, list or file raises ``FileNotFoundError`` naming it.

    **Class list**, the first rule that applies:

    1. ``class_names``: the names, or a file in a format of
       :func:`read_class_names`;
    2. ``classes.txt``, else ``labelmap.txt``, in the folder (the VOC root, or
       the folder given if that differs); if both exist they must agree;
    3. the 21 names of :data:`VOC_CLASSES`, if the folder looks like PASCAL
       VOC 2012: it is named ``VOC2012`` or every image id of every split
       list has VOC's form ``YYYY_NNNNNN``;
    4. otherwise, from the masks: every mask listed in any split is read once
       (so all splits get the same list), and with ``m`` the largest label
       found (255 excluded) the classes are ``background, class 1, ...,
       class m``; ``class_names_note`` says so.  A largest label above 20 (the
       labels VOC's list could name) raises ``ValueError`` asking for the
       list instead: such a label is more often a fault in the masks.

    ``class_names_source`` says which rule gave the list.

    **Masks are checked before any work**: with ``check=True`` (default) every
    mask of the split is read once at construction (about 1 ms for a 500x375
    mask on one core: 1.5 s for VOC 2012's 1,449 validation masks) and a
    wrong mode, a size that differs from its image's, or a label outside
    ``0..C`` and 255 raises ``ValueError`` naming the file, the label and the
    allowed range.  With ``check=False``, call :meth:`check` (e.g. on the
    images an evaluation will use) before the work; loading a mask checks it
    too.

    Args:
        root: the folder.
        split: the name of the list, usually ``"train"`` or ``"val"``.
        class_names: names of the labels (index 0 = background) or a file of
            them; None: rules 2-4 above.
        check: read and check every mask of the split at construction.

    Items: ``voc[i] -> (image, mask)``: (H, W, 3) uint8 RGB and (H, W) int64
    labels (0 = background, 1..C = classes, 255 = ignore).
    """

    ignore_index = 255

    def __init__(self, root: PathLike, split: str = "train",
                 class_names: Union[None, PathLike, Sequence[str]] = None,
                 check: bool = True) -> None:
        given = os.fspath(root)
        root = given
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
        self.ids: List[str] = self._read_list(listing)
        if not self.ids:
            raise ValueError(f"VOCSegmentation: {listing} lists no images")
        missing = [p for i in self.ids for p in (self._image_path(i), self._mask_path(i))
                   if not os.path.isfile(p)]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise FileNotFoundError(f"VOCSegmentation: missing file {missing[0]}{more} "
                                    f"(listed in {listing})")
        self._labels: Dict[str, np.ndarray] = {}   # id -> labels found in its mask
        self._checked = 0                          # masks of self.ids[:_checked] checked
        self.class_names_note: Optional[str] = None
        names, self.class_names_source = self._class_list(class_names, given)
        self.class_names: Tuple[str, ...] = names
        if check:
            self.check()

    # ------------------------------------------------------------------ class list

    @staticmethod
    def _read_list(listing: str) -> List[str]:
        with open(listing) as f:
            return [line.split()[0] for line in f if line.strip()]

    def _all_listed_ids(self) -> List[str]:
        folder = os.path.join(self.root, "ImageSets", "Segmentation")
        ids: Dict[str, None] = {}
        for f in sorted(os.listdir(folder)):
            if f.endswith(".txt"):
                ids.update(dict.fromkeys(self._read_list(os.path.join(folder, f))))
        return list(ids)

    def _class_list(self, class_names: Union[None, PathLike, Sequence[str]],
                    given: str) -> Tuple[Tuple[str, ...], str]:
        if isinstance(class_names, (str, os.PathLike)):
            return read_class_names(class_names), os.fspath(class_names)
        if class_names is not None:
            names = tuple(str(c) for c in class_names)
            if len(names) < 2 or len(set(names)) != len(names) or len(names) > 255:
                raise ValueError(f"VOCSegmentation: class_names must be 2 to 255 distinct "
                                 f"names, background first; got {len(names)}: {names[:5]}")
            return names, "class_names argument"
        for folder in dict.fromkeys((self.root, given)):
            found = [os.path.join(folder, f) for f in CLASS_LIST_FILES
                     if os.path.isfile(os.path.join(folder, f))]
            if found:
                lists = [read_class_names(f) for f in found]
                if any(other != lists[0] for other in lists[1:]):
                    raise ValueError(f"VOCSegmentation: {found[0]} and {found[1]} list "
                                     "different classes; keep one")
                return lists[0], found[0]
        all_ids = self._all_listed_ids()
        if (os.path.basename(os.path.normpath(self.root)) == "VOC2012"
                or all(_VOC_ID.match(i) for i in all_ids)):
            return VOC_CLASSES, "PASCAL VOC 2012 (the folder looks like VOC 2012)"
        top, where = 0, ""
        for i in all_ids:
            if not os.path.isfile(self._mask_path(i)):
                continue  # another split's missing file: that split reports it
            labels = self._mask_labels(i)
            labels = labels[labels != self.ignore_index]
            if labels.size and int(labels.max()) > top:
                top, where = int(labels.max()), self._mask_path(i)
        if top > len(VOC_CLASSES) - 1:
            raise ValueError(f"VOCSegmentation: {self.root} has no class list and its masks "
                             f"hold labels up to {top} (e.g. {where}); without a list only "
                             f"labels 0..{len(VOC_CLASSES) - 1} are accepted. Give the class "
                             f"names (cribo evaluate --class-names FILE, or class_names=), or "
                             f"put a classes.txt in the folder: one name per line, the first "
                             f"for label 0 (the background)")
        top = max(top, 1)
        self.class_names_note = (
            f"{self.root} has no class list (classes.txt or labelmap.txt) and does not look "
            f"like PASCAL VOC 2012: its labels 1..{top} are named 'class 1'..'class {top}' "
            f"(the largest label in its masks); give --class-names FILE to name them")
        return (("background",) + tuple(f"class {c}" for c in range(1, top + 1)),
                f"the masks' labels 0..{top}")

    @property
    def n_classes(self) -> int:
        """C, the number of object classes (labels 1..C)."""
        return len(self.class_names) - 1

    # ------------------------------------------------------------------ masks

    def _image_path(self, i: str) -> str:
        return os.path.join(self.root, "JPEGImages", i + ".jpg")

    def _mask_path(self, i: str) -> str:
        return os.path.join(self.root, "SegmentationClass", i + ".png")

    def _read_mask(self, i: str, dtype: Optional[type] = np.int64) -> np.ndarray:
        """The mask as int64 (``dtype=None``: as stored, uint8/uint16/int32)."""
        path = self._mask_path(i)
        with Image.open(path) as m:
            if m.mode not in _MASK_MODES:
                raise ValueError(f"VOCSegmentation: {path} must be a palette or 8-bit gray "
                                 f"(or 16-bit gray) PNG of class indices, got mode {m.mode!r}")
            a = np.asarray(m)
        return a if dtype is None else a.astype(dtype)

    def _mask_labels(self, i: str) -> np.ndarray:
        """The labels present in a mask, increasing (read once, then remembered)."""
        if i not in self._labels:
            m = self._read_mask(i, dtype=None)
            if m.dtype.kind == "u":   # a histogram is ~10x faster than a sort
                labels = np.flatnonzero(np.bincount(m.ravel()))
            else:
                labels = np.unique(m)
            self._labels[i] = labels.astype(np.int64)
        return self._labels[i]

    def _check_labels(self, labels: np.ndarray, path: str) -> None:
        """Raises if any of ``labels`` (any shape) is outside 0..C and not 255."""
        C = self.n_classes
        bad = labels[((labels < 0) | (labels > C)) & (labels != self.ignore_index)]
        if bad.size:
            hint = ""
            if self.class_names is VOC_CLASSES:
                hint = (" -- if the folder has classes of its own, give their list "
                        "(cribo evaluate --class-names FILE, class_names=, or a classes.txt "
                        "in the folder)")
            raise ValueError(f"VOCSegmentation: mask {path} holds label {int(bad.flat[0])}, "
                             f"outside the allowed range 0..{C} (the {C + 1} classes from "
                             f"{self.class_names_source}) and {self.ignore_index} (ignore)"
                             f"{hint}")

    def check(self, n: Optional[int] = None) -> Tuple[int, ...]:
        """Reads the masks of the first ``n`` listed images (all if None) and checks them.

        Each mask is read once per object (later calls reuse what was read).
        Checks, in list order: the mask's mode (palette, 8- or 16-bit gray), its
        size against its image's (read from the image header only), and its
        labels against ``0..C`` and 255 (ignore).

        Returns:
            The labels found in those masks, increasing, 255 left out.

        Raises:
            ValueError: naming the first bad mask, the label and the allowed range.
        """
        ids = self.ids if n is None else self.ids[:max(int(n), 0)]
        found: Set[int] = set()
        for k, i in enumerate(ids):
            labels = self._mask_labels(i)
            if k >= self._checked:
                path = self._mask_path(i)
                self._check_labels(labels, path)
                with Image.open(self._image_path(i)) as im:
                    w, h = im.size
                with Image.open(path) as m:
                    mw, mh = m.size
                if (mw, mh) != (w, h):
                    raise ValueError(f"VOCSegmentation: mask {path} is {mw}x{mh}, its image "
                                     f"is {w}x{h}")
            found.update(int(v) for v in labels if v != self.ignore_index)
        self._checked = max(self._checked, len(ids))
        return tuple(sorted(found))

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"VOCSegmentation({self.root!r}, split={self.split!r}, {len(self)} images)"

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        k = image_index(index, len(self.ids), "VOCSegmentation")
        i = self.ids[k]
        image = load_rgb(self._image_path(i), exif=False)  # masks ignore EXIF too
        path = self._mask_path(i)
        mask = self._read_mask(i)
        if k >= self._checked:
            self._check_labels(mask, path)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"VOCSegmentation: mask {path} is {mask.shape[1]}x{mask.shape[0]}, "
                             f"its image is {image.shape[1]}x{image.shape[0]}")
        return image, mask
