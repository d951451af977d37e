"""Linear attention, decoding and softmax attention against dense float64 oracles."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import oracles
from backends_tests.backends import assert_array, assert_close, check_gradients
from fastrpb import feature_maps as fm
from fastrpb import linear_attention, linear_attention_step, random_projection, softmax_attention


def _inputs(backend, rng, dtype, *, lead=(2,), Lq=7, Lk=None, dk=4, dv=3, scale=1.0):
    Lk = Lq if Lk is None else Lk
    arrays = [
        backend.asarray(rng.standard_normal((*lead, Lq, dk)) * scale, dtype),
        backend.asarray(rng.standard_normal((*lead, Lk, dk)) * scale, dtype),
        backend.asarray(rng.standard_normal((*lead, Lk, dv)), dtype),
    ]
    return arrays, [backend.to_numpy(a).astype(np.float64) for a in arrays]


def _oracle(name, qn, kn, vn, wn=None, **kw):
    """Dense float64 attention for the map ``name`` from its formula."""
    if name == "elu":
        return oracles.kernel_attention(oracles.elu1(qn), oracles.elu1(kn), vn, **kw)
    if name == "relu":
        return oracles.kernel_attention(oracles.relu(qn), oracles.relu(kn), vn, **kw)
    if name == "dpfp":
        return oracles.kernel_attention(oracles.dpfp(qn), oracles.dpfp(kn), vn, **kw)
    if name == "sikf":
        return oracles.exp_kernel_attention(qn, kn, vn, **kw)
    if name == "favor":
        return oracles.exp_kernel_attention(oracles.favor_log(qn, wn), oracles.favor_log(kn, wn), vn, **kw)
    raise AssertionError(name)


def _masked(q, k, v, key_mask, **options):
    """``linear_attention`` with the key mask positional (``Backend.call`` traces it)."""
    return linear_attention(q, k, v, key_mask=key_mask, **options)


def _with_tables(q, k, v, tables, **options):
    """``linear_attention`` with the N-d bias tables positional (a pytree, traced)."""
    return linear_attention(q, k, v, rpb_tables=tables, **options)


def _favor_attention(q, k, v, w):
    return linear_attention(q, k, v, feature_map=fm.favor(w), causal=False)


def _map(backend, name, dk=4, m=16):
    if name == "favor":
        w = random_projection(m, dk, seed=11, like=backend.asarray(np.zeros(1)))
        return fm.favor(w), backend.to_numpy(w)
    return name, None


# --------------------------------------------------------------------------- linear attention
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", ["elu", "sikf", "favor"])
def test_linear_attention_matches_dense_oracle(backend, dtype, rng, name, causal):
    (q, k, v), (qn, kn, vn) = _inputs(backend, rng, dtype)
    fmap, wn = _map(backend, name)
    out = linear_attention(q, k, v, feature_map=fmap, causal=causal, chunk_size=3)
    assert_close(backend, out, _oracle(name, qn, kn, vn, wn, causal=causal, eps=1e-6), dtype)


@pytest.mark.parametrize("name", ["relu", "dpfp"])
def test_other_maps_match_dense_oracle(backend, rng, name):
    (q, k, v), (qn, kn, vn) = _inputs(backend, rng, "float64")
    for causal in (False, True):  # the map's maths: compiled on JAX (backend.call)
        out = backend.call(linear_attention, q, k, v, feature_map=name, causal=causal, chunk_size=3)
        assert_close(backend, out, _oracle(name, qn, kn, vn, causal=causal, eps=1e-6), "float64")


@pytest.mark.parametrize("name", ["elu", "sikf"])
def test_causal_lengths_and_chunk_sizes(backend, rng, name):
    # L = 1 (shorter than C), C = 1, L a multiple of C, L not a multiple of C; compiled
    # on JAX (backend.call: one compilation per shape, not one per operation)
    for L, C in ((1, 64), (5, 1), (8, 4), (13, 3)):
        (q, k, v), (qn, kn, vn) = _inputs(backend, rng, "float64", lead=(), Lq=L)
        out = backend.call(linear_attention, q, k, v, feature_map=name, causal=True, chunk_size=C)
        assert_close(backend, out, _oracle(name, qn, kn, vn, causal=True, eps=1e-6), "float64")


@pytest.mark.parametrize("name", ["elu", "signed"])
def test_causal_blocks_of_chunks(backend, monkeypatch, rng, name):
    """Long sequences run the causal chunks in blocks with the state carried between
    them (``_compat.scan``: ``lax.scan`` on JAX). A budget of 24 chunk-state elements
    makes blocks of 2 chunks here: 13 tokens in chunks of 3 are 2 blocks and a
    remainder. Values, the returned state, continuation and gradients against the
    dense oracle; ``signed``, a callable, takes the signed maps' normaliser."""
    from fastrpb._kernels import causal as causal_kernel

    monkeypatch.setattr(causal_kernel, "BLOCK_ELEMENTS", 24)
    (q, k, v), (qn, kn, vn) = _inputs(backend, rng, "float64", lead=(), Lq=13)
    fmap = (lambda x: x + 2.0) if name == "signed" else name
    phi = (lambda x: x + 2.0) if name == "signed" else oracles.elu1
    assert causal_kernel.block_chunks(k, v) == 2  # (features 4 x values 3) x 2 chunks = 24
    run = backend.compile(lambda q, k, v: linear_attention(q, k, v, feature_map=fmap, causal=True, chunk_size=3))
    expected = oracles.kernel_attention(phi(qn), phi(kn), vn, causal=True, eps=1e-6)
    assert_close(backend, run(q, k, v), expected, "float64")
    # the rest compiled on JAX too (backend.call), as the blocks are laid out from shapes
    out, state = backend.call(linear_attention, q, k, v, feature_map=fmap, causal=True, chunk_size=3, return_state=True)
    assert_close(backend, out, expected, "float64")
    assert_close(backend, state.S, phi(kn).T @ vn, "float64")
    assert_close(backend, state.z, phi(kn).sum(0), "float64")
    head, head_state = backend.call(
        linear_attention, q[:8, :], k[:8, :], v[:8, :], feature_map=fmap, causal=True, chunk_size=2, return_state=True
    )
    tail = backend.call(
        linear_attention,
        q[8:, :],
        k[8:, :],
        v[8:, :],
        feature_map=fmap,
        causal=True,
        chunk_size=2,
        initial_state=head_state,
    )
    assert_close(backend, head, expected[:8], "float64")
    assert_close(backend, tail, expected[8:], "float64")
    if backend.grad:
        check_gradients(
            backend, lambda q, k, v: linear_attention(q, k, v, feature_map=fmap, causal=True, chunk_size=3), qn, kn, vn
        )


