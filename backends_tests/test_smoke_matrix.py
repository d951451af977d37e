"""The matrix itself: every backend loads, and round-trips arrays on its device."""

import numpy as np
import pytest

from backends_tests.backends import assert_array, assert_close, check_gradients


def test_backend_round_trip(backend, dtype):
    x = backend.asarray(np.arange(6.0).reshape(2, 3), dtype)
    assert_array(backend, x, dtype, shape=(2, 3))
    np.testing.assert_array_equal(backend.to_numpy(x), np.arange(6.0).reshape(2, 3))


# ----------------------------------------------------------------- the helpers judge what they say
def test_assert_close_checks_library_dtype_device_shape_and_values(backend, rng):
    x = rng.standard_normal((3, 4))
    assert_close(backend, backend.asarray(x), x, "float64")
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(backend, backend.asarray(x, "float32"), x, "float64")
    with pytest.raises(AssertionError, match=r"expected an array of|is an array of"):
        assert_close(backend, backend.foreign(x), x, "float64")
    with pytest.raises(AssertionError, match="shape"):
        assert_close(backend, backend.asarray(x[:2]), x, "float64")
    with pytest.raises(AssertionError):
        assert_close(backend, backend.asarray(x + 1e-6), x, "float64")
    assert_close(backend, backend.asarray(x, "float32"), x, "float32")
    assert_close(backend, backend.asarray(x, "float32"), x, "float32", expected_dtype="float32")


@pytest.mark.two_devices
def test_assert_close_checks_the_device(backend, rng):
    x = backend.xp.asarray(backend.asarray(np.ones(3)), device=backend.other_device)
    with pytest.raises(AssertionError, match="device"):
        assert_close(backend, x, np.ones(3), "float64")


@pytest.mark.jit
@pytest.mark.grad
def test_capability_markers_reach_capable_backends_only(backend):
    assert backend.jit is not None
    assert backend.grad is not None


@pytest.mark.needs_dtype("float16", "bfloat16")
@pytest.mark.skip_backends("jax", reason="skipped to test the marker")
def test_dtype_and_skip_markers(backend):
    assert {"float16", "bfloat16"} <= set(backend.dtypes)
    assert backend.name != "jax"


@pytest.mark.only_backends("numpy", "array_api_strict", reason="run to test the marker")
def test_only_backends_marker(backend):
    assert backend.name in ("numpy", "array_api_strict")


@pytest.mark.grad
def test_check_gradients_catches_a_wrong_gradient(backend):
    xp = backend.xp
    check_gradients(backend, lambda x: xp.sin(x) * x, np.linspace(-1.0, 1.0, 5))

    def detached(x):  # the value of x * x with the gradient of x: wrong on purpose
        return x * (
            xp.asarray(backend.to_numpy(x), device=backend.device)
            if backend.grad == "torch"
            else backend.native.lax.stop_gradient(x)
        )

    with pytest.raises(AssertionError, match="gradient"):
        check_gradients(backend, detached, np.linspace(-1.0, 1.0, 5))


@pytest.mark.subset(lambda case: case == "kept")
@pytest.mark.parametrize("case", ["kept", "full-matrix-only"])
def test_subset_marker(backend, case):
    # NumPy and array-api-strict run every case; the other backends only those kept
    from conftest import FULL_MATRIX

    assert case == "kept" or backend.name in FULL_MATRIX
