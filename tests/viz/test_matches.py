"""cribo.viz.matches: queue addresses map back to the right image and cluster
(through cribo.ops.queue.locate_entries); frames are green or red by the cycle check."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("PIL.Image")

import cribo  # noqa: E402
from cribo import viz  # noqa: E402
from cribo.ops.queue import locate_entries  # noqa: E402
from viz_checks import expected_size, pixel, read_png  # noqa: E402


def test_locate_entries_skips_empty_images():
    slot, rank = locate_entries([0, 1, 2, 4, 5, -1, 9], [2, 0, 3, 1])
    np.testing.assert_array_equal(slot, [0, 0, 2, 2, 3, -1, -1])
    np.testing.assert_array_equal(rank, [0, 1, 0, 2, 0, -1, -1])


def _step(queue, buffer, objects, valid, images, labels, *, keep=True):
    """One training step as the objective does it: match, push; then the buffer."""
    t = objects[valid]
    counts_before = queue.image_counts.copy()
    m = queue.match(t, t)
    queue.push(t, t, valid.sum(1))
    if keep:
        buffer.push(images, labels, valid)
    return m, counts_before


def test_match_buffer_maps_addresses_back_to_images_and_clusters(tmp_path):
    rng = np.random.default_rng(1)
    K, d, g, S = 3, 16, 2, 8
    queue, buffer = cribo.ObjectQueue(capacity=50, dim=d), viz.MatchBuffer(max_batches=2)
    labels = np.broadcast_to(np.array([0, 1, 2, 2]), (3, 2, g * g)).copy()
    images = rng.integers(0, 256, (3, 2, S, S, 3), dtype=np.uint8)
    batches = []
    for valid in (np.array([[1, 0, 1], [1, 1, 1], [0, 0, 0]], bool),    # oldest
                  np.array([[0, 1, 0], [1, 1, 0], [1, 0, 1]], bool)):   # newest
        objects = rng.standard_normal((3, K, d)).astype(np.float32)
        _step(queue, buffer, objects, valid, images, labels)
        batches.append((objects, valid))
    np.testing.assert_array_equal(buffer.image_counts, queue.image_counts)
    # The current batch: image 0 copies (oldest batch, image 1, cluster 2) and
    # image 1 copies (newest batch, image 2, cluster 0).
    objects = np.zeros((2, K, d), np.float32)
    objects[0, 0] = batches[0][0][1, 2]
    objects[1, 1] = batches[1][0][2, 0]
    valid = np.array([[1, 0, 0], [0, 1, 0]], bool)
    t = objects[valid]
    m = queue.match(t, t)
    age, img, cl = buffer.lookup(m.index1, queue.image_counts)
    np.testing.assert_array_equal(age, [1, 0])
    np.testing.assert_array_equal(img, [1, 2])
    np.testing.assert_array_equal(cl, [2, 0])

    cur_images = rng.integers(0, 256, (2, 2, S, S, 3), dtype=np.uint8)
    cur_labels = np.broadcast_to(np.array([0, 1, 1, 0]), (2, 2, g * g)).copy()
    ex = viz.match_examples(buffer, cur_images, cur_labels, valid, m, max_examples=4,
                            image_counts=queue.image_counts)
    assert len(ex) == 2
    np.testing.assert_array_equal(ex[0].query_image, cur_images[0, 0])
    np.testing.assert_array_equal(ex[0].query_mask, [[True, False], [False, True]])
    np.testing.assert_array_equal(ex[0].neighbour_image, images[1, 0])
    np.testing.assert_array_equal(ex[0].neighbour_mask, [[False, False], [True, True]])
    np.testing.assert_array_equal(ex[1].neighbour_mask, [[True, False], [False, False]])
    assert [e.consistent for e in ex] == [bool(x) for x in m.mask1]
    with pytest.raises(ValueError, match="out of step"):
        buffer.lookup(m.index1, queue.image_counts[::-1])

    path = tmp_path / "matches.png"
    bad = viz.MatchExample(cur_images[1, 0], np.eye(4, dtype=bool), images[0, 1],
                           np.ones((2, 2), bool), consistent=False, similarity=0.5)
    fig = viz.plot_matches(ex + [bad], ncols=2, panel_size=1.2, path=path)
    png = read_png(path)
    assert png.shape[:2] == expected_size(fig)
    # The frame of a consistent pair is green, of an inconsistent one red.
    for e, sub in zip(ex + [bad], fig.subfigs):
        ax = sub.axes[0]
        rgb = pixel(png, ax, 0.0, S / 2)  # on the left spine
        green = rgb[1] > rgb[0] + 40
        assert green == e.consistent, (rgb, e.consistent)
