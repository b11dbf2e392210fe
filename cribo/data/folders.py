"""Images from disk: decoding one file, and any folder of images.

Decoding (:func:`load_rgb`) gives 8-bit RGB.  Pillow's own ``convert("RGB")``
clips 16- and 32-bit gray images (a 16-bit PNG comes out almost white), so
those are scaled to 8 bits instead, by this rule:

=========================  ===================================================
Pillow mode                8-bit value of a sample ``v``
=========================  ===================================================
``I;16``, ``I;16L/B/N``    ``round(v / 257)`` (16-bit: 0 -> 0, 65535 -> 255)
``I`` (32-bit integer)     as 16-bit when every value is in 0..65535 (how
                           Pillow may hold a 16-bit file); otherwise the
                           image's range min..max stretched linearly to 0..255
``F`` (32-bit float)       ``round(255 v)`` when every value is in [0, 1];
                           otherwise min..max stretched; NaN and inf -> 0
anything else              Pillow's ``convert("RGB")`` (8-bit gray, palette,
                           gray + alpha and RGBA: alpha dropped, CMYK, ...)
=========================  ===================================================

Pillow reads 16-bit-per-channel RGB(A) and gray + alpha PNGs as 8-bit itself
(the high byte of each sample), so those need nothing more.

Folders are scanned by :class:`ImageFolder`, which follows every real folder
once and ends its scan with one line saying what it found and skipped.
Pascal-VOC-style segmentation folders are :mod:`cribo.data.voc`'s (they decode
their images with :func:`load_rgb`).
"""
from __future__ import annotations

import multiprocessing
import os
import warnings
from typing import Any, List, Sequence, Set, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

from ._index import image_index

__all__ = ["ImageFolder", "UnreadableImageWarning", "ImageFolderWarning", "IMAGE_EXTENSIONS",
           "load_rgb", "to_rgb"]

IMAGE_EXTENSIONS: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff",
                                     ".gif", ".ppm", ".pgm", ".pbm", ".jfif")