def test_callable_and_rff_maps(backend, rng):
    (q, k, v), (qn, kn, vn) = _inputs(backend, rng, "float64", Lq=6)
    # the maps' maths: compiled on JAX (backend.call)
    out = backend.call(linear_attention, q, k, v, feature_map=lambda x: x * x + 0.5, causal=True, chunk_size=4)
    assert_close(backend, out, oracles.kernel_attention(qn**2 + 0.5, kn**2 + 0.5, vn, causal=True, eps=1e-6), "float64")
    w = random_projection(32, 4, seed=2, like=q)
    wn = backend.to_numpy(w)
    # small inputs keep the Gaussian kernel (and its estimate) well away from zero
    out = backend.call(linear_attention, q * 0.1, k * 0.1, v, feature_map=fm.rff(w))
    expected = oracles.kernel_attention(oracles.rff(qn * 0.1, wn), oracles.rff(kn * 0.1, wn), vn, eps=1e-6)
    assert_close(backend, out, expected, "float64")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", ["elu", "sikf"])
def test_key_mask_excludes_keys_exactly(backend, dtype, rng, name, causal):
    (q, k, v), (qn, kn, vn) = _inputs(backend, rng, dtype, lead=(3,), Lq=6)
    mask_n = np.ones((3, 6), dtype=bool)
    mask_n[0, 4:] = False  # trailing padding
    mask_n[1, [0, 2, 3]] = False  # holes, and query 0 of a causal row sees no key
    mask_n[2, :] = False  # nothing visible at all
    mask = backend.asarray(mask_n, None)
    fmap, wn = _map(backend, name)
    # compiled on JAX (backend.call); the eager masked calls are in test_rpb_term_is_added and test_jit
    out = backend.call(_masked, q, k, v, mask, feature_map=fmap, causal=causal, chunk_size=4)
    got = backend.to_numpy(out)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[2], 0.0)  # no visible key: zeros, not NaN
    assert_close(backend, out, _oracle(name, qn, kn, vn, wn, causal=causal, key_mask=mask_n, eps=1e-6), dtype)
    if not causal:  # padding keys are as good as absent (normaliser included)
        short = backend.call(linear_attention, q[:1, ...], k[:1, :4, :], v[:1, :4, :], feature_map=fmap)
        assert_close(backend, out[:1, ...], short, dtype)
    # eps = 0 is allowed: an all-padding row still gives zeros
    out0 = backend.to_numpy(backend.call(_masked, q, k, v, mask, feature_map=fmap, causal=causal, eps=0.0))
    np.testing.assert_array_equal(out0[2], 0.0)


