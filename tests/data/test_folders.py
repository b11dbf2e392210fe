"""cribo.data.folders and cribo.data.voc: image folders, 16-bit images, VOC-style folders."""
from __future__ import annotations

import os
import re
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from cribo.data import (VOC_CLASSES, ImageFolder, ImageFolderWarning, TwoViewDataset,
                        TwoViewTransform, UnreadableImageWarning, VOCSegmentation, load_rgb,
                        make_loader, read_class_names)


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
    with pytest.warns(UnreadableImageWarning, match="3_broken.jpg"), \
            pytest.warns(ImageFolderWarning, match="skipped 1: 1 unreadable file"):
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


def _write_png16(path, samples) -> None:
    """A 16-bit PNG written byte by byte (independent of Pillow's writer).

    samples: (H, W) gray, or (H, W, c) with c = 2 (gray + alpha), 3 (RGB), 4 (RGBA).
    """
    a = np.asarray(samples, dtype=">u2")
    if a.ndim == 2:
        a = a[:, :, None]
    h, w, c = a.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + a[i].tobytes() for i in range(h))    # filter 0 on each row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n"
                 + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                 + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _gray3(v: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(v, np.uint8)[:, :, None], 3, axis=2)


def test_16_and_32_bit_images_are_scaled_not_clipped(tmp_path):
    # 16-bit: v * 255 / 65535 rounded, i.e. v / 257 (never a tie: 257 is odd)
    ramp = (np.arange(12 * 16).reshape(12, 16) * 343).astype(np.uint16)     # 0 .. 65,513
    want16 = _gray3(np.floor(ramp.astype(np.float64) * 255 / 65535 + 0.5))
    Image.fromarray(ramp).save(tmp_path / "pillow16.png")                     # Pillow: I;16
    Image.fromarray(ramp.astype(">u2")).save(tmp_path / "big_endian16.tif")    # I;16B
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "int32.tif")       # I
    _write_png16(tmp_path / "raw16.png", ramp)
    modes = {}
    for name in ("pillow16.png", "big_endian16.tif", "int32.tif", "raw16.png"):
        with Image.open(tmp_path / name) as im:
            modes[name] = im.mode
        np.testing.assert_array_equal(load_rgb(tmp_path / name), want16, err_msg=name)
    assert modes["big_endian16.tif"] == "I;16B" and modes["int32.tif"] == "I"
    assert modes["raw16.png"] in ("I;16", "I")
    # 32-bit integers beyond 0..65535: the range stretched to 0..255
    k = np.arange(192).reshape(12, 16)
    Image.fromarray((k * 500 - 30000).astype(np.int32)).save(tmp_path / "wide.tif")
    np.testing.assert_array_equal(load_rgb(tmp_path / "wide.tif"),
                                  _gray3(np.floor(k * 255 / 191 + 0.5)))
    # float in [0, 1]: 255 v; outside: stretched
    levels = np.arange(192).reshape(12, 16) % 256
    Image.fromarray((levels / 255).astype(np.float32)).save(tmp_path / "unit.tif")
    np.testing.assert_array_equal(load_rgb(tmp_path / "unit.tif"), _gray3(levels))
    Image.fromarray((k * 3.0 - 100).astype(np.float32)).save(tmp_path / "wide_float.tif")
    np.testing.assert_array_equal(load_rgb(tmp_path / "wide_float.tif"),
                                  _gray3(np.floor(k * 255 / 191 + 0.5)))
    # 16-bit RGB, RGBA and gray + alpha: Pillow decodes them to 8 bits itself (high byte)
    rng = np.random.default_rng(0)
    for c in (2, 3, 4):
        s = rng.integers(0, 65536, (5, 7, c)).astype(np.uint16)
        _write_png16(tmp_path / f"c{c}.png", s)
        want = s[:, :, [0, 0, 0]] if c == 2 else s[:, :, :3]
        got = load_rgb(tmp_path / f"c{c}.png").astype(np.float64)
        assert np.abs(got - want / 257).max() < 1, c
    # the folder gives the same pixels
    folder = ImageFolder(tmp_path, extensions=(".png",))
    np.testing.assert_array_equal(folder[folder.paths.index(str(tmp_path / "raw16.png"))],
                                  want16)


