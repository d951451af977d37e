"""The namespace layer's own helpers (pure Python: no backend involved)."""

import numpy as np
import pytest

import fastrpb
from fastrpb._compat import MIN_API_VERSION, namespace, next_fast_len
from fastrpb._compat.fft import _next_fast_len_portable
from fastrpb._validate import int_arg


def _is_5_smooth(n: int) -> bool:
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


@pytest.mark.parametrize(
    "fast_len", [pytest.param(next_fast_len, id="native"), pytest.param(_next_fast_len_portable, id="portable")]
)
def test_next_fast_len_is_the_smallest_5_smooth_length(fast_len):
    for n in range(1, 3000):
        m = fast_len(n)
        assert m >= n, n
        assert _is_5_smooth(m), n
        assert not any(_is_5_smooth(k) for k in range(n, m)), n


@pytest.mark.parametrize(("L", "expected"), [(784, 1600), (4096, 8192), (4097, 8640), (65536, 131072)])
def test_fft_length_for_sequence(L, expected):
    # 2L - 1 = 1567 for L = 784 is prime: the FFT uses 1600, never 1567.
    assert next_fast_len(2 * L - 1) == expected


def test_int_arg():
    assert int_arg("n", 3, minimum=1) == 3
    with pytest.raises(TypeError, match="n must be an int, got bool"):
        int_arg("n", True, minimum=0)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        int_arg("n", 2.0, minimum=0)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        int_arg("n", 0, minimum=1)


# --------------------------------------------------------------------------- array API version
class _OldNamespace:
    """A namespace that declares an older standard than fastrpb needs."""

    __name__ = "old_array_library"
    __array_api_version__ = "2022.12"


class _OldArray:
    shape = (2, 3)
    dtype = "float64"
    device = "cpu"

    def __array_namespace__(self, api_version=None):
        return _OldNamespace()


def test_namespace_older_than_2023_12_is_rejected():
    assert MIN_API_VERSION == "2023.12"
    with pytest.raises(TypeError, match=r"2023\.12 or newer.*'old_array_library'.*'2022\.12'"):
        namespace(v=_OldArray())


def test_array_api_strict_at_2022_12_is_rejected(monkeypatch):
    strict = pytest.importorskip("array_api_strict")
    import fastrpb
    from fastrpb._compat import dispatch

    monkeypatch.setattr(dispatch, "_NAMESPACES", {})  # forget namespaces resolved earlier
    strict.set_array_api_strict_flags(api_version="2022.12")
    try:
        v = strict.asarray([[1.0, 2.0]])
        with pytest.raises(TypeError, match=r"2023\.12 or newer.*'2022\.12'.*set_array_api_strict_flags"):
            fastrpb.rpb(v, strict.asarray([0.5]))
    finally:
        strict.reset_array_api_strict_flags()
    assert fastrpb.rpb(strict.asarray([[1.0, 2.0]]), strict.asarray([0.5])).shape == (1, 2)


# --------------------------------------------------------------------------- JAX pytrees
_FRESH_JIT = """
import sys, threading
import numpy as np
import fastrpb  # before JAX: nothing of JAX is imported here
assert "jax" not in sys.modules, "import fastrpb imported JAX"
import jax, jax.numpy as jnp

F, Dv = 4, 3
rng = np.random.default_rng(0)
S0, z0 = rng.random((F, Dv)), rng.random(F)
q, k, v = (rng.standard_normal(n) for n in (F, F, Dv))
# the first state of this process is built by the caller, not by fastrpb
state = fastrpb.LinearAttentionState(S=jnp.asarray(S0), z=jnp.asarray(z0), offset=None, feature_map="elu")
step = jax.jit(lambda s, q, k, v: fastrpb.linear_attention_step(s, q, k, v, feature_map="elu"))
out, new = step(state, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
elu1 = lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
S1, z1 = S0 + np.outer(elu1(k), v), z0 + elu1(k)
expected = elu1(q) @ S1 / (elu1(q) @ z1 + 1e-6)
np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5)
np.testing.assert_allclose(np.asarray(new.S), S1, rtol=1e-5)
assert new.feature_map == "elu"
print("jit ok")
"""

_FRESH_THREADS = """
import threading
import jax, jax.numpy as jnp
import fastrpb

errors = []
barrier = threading.Barrier(8)

def work(i):
    try:
        barrier.wait()
        state = fastrpb.LinearAttentionState(S=jnp.zeros((4, 3)), z=jnp.zeros(4), offset=None, feature_map="elu")
        out, _ = jax.jit(lambda s: fastrpb.linear_attention_step(s, jnp.ones(4), jnp.ones(4), jnp.ones(3)))(state)
        assert out.shape == (3,)
    except Exception as exc:  # reported below
        errors.append(repr(exc))

threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
print("threads ok")
"""