@pytest.mark.parametrize("name", ["elu", "sikf"])
def test_cross_attention(backend, rng, name):
    dtype = "float64"
    (q, k, v), (qn, kn, vn) = _inputs(backend, rng, dtype, Lq=5, Lk=9)
    mask_n = rng.random((2, 9)) > 0.3
    out = backend.call(_masked, q, k, v, backend.asarray(mask_n, None), feature_map=name)
    assert_close(backend, out, _oracle(name, qn, kn, vn, key_mask=mask_n, eps=1e-6), dtype)


def test_broadcast_leading_dims(backend, rng):
    """Heads are a leading dimension; keys/values shared across heads broadcast."""
    qn = rng.standard_normal((2, 3, 5, 4))
    kn, vn = rng.standard_normal((2, 1, 5, 4)), rng.standard_normal((2, 1, 5, 2))
    q, k, v = (backend.asarray(a) for a in (qn, kn, vn))
    for causal in (False, True):
        out = backend.call(linear_attention, q, k, v, feature_map="sikf", causal=causal, chunk_size=2)
        assert_close(backend, out, oracles.exp_kernel_attention(qn, kn, vn, causal=causal, eps=1e-6), "float64")


# --------------------------------------------------------------------------- FastRPB term
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_rpb_term_is_added(backend, dtype, rng, causal):
    L, M = 7, 9
    (q, k, v), (qn, kn, vn) = _inputs(backend, rng, dtype, lead=(2,), Lq=L)
    wn = rng.standard_normal((2, 2 * M - 1)) * 0.3  # one table per head
    w = backend.asarray(wn, dtype)
    wn = backend.to_numpy(w).astype(np.float64)
    mask_n = np.ones((2, L), dtype=bool)
    mask_n[1, -2:] = False
    mask = backend.asarray(mask_n, None)
    vmasked = np.where(mask_n[..., None], vn, 0.0)
    B = oracles.toeplitz(wn, L, causal=causal, skip=(1, 1))
    out = linear_attention(
        q, k, v, feature_map="sikf", causal=causal, key_mask=mask, chunk_size=3, rpb=w, rpb_skip=(1, 1)
    )
    expected = _oracle("sikf", qn, kn, vn, causal=causal, key_mask=mask_n, eps=1e-6) + B @ vmasked
    assert_close(backend, out, expected, dtype)
    out = softmax_attention(q, k, v, causal=causal, key_mask=mask, rpb=w, rpb_skip=(1, 1))
    expected = oracles.softmax_attention(qn, kn, vn, causal=causal, key_mask=mask_n) + B @ vmasked
    assert_close(backend, out, expected, dtype)


def test_rpb_nd_term(backend, rng):
    grid = (2, 3)
    (q, k, v), (qn, kn, vn) = _inputs(backend, rng, "float64", lead=(), Lq=8)
    w0, w1 = rng.standard_normal(3), rng.standard_normal(5)
    tables = (backend.asarray(w0), backend.asarray(w1))
    B = oracles.toeplitz_nd((w0, w1), grid, skip=(1, 1))
    # compiled on JAX (backend.call); the eager N-d bias has its own tests in test_bias
    out = backend.call(_with_tables, q, k, v, tables, rpb_grid=grid, rpb_skip=(1, 1))
    assert_close(backend, out, _oracle("elu", qn, kn, vn, eps=1e-6) + B @ vn, "float64")
    out = backend.call(_with_tables, q, k, v, (None, tables[1]), rpb_grid=grid, rpb_skip=(1, 1))
    B = oracles.toeplitz_nd((None, w1), grid, skip=(1, 1))
    assert_close(backend, out, _oracle("elu", qn, kn, vn, eps=1e-6) + B @ vn, "float64")


# --------------------------------------------------------------------------- FAVOR+
def test_favor_approaches_softmax_attention(backend, rng):
    L, d = 12, 4
    (q, k, v), (qn, kn, vn) = _inputs(backend, rng, "float64", lead=(), Lq=L, dk=d, scale=0.35)
    expected = oracles.softmax_attention(qn, kn, vn, scale=1.0)  # FAVOR+ estimates exp(q . k)

    def error(m):
        errs = []
        for seed in range(6):
            w = random_projection(m, d, seed=seed, like=q)
            # compiled on JAX (backend.call): one compilation per m, not per operation and seed
            out = backend.to_numpy(backend.call(_favor_attention, q, k, v, w))
            errs.append(np.abs(out - expected).mean())
        return float(np.mean(errs))

    coarse, fine = error(32), error(1024)
    # the positive-feature estimator is heavy tailed: slower than 1/sqrt(m) at these m
    assert fine < 0.5 * coarse, (coarse, fine)
    assert fine < 0.02, fine


