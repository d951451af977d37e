"""The matrix itself: every backend loads, and round-trips arrays on its device."""

import numpy as np

from backends import assert_array


def test_backend_round_trip(backend, dtype):
    x = backend.asarray(np.arange(6.0).reshape(2, 3), dtype)
    assert_array(backend, x, dtype, shape=(2, 3))
    np.testing.assert_array_equal(backend.to_numpy(x), np.arange(6.0).reshape(2, 3))
