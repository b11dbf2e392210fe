"""cribo.viz._figure: the colours and the image layouts every picture shares."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("PIL.Image")

from cribo import viz  # noqa: E402


def test_to_rgb_undoes_the_imagenet_normalisation(rng):
    from cribo.data import normalize

    img = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    back = viz.to_rgb(normalize(img))  # (3, 6, 5) normalised float
    np.testing.assert_allclose(back, img / 255.0, atol=1e-6)
    np.testing.assert_allclose(viz.to_rgb(img), img / 255.0, atol=1e-7)
    with pytest.raises(ValueError, match="to_rgb"):
        viz.to_rgb(np.zeros((2, 3, 4, 5)))


def test_cluster_colours_are_fixed_by_id():
    c8, c30 = viz.cluster_colors(8), viz.cluster_colors(30)
    np.testing.assert_array_equal(c8, c30[:8])
    assert len({tuple(np.round(c, 6)) for c in c30}) == 30
    assert np.all((c30 >= 0) & (c30 <= 1))