# --------------------------------------------------------------------------- decoding
# elsewhere than NumPy and array-api-strict: the plain (elu) and exponential (sikf) state
@pytest.mark.subset(lambda name, **_: name in ("elu", "sikf"))
@pytest.mark.parametrize("name", ["elu", "sikf", "favor"])
def test_decoding_equals_causal(backend, dtype, rng, name):
    L = 6
    (q, k, v), (qn, kn, vn) = _inputs(backend, rng, dtype, lead=(2,), Lq=L)
    fmap, wn = _map(backend, name)
    expected = _oracle(name, qn, kn, vn, wn, causal=True, eps=1e-6)
    state, outs = None, []
    for t in range(L):
        out_t, state = linear_attention_step(state, q[:, t, :], k[:, t, :], v[:, t, :], feature_map=fmap)
        outs.append(out_t)
    assert_close(backend, backend.xp.stack(outs, axis=-2), expected, dtype)
    # prefill the first 4 tokens, then decode the rest
    prompt, state = linear_attention(
        q[:, :4, :], k[:, :4, :], v[:, :4, :], feature_map=fmap, causal=True, chunk_size=3, return_state=True
    )
    assert_close(backend, prompt, expected[:, :4], dtype)
    assert state.S.shape[-1] == 3
    assert state.z.shape == state.S.shape[:-1]
    for t in range(4, L):
        out_t, state = linear_attention_step(state, q[:, t, :], k[:, t, :], v[:, t, :], feature_map=fmap)
        assert_close(backend, out_t, expected[:, t], dtype, scale=float(np.abs(expected).max()))


def test_sikf_decoding_rescales_without_overflow(backend, rng):
    """A late huge key neither overflows the state nor wipes out earlier keys' share."""
    L, d = 8, 3
    qn = rng.standard_normal((L, d))
    kn = rng.standard_normal((L, d))
    kn[5] += 80.0  # exp(80) alone is fine in float32, but exp(80 + 80) is not
    kn[6] -= 60.0
    vn = rng.standard_normal((L, 2))
    q, k, v = (backend.asarray(a, "float32") for a in (qn, kn, vn))
    expected = oracles.exp_kernel_attention(qn, kn, vn, causal=True, eps=1e-6)
    state, outs = None, []
    for t in range(L):
        out_t, state = linear_attention_step(state, q[t, :], k[t, :], v[t, :], feature_map="sikf")
        for part in (state.S, state.z, state.offset):
            assert np.all(np.isfinite(backend.to_numpy(part)))
        outs.append(out_t)
    assert_close(backend, backend.xp.stack(outs), expected, "float32")
    out_p, state_p = backend.call(
        linear_attention, q, k, v, feature_map="sikf", causal=True, chunk_size=3, return_state=True
    )
    assert_close(backend, out_p, expected, "float32")
    np.testing.assert_allclose(backend.to_numpy(state_p.offset), backend.to_numpy(state.offset), rtol=1e-6)


# --------------------------------------------------------------------------- SIKF numerics
def test_sikf_large_logits_are_finite(backend, rng):
    L = 7
    qn = rng.uniform(-1e4, 1e4, (2, L, 4))
    kn = rng.uniform(-1e4, 1e4, (2, L, 4))
    vn = rng.standard_normal((2, L, 3))
    q, k, v = (backend.asarray(a, "float32") for a in (qn, kn, vn))
    qn, kn, vn = (backend.to_numpy(a).astype(np.float64) for a in (q, k, v))
    # each output is (up to float32 rounding of 1e4-sized logits) the value of one key
    tol = dict(atol=2e-2 * np.abs(vn).max())
    full = backend.to_numpy(backend.call(linear_attention, q, k, v, feature_map="sikf", chunk_size=4))
    np.testing.assert_allclose(full, oracles.exp_kernel_attention(qn, kn, vn), **tol)
    causal = backend.to_numpy(backend.call(linear_attention, q, k, v, feature_map="sikf", causal=True, chunk_size=4))
    assert np.all(np.isfinite(causal))
    # inside a chunk, a key ~90+ units (float32) above an earlier one can hide it from the
    # queries in between (documented); one-token chunks and decoding are exact at any scale
    expected = oracles.exp_kernel_attention(qn, kn, vn, causal=True)
    exact = backend.to_numpy(backend.call(linear_attention, q, k, v, feature_map="sikf", causal=True, chunk_size=1))
    np.testing.assert_allclose(exact, expected, **tol)
    state, outs = None, []
    for t in range(L):
        out_t, state = linear_attention_step(state, q[:, t, :], k[:, t, :], v[:, t, :], feature_map="sikf")
        outs.append(backend.to_numpy(out_t))
    np.testing.assert_allclose(np.stack(outs, axis=1), expected, **tol)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("level", [0.0, 300.0])