@pytest.mark.parametrize(
    "script", [pytest.param(_FRESH_JIT, id="jit-first-state"), pytest.param(_FRESH_THREADS, id="8-threads")]
)
def test_state_is_a_jax_pytree_in_a_fresh_process(script):
    pytest.importorskip("jax")
    import os
    import subprocess
    import sys

    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# --------------------------------------------------------------------------- gaps of the standard, per backend
@pytest.mark.parametrize("axis", [-1, -2, -3])
def test_cumulative_max(backend, rng, axis):
    from fastrpb._compat import cumulative_max

    xn = rng.standard_normal((2, 5, 7, 3))
    got = backend.to_numpy(backend.call(lambda x: cumulative_max(backend.xp, x, axis), backend.asarray(xn)))
    np.testing.assert_array_equal(got, np.maximum.accumulate(xn, axis=axis))


# (n, slice size): few positions and large slices scan in order on eager CPU arrays,
# many small ones with the odd-even schedule (JAX always); odd n has an unpaired end.
# The scans of this file run through Backend.call: JAX takes the one schedule eagerly
# and traced, and compiles it once instead of each slice's operations (5-7x faster)
SCHEDULES = [(1, 3), (2, 3), (5, 3), (33, 3), (100, 2), (40, 1024)]


@pytest.mark.parametrize(("n", "width"), SCHEDULES)
def test_associative_scan_composes_in_order(backend, rng, n, width):
    """An operator that does not commute (composing affine maps ``h -> a h + b``): each
    position is the composition of every map up to it, earliest first."""
    from fastrpb._compat import associative_scan

    xp = backend.xp
    an, bn = rng.uniform(0.5, 1.5, (n, width)), rng.standard_normal((n, width))
    expected = np.empty_like(bn)
    h = np.zeros(width)
    for i in range(n):
        h = an[i] * h + bn[i]
        expected[i] = h

    def compose(first, then):
        return (first[0] * then[0], then[0] * first[1] + then[1])

    got = backend.call(lambda e: associative_scan(xp, compose, e, -2), (backend.asarray(an), backend.asarray(bn)))
    np.testing.assert_allclose(backend.to_numpy(got[1]), expected, rtol=1e-12, atol=1e-12)

    def larger(a, b):
        return (xp.maximum(a[0], b[0]),)

    got = backend.to_numpy(backend.call(lambda e: associative_scan(xp, larger, e, -2), (backend.asarray(bn),))[0])
    np.testing.assert_array_equal(got, backend.to_numpy(backend.asarray(np.maximum.accumulate(bn, axis=0))))


