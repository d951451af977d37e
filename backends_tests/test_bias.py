"""FastRPB against a float64 dense Toeplitz oracle built in NumPy from its definition."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import fastrpb
import oracles
from backends_tests.backends import assert_array, assert_close, check_gradients, property_test

# ----------------------------------------------------------------- oracle (NumPy, float64)
# The dense Toeplitz oracle lives in oracles.py (one for the whole suite); these names
# stay for the tests that use them.
dense_bias = oracles.toeplitz  # B[..., i, j] = w[..., M - 1 + i - j], straight from the definition
oracle_rpb = oracles.rpb
oracle_rpb_nd = oracles.rpb_nd


def test_oracle_is_convolution_not_correlation():
    # Guards the oracle itself: out[1] must pick w(+1) * v[0].
    w = np.array([0.0, 0.0, 10.0, 1.0, 0.0])  # M = 3, w(0) = 10, w(+1) = 1, w(-1) = 0
    v = np.array([[1.0], [0.0], [0.0]])
    np.testing.assert_array_equal(oracle_rpb(v, w)[:, 0], [10.0, 1.0, 0.0])


# ----------------------------------------------------------------- rpb
# elsewhere than NumPy and array-api-strict: every dtype at L = 1 and at the prime L = 97,
# and in float32 a short and a long length (the lengths pick FFT sizes, not code paths)
@pytest.mark.subset(lambda L, dtype: L in (1, 97) or (dtype == "float32" and L in (7, 784)))
@pytest.mark.parametrize("L", [1, 2, 3, 7, 64, 97, 784])
def test_rpb_matches_dense(backend, dtype, rng, L):
    M = L + 3
    v = rng.standard_normal((2, L, 5))
    w = rng.standard_normal((2 * M - 1,))
    out = fastrpb.rpb(backend.asarray(v, dtype), backend.asarray(w, dtype))
    assert_close(backend, out, oracle_rpb(v, w), dtype, scale=np.abs(oracle_rpb(v, w)).max() + L**0.5)


@pytest.mark.subset(lambda L: L in (1, 1567))  # elsewhere than NumPy and array-api-strict
@pytest.mark.parametrize("L", [1, 5, 64, 1567])
def test_rpb_causal_matches_dense(backend, rng, L):
    v = rng.standard_normal((L, 3))
    w = rng.standard_normal((2 * L - 1,))
    out = fastrpb.rpb(backend.asarray(v), backend.asarray(w), causal=True)
    assert_close(backend, out, oracle_rpb(v, w, causal=True), "float64")


def test_rpb_direction_and_causality(backend):
    # out[i] = sum_j w(i - j) v[j]: an impulse at j = 2 lands at i = 2 + t with weight w(t).
    M, L = 6, 6
    w = np.arange(1.0, 2 * M)  # w(t) = M + t, distinct for every offset
    v = np.zeros((L, 1))
    v[2, 0] = 1.0
    full = fastrpb.rpb(backend.asarray(v), backend.asarray(w))
    assert_close(backend, full, np.array([[M + i - 2.0] for i in range(L)]), "float64")
    causal = fastrpb.rpb(backend.asarray(v), backend.asarray(w), causal=True)
    assert_close(backend, causal, np.array([[0.0], [0.0]] + [[M + i - 2.0] for i in range(2, L)]), "float64")


@pytest.mark.parametrize("L", [1567, 2048])
def test_rpb_long_prime_lengths(backend, rng, L):
    v = rng.standard_normal((L, 2))
    w = rng.standard_normal((2 * L - 1,)) / L
    expected = oracle_rpb(v, w)
    # the FFT sizes' maths: compiled on JAX (backend.call); the eager calls are tested above
    assert_close(backend, backend.call(fastrpb.rpb, backend.asarray(v), backend.asarray(w)), expected, "float64")


def test_rpb_table_longer_than_sequence_uses_central_entries(backend, rng):
    L, M = 5, 40
    v = rng.standard_normal((L, 3))
    w = rng.standard_normal((2 * M - 1,))
    central = w[M - L : M + L - 1]
    out = backend.call(fastrpb.rpb, backend.asarray(v), backend.asarray(w))
    assert_close(backend, out, oracle_rpb(v, central), "float64")


def test_rpb_per_head_tables_broadcast(backend, rng):
    v = rng.standard_normal((2, 3, 9, 4))  # (B, H, L, D)
    w = rng.standard_normal((3, 2 * 9 - 1))  # (H, 2M-1)
    # broadcasting is laid out from the shapes: compiled on JAX (backend.call)
    out = backend.call(fastrpb.rpb, backend.asarray(v), backend.asarray(w))
    assert_close(backend, out, oracle_rpb(v, w), "float64")
    # a table with more leading dimensions than the values
    w2 = rng.standard_normal((2, 1, 2 * 9 - 1))
    v2 = rng.standard_normal((9, 4))
    out2 = backend.call(fastrpb.rpb, backend.asarray(v2), backend.asarray(w2))
    assert_close(backend, out2, oracle_rpb(v2, w2), "float64")


@pytest.mark.subset(lambda skip, causal: skip in ((0, 0), (2, 3)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("skip", [(0, 0), (1, 0), (0, 1), (1, 1), (2, 3), (4, 4)])
def test_rpb_skip(backend, rng, skip, causal):
    L = 8
    v = rng.standard_normal((2, L, 3))
    M = L - skip[0] - skip[1] + 1
    w = rng.standard_normal((2 * M - 1,))
    out = backend.call(fastrpb.rpb, backend.asarray(v), backend.asarray(w), causal=causal, skip=skip)  # compiled on JAX
    expected = oracle_rpb(v, w, causal=causal, skip=skip)
    assert_close(backend, out, expected, "float64")
    got = backend.to_numpy(out)
    assert np.all(got[:, : skip[0]] == 0)
    assert np.all(got[:, L - skip[1] :] == 0)


def test_rpb_dtype_promotion_and_half_precision(backend, rng, dtype):
    v = rng.standard_normal((6, 2))
    w = rng.standard_normal((11,))
    out = fastrpb.rpb(backend.asarray(v, dtype), backend.asarray(w, dtype))
    assert_close(backend, out, oracle_rpb(v, w), dtype)
    if dtype != "float64":
        mixed = fastrpb.rpb(backend.asarray(v, dtype), backend.asarray(w, "float64"))
        assert_close(backend, mixed, oracle_rpb(v, w), dtype, expected_dtype="float64")


def test_rpb_stays_on_library_and_device(backend, rng):
    v_np, w_np = rng.standard_normal((4, 2)), rng.standard_normal((7,))
    out = fastrpb.rpb(backend.asarray(v_np), backend.asarray(w_np))
    assert_close(backend, out, oracle_rpb(v_np, w_np), "float64")  # library, device and dtype included


def test_rpb_does_not_mutate_inputs(backend, rng):
    v_np = rng.standard_normal((5, 3))
    w_np = rng.standard_normal((9,))
    v, w = backend.asarray(v_np), backend.asarray(w_np)
    fastrpb.rpb(v, w, causal=True, skip=(1, 1))
    np.testing.assert_array_equal(backend.to_numpy(v), v_np)
    np.testing.assert_array_equal(backend.to_numpy(w), w_np)


# ----------------------------------------------------------------- rpb_matrix, symmetric_table
@pytest.mark.parametrize("causal", [False, True])
def test_rpb_matrix_matches_definition(backend, rng, causal):
    w = rng.standard_normal((3, 2 * 6 - 1))
    B = fastrpb.rpb_matrix(backend.asarray(w), 4, causal=causal)
    assert_close(backend, B, dense_bias(w[:, 6 - 4 : 6 + 3], 4, causal), "float64")


def test_rpb_equals_rpb_matrix_product(backend, rng):
    w = backend.asarray(rng.standard_normal((2, 2 * 10 - 1)))
    v = backend.asarray(rng.standard_normal((2, 10, 3)))
    dense = backend.xp.matmul(fastrpb.rpb_matrix(w, 10), v)
    assert_close(backend, fastrpb.rpb(v, w), backend.to_numpy(dense), "float64")


def test_symmetric_table(backend, rng):
    h = rng.standard_normal((2, 4))
    w = backend.to_numpy(fastrpb.symmetric_table(backend.asarray(h)))
    assert w.shape == (2, 7)
    for t in range(-3, 4):
        np.testing.assert_array_equal(w[:, 3 + t], h[:, abs(t)])


# ----------------------------------------------------------------- rpb_nd
@pytest.mark.parametrize(
    ("grid", "with_table"),
    [
        ((7,), (True,)),
        ((3, 4), (True, True)),
        ((4, 3, 2), (True, True, False)),  # (H, W, C): no bias across colour channels
        ((2, 3, 2, 2), (True, False, True, True)),
        ((1, 5), (True, True)),
    ],
)
@pytest.mark.subset(lambda grid, with_table, skip: skip == (1, 2))  # every grid, skips at both ends
@pytest.mark.parametrize("skip", [(0, 0), (1, 0), (1, 2)])
def test_rpb_nd_matches_dense(backend, rng, grid, with_table, skip):
    L = int(np.prod(grid)) + sum(skip)
    v = rng.standard_normal((2, L, 3))
    tables = [rng.standard_normal((2, 2 * (g + 1) - 1)) if t else None for g, t in zip(grid, with_table, strict=True)]
    # compiled on JAX (backend.call); the eager N-d calls are the dtype tests below
    out = backend.call(
        fastrpb.rpb_nd,
        backend.asarray(v),
        [None if t is None else backend.asarray(t) for t in tables],
        grid=grid,
        skip=skip,
    )
    assert_close(backend, out, oracle_rpb_nd(v, tables, grid, skip), "float64")


def test_rpb_nd_one_axis_equals_rpb(backend, rng):
    v = backend.asarray(rng.standard_normal((3, 12, 2)))
    w = backend.asarray(rng.standard_normal((23,)))
    assert_close(backend, fastrpb.rpb_nd(v, [w], (12,)), backend.to_numpy(fastrpb.rpb(v, w)), "float64")


def test_rpb_nd_half_precision(backend, rng, dtype):
    v = rng.standard_normal((1 + 12, 4))
    tables = [rng.standard_normal((5,)), rng.standard_normal((7,))]
    out = fastrpb.rpb_nd(backend.asarray(v, dtype), [backend.asarray(t, dtype) for t in tables], (3, 4), skip=(1, 0))
    expected = oracle_rpb_nd(v, tables, (3, 4), (1, 0))
    assert_close(backend, out, expected, dtype)


# ----------------------------------------------------------------- rpb_init
def test_rpb_init(backend):
    like = backend.asarray(np.zeros(3), "float32")
    w = fastrpb.rpb_init(4, 10, seed=0, like=like)
    assert_array(backend, w, "float32", shape=(4, 19))
    got = backend.to_numpy(w)
    assert 0 < np.abs(got).max() < 0.1
    again = backend.to_numpy(fastrpb.rpb_init(4, 10, seed=0, like=like))
    np.testing.assert_array_equal(got, again)
    assert not np.array_equal(got, backend.to_numpy(fastrpb.rpb_init(4, 10, seed=1, like=like)))
    assert tuple(fastrpb.rpb_init(None, 3, seed=0, like=like).shape) == (5,)


# ----------------------------------------------------------------- jit and gradients
@pytest.mark.jit
@pytest.mark.parametrize("causal", [False, True])
def test_rpb_under_jit(backend, rng, causal):
    v = rng.standard_normal((2, 9, 3))
    w = rng.standard_normal((2 * 9 - 1,))
    f = backend.jit(functools.partial(fastrpb.rpb, causal=causal, skip=(1, 0)))
    assert_close(backend, f(backend.asarray(v), backend.asarray(w)), oracle_rpb(v, w[1:-1], causal, (1, 0)), "float64")
    g = backend.jit(lambda v, a, b: fastrpb.rpb_nd(v, [a, b], (2, 4), skip=(1, 0)))
    tables = [rng.standard_normal((3,)), rng.standard_normal((7,))]
    out = g(backend.asarray(v), *(backend.asarray(t) for t in tables))
    assert_close(backend, out, oracle_rpb_nd(v, tables, (2, 4), (1, 0)), "float64")


def _loss_fns():
    return {
        "rpb": lambda xp, v, w: xp.sum(fastrpb.rpb(v, w) ** 2),
        "rpb_causal_skip": lambda xp, v, w: xp.sum(xp.sin(fastrpb.rpb(v, w, causal=True, skip=(1, 1)))),
        "rpb_nd": lambda xp, v, w: xp.sum(fastrpb.rpb_nd(v, [w[2:-2], w[3:-3]], (2, 3)) ** 2),
        "rpb_matrix": lambda xp, v, w: xp.sum(xp.matmul(fastrpb.rpb_matrix(w, 6), v) ** 2),
    }


@pytest.mark.grad
@pytest.mark.parametrize("which", list(_loss_fns()))
def test_rpb_gradients(backend, rng, which):
    loss = _loss_fns()[which]
    v_np = rng.standard_normal((6, 2))
    w_np = rng.standard_normal((11,))
    check_gradients(backend, lambda v, w: loss(backend.xp, v, w), v_np, w_np)


# ----------------------------------------------------------------- errors
def _zeros(b, *shape, dtype="float64"):
    return b.asarray(np.zeros(shape), dtype)


# (id, call(backend, v, w) with v (2, 5, 3) and w (9,) of the backend, exception, message)
_ERRORS = [
    (
        "w even",
        lambda b, v, w: fastrpb.rpb(v, _zeros(b, 8)),
        ValueError,
        r"w must have an odd last dimension.*got length 8",
    ),
    ("w short", lambda b, v, w: fastrpb.rpb(v, _zeros(b, 5)), ValueError, r"L = 5 tokens.*M = 3"),
    ("v 1-d", lambda b, v, w: fastrpb.rpb(_zeros(b, 5), w), ValueError, r"v must have shape \(\.\.\., L, D\).*\(5,\)"),
    (
        "v int",
        lambda b, v, w: fastrpb.rpb(b.asarray(np.zeros((5, 3), dtype=np.int32), None), w),
        TypeError,
        r"v must have a real floating dtype.*int",
    ),
    (
        "w bool",
        lambda b, v, w: fastrpb.rpb(v, b.asarray(np.zeros(9, dtype=bool), None)),
        TypeError,
        r"w must have a real floating dtype.*bool",
    ),
    ("v list", lambda b, v, w: fastrpb.rpb([[1.0, 2.0]], w), TypeError, r"v must be an array.*list"),
    ("w float", lambda b, v, w: fastrpb.rpb(v, 1.5), TypeError, r"w must be an array.*float"),
    ("skip negative", lambda b, v, w: fastrpb.rpb(v, w, skip=(-1, 0)), ValueError, r"skip\[0\] must be >= 0, got -1"),
    (
        "skip too long",
        lambda b, v, w: fastrpb.rpb(v, w, skip=(3, 3)),
        ValueError,
        r"skip = \(3, 3\) skips 6 tokens but the sequence has only L = 5",
    ),
    ("skip int", lambda b, v, w: fastrpb.rpb(v, w, skip=1), TypeError, r"skip must be a pair"),
    ("lead", lambda b, v, w: fastrpb.rpb(v, _zeros(b, 3, 9)), ValueError, r"leading dimensions of w \(3,\).*v \(2,\)"),
    (
        "nd grid size",
        lambda b, v, w: fastrpb.rpb_nd(v, [w, w], (2, 2)),
        ValueError,
        r"grid \(2, 2\) holds 4 tokens but v has L = 5",
    ),
    (
        "nd tables count",
        lambda b, v, w: fastrpb.rpb_nd(v, [w], (5, 1)),
        ValueError,
        r"tables has 1 entries but grid has 2 axes",
    ),
    (
        "nd table short",
        lambda b, v, w: fastrpb.rpb_nd(_zeros(b, 10, 3), [w, _zeros(b, 3)], (2, 5)),
        ValueError,
        r"tables\[1\].*L = 5 tokens.*M = 2",
    ),
    ("nd grid zero", lambda b, v, w: fastrpb.rpb_nd(v, [w], (0,)), ValueError, r"grid\[0\] must be >= 1, got 0"),
    ("matrix short", lambda b, v, w: fastrpb.rpb_matrix(w, 6), ValueError, r"L = 6 tokens.*M = 5"),
    (
        "symmetric int",
        lambda b, v, w: fastrpb.symmetric_table(b.asarray(np.zeros(3, dtype=np.int64), None)),
        TypeError,
        r"h must have a real floating dtype",
    ),
    ("init seed", lambda b, v, w: fastrpb.rpb_init(2, 4, seed=0.5, like=v), TypeError, r"seed must be an int"),
    (
        "init max_len",
        lambda b, v, w: fastrpb.rpb_init(2, 0, seed=0, like=v),
        ValueError,
        r"max_len must be >= 1, got 0",
    ),
]


@pytest.mark.parametrize(("call", "exc", "pattern"), [pytest.param(c, e, p, id=i) for i, c, e, p in _ERRORS])
def test_errors_name_the_argument(backend, rng, call, exc, pattern):
    v = backend.asarray(rng.standard_normal((2, 5, 3)))
    w = backend.asarray(rng.standard_normal((9,)))
    with pytest.raises(exc, match=pattern):
        call(backend, v, w)


def test_complex_input_is_rejected(backend):
    x = backend.asarray(np.zeros((4, 2), dtype=np.complex128), None)
    with pytest.raises(TypeError, match=r"v must have a real floating dtype.*complex"):
        fastrpb.rpb(x, backend.asarray(np.zeros(7)))


def test_mixing_libraries_is_rejected(backend):
    v = backend.asarray(np.zeros((4, 2)))
    with pytest.raises(TypeError, match=r"one array library.*v: .*w: "):
        fastrpb.rpb(v, backend.foreign(np.zeros(7)))


@pytest.mark.two_devices
def test_two_devices_are_rejected(backend):
    # array-api-strict simulates several devices; torch with CUDA has two real ones.
    xp = backend.xp
    v = xp.zeros((4, 2), dtype=xp.float64, device=backend.device)
    w = xp.zeros((7,), dtype=xp.float64, device=backend.other_device)
    with pytest.raises(ValueError, match=r"one device: v is on .* but w is on"):
        fastrpb.rpb(v, w)


# ----------------------------------------------------------------- properties
from hypothesis import strategies as st  # noqa: E402


@property_test(
    20,
    L=st.integers(1, 40),
    extra=st.integers(0, 5),
    heads=st.sampled_from([(), (1,), (3,)]),
    causal=st.booleans(),
    a=st.integers(0, 2),
    b=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_rpb_property(backend, L, extra, heads, causal, a, b, seed):
    """Random lengths, tables, head shapes, causal and skip against the dense oracle."""
    rng = np.random.default_rng(seed)
    inner = max(L - a - b, 0)
    M = max(inner, 1) + extra
    v = rng.standard_normal((2, *heads, L, 2)) if heads else rng.standard_normal((L, 2))
    w = rng.standard_normal((*heads, 2 * M - 1))
    # compiled on JAX (backend.call): each example has new shapes, one compilation
    # instead of one per operation; the eager calls have the tests above
    if a + b > L:
        with pytest.raises(ValueError, match="skip"):
            backend.call(fastrpb.rpb, backend.asarray(v), backend.asarray(w), causal=causal, skip=(a, b))
        return
    out = backend.call(fastrpb.rpb, backend.asarray(v), backend.asarray(w), causal=causal, skip=(a, b))
    assert_close(backend, out, oracle_rpb(v, w, causal, (a, b)), "float64")


# ----------------------------------------------------------------- rpb_nd, causal (raster order)


def oracle_rpb_nd_causal(v, tables, grid, skip=(0, 0)):
    """The dense raster-causal N-d bias (oracles.toeplitz_nd, lower triangle) on the grid tokens."""
    a, b = skip
    L = v.shape[-2]
    B = oracles.toeplitz_nd(tables, grid, causal=True)
    inner = B @ v[..., a : L - b, :]
    full = np.zeros((*inner.shape[:-2], L, v.shape[-1]))
    full[..., a : L - b, :] = inner
    return full


def test_causal_nd_oracle_is_raster_order():
    # Guards the oracle: on a (2, 2) grid token (1, 0) sees (0, 0), (0, 1) (an earlier row,
    # though a later column) and itself; token (0, 1) sees (0, 0) and itself, not (1, 0).
    # w_rows(-1, 0, 1) = (0, 10, 1), w_cols(-1, 0, 1) = (0, 100, 2).
    B = oracles.toeplitz_nd([np.array([0.0, 10.0, 1.0]), np.array([0.0, 100.0, 2.0])], (2, 2), causal=True)
    np.testing.assert_array_equal(B[2], [1.0 + 100.0, 1.0 + 0.0, 10.0 + 100.0, 0.0])
    np.testing.assert_array_equal(B[1], [10.0 + 2.0, 10.0 + 100.0, 0.0, 0.0])


@pytest.mark.parametrize(
    ("grid", "with_table"),
    [
        ((7,), (True,)),
        ((3, 4), (True, True)),
        ((4, 3), (False, True)),
        ((4, 3, 2), (True, True, False)),  # (H, W, C): no bias across colour channels
        ((2, 3, 2, 2), (True, False, True, True)),
        ((1, 5), (True, True)),
        ((3, 1, 2), (True, True, True)),
        ((3, 2), (False, False)),
    ],
)
@pytest.mark.subset(lambda grid, with_table, skip: skip == (1, 2))  # every grid, skips at both ends
@pytest.mark.parametrize("skip", [(0, 0), (1, 0), (1, 2)])
def test_rpb_nd_causal_matches_dense(backend, rng, grid, with_table, skip):
    L = int(np.prod(grid)) + sum(skip)
    v = rng.standard_normal((2, L, 3))
    # tables longer than their axis (M = G + 1): only the central entries are used
    tables = [rng.standard_normal((2, 2 * (g + 1) - 1)) if t else None for g, t in zip(grid, with_table, strict=True)]
    # compiled on JAX (backend.call); the eager N-d calls are the dtype tests below
    out = backend.call(
        fastrpb.rpb_nd,
        backend.asarray(v),
        [None if t is None else backend.asarray(t) for t in tables],
        grid=grid,
        causal=True,
        skip=skip,
    )
    expected = oracle_rpb_nd_causal(v, tables, grid, skip) if any(with_table) else np.zeros_like(v)
    assert_close(backend, out, expected, "float64")


def test_rpb_nd_causal_per_head_tables_broadcast(backend, rng):
    grid = (3, 4)
    v = rng.standard_normal((2, 3, 12, 4))  # (batch, heads, L, D)
    tables = [rng.standard_normal((4, 1, 1, 5)), rng.standard_normal((7,))]  # a new leading axis, and shared
    # broadcasting is laid out from the shapes: compiled on JAX (backend.call)
    out = backend.call(fastrpb.rpb_nd, backend.asarray(v), [backend.asarray(t) for t in tables], grid=grid, causal=True)
    expected = oracle_rpb_nd_causal(v, tables, grid)
    assert out.shape == (4, 2, 3, 12, 4) == expected.shape
    assert_close(backend, out, expected, "float64")
    # one table per head (H, 2M - 1) against values (B, H, L, D)
    heads = [rng.standard_normal((3, 5)), rng.standard_normal((3, 7))]
    out = backend.call(fastrpb.rpb_nd, backend.asarray(v), [backend.asarray(t) for t in heads], grid=grid, causal=True)
    assert_close(backend, out, oracle_rpb_nd_causal(v, heads, grid), "float64")


def test_rpb_nd_causal_dtypes(backend, rng, dtype):
    grid = (3, 2, 2)
    v = rng.standard_normal((2, 1 + 12, 4))
    tables = [rng.standard_normal((5,)), rng.standard_normal((3,)), None]
    vb = backend.asarray(v, dtype)
    tb = [None if t is None else backend.asarray(t, dtype) for t in tables]
    out = fastrpb.rpb_nd(vb, tb, grid, causal=True, skip=(1, 0))
    assert out.dtype == backend.dtype(dtype)
    got = [backend.to_numpy(vb).astype(np.float64)] + [
        None if t is None else backend.to_numpy(t).astype(np.float64) for t in tb
    ]
    assert_close(backend, out, oracle_rpb_nd_causal(got[0], got[1:], grid, (1, 0)), dtype)


@pytest.mark.jit
def test_rpb_nd_causal_under_jit(backend, rng):
    v = rng.standard_normal((2, 1 + 12, 3))
    tables = [rng.standard_normal((5,)), rng.standard_normal((2, 7))]
    f = backend.jit(lambda v, a, b: fastrpb.rpb_nd(v, [a, None, b], (3, 1, 4), causal=True, skip=(1, 0)))
    out = f(backend.asarray(v), *(backend.asarray(t) for t in tables))
    assert_close(backend, out, oracle_rpb_nd_causal(v, [tables[0], None, tables[1]], (3, 1, 4), (1, 0)), "float64")


@pytest.mark.grad
def test_rpb_nd_causal_gradients(backend, rng):
    # check_gradients compiles the loss once (JAX), instead of one dispatch per operation
    # and finite-difference probe
    grid = (2, 3)
    v_np = rng.standard_normal((1 + 6, 2))
    a_np, b_np = rng.standard_normal((3,)), rng.standard_normal((2, 5))
    xp = backend.xp
    check_gradients(
        backend, lambda v, a, b: xp.sin(fastrpb.rpb_nd(v, [a, b], grid, causal=True, skip=(1, 0))), v_np, a_np, b_np
    )


def test_causal_nd_bias_in_attention(backend, rng, dtype):
    from fastrpb import linear_attention, softmax_attention

    grid = (3, 2, 2)
    L = 1 + 12 + 1
    arrays = [backend.asarray(rng.standard_normal((2, L, d)), dtype) for d in (4, 4, 3)]
    tables = [backend.asarray(rng.standard_normal((2, 1, 2 * g - 1)), dtype) for g in grid[:2]] + [None]
    qn, kn, vn = (backend.to_numpy(x).astype(np.float64) for x in arrays)
    wn = [None if t is None else backend.to_numpy(t).astype(np.float64) for t in tables]
    term = oracle_rpb_nd_causal(vn, wn, grid, (1, 1))
    kw = {"causal": True, "rpb_tables": tables, "rpb_grid": grid, "rpb_skip": (1, 1)}
    out = linear_attention(*arrays, chunk_size=4, **kw)
    expected = oracles.kernel_attention(oracles.elu1(qn), oracles.elu1(kn), vn, causal=True, eps=1e-6) + term
    assert out.dtype == arrays[0].dtype
    assert_close(backend, out, expected, dtype)
    out = softmax_attention(*arrays, **kw)
    assert_close(backend, out, oracles.softmax_attention(qn, kn, vn, causal=True) + term, dtype)


def test_rpb_nd_causal_errors(backend):
    v = backend.asarray(np.zeros((6, 2)))
    w = backend.asarray(np.zeros(5))
    with pytest.raises(TypeError, match=r"causal must be a bool.*got str"):
        fastrpb.rpb_nd(v, [w, w], (2, 3), causal="yes")
    with pytest.raises(ValueError, match=r"tables\[1\].*L = 4 tokens.*M = 3"):
        fastrpb.rpb_nd(backend.asarray(np.zeros((8, 2))), [w, w], (2, 4), causal=True)


def test_rpb_nd_causal_blocked_path_matches_dense(backend, monkeypatch, rng):
    """Long inputs go through blocks of columns; shrink the budget so small ones do too."""
    grid = (3, 4, 2)
    v = rng.standard_normal((2, 3, 24, 5))
    tables = [rng.standard_normal((3, 5)), None, rng.standard_normal((2, 1, 3))]
    expected = oracle_rpb_nd_causal(v, tables, grid)
    for budget in (1, 3000, 20000):  # one column per block, several columns, several heads
        monkeypatch.setattr(fastrpb.bias, "_BLOCK_BYTES", budget)
        out = fastrpb.rpb_nd(
            backend.asarray(v), [None if t is None else backend.asarray(t) for t in tables], grid, causal=True
        )
        assert_close(backend, out, expected, "float64")