def test_sikf_accurate_over_a_60_unit_spread(backend, rng, causal, level):
    """float32 against the float64 oracle when logits in a sequence span 60 units."""
    L = 12
    qn = rng.uniform(-30, 30, (2, L, 4)) + level
    kn = rng.uniform(-30, 30, (2, L, 4)) - level
    kn[0, :6] = rng.uniform(-30, -25, (6, 4))  # quiet early keys ...
    kn[0, 7] = 30.0  # ... then a loud one inside the same chunk (chunk 4..7)
    vn = rng.standard_normal((2, L, 3))
    q, k, v = (backend.asarray(a, "float32") for a in (qn, kn, vn))
    qn, kn = backend.to_numpy(q).astype(np.float64), backend.to_numpy(k).astype(np.float64)
    out = backend.call(linear_attention, q, k, v, feature_map="sikf", causal=causal, chunk_size=4)
    # eps is relative, so it cannot swamp a denominator that is small only because of
    # offsets: the result equals the eps-free oracle to float32 accuracy
    assert_close(backend, out, oracles.exp_kernel_attention(qn, kn, vn, causal=causal, eps=0.0), "float32")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sikf_shift_invariance(backend, rng, causal):
    (q, k, v), (_qn, _kn, _vn) = _inputs(backend, rng, "float64", Lq=9, scale=2.0)
    base = backend.to_numpy(backend.call(linear_attention, q, k, v, feature_map="sikf", causal=causal, chunk_size=4))
    row_shift = backend.asarray(rng.uniform(-50, 50, (2, 9, 1)))
    shifted = backend.call(
        linear_attention, q + row_shift, k - 37.5, v, feature_map="sikf", causal=causal, chunk_size=4
    )
    np.testing.assert_allclose(backend.to_numpy(shifted), base, rtol=1e-9, atol=1e-9)
    if causal:
        state, outs = None, []
        for t in range(9):
            out_t, state = linear_attention_step(
                state, q[:, t, :] + row_shift[:, t, :], k[:, t, :] + 400.0, v[:, t, :], feature_map="sikf"
            )
            outs.append(backend.to_numpy(out_t))
        np.testing.assert_allclose(np.stack(outs, axis=1), base, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- softmax
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softmax_attention_matches_oracle(backend, dtype, rng, causal):
    (q, k, v), (qn, kn, vn) = _inputs(backend, rng, dtype, lead=(3,), Lq=6)
    mask_n = np.ones((3, 6), dtype=bool)
    mask_n[1, :2] = False
    mask_n[2] = False
    mask = backend.asarray(mask_n, None)
    out = softmax_attention(q, k, v, causal=causal, key_mask=mask)
    got = backend.to_numpy(out)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[2], 0.0)
    assert_close(backend, out, oracles.softmax_attention(qn, kn, vn, causal=causal, key_mask=mask_n), dtype)
    # logits_bias: the T5-style use of a bias table, built densely in the test
    M = 6
    wn = rng.standard_normal(2 * M - 1)
    w = backend.asarray(wn, dtype)
    wn = backend.to_numpy(w).astype(np.float64)
    Bn = oracles.toeplitz(wn, 6)
    out = softmax_attention(q, k, v, causal=causal, logits_bias=backend.asarray(Bn, dtype), scale=0.7)
    bias_n = backend.to_numpy(backend.asarray(Bn, dtype)).astype(np.float64)
    assert_close(
        backend, out, oracles.softmax_attention(qn, kn, vn, causal=causal, logits_bias=bias_n, scale=0.7), dtype
    )


def test_softmax_attention_is_stable_and_cross(backend, rng):
    (q, k, v), (qn, kn, vn) = _inputs(backend, rng, "float32", Lq=4, Lk=9, scale=300.0)
    out = softmax_attention(q, k, v)
    assert np.all(np.isfinite(backend.to_numpy(out)))
    assert_close(backend, out, oracles.softmax_attention(qn, kn, vn), "float32")


# --------------------------------------------------------------------------- arrays and devices
def test_results_stay_on_the_input_library_and_device(backend, dtype, rng):
    (q, k, v), _ = _inputs(backend, rng, dtype)
    work = "float64" if dtype == "float64" else "float32"
    for out in (
        linear_attention(q, k, v, feature_map="sikf"),
        softmax_attention(q, k, v),
    ):
        assert_array(backend, out, dtype)
    out, state = linear_attention(q, k, v, feature_map="sikf", causal=True, return_state=True)
    for part in (state.S, state.z, state.offset):
        assert_array(backend, part, work)
    out_t, state = linear_attention_step(state, q[:, 0, :], k[:, 0, :], v[:, 0, :], feature_map="sikf")
    assert_array(backend, out_t, dtype)


