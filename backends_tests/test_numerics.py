"""Regression tests of issue 12's numerics: promotion with weak types, the non-finite
policy (causality and masks, NaN and infinity included), vmap over a table, and the
1-d ``sikf`` keys. Every result is compared with a float64 dense oracle."""

from __future__ import annotations

import numpy as np
import pytest

import oracles
from backends_tests.backends import assert_close, tolerance
from fastrpb import feature_maps as fm
from fastrpb import linear_attention, random_projection, rpb, softmax_attention

MAPS = ["elu", "relu", "dpfp", "sikf", "favor", "rff", "callable"]


def _square(x):
    return x * x + 0.5


def _map_and_oracle(backend, name, dk):
    """(feature_map argument, oracle(qn, kn, vn, **kw)) for the map ``name``."""
    if name in ("favor", "rff"):
        w = random_projection(8, dk, seed=5, like=backend.asarray(np.zeros(1)))
        wn = backend.to_numpy(w)
        if name == "favor":
            return fm.favor(w), lambda q, k, v, **kw: oracles.exp_kernel_attention(
                oracles.favor_log(q, wn), oracles.favor_log(k, wn), v, **kw
            )
        return fm.rff(w), lambda q, k, v, **kw: oracles.kernel_attention(
            oracles.rff(q, wn), oracles.rff(k, wn), v, **kw
        )
    if name == "sikf":
        return name, oracles.exp_kernel_attention
    if name == "callable":
        return _square, lambda q, k, v, **kw: oracles.kernel_attention(_square(q), _square(k), v, **kw)
    phi = {"elu": oracles.elu1, "relu": oracles.relu, "dpfp": oracles.dpfp}[name]
    return name, lambda q, k, v, **kw: oracles.kernel_attention(phi(q), phi(k), v, **kw)


def _close(got: np.ndarray, expected: np.ndarray) -> None:
    """``assert_close`` for a float64 result already brought back to NumPy."""
    np.testing.assert_allclose(got, expected, **tolerance("float64"))


def _vmap(backend):
    if backend.grad == "torch":
        return backend.native.func.vmap
    if backend.grad == "jax":
        return backend.native.vmap
    return None


# ----------------------------------------------------------------- 12.1 promotion
def test_result_dtype_does_not_depend_on_earlier_calls(backend):
    """A weakly typed (JAX: made from a Python scalar) table and a strong one of the same
    dtype promote differently with half-precision values; each call must follow the
    library's own promotion whatever was called before, in either order."""
    xp = backend.xp
    half = next((d for d in ("bfloat16", "float16") if d in backend.dtypes), "float32")
    v = backend.asarray(np.ones((5, 2)), half)
    weak = xp.broadcast_to(xp.asarray(0.5, device=backend.device), (9,))  # weak on JAX
    strong = backend.asarray(np.full(9, 0.5), "float64")
    for w in (weak, strong, weak, strong):
        assert rpb(v, w).dtype == xp.result_type(v, w)
        out = linear_attention(v, v, v, rpb=w, causal=True)
        assert out.dtype == xp.result_type(v, v, v, w)


# ----------------------------------------------------------------- 12.2 causality
def _poisoned(array, j, value):
    out = array.copy()
    out[..., j, 0] = value
    return out