@pytest.mark.parametrize("n", [1, 5])
def test_scan_carries_state_in_order(backend, rng, n):
    """``scan``: the affine recurrence ``h -> a h + b`` along axis -2 of ``(3, n, 4)``
    (``lax.scan`` on JAX, eagerly and under the backend's compiler; a loop elsewhere),
    each step's output stacked along the same axis as the input."""
    from fastrpb._compat import scan

    an, bn = rng.uniform(0.5, 1.5, (3, n, 4)), rng.standard_normal((3, n, 4))
    expected, h = np.empty_like(bn), np.ones((3, 4))
    for i in range(n):
        h = an[:, i] * h + bn[:, i]
        expected[:, i] = h

    def run(a, b):
        def step(h, ab):
            h = ab[0] * h + ab[1]
            return h, (h, -h)

        return scan(backend.xp, step, backend.xp.ones((3, 4), dtype=a.dtype, device=backend.device), (a, b), -2)

    for fn in (run, backend.compile(run)):
        last, (ys, neg) = fn(backend.asarray(an), backend.asarray(bn))
        np.testing.assert_allclose(backend.to_numpy(ys), expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(backend.to_numpy(neg), -expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(backend.to_numpy(last), expected[:, -1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("N", [1, 2, 7, 40])
def test_rescaled_scan(backend, rng, N):
    """``X_n = sum_{m <= n} exp(R_m - R_n) X_m`` against the float64 double sum, with
    features whose running maximum starts at ``-inf`` (no key yet)."""
    from fastrpb._compat import rescaled_scan

    F, D = 3, 2
    Xn = rng.standard_normal((2, N, F, D))
    Rn = np.maximum.accumulate(rng.standard_normal((2, N, F)) * 20, axis=1)
    Rn[:, : N // 2, 0] = -np.inf
    Xn[:, : N // 2, 0] = 0.0  # no key in the frame -inf: a zero state
    safe = np.where(np.isfinite(Rn), Rn, 0.0)
    expected = np.zeros_like(Xn)
    for n in range(N):
        for m in range(n + 1):
            with np.errstate(invalid="ignore"):
                factor = np.where(np.isfinite(Rn[:, m]), np.exp(Rn[:, m] - safe[:, n]), 0.0)
            expected[:, n] += factor[..., None] * Xn[:, m]
    R = backend.asarray(Rn)
    got = backend.call(lambda *a: rescaled_scan(backend.xp, *a), backend.asarray(Xn), R, backend.asarray(safe))
    np.testing.assert_allclose(backend.to_numpy(got), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("before", "after", "axis", "value"),
    [
        pytest.param(2, 1, -2, 0.0, id="rows"),
        pytest.param(0, 3, -1, -np.inf, id="end-neg-inf"),
        pytest.param(1, 0, -3, 5.0, id="start"),
    ],
)
def test_pad_axis(backend, rng, before, after, axis, value):
    from fastrpb._compat import pad_axis

    xn = rng.standard_normal((2, 4, 3))
    widths = [(0, 0)] * 3
    widths[axis] = (before, after)
    got = backend.to_numpy(pad_axis(backend.xp, backend.asarray(xn), before, after, axis=axis, value=value))
    np.testing.assert_array_equal(got, np.pad(xn, widths, constant_values=value))


@pytest.mark.parametrize("s", [0, 1, 3, 9])
def test_shift(backend, rng, s):
    from fastrpb._compat import shift

    xn = rng.standard_normal((2, 4, 3))
    expected = np.full_like(xn, -np.inf)
    expected[:, min(s, 4) :, :] = xn[:, : 4 - min(s, 4), :]
    got = backend.to_numpy(shift(backend.xp, backend.asarray(xn), s, -2, -np.inf))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        pytest.param([(2, 1), (3,)], (2, 3), id="stretch"),
        pytest.param([(1,), (0,)], (0,), id="one-and-zero"),
        pytest.param([(0, 1), (1, 4)], (0, 4), id="empty-batch"),
        pytest.param([(), (5, 2)], (5, 2), id="scalar"),
    ],
)
def test_broadcast_shapes(shapes, expected):
    from fastrpb._validate import broadcast_shapes

    assert broadcast_shapes(*shapes) == expected == np.broadcast_shapes(*shapes)


@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf], ids=["finite", "nan", "inf", "-inf"])
def test_on_finite_takes_the_finite_path_only_for_finite_input(backend, rng, bad):
    """``on_finite(xp, x, fn)`` calls ``fn(False)`` whenever ``x`` holds a NaN or an
    infinity, eagerly and under the backend's compiler; for finite ``x`` it calls
    ``fn(True)`` where that can be told without a synchronisation: eager CPU arrays
    (NumPy, PyTorch, JAX) and traced JAX on the CPU (a ``lax.cond`` in the program)."""
    from fastrpb._compat import on_finite

    xn = rng.standard_normal((3, 5))
    if bad is not None:
        xn[1, 2] = bad
    xp = backend.xp

    def run(x):
        return on_finite(xp, x, lambda finite: x[0, 0] * 0 + (1.0 if finite else 0.0))

    cpu = backend.name in ("numpy", "torch", "jax")
    for fn in (run, backend.compile(run)):
        took_finite = float(backend.to_numpy(fn(backend.asarray(xn)))) == 1.0
        assert took_finite == (bad is None and cpu), (backend.name, bad)


@pytest.mark.jit
@pytest.mark.parametrize("bad", [None, np.nan], ids=["finite", "nan"])
def test_on_finite_of_an_array_closed_over_by_a_compiled_function(backend, rng, bad):
    """A concrete array that a compiled function closes over meets the trace: asking
    whether it is finite must neither fail (JAX staged its reduction out as a tracer,
    and bool() of it raised) nor change the answer for non-finite input; and causal
    attention over closed-over keys equals the eager call."""
    from fastrpb._compat import on_finite

    xn = rng.standard_normal((3, 5))
    if bad is not None:
        xn[1, 2] = bad
    xp, x = backend.xp, backend.asarray(xn)

    def run(y):
        return on_finite(xp, x, lambda finite: y[0, 0] * 0 + (1.0 if finite else 0.0))

    took_finite = float(backend.to_numpy(backend.compile(run)(backend.asarray(xn[:1, :1] * 0)))) == 1.0
    if bad is not None:
        assert not took_finite
    elif backend.name == "jax":  # a concrete CPU array: asked at trace time
        assert took_finite

    k = backend.asarray(rng.standard_normal((2, 20, 4)).astype(np.float32))
    q = backend.asarray(rng.standard_normal((2, 20, 4)).astype(np.float32))
    got = backend.compile(lambda q: fastrpb.linear_attention(q, k, k, causal=True, chunk_size=8))(q)
    want = backend.to_numpy(fastrpb.linear_attention(q, k, k, causal=True, chunk_size=8))
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-5, atol=1e-5)