@pytest.mark.skip_backends("jax", "jax_gpu", reason="immutable arrays: no call can overwrite its input")
def test_inputs_are_not_mutated(backend, rng):
    (q, k, v), (qn, kn, vn) = _inputs(backend, rng, "float64")
    mask_n = rng.random((2, 7)) > 0.2
    mask = backend.asarray(mask_n, None)
    wn = rng.standard_normal(13)
    w = backend.asarray(wn)
    for name in ("elu", "sikf"):
        for causal in (False, True):
            linear_attention(q, k, v, feature_map=name, causal=causal, key_mask=mask, rpb=w)
        _, state = linear_attention(q, k, v, feature_map=name, causal=True, return_state=True)
        before = [backend.to_numpy(a).copy() for a in state[:3] if a is not None]
        linear_attention_step(state, q[:, 0, :], k[:, 0, :], v[:, 0, :], feature_map=name)
        after = [backend.to_numpy(a) for a in state[:3] if a is not None]
        for b, a in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b)
    softmax_attention(q, k, v, causal=True, key_mask=mask, rpb=w)
    for x, xn in ((q, qn), (k, kn), (v, vn), (w, wn)):
        np.testing.assert_array_equal(backend.to_numpy(x), xn)
    np.testing.assert_array_equal(backend.to_numpy(mask), mask_n)


# --------------------------------------------------------------------------- transformations
@pytest.mark.jit
def test_jit(backend, rng):
    import functools

    (q, k, v), (qn, kn, vn) = _inputs(backend, rng, "float64", Lq=7)
    mask = backend.asarray(rng.random((2, 7)) > 0.2, None)
    w = backend.asarray(rng.standard_normal(13) * 0.1)
    proj = random_projection(8, 4, seed=0, like=q)
    cases = [
        functools.partial(linear_attention, feature_map="sikf", causal=True, chunk_size=3),
        functools.partial(linear_attention, feature_map=fm.favor(proj), causal=False),
    ]
    for fn in cases:
        eager = backend.to_numpy(fn(q, k, v, key_mask=mask, rpb=w))
        jitted = backend.jit(lambda q, k, v, mask, w, fn=fn: fn(q, k, v, key_mask=mask, rpb=w))
        np.testing.assert_allclose(backend.to_numpy(jitted(q, k, v, mask, w)), eager, rtol=1e-12, atol=1e-12)
    soft = backend.jit(functools.partial(softmax_attention, causal=True))
    np.testing.assert_allclose(
        backend.to_numpy(soft(q, k, v)), oracles.softmax_attention(qn, kn, vn, causal=True), rtol=1e-10
    )
    # the decoding state is a pytree: it crosses jit in and out
    prefill = backend.jit(functools.partial(linear_attention, feature_map="sikf", causal=True, return_state=True))
    step = backend.jit(functools.partial(linear_attention_step, feature_map="sikf"))
    _, state = prefill(q[:, :5, :], k[:, :5, :], v[:, :5, :])
    outs = []
    for t in range(5, 7):
        out_t, state = step(state, q[:, t, :], k[:, t, :], v[:, t, :])
        outs.append(backend.to_numpy(out_t))
    assert state.feature_map == "sikf"
    expected = oracles.exp_kernel_attention(qn, kn, vn, causal=True, eps=1e-6)
    np.testing.assert_allclose(np.stack(outs, axis=1), expected[:, 5:], rtol=1e-10)


def _grad_cases(backend, rng):
    (_q, _k, _v), (qn, kn, vn) = _inputs(backend, rng, "float64", lead=(), Lq=5, dk=3, dv=2)
    mask = backend.asarray(np.array([True, False, True, True, True]), None)
    w = backend.asarray(rng.standard_normal(9) * 0.3)
    return (qn, kn, vn), [
        lambda q, k, v: linear_attention(q, k, v, feature_map="elu"),
        lambda q, k, v: linear_attention(q, k, v, feature_map="sikf", causal=True, chunk_size=2, key_mask=mask),
        lambda q, k, v: linear_attention(q, k, v, feature_map="sikf", rpb=w),
        lambda q, k, v: softmax_attention(q, k, v, causal=True, rpb=w),
    ]


@pytest.mark.grad
def test_gradients_match_finite_differences(backend, rng):
    inputs, cases = _grad_cases(backend, rng)
    for fn in cases:
        check_gradients(backend, fn, *inputs, rtol=1e-5)


# --------------------------------------------------------------------------- errors
def _squared(x):
    """A plain callable feature map, named in error messages as ``callable(_squared)``."""
    return x * x