# elsewhere than NumPy and array-api-strict: every poison in every input for the plain
# (elu) and the exponential (sikf) kernel; the other maps only pick the features (eager
# JAX compiles each map's operations anew, 5-25 s a map, for no code path of its own)
@pytest.mark.subset(lambda name, where, bad: name in ("elu", "sikf"))
@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("where", ["value", "key", "query"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_causal_output_never_depends_on_later_tokens(backend, rng, name, where, bad):
    """A NaN or infinity at token j (mid-chunk) leaves every earlier output as the oracle
    of the clean inputs gives it (a query only its own row); a NaN shows in row j."""
    L, j, dk = 11, 6, 4
    qn, kn, vn = (rng.standard_normal((2, L, dk)) for _ in range(3))
    fmap, oracle = _map_and_oracle(backend, name, dk)
    expected = oracle(qn, kn, vn, causal=True, eps=1e-6)
    poisoned = {
        "query": (_poisoned(qn, j, bad), kn, vn),
        "key": (qn, _poisoned(kn, j, bad), vn),
        "value": (qn, kn, _poisoned(vn, j, bad)),
    }[where]
    q, k, v = (backend.asarray(x) for x in poisoned)
    for C in (4, 64):  # j inside a chunk of 4, and all in one chunk
        # the poisoned token's own row and the later ones are NaN on purpose (inf - inf,
        # 0 * inf): NumPy's "invalid value" warnings say just that
        with np.errstate(invalid="ignore"):
            out = backend.to_numpy(linear_attention(q, k, v, feature_map=fmap, causal=True, chunk_size=C))
        kept = [i for i in range(L) if i != j] if where == "query" else list(range(j))
        _close(out[:, kept], expected[:, kept])
        if np.isnan(bad) and where != "query":
            assert not np.isfinite(out[:, j:]).all(axis=-1).any(), "a NaN must reach its own and later tokens"
    if name == "elu":  # softmax attention follows the same policy
        with np.errstate(invalid="ignore"):
            out = backend.to_numpy(softmax_attention(q, k, v, causal=True))
        kept = [i for i in range(L) if i != j] if where == "query" else list(range(j))
        _close(out[:, kept], oracles.softmax_attention(qn, kn, vn, causal=True)[:, kept])


# ----------------------------------------------------------------- 12.3 masks
@pytest.mark.subset(lambda name, causal: name in ("elu", "sikf", "softmax"))
@pytest.mark.parametrize("name", [*MAPS, "softmax"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_masked_keys_never_reach_any_output(backend, rng, name, causal):
    """NaN and infinite keys and values at padding positions change no output, the
    FastRPB term included: the result is the oracle's with clean padding."""
    L, dk = 9, 4
    qn, kn, vn = (rng.standard_normal((2, L, dk)) for _ in range(3))
    wn = rng.standard_normal(2 * L - 1) * 0.3
    mask = np.ones((2, L), dtype=bool)
    mask[0, [2, 7]] = False
    mask[1, [0, 4]] = False
    k_bad, v_bad = kn.copy(), vn.copy()
    k_bad[0, 2], v_bad[0, 2] = np.nan, np.nan
    k_bad[0, 7], v_bad[0, 7] = np.inf, -np.inf
    k_bad[1, 0], v_bad[1, 4] = -np.inf, np.inf
    v_clean = np.where(mask[..., None], vn, 0.0)
    bias = oracles.toeplitz(wn, L, causal=causal) @ v_clean
    q, k, v, w = (backend.asarray(x) for x in (qn, k_bad, v_bad, wn))
    km = backend.asarray(mask, None)
    if name == "softmax":
        out = softmax_attention(q, k, v, causal=causal, key_mask=km, rpb=w)
        expected = oracles.softmax_attention(qn, kn, vn, causal=causal, key_mask=mask)
    else:
        fmap, oracle = _map_and_oracle(backend, name, dk)
        out = linear_attention(q, k, v, feature_map=fmap, causal=causal, key_mask=km, chunk_size=4, rpb=w)
        expected = oracle(qn, kn, vn, causal=causal, key_mask=mask, eps=1e-6)
    assert_close(backend, out, expected + bias, "float64")


# gradients run on torch and JAX alone: every map there (the features' derivatives are
# tested nowhere else), both chunkings for the plain and the two exponential kernels
@pytest.mark.grad
@pytest.mark.subset(lambda name, chunk: name in ("elu", "sikf", "favor") or chunk == 3)
@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("chunk", [3, 16], ids=["chunks", "one chunk"])
def test_value_gradient_with_tiny_causal_normalisers(backend, rng, name, chunk):
    """The gradient with respect to ``v`` is ``A^T g`` (the output is ``A v``) even
    where a causal normaliser is tiny and the output's cotangent ``g / den`` huge:
    large logits whose later keys grow, so each query's earlier keys are negligible
    in its chunk's frame. ``A`` is the float64 oracle applied to the identity."""
    L, dk = 16, 4
    qn = 10 * rng.standard_normal((2, L, dk))
    kn = 10 * rng.standard_normal((2, L, dk)) + 1.5 * np.arange(L)[:, None]
    if name not in ("sikf", "favor"):  # the others would overflow float64 at these logits
        qn, kn = qn / 10, kn / 10
    vn, gn = rng.standard_normal((2, L, 3)), rng.standard_normal((2, L, 3))
    mask = rng.random((2, L)) > 0.2
    fmap, oracle = _map_and_oracle(backend, name, dk)
    A = oracle(qn, kn, np.broadcast_to(np.eye(L), (2, L, L)), causal=True, key_mask=mask, eps=1e-6)
    np.testing.assert_allclose(A @ vn, oracle(qn, kn, vn, causal=True, key_mask=mask, eps=1e-6), rtol=1e-12, atol=1e-12)
    q, k, g = (backend.asarray(x) for x in (qn, kn, gn))
    km = backend.asarray(mask, None)

    def loss(v):
        out = linear_attention(q, k, v, feature_map=fmap, causal=True, key_mask=km, chunk_size=chunk)
        return backend.xp.sum(out * g)

    # compiled (JAX): the gradient traces the library either way, as one program
    (grad,) = backend.gradient(backend.compile(loss), backend.asarray(vn))
    assert_close(backend, grad, np.swapaxes(A, -1, -2) @ gn, "float64")


# ----------------------------------------------------------------- 12.5 vmap
@pytest.mark.parametrize("name", MAPS)
def test_vmap_over_the_table(backend, rng, name):
    """``vmap`` over a stack of tables: ``rpb`` and the attention functions' ``rpb=``."""
    vmap = _vmap(backend)
    if vmap is None:
        pytest.skip(f"{backend.name} has no vmap")
    L, dk = 6, 4
    qn, kn, vn = (rng.standard_normal((2, L, dk)) for _ in range(3))
    wn = rng.standard_normal((3, 2 * L - 1))
    q, k, v, w = (backend.asarray(x) for x in (qn, kn, vn, wn))
    fmap, oracle = _map_and_oracle(backend, name, dk)
    bias = np.stack([oracles.toeplitz(t, L) @ vn for t in wn])
    # compiled (Backend.call: jax.jit on JAX): vmap traces the library either way, and
    # one compilation costs a fraction of eager JAX's per-operation ones
    if name == "elu":
        assert_close(backend, backend.call(vmap(lambda t: rpb(v, t)), w), bias, "float64")
        out = backend.call(vmap(lambda t: softmax_attention(q, k, v, rpb=t)), w)
        assert_close(backend, out, oracles.softmax_attention(qn, kn, vn) + bias, "float64")
    for causal in (False, True):
        out = backend.call(
            vmap(
                lambda t, causal=causal: linear_attention(q, k, v, feature_map=fmap, causal=causal, chunk_size=4, rpb=t)
            ),
            w,
        )
        bias = np.stack([oracles.toeplitz(t, L, causal=causal) @ vn for t in wn])
        assert_close(backend, out, oracle(qn, kn, vn, causal=causal, eps=1e-6) + bias, "float64")


# ----------------------------------------------------------------- 12.8 sikf keys
@pytest.mark.parametrize("x", [[100.0, 0.0], [-3.0, 1e4, 2.0], [-1e4, -1e4 + 1.0]])
def test_sikf_keys_of_one_token_stay_finite(backend, x):
    """A 1-d input is one key: its features are exp(x - max x), as for the same key in a
    sequence of one, finite for logits up to |x| = 1e4 in float32."""
    xn = np.asarray(x)
    expected = np.exp(xn - xn.max())
    one = fm.sikf().keys(backend.asarray(xn, "float32"))
    assert_close(backend, one, expected, "float32")
    assert_close(
        backend,
        fm.sikf().keys(backend.asarray(xn[None], "float32")),
        expected[None],
        "float32",
    )
