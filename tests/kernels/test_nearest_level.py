"""nearest_level against a float64 numpy argmin over |x - level| (ties to the lower index)."""

import numpy as np
import pytest

from vqlib.kernels import nearest_level


def _reference(x, levels):
    dist = np.abs(np.asarray(x, np.float64)[..., None] - np.asarray(levels, np.float64))
    return np.argmin(dist, axis=-1)  # numpy's argmin keeps the first (lowest) index on ties


@pytest.mark.parametrize("k", [1, 2, 5, 16, 64, 65, 200])  # unrolled up to 64 boundaries, summed beyond
def test_nearest_level_is_the_argmin_distance(k):
    rng = np.random.default_rng(k)
    levels = np.sort(rng.standard_normal(k)).astype(np.float32)
    x = rng.standard_normal((7, 300)).astype(np.float32) * 1.5
    np.testing.assert_array_equal(np.asarray(nearest_level(x, levels)), _reference(x, levels))


def test_halfway_entries_go_to_the_lower_level():
    levels = np.array([-1.0, -0.5, 0.25, 2.0], np.float32)  # midpoints exact in float32
    mids = (levels[1:] + levels[:-1]) / 2
    got = np.asarray(nearest_level(mids, levels))
    np.testing.assert_array_equal(got, [0, 1, 2])
    np.testing.assert_array_equal(got, _reference(mids, levels))