def _bad_inputs(backend):
    """The arrays the error cases below are built from."""
    a = lambda *shape, dtype="float64": backend.asarray(np.ones(shape), dtype)  # noqa: E731
    q, k, v = a(2, 5, 4), a(2, 5, 4), a(2, 5, 3)
    mask = backend.asarray(np.ones((2, 5), dtype=bool), None)
    # compiled once on JAX (backend.call) for all the cases, not one dispatch per operation
    _, elu_state = backend.call(linear_attention, q, k, v, causal=True, return_state=True)
    _, sikf_state = backend.call(linear_attention, q, k, v, feature_map="sikf", causal=True, return_state=True)
    return SimpleNamespace(backend=backend, a=a, q=q, k=k, v=v, mask=mask, elu_state=elu_state, sikf_state=sikf_state)


# (id, call(c) with c from _bad_inputs, exception, message)
_BAD_CALLS = [
    ("width", lambda c: linear_attention(c.q, c.a(2, 5, 3), c.v), ValueError, r"k must have the width Dk of q"),
    ("length", lambda c: linear_attention(c.q, c.k, c.a(2, 4, 3)), ValueError, r"v must have one row per key.*Lk = 5"),
    (
        "lead",
        lambda c: linear_attention(c.q, c.a(3, 5, 4), c.a(3, 5, 3)),
        ValueError,
        r"leading dimensions of q, k and v",
    ),
    (
        "mask shape",
        lambda c: linear_attention(c.q, c.k, c.v, key_mask=c.mask[:, :4]),
        ValueError,
        r"key_mask must have shape \(\.\.\., Lk\) with Lk = 5",
    ),
    (
        "mask lead",
        lambda c: linear_attention(c.q, c.k, c.v, key_mask=c.backend.asarray(np.ones((3, 5), dtype=bool), None)),
        ValueError,
        r"key_mask",
    ),
    (
        "mask dtype",
        lambda c: linear_attention(c.q, c.k, c.v, key_mask=c.a(2, 5)),
        TypeError,
        r"key_mask must be a bool array",
    ),
    (
        "map name",
        lambda c: linear_attention(c.q, c.k, c.v, feature_map="softmax"),
        ValueError,
        r"feature_map 'softmax'.*'elu', 'relu', 'sikf', 'dpfp'",
    ),
    (
        "map needs projection",
        lambda c: linear_attention(c.q, c.k, c.v, feature_map="hedgehog"),
        ValueError,
        r"feature_map 'hedgehog' needs a projection.*feature_maps.hedgehog\(projection\)",
    ),
    ("map type", lambda c: linear_attention(c.q, c.k, c.v, feature_map=3), TypeError, r"feature_map must be"),
    (
        "chunk zero",
        lambda c: linear_attention(c.q, c.k, c.v, causal=True, chunk_size=0),
        ValueError,
        r"chunk_size must be >= 1, got 0",
    ),
    (
        "chunk negative",
        lambda c: linear_attention(c.q, c.k, c.v, causal=True, chunk_size=-2),
        ValueError,
        r"chunk_size must be >= 1",
    ),
    (
        "chunk float",
        lambda c: linear_attention(c.q, c.k, c.v, causal=True, chunk_size=2.0),
        TypeError,
        r"chunk_size must be an int",
    ),
    (
        "causal lengths",
        lambda c: linear_attention(c.q, c.a(2, 6, 4), c.a(2, 6, 3), causal=True),
        ValueError,
        r"causal=True needs as many queries as keys.*Lq = 5.*Lk = 6",
    ),
    (
        "softmax causal lengths",
        lambda c: softmax_attention(c.q, c.a(2, 6, 4), c.a(2, 6, 3), causal=True),
        ValueError,
        r"causal=True.*Lq = 5",
    ),
    (
        "int dtype",
        lambda c: linear_attention(c.backend.asarray(np.ones((2, 5, 4), dtype=np.int32), None), c.k, c.v),
        TypeError,
        r"q must have a real floating dtype",
    ),
    (
        "bool dtype",
        lambda c: softmax_attention(c.q, c.k, c.backend.asarray(np.ones((2, 5, 3), dtype=bool), None)),
        TypeError,
        r"v must have a real floating dtype",
    ),
    (
        "not an array",
        lambda c: linear_attention(np.ones((2, 5, 4)).tolist(), c.k, c.v),
        TypeError,
        r"q must be an array",
    ),
    ("eps", lambda c: linear_attention(c.q, c.k, c.v, eps=-1.0), ValueError, r"eps must be a finite float >= 0"),
    ("causal type", lambda c: linear_attention(c.q, c.k, c.v, causal="yes"), TypeError, r"causal must be a bool"),
    (
        "return_state",
        lambda c: linear_attention(c.q, c.k, c.v, return_state=True),
        ValueError,
        r"return_state=True needs causal=True",
    ),
    (
        "rpb both",
        lambda c: linear_attention(c.q, c.k, c.v, rpb=c.a(9), rpb_tables=(c.a(3),), rpb_grid=(5,)),
        ValueError,
        r"either rpb",
    ),
    (
        "rpb cross",
        lambda c: linear_attention(c.a(2, 3, 4), c.k, c.v, rpb=c.a(9)),
        ValueError,
        r"FastRPB term.*Lq = 3 and Lk = 5",
    ),
    (
        "rpb short",
        lambda c: linear_attention(c.q, c.k, c.v, rpb=c.a(5)),
        ValueError,
        r"L = 5 tokens but the table covers at most M = 3",
    ),
    (
        "logits_bias shape",
        lambda c: softmax_attention(c.q, c.k, c.v, logits_bias=c.a(5, 4)),
        ValueError,
        r"logits_bias must broadcast to \(\.\.\., Lq, Lk\)",
    ),
    ("scale", lambda c: softmax_attention(c.q, c.k, c.v, scale="big"), TypeError, r"scale must be a float"),
    (
        "state map",
        lambda c: linear_attention_step(c.elu_state, c.q[:, 0, :], c.k[:, 0, :], c.v[:, 0, :], feature_map="relu"),
        ValueError,
        r"state was made by feature map 'elu' but feature_map is 'relu'",
    ),
    (
        "state map callable",
        lambda c: linear_attention_step(c.elu_state, c.q[:, 0, :], c.k[:, 0, :], c.v[:, 0, :], feature_map=_squared),
        ValueError,
        r"state was made by feature map 'elu' but feature_map is 'callable\(_squared\)'",
    ),
    (
        "state map exp",
        lambda c: linear_attention_step(c.sikf_state, c.q[:, 0, :], c.k[:, 0, :], c.v[:, 0, :], feature_map="elu"),
        ValueError,
        r"state was made by feature map 'sikf'",
    ),
    (
        "state Dv",
        lambda c: linear_attention_step(c.elu_state, c.q[:, 0, :], c.k[:, 0, :], c.a(2, 4), feature_map="elu"),
        ValueError,
        r"state.S must have shape \(\.\.\., F, Dv\) = \(\.\.\., 4, 4\)",
    ),
    (
        "state Dk",
        lambda c: linear_attention_step(c.elu_state, c.a(2, 6), c.a(2, 6), c.v[:, 0, :]),
        ValueError,
        r"state.S must have shape",
    ),
    (
        "state lead",
        lambda c: linear_attention_step(c.elu_state, c.a(3, 4), c.a(3, 4), c.a(3, 3)),
        ValueError,
        r"leading dimensions of state",
    ),
    (
        "state type",
        lambda c: linear_attention_step((1, 2), c.q[:, 0, :], c.k[:, 0, :], c.v[:, 0, :]),
        TypeError,
        r"state must be a LinearAttentionState",
    ),
    (
        "mixed libraries",
        lambda c: linear_attention(c.q, c.k, _other_library(c.backend, c.v)),
        TypeError,
        r"one array library|v must be an array",
    ),
    (
        "step width",
        lambda c: linear_attention_step(None, c.q[:, 0, :], c.a(2, 3), c.v[:, 0, :]),
        ValueError,
        r"k_t must have the width Dk of q_t",
    ),
]


