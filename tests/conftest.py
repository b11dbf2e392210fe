"""Shared fixtures and the one float32-vs-float64 tolerance helper of the suite."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `import reference`

EPS32 = float(np.finfo(np.float32).eps)


def assert_close_f32(actual, expected, *, reduction: int = 1, scale: float | None = None,
                     rtol: float = 1e-5, err_msg: str = "") -> None:
    """Compare a float32 result with a float64 reference.

    ``rtol`` covers relative rounding; the absolute part is
    ``8 * eps32 * sqrt(reduction) * scale`` where ``reduction`` is the length of
    the longest sum behind an entry and ``scale`` the magnitude of its terms
    (default: the largest |expected|), i.e. what float32 rounding can produce.
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    if scale is None:
        scale = float(np.abs(expected).max()) if expected.size else 1.0
    atol = 8 * EPS32 * np.sqrt(max(reduction, 1)) * max(scale, 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=err_msg)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240126)
