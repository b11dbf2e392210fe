"""Dense evaluation (docs/method.md §7): the vote, the scores, ignore labels, the bank's
sampling rule, oracle features, the paired bootstrap and its printed intervals, the
probe, and the floor of a real (tiny) pretraining run.  (``cribo evaluate``:
tests/cli/test_evaluate_cli.py.)"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cribo.data import IMAGENET_MEAN, IMAGENET_STD, SyntheticScenes  # noqa: E402
from cribo.evaluation import (confusion_matrix, dense_evaluation,  # noqa: E402
                            eval_size, evaluate_retrieval, knn_vote, linear_probe,
                            paired_bootstrap, patch_histograms,
                            random_init_like, sample_patches, scores_from_confusion,
                            train_linear_probe, train_view)

P = 8          # patch size of every test here
SIZE = 32      # image side: a 4 x 4 patch grid
N_CLASSES = 3  # synthetic object classes (4 labels with the background)


# ----------------------------------------------------------------------------- fixtures

class BlockScenes:
    """Synthetic scenes made patch-aligned, with images that encode the labels.

    The mask is each patch's majority class of a SyntheticScenes mask, painted
    over the whole patch; the image is gray level ``40 * label + 20``.  Optional
    ignore pixels (255) fill the top-left patch of every other image.
    """

    def __init__(self, split: str, n: int, ignore: bool = False) -> None:
        self.src = SyntheticScenes(split, n, SIZE, seed=0, n_classes=N_CLASSES)
        self.class_names = self.src.class_names
        self.ignore = ignore

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int):
        _, mask = self.src[i]
        C = len(self.class_names)
        lab = patch_histograms(mask, P, C).argmax(1).reshape(SIZE // P, SIZE // P)
        block = np.kron(lab, np.ones((P, P), np.int64))
        image = np.repeat((40 * block + 20).astype(np.uint8)[:, :, None], 3, axis=2)
        if self.ignore and i % 2 == 0:
            block = block.copy()
            block[:P, :P] = 255
        return image, block


class Oracle(torch.nn.Module):
    """Patch features = one-hot of the patch's label, decoded from a BlockScenes image."""

    patch_size, img_size = P, SIZE

    def forward(self, x):
        v = x[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
        lab = ((v * 255 - 20) / 40).round().clamp(0, N_CLASSES).long()
        onehot = torch.nn.functional.one_hot(lab, N_CLASSES + 1).permute(0, 3, 1, 2).float()
        major = torch.nn.functional.avg_pool2d(onehot, P).argmax(1).flatten(1)   # (B, N)
        feats = torch.nn.functional.one_hot(major, N_CLASSES + 1).float()
        return feats[:, 0], feats


class RandomFeatures(torch.nn.Module):
    """Patch features independent of the image (seeded noise)."""

    patch_size, img_size = P, SIZE

    def forward(self, x):
        g = torch.Generator().manual_seed(int(x.sum().abs() * 1000) % 2**31)
        feats = torch.randn(x.shape[0], (x.shape[2] // P) * (x.shape[3] // P), 16, generator=g)
        return feats[:, 0], feats


EXACT = dict(image_size=SIZE, augment_passes=0, upsample="nearest", k=5, progress=False)


# ----------------------------------------------------------------------------- the vote

def test_vote_on_a_hand_made_bank():
    bank = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.75, 0.66]], np.float32)
    hist = np.array([[1, 0], [1, 0], [0, 1], [0.5, 0.5], [0, 1]], np.float32)
    q = np.array([[1, 0], [0, 1]], np.float32)
    votes = knn_vote(q, bank, hist, k=2, temperature=0.02)
    assert votes.argmax(1).tolist() == [0, 1]
    # query 1: neighbours 2 (sim 1) and 3 (sim 0.9/|(0.1,0.9)|), weights softmax(sim/T)
    s3 = 0.9 / math.hypot(0.1, 0.9)
    w = np.exp(np.array([1.0, s3]) / 0.02)
    w /= w.sum()
    np.testing.assert_allclose(votes[1], [0.5 * w[1], w[0] + 0.5 * w[1]], rtol=1e-5)
    np.testing.assert_allclose(votes.sum(1), 1.0, rtol=1e-6)
    # The temperature decides between one very close neighbour and two slightly farther:
    # query (1, 0.6): entry 4 is nearest (class 1), entries 0 and 1 (class 0) follow.
    q2 = np.array([[1, 0.6]], np.float32)
    assert knn_vote(q2, bank, hist, k=3, temperature=0.02).argmax(1)[0] == 1
    assert knn_vote(q2, bank, hist, k=3, temperature=10.0).argmax(1)[0] == 0