PathLike = Union[str, "os.PathLike[str]"]


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and was skipped."""


class ImageFolderWarning(UserWarning):
    """The one-line summary of an :class:`ImageFolder` scan that skipped something."""


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def to_rgb(im: Image.Image) -> np.ndarray:
    """A decoded Pillow image as 8-bit RGB, 16/32-bit gray scaled (module docstring).

    Returns:
        (H, W, 3) uint8.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        v = np.asarray(im).astype(np.float64)
        if mode == "F":
            v = np.where(np.isfinite(v), v, 0.0)
            lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
            if lo < 0.0 or hi > 1.0:
                v = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
            v = v * 255.0
        else:
            lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
            if mode == "I" and (lo < 0 or hi > 65535):
                v = (v - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(v)
            else:
                v = v / 257.0
        gray = np.clip(np.rint(v), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB")).copy()


def load_rgb(path: PathLike, exif: bool = True) -> np.ndarray:
    """Decodes an image file fully, with its EXIF orientation applied if ``exif``.

    16- and 32-bit images are scaled to 8 bits, not clipped (:func:`to_rgb`).

    Returns:
        (H, W, 3) uint8 RGB.

    Raises:
        OSError (or another Pillow error) if the file cannot be decoded.
    """
    with Image.open(path) as im:
        if exif:
            im = ImageOps.exif_transpose(im)
        return to_rgb(im)


class _Scan:
    """What a walk of an image folder found (see :func:`_scan`)."""

    def __init__(self) -> None:
        self.files: List[str] = []
        self.unreadable_folders: List[Tuple[str, str]] = []   # (path, reason)
        self.broken_links: List[str] = []
        self.revisits: List[str] = []                         # links to a folder seen before


def _scan(root: str, exts: Tuple[str, ...]) -> _Scan:
    """Walks ``root``, following symbolic links, each real folder once.

    A folder is identified by ``(st_dev, st_ino)`` of its target; a link to a
    folder already visited (a symlink loop such as ``a/back -> ..``, or a second
    path to the same folder) is not followed and is recorded in ``revisits``.
    Folders are visited depth-first with names in sorted order and recorded
    when their parent is listed, so which path represents a folder reached
    twice depends only on the names, the same on every file system.  Links
    to files are kept as they are: a file linked under two
    names counts twice (a deliberate link is the user's choice, e.g. to
    oversample).  Folders that cannot be listed are recorded, not raised,
    except ``root`` itself.
    """
    out = _Scan()
    st = os.stat(root)
    seen: Set[Tuple[int, Any]] = {(st.st_dev, st.st_ino) if st.st_ino
                                  else (-1, os.path.realpath(root))}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if folder == root:
                raise type(e)(f"ImageFolder: cannot list the folder {root}: "
                              f"{e.strerror or e}") from e
            out.unreadable_folders.append((folder, type(e).__name__))
            continue
        subfolders = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir:
                try:
                    t = e.stat()
                except OSError as err:
                    out.unreadable_folders.append((e.path, type(err).__name__))
                    continue
                # st_ino is 0 where a file system has no inode numbers: use the real path
                key = (t.st_dev, t.st_ino) if t.st_ino else (-1, os.path.realpath(e.path))
                if key in seen:
                    out.revisits.append(e.path)
                    continue
                seen.add(key)
                subfolders.append(e.path)
            elif os.path.splitext(e.name)[1].lower() in exts:
                try:
                    exists = e.is_file()
                except OSError:
                    exists = False
                if exists:
                    out.files.append(os.path.relpath(e.path, root))
                elif e.is_symlink():
                    out.broken_links.append(e.path)
        stack.extend(reversed(subfolders))
    out.files.sort(key=lambda p: p.replace(os.sep, "/"))
    return out


class _SharedFlags:
    """One byte per image, shared with DataLoader worker processes.

    The bytes live in a ``multiprocessing.RawArray``: forked workers inherit it
    and spawned ones receive it when they start, so a flag set in any worker
    is seen by the main process.  Pickled any other way (a copy, ``pickle``
    by hand) the flags are copied, not shared.  Where shared memory cannot be
    had, a plain ``bytearray`` is used (each process then counts its own).
    """

    def __init__(self, n: int) -> None:
        try:
            self._a = multiprocessing.RawArray("B", max(int(n), 1))
        except (OSError, ValueError):  # no /dev/shm or similar
            self._a = bytearray(max(int(n), 1))

    def __getitem__(self, i: int) -> int:
        return self._a[i]

    def set(self, i: int) -> None:
        self._a[i] = 1

    def indices(self) -> np.ndarray:
        return np.flatnonzero(np.frombuffer(self._a, dtype=np.uint8))

    def __getstate__(self) -> dict:
        from multiprocessing import context

        if isinstance(self._a, bytearray) or context.get_spawning_popen() is None:
            return {"_a": bytearray(bytes(self._a))}
        return {"_a": self._a}  # starting a process: the shared array itself

    def __setstate__(self, state: dict) -> None:
        self._a = state["_a"]


class ImageFolder:
    """Every image under a folder, recursively (for pretraining on unlabelled images).

    Files are found by extension (case-insensitive, :data:`IMAGE_EXTENSIONS`)
    and sorted by their path relative to ``root``, so the indices do not depend
    on the file system.  Hidden files and folders (names starting with '.') are
    left out.  Symbolic links are followed, **each real folder once**: a link
    to a folder already visited (a loop such as ``a/back -> ..``, or a second
    path to the same folder) is not followed again, while links to folders
    outside ``root`` are.  A file linked under two names counts twice.

    The scan ends with **one line** (:meth:`summary`), e.g. ``ImageFolder:
    2,000 images under X; skipped 3: 2 unreadable folders (first: X/a,
    PermissionError), 1 broken link (X/b.png)``.  When anything was skipped
    or a folder link was not followed, that line is emitted once, at
    construction, as an :class:`ImageFolderWarning` (so a command-line user
    sees it once per process that builds the folder, never per DataLoader
    worker: workers receive the built object); when nothing was, nothing is
    emitted.

    Unreadable files are detected **on load** by default (construction only
    lists names, so it is fast on large folders): loading one emits an
    :class:`UnreadableImageWarning` naming it and giving the running count,
    marks it, and returns the next readable image instead (wrapping around),
    so a bad file never crashes a DataLoader worker; only when no file at all
    can be read does loading raise.  The marks are shared between the main
    process and its DataLoader workers (fork or spawn), so
    :meth:`unreadable_files` and :meth:`summary` in the main process count the
    files any worker found unreadable; in a multi-process (distributed) run
    each rank counts its own.  With ``check=True`` every file is decoded once
    at construction and the unreadable ones are dropped from ``paths`` (each
    with the same warning) and counted in the summary.

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
        scan = _scan(self.root, exts)
        self.paths: List[str] = [os.path.join(self.root, p) for p in scan.files]
        #: what the scan skipped: unreadable folders (path, error type), broken links
        self.unreadable_folders: List[Tuple[str, str]] = scan.unreadable_folders
        self.broken_links: List[str] = scan.broken_links
        #: links to folders already visited, not followed
        self.revisited_folders: List[str] = scan.revisits
        self._dropped: List[str] = []       # unreadable at construction (check=True)
        self._n_listed = len(self.paths)    # files found by the scan
        self._flags = _SharedFlags(0)
        if check:
            good = []
            for p in self.paths:
                try:
                    load_rgb(p)
                    good.append(p)
                except Exception as e:  # noqa: BLE001 -- any decoder failure means unreadable
                    self._dropped.append(p)
                    self._warn(p, e)
            self.paths = good
        if not self.paths:
            raise ValueError(f"ImageFolder: no {'readable ' if check else ''}images with "
                             f"extensions {', '.join(exts)} under {self.root}"
                             f"{self._skipped_text()}")
        self._flags = _SharedFlags(len(self.paths))
        if self._dropped or self.unreadable_folders or self.broken_links or \
                self.revisited_folders:
            warnings.warn(self.summary(), ImageFolderWarning, stacklevel=2)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r}, {len(self)} images)"

    def unreadable_files(self) -> List[str]:
        """Files found unreadable so far: at construction (``check=True``) and
        on load in this process or any of its DataLoader workers."""
        return self._dropped + [self.paths[i] for i in self._flags.indices()
                                if i < len(self.paths)]

    def _skipped_text(self) -> str:
        bad_files = self.unreadable_files()
        parts = []
        if self.unreadable_folders:
            p, why = self.unreadable_folders[0]
            parts.append(f"{_plural(len(self.unreadable_folders), 'unreadable folder')} "
                         f"(first: {p}, {why})")
        if self.broken_links:
            parts.append(f"{_plural(len(self.broken_links), 'broken link')} "
                         f"(first: {self.broken_links[0]})")
        if bad_files:
            parts.append(f"{_plural(len(bad_files), 'unreadable file')} "
                         f"(first: {bad_files[0]})")
        n = len(self.unreadable_folders) + len(self.broken_links) + len(bad_files)
        text = f"; skipped {n:,}: " + ", ".join(parts) if parts else "; nothing skipped"
        if self.revisited_folders:
            text += (f"; not followed: {_plural(len(self.revisited_folders), 'link')} to a "
                     f"folder already visited, a symlink loop or a second path "
                     f"(first: {self.revisited_folders[0]})")
        return text

    def summary(self) -> str:
        """The scan's one line: readable images found, what was skipped and why.

        Files that are listed but found unreadable on load (the default lazy
        check) are counted as they are found, so the line can change after
        the data has been read.
        """
        n_ok = len(self.paths) - len(self._flags.indices())
        return f"ImageFolder: {_plural(n_ok, 'image')} under {self.root}{self._skipped_text()}"

    def _warn(self, path: str, err: BaseException) -> None:
        n = len(self.unreadable_files())
        warnings.warn(f"ImageFolder: skipping unreadable image {path} "
                      f"({type(err).__name__}: {err}); {n:,} of {self._n_listed:,} images under "
                      f"{self.root} found unreadable so far", UnreadableImageWarning,
                      stacklevel=3)

    def __getitem__(self, index: int) -> np.ndarray:
        n = len(self.paths)
        i = image_index(index, n, "ImageFolder")
        for k in range(n):
            j = (i + k) % n
            if self._flags[j]:
                continue
            try:
                return load_rgb(self.paths[j])
            except Exception as e:  # noqa: BLE001 -- skip it, never crash a worker
                self._flags.set(j)
                self._warn(self.paths[j], e)
        raise RuntimeError(f"ImageFolder: none of the {n} files under {self.root} is readable")