def test_image_folder_follows_each_real_folder_once(tmp_path):
    d, outside = tmp_path / "d", tmp_path / "outside"
    _write_images(d, ["top.png", "a/one.png", "a/b/two.png"])
    _write_images(outside, ["ext.png"])
    os.symlink("..", d / "a" / "back")                  # a loop: a/back -> d
    os.symlink(outside, d / "link_out")                 # outside the tree: followed
    os.symlink(d / "top.png", d / "alias.png")          # a file link counts per name
    os.symlink(d / "gone.png", d / "broken.png")        # a broken link
    with pytest.warns(ImageFolderWarning) as record:
        folder = ImageFolder(d)
    rel = [os.path.relpath(p, d).replace(os.sep, "/") for p in folder.paths]
    assert rel == ["a/b/two.png", "a/one.png", "alias.png", "link_out/ext.png", "top.png"]
    lines = [str(w.message) for w in record if w.category is ImageFolderWarning]
    assert lines == [folder.summary()]
    assert re.fullmatch(
        rf"ImageFolder: 5 images under {re.escape(str(d))}; skipped 1: 1 broken link "
        rf"\(first: {re.escape(str(d / 'broken.png'))}\); not followed: 1 link to a folder "
        rf"already visited, a symlink loop or a second path \(first: "
        rf"{re.escape(str(d / 'a' / 'back'))}\)", lines[0]), lines[0]
    # a second path to a folder (no loop): the folder is read once, under its first name
    os.remove(d / "a" / "back")
    os.symlink(d / "a", d / "c")
    with pytest.warns(ImageFolderWarning, match=r"not followed: 1 link .*first: .*c\)"):
        again = ImageFolder(d)
    assert [os.path.relpath(p, d).replace(os.sep, "/") for p in again.paths] == rel
    assert again.revisited_folders == [str(d / "c")]
    # a clean folder says nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = ImageFolder(outside)
    assert clean.summary() == f"ImageFolder: 1 image under {outside}; nothing skipped"


def test_unreadable_folders_are_counted_in_one_line(tmp_path, monkeypatch):
    # chmod 000 does not stop root (CI runs as root), so the listing error is
    # injected where the walk lists a folder
    _write_images(tmp_path, ["a/1.png", "locked/2.png", "locked/3.png", "z.png"])
    locked = str(tmp_path / "locked")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(ImageFolderWarning) as record:
        folder = ImageFolder(tmp_path)
    assert [os.path.basename(p) for p in folder.paths] == ["1.png", "z.png"]
    assert folder.unreadable_folders == [(locked, "PermissionError")]
    lines = [str(w.message) for w in record if w.category is ImageFolderWarning]
    assert lines == [f"ImageFolder: 2 images under {tmp_path}; skipped 1: 1 unreadable "
                     f"folder (first: {locked}, PermissionError)"]
    with pytest.raises(PermissionError, match=f"cannot list the folder {re.escape(locked)}"):
        ImageFolder(locked)