def test_vote_errors_and_chunking_do_not_change_the_result(rng):
    """Bitwise: any query chunking, 1 or 2 threads, a bank with duplicated rows
    (the search ranks exactly, and the votes are fixed-order elementwise sums)."""
    bank = rng.standard_normal((50, 8)).astype(np.float32)
    bank[25:] = bank[:25]                                    # every row twice
    bank = np.concatenate([bank] * 30)                       # 1500 rows: two search blocks
    hist = rng.dirichlet(np.ones(4), len(bank)).astype(np.float32)
    q = np.concatenate([rng.standard_normal((20, 8)), bank[:3]]).astype(np.float32)
    from cribo import num_threads
    whole = knn_vote(q, bank, hist, k=7, chunk=1000)
    for chunk, threads in ((1, 1), (5, 2), (23, 2), (1000, 2)):
        with num_threads(threads):
            assert knn_vote(q, bank, hist, k=7, chunk=chunk).tobytes() == whole.tobytes()
    with pytest.raises(ValueError, match="k=51"):
        knn_vote(q, bank[:50], hist[:50], k=51)
    with pytest.raises(ValueError, match="temperature"):
        knn_vote(q, bank, hist, temperature=0)


# ----------------------------------------------------------------------------- scores

def test_scores_from_a_confusion_matrix_by_hand():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    conf = confusion_matrix(gt, pred, 4)                        # class 3 never occurs
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 2] = 1, 1, 2, 1
    np.testing.assert_array_equal(conf, expected)              # the 255 pixel is not counted
    s = scores_from_confusion(conf, ["bg", "a", "b", "c"])
    assert s["per_class_iou"]["bg"] == pytest.approx(1 / 2)    # 1 / (2 + 1 - 1)
    assert s["per_class_iou"]["a"] == pytest.approx(2 / 3)     # 2 / (2 + 3 - 2)
    assert s["per_class_iou"]["b"] == 1.0
    assert math.isnan(s["per_class_iou"]["c"])                 # absent: left out of the mean
    assert s["miou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert s["pixel_acc"] == pytest.approx(4 / 5)
    # background vs foreground: [[1, 1], [0, 3]] -> foreground IoU 3 / 4, background 1 / 2
    assert s["fg_iou"] == pytest.approx(3 / 4)
    assert s["bg_iou"] == pytest.approx(1 / 2)


def test_confusion_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([0, 7]), np.array([0, 1]), 3)


def test_patch_histograms_and_the_bank_sampling_rule():
    mask = np.zeros((16, 16), np.int64)
    mask[:8, :8] = 255                                           # patch 0: ignore only
    mask[:8, 8:12] = 2                                           # patch 1: half class 2
    mask[8:, :] = 1                                              # patches 2, 3: class 1
    mask[15, 15] = 255
    counts = patch_histograms(mask, 8, 3)
    np.testing.assert_array_equal(counts, [[0, 0, 0], [32, 0, 32], [0, 64, 0], [0, 63, 0]])
    rng = np.random.default_rng(0)
    assert sample_patches(counts, None, rng).tolist() == [1, 2, 3]   # all-ignore patch dropped
    # cap 5 of 10 patches, majority counts 7 / 2 / 1: rarest first, 1, then 2, then the rest
    counts = np.zeros((10, 3), np.int64)
    counts[np.arange(10), [0, 0, 1, 0, 0, 2, 0, 1, 0, 0]] = 4
    keep = sample_patches(counts, 5, np.random.default_rng(0))
    assert keep.size == 5 and {2, 5, 7} <= set(keep.tolist())
    assert np.all(np.diff(keep) > 0)


def test_views_and_resolution_rule():
    assert eval_size(96, 96, 64, 8) == (64, 64)
    assert eval_size(375, 500, 224, 16) == (224, 304)           # aspect kept within half a patch
    with pytest.raises(ValueError, match="multiple"):
        eval_size(10, 10, 20, 8)
    image, mask = SyntheticScenes("train", 1, 48)[0]
    a = train_view(image, mask, np.random.default_rng(1), 32, 8)
    b = train_view(image, mask, np.random.default_rng(1), 32, 8)
    assert a[0].shape == (32, 32, 3) and a[1].shape == (32, 32)
    np.testing.assert_array_equal(a[1], b[1])
    assert set(np.unique(a[1])) <= set(np.unique(mask))        # nearest: no new labels


# ----------------------------------------------------------------------------- oracle, bootstrap