def _other_library(backend, x):
    """``x`` as an array of another library than the backend's."""
    return backend.foreign(backend.to_numpy(x))


def test_empty_sequences(backend, rng):
    (q, k, v), _ = _inputs(backend, rng, "float64", Lq=0)
    for name in ("elu", "sikf"):
        for causal in (False, True):
            out = linear_attention(q, k, v, feature_map=name, causal=causal)
            assert out.shape == (2, 0, 3)
        out, state = linear_attention(q, k, v, feature_map=name, causal=True, return_state=True)
        (q1, k1, v1), (qn, kn, vn) = _inputs(backend, rng, "float64", Lq=1)
        out_t, _ = linear_attention_step(state, q1[:, 0, :], k1[:, 0, :], v1[:, 0, :], feature_map=name)
        assert_close(backend, out_t, _oracle(name, qn, kn, vn, causal=True, eps=1e-6)[:, 0], "float64")
    (q, k, v), _ = _inputs(backend, rng, "float64", Lq=3, Lk=0)
    np.testing.assert_array_equal(backend.to_numpy(linear_attention(q, k, v, feature_map="sikf")), np.zeros((2, 3, 3)))
    np.testing.assert_array_equal(backend.to_numpy(softmax_attention(q, k, v)), np.zeros((2, 3, 3)))


@pytest.mark.parametrize(("call", "exc", "pattern"), [pytest.param(c, e, p, id=i) for i, c, e, p in _BAD_CALLS])
def test_bad_input_errors(backend, call, exc, pattern):
    c = _bad_inputs(backend)
    with pytest.raises(exc, match=pattern):
        call(c)