def test_unreadable_files_are_counted_across_loader_workers(tmp_path):
    pytest.importorskip("torch")
    _write_images(tmp_path, [f"{k}.png" for k in range(6)], size=(20, 16))
    good = (tmp_path / "0.png").read_bytes()
    (tmp_path / "2_truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "4_garbage.png").write_bytes(b"not an image at all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # the scan found nothing wrong
        folder = ImageFolder(tmp_path)
    assert folder.summary() == f"ImageFolder: 8 images under {tmp_path}; nothing skipped"
    ds = TwoViewDataset(folder, TwoViewTransform(16, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        batches = list(make_loader(ds, batch_size=2, num_workers=2, shuffle=False))
    assert len(batches) == 4
    bad = [str(tmp_path / "2_truncated.png"), str(tmp_path / "4_garbage.png")]
    assert sorted(folder.unreadable_files()) == bad     # found in the workers, seen here
    assert folder.summary() == (f"ImageFolder: 6 images under {tmp_path}; skipped 2: "
                                f"2 unreadable files (first: {bad[0]})")
    # the per-file warning carries the running count
    fresh = ImageFolder(tmp_path)
    with pytest.warns(UnreadableImageWarning, match=r"2_truncated.png .*; 1 of 8 images "):
        fresh[3]
    with pytest.warns(UnreadableImageWarning, match=r"4_garbage.png .*; 2 of 8 images "):
        fresh[6]
    # check=True: dropped at construction, counted in the one line
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        checked = ImageFolder(tmp_path, check=True)
    said = [(w.category, str(w.message)) for w in record]
    assert [c for c, _ in said] == [UnreadableImageWarning] * 2 + [ImageFolderWarning]
    assert "; 1 of 8 images " in said[0][1] and "; 2 of 8 images " in said[1][1]
    assert said[2][1] == checked.summary() == (f"ImageFolder: 6 images under {tmp_path}; "
                                               f"skipped 2: 2 unreadable files (first: "
                                               f"{bad[0]})")
    assert len(checked) == 6 and sorted(checked.unreadable_files()) == bad


def _load_every_item(folder) -> None:
    """Target of a spawned process (module level, so it pickles by name)."""
    warnings.simplefilter("ignore", UnreadableImageWarning)
    for i in range(len(folder)):
        folder[i]


def test_unreadable_counts_reach_the_main_process_from_a_spawned_process(tmp_path):
    import multiprocessing
    import pickle

    _write_images(tmp_path, ["0.png", "2.png"])
    (tmp_path / "1_bad.png").write_bytes(b"garbage")
    folder = ImageFolder(tmp_path)
    proc = multiprocessing.get_context("spawn").Process(target=_load_every_item,
                                                        args=(folder,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert folder.unreadable_files() == [str(tmp_path / "1_bad.png")]
    copy = pickle.loads(pickle.dumps(folder))        # a copy outside process start: detached
    assert copy.unreadable_files() == folder.unreadable_files()


def test_read_class_names_formats_and_errors(tmp_path):
    (tmp_path / "classes.txt").write_text("# my classes\nbackground\n\ncat\n  dog  \n")
    assert read_class_names(tmp_path / "classes.txt") == ("background", "cat", "dog")
    (tmp_path / "labelmap.txt").write_text("# label:color_rgb:parts:actions\n"
                                           "background:0,0,0::\ncat:128,0,0::\n"
                                           "dog:0,128,0::\n")
    assert read_class_names(tmp_path / "labelmap.txt") == ("background", "cat", "dog")
    (tmp_path / "other.txt").write_text("bg:0,0,0::\nsheep:1,2,3::\n")   # every line has ':'
    assert read_class_names(tmp_path / "other.txt") == ("bg", "sheep")
    for text, match in (("background\n", "1 name"), ("bg\ncat\ncat\n", "line 3: 'cat' is "
                                                                         "listed twice"),
                        ("", "0 name")):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(ValueError, match=match):
            read_class_names(tmp_path / "bad.txt")
    (tmp_path / "labelmap.txt").write_text("background:0,0,0::\n:1,1,1::\n")
    with pytest.raises(ValueError, match="line 2: empty class name"):
        read_class_names(tmp_path / "labelmap.txt")
    with pytest.raises(FileNotFoundError, match="no class list file"):
        read_class_names(tmp_path / "missing.txt")


def _custom_voc(root, labels_per_image, splits=(("train", 2),)):
    """A VOC-style folder of non-VOC ids; image k's mask holds labels_per_image[k]."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    ids = [f"shot{k}" for k in range(len(labels_per_image))]
    for i, labels in zip(ids, labels_per_image):
        m = np.zeros((8, 10), np.uint8)
        for j, lab in enumerate(labels):
            m[j, :] = lab
        Image.fromarray(m, "L").save(os.path.join(root, "SegmentationClass", i + ".png"))
        Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(
            os.path.join(root, "JPEGImages", i + ".jpg"))
    start = 0
    for name, n in splits:
        with open(os.path.join(root, "ImageSets/Segmentation", name + ".txt"), "w") as f:
            f.write("\n".join(ids[start:start + n]) + "\n")
        start += n
    return ids


def test_voc_label_outside_the_range_is_found_before_any_work(tmp_path):
    masks = _voc_tree(tmp_path)                     # VOC ids: the 21 VOC names
    m = masks["2007_000002"].copy()
    m[5, 5] = 23                                    # only in the validation split
    im = Image.fromarray(m, "P")
    im.putpalette([0] * 768)
    im.save(tmp_path / "SegmentationClass" / "2007_000002.png")
    assert VOCSegmentation(tmp_path, "train").n_classes == 20
    msg = (r"mask .*2007_000002\.png holds label 23, outside the allowed range 0\.\.20 "
           r"\(the 21 classes from PASCAL VOC 2012.*\) and 255 \(ignore\).*--class-names")
    with pytest.raises(ValueError, match=msg):
        VOCSegmentation(tmp_path, "val")            # checked at construction
    lazy = VOCSegmentation(tmp_path, "val", check=False)
    with pytest.raises(ValueError, match=msg):
        lazy.check()
    with pytest.raises(ValueError, match=msg):
        lazy[0]
    # the check reads each mask once and returns the labels it found
    ok = VOCSegmentation(tmp_path, "train", check=False)
    assert ok.check(1) == (0, 1) and ok.check() == (0, 1, 3)


def test_voc_class_list_rules(tmp_path):
    root = tmp_path / "mine"
    _custom_voc(root, [(0, 1), (2,), (0, 3)], splits=(("train", 2), ("val", 1)))
    # no list, not VOC-like: 'class 1'..'class m', m the largest label of every split
    train, val = VOCSegmentation(root, "train"), VOCSegmentation(root, "val")
    assert train.class_names == val.class_names == ("background", "class 1", "class 2",
                                                    "class 3")
    assert "class 1'..'class 3'" in train.class_names_note and "--class-names" in \
        train.class_names_note
    # a list in the folder: classes.txt, or labelmap.txt
    (root / "labelmap.txt").write_text("background:0,0,0::\nleaf:0,1,0::\nstem:1,0,0::\n"
                                       "root:2,0,0::\nbud:3,0,0::\n")
    lm = VOCSegmentation(root, "val")
    assert lm.class_names == ("background", "leaf", "stem", "root", "bud")
    assert lm.class_names_source == str(root / "labelmap.txt") and lm.class_names_note is None
    (root / "classes.txt").write_text("background\nleaf\nstem\nroot\nbud\n")
    assert VOCSegmentation(root, "train").class_names == lm.class_names
    (root / "classes.txt").write_text("background\nleaf\nstem\n")
    with pytest.raises(ValueError, match="list different classes"):
        VOCSegmentation(root, "train")
    os.remove(root / "labelmap.txt")
    with pytest.raises(ValueError, match=r"shot2\.png holds label 3, outside the allowed "
                                         r"range 0\.\.2 \(the 3 classes from .*classes\.txt\)"):
        VOCSegmentation(root, "val")
    # given: a file, or the names (either overrides the folder's)
    (tmp_path / "names.txt").write_text("bg\na\nb\nc\n")
    assert VOCSegmentation(root, "val", class_names=tmp_path / "names.txt").class_names == \
        ("bg", "a", "b", "c")
    assert VOCSegmentation(root, "val", class_names=["bg", "a", "b", "c"]).n_classes == 3
    with pytest.raises(ValueError, match="distinct"):
        VOCSegmentation(root, "val", class_names=["bg", "bg"])
    # labels beyond VOC's 20 and no list: an error asking for one
    big = tmp_path / "big"
    _custom_voc(big, [(0, 1), (0, 37)])
    with pytest.raises(ValueError, match=r"labels up to 37 \(e\.g\. .*shot1\.png\).*"
                                         r"--class-names FILE.*classes\.txt"):
        VOCSegmentation(big, "train")
    # a folder named VOC2012 gets the VOC names
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    _custom_voc(voc, [(0, 1), (0, 15)])
    found = VOCSegmentation(tmp_path / "VOCdevkit", "train")
    assert found.class_names == VOC_CLASSES and "VOC 2012" in found.class_names_source


def test_voc_masks_of_16_bit_gray_hold_labels(tmp_path):
    root = tmp_path / "deep"
    _custom_voc(root, [(0, 1), (0, 2)])
    m = np.zeros((8, 10), np.uint16)
    m[3, :] = 2
    m[0, :] = 255
    Image.fromarray(m).save(root / "SegmentationClass" / "shot1.png")       # I;16
    ds = VOCSegmentation(root, "train", class_names=["bg", "a", "b"])
    np.testing.assert_array_equal(ds[1][1], m.astype(np.int64))           # labels, not scaled
