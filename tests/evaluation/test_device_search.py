"""The dense evaluation's device path (issue 11, point 5): :func:`knn_vote` and
:func:`dense_evaluation` with the torch top-k search (``search="torch"``), run here on
CPU tensors, against the C search on the host; and the engine choice by device.
(``cribo evaluate --device``: tests/cli/test_evaluate_cli.py.)"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cribo import nn  # noqa: E402
from cribo.data import SyntheticScenes  # noqa: E402
from cribo.evaluation import dense, dense_evaluation, knn_vote  # noqa: E402
from cribo.nn import torch_ops  # noqa: E402


@pytest.fixture
def no_c_search(monkeypatch):
    """The C search fails the test: the result must come from the torch search."""
    def c_search(*args, **kwargs):
        raise AssertionError("the C search ran on the torch path")

    monkeypatch.setattr(dense, "topk_cosine", c_search)


def _bank(rng, duplicates: bool):
    """A (1200, 12) bank (every row twice when ``duplicates``), Dirichlet histograms
    over 5 classes, and 150 queries (3 of them bank rows)."""
    bank = rng.standard_normal((1200, 12)).astype(np.float32)
    if duplicates:
        bank[600:] = bank[:600]
    hist = rng.dirichlet(np.ones(5) * 0.5, len(bank)).astype(np.float32)
    q = np.concatenate([rng.standard_normal((147, 12)), bank[[0, 5, 900]]]).astype(np.float32)
    return q, bank, hist


@pytest.mark.parametrize("duplicates", [False, True])
def test_torch_search_votes_equal_the_c_votes(rng, duplicates, monkeypatch):
    q, bank, hist = _bank(rng, duplicates)
    with monkeypatch.context() as m:
        m.setattr(torch_ops.queue, "topk_cosine", lambda *a, **kw: pytest.fail("torch search"))
        c_votes = knn_vote(q, bank, hist, k=9, temperature=0.05)      # the C path, as before
    with monkeypatch.context() as m:
        m.setattr(dense, "topk_cosine", lambda *a, **kw: pytest.fail("C search"))
        # a small budget: many bank blocks and query blocks inside each search call
        t_votes = knn_vote(q, bank, hist, k=9, temperature=0.05, search="torch",
                           chunk=64, chunk_bytes=1 << 14)
    assert t_votes.dtype == np.float32 and t_votes.shape == c_votes.shape
    np.testing.assert_allclose(t_votes, c_votes, rtol=1e-5, atol=1e-7)
    # identical labels wherever the two best classes are not a near-tie
    top2 = np.sort(c_votes, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(t_votes.argmax(1)[clear], c_votes.argmax(1)[clear])


def test_torch_vote_is_independent_of_chunking_and_takes_device_tensors(rng, no_c_search):
    q, bank, hist = _bank(rng, duplicates=True)
    whole = knn_vote(q, bank, hist, k=7, search="torch", chunk=1000)
    for chunk, budget, n in ((1, 1 << 16, 12), (23, 1 << 13, 150), (150, None, 150)):
        v = knn_vote(q[:n], bank, hist, k=7, search="torch", chunk=chunk, chunk_bytes=budget)
        assert v.tobytes() == whole[:n].tobytes()
    # the bank and histograms as tensors on the device (what dense_evaluation passes)
    v = knn_vote(q, torch.from_numpy(bank), torch.from_numpy(hist), k=7, device="cpu",
                 search="torch")
    assert v.tobytes() == whole.tobytes()


def test_the_engine_follows_the_device(rng, monkeypatch):
    q, bank, hist = _bank(rng, duplicates=False)
    calls = []
    real = torch_ops.queue.topk_cosine
    monkeypatch.setattr(torch_ops.queue, "topk_cosine",
                        lambda *a, **kw: calls.append("torch") or real(*a, **kw))
    c = knn_vote(q, bank, hist, k=5)                                  # default: C
    assert knn_vote(q, bank, hist, k=5, device="cpu").tobytes() == c.tobytes()
    assert knn_vote(q, bank, hist, k=5, device=torch.device("cpu"), search="c").tobytes() \
        == c.tobytes()
    assert calls == []
    knn_vote(q, bank, hist, k=5, device="cpu", search="torch")
    assert calls == ["torch"]
    # a non-CPU device picks the torch search ("meta": no data, so only the choice is seen)
    assert dense._search_engine("auto", "meta", "f") == "torch"
    assert dense._search_engine("auto", None, "f") == "c"
    assert dense._search_engine("c", "meta", "f") == "c"
    with pytest.raises(ValueError, match="search must be 'auto', 'c' or 'torch', got 'gpu'"):
        knn_vote(q, bank, hist, k=5, search="gpu")
    with pytest.raises(ValueError, match="k=2000"):
        knn_vote(q, bank, hist, k=2000, search="torch")


def test_dense_evaluation_with_the_torch_search_equals_the_c_search(monkeypatch):
    torch.manual_seed(0)
    vit = nn.vit(32, 1, 1, patch_size=8, img_size=32)
    train = SyntheticScenes("train", 4, 32, seed=0, n_classes=3)
    val = SyntheticScenes("val", 3, 32, seed=0, n_classes=3)
    opts = dict(image_size=32, augment_passes=1, k=5, probe=False, progress=False,
                upsample="nearest", patches_per_image=None)
    c, _ = dense_evaluation(vit, train, val, **opts)
    monkeypatch.setattr(dense, "topk_cosine", lambda *a, **kw: pytest.fail("C search"))
    t, _ = dense_evaluation(vit, train, val, search="torch", search_bytes=1 << 14,
                            query_chunk=7, **opts)
    assert c.bank_size == t.bank_size > 5
    np.testing.assert_array_equal(t.per_image_confusion, c.per_image_confusion)
    assert t.miou == c.miou
    with pytest.raises(ValueError, match="dense_evaluation: search must be"):
        dense_evaluation(vit, train, val, search="cuda", **opts)
