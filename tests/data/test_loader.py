"""cribo.data.loader: two-view items, the epoch batch sampler, the loader and its workers."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from test_folders import _write_images  # noqa: E402

from cribo.data import (EpochBatchSampler, ImageFolder, SyntheticScenes, TwoViewDataset,
                        TwoViewTransform, UnreadableImageWarning, make_loader, set_epoch)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