@pytest.fixture(scope="module")
def block_data():
    return BlockScenes("train", 12), BlockScenes("val", 8, ignore=True)


@pytest.fixture(scope="module")
def oracle_results(block_data):
    train, val = block_data
    return dense_evaluation(Oracle(), train, val, probe_epochs=2, **EXACT)


def test_oracle_features_give_miou_one_and_ignore_pixels_are_excluded(oracle_results,
                                                                     block_data):
    nn_r, _ = oracle_results
    assert nn_r.miou == 1.0 and nn_r.fg_iou == 1.0 and nn_r.pixel_acc == 1.0
    assert nn_r.per_image_confusion.shape == (8, 4, 4)
    _, val = block_data
    for i in range(len(val)):
        assert nn_r.per_image_confusion[i].sum() == int((val[i][1] != 255).sum())
    assert set(nn_r.predictions) == {0, 1, 2, 3}
    np.testing.assert_array_equal(nn_r.predictions[1], val[1][1])
    # the bank holds every labelled patch: 12 images x 16 patches
    assert nn_r.bank_size == 12 * 16


def test_probe_on_oracle_features_reaches_miou_one(oracle_results):
    _, probe_r = oracle_results
    assert probe_r.train_accuracy == 1.0
    assert probe_r.miou == 1.0
    # balanced weights on very unequal classes, and a class absent from training
    labels = np.repeat([0, 1, 2], [500, 20, 3])
    feats = np.eye(4, dtype=np.float32)[labels]
    for balanced in (False, True):
        head = train_linear_probe(feats, labels, 4, epochs=1, balanced=balanced, min_steps=50)
        assert head.train_accuracy == 1.0
        assert np.all(np.isfinite(head.weight))


def test_bootstrap_interval(oracle_results, block_data):
    train, val = block_data
    oracle, _ = oracle_results
    same = paired_bootstrap(oracle, oracle, n=200, seed=0)
    assert not same.miou.excludes_zero and same.miou.low <= 0 <= same.miou.high
    rand = evaluate_retrieval(RandomFeatures(), train, val, **EXACT)
    assert rand.miou < 0.7
    b = paired_bootstrap(oracle, rand, n=200, seed=0)
    assert b.miou.excludes_zero and b.miou.low > 0
    assert b.miou.diff == pytest.approx(oracle.miou - rand.miou)
    assert b.to_dict()["n"] == 200 and b.to_dict()["miou"]["excludes_zero"]
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap(oracle, oracle.per_image_confusion[:3])


def test_intervals_are_in_points_with_one_decimal():
    from cribo.evaluation import Interval

    iv = Interval(diff=0.01234, low=-0.0004, high=0.02999, std=0.01, level=0.95)
    assert str(iv) == "+1.2 [+0.0, +3.0] (95% CI)"               # never "-0.0"
    assert str(Interval(-0.1, -0.155, -0.05, 0.02, 0.9)) == "-10.0 [-15.5, -5.0] (90% CI)"


def test_linear_probe_and_retrieval_on_a_vit_are_deterministic(block_data):
    train, val = block_data
    vit = random_init_like(dict(img_size=SIZE, patch_size=P, embed_dim=32, depth=1,
                                num_heads=2), seed=3)
    vit2 = random_init_like(vit, seed=3)
    torch.testing.assert_close(vit.state_dict(), vit2.state_dict())
    kw = dict(augment_passes=1, patches_per_image=10, k=5, progress=False)
    a = evaluate_retrieval(vit, train, val, **kw)
    b = evaluate_retrieval(vit2, train, val, **kw)
    np.testing.assert_array_equal(a.per_image_confusion, b.per_image_confusion)
    assert a.bank_size <= 12 * 10
    p = linear_probe(vit, train, val, epochs=1, **kw)
    assert 0 <= p.miou <= 1 and p.confusion.sum() == a.confusion.sum()


def test_random_init_like_with_the_run_seed_is_the_runs_starting_point(tmp_path):
    from cribo.train.config import config_from_args
    from cribo.train.build import build_models

    from runs import TINY

    cfg = config_from_args(TINY + ["--output-dir", str(tmp_path), "--seed", "5",
                                   "--batch-size", "8"])
    torch.manual_seed(cfg.seed)
    teacher = build_models(cfg)["teacher"].backbone
    floor = random_init_like(teacher, cfg.seed)
    torch.testing.assert_close(floor.state_dict(), teacher.state_dict(), rtol=0, atol=0)
    other = random_init_like(teacher, cfg.seed + 1)
    assert not torch.equal(other.pos_embed, teacher.pos_embed)
