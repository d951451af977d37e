"""Issue 10 (breadth): the exact causal normaliser and unnormalised / scaled linear
attention, against dense float64 oracles on every backend."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import fastrpb
import oracles
from backends_tests.backends import assert_close, check_gradients
from fastrpb import (
    LinearAttentionState,
    linear_attention,
    linear_attention_step,
    random_projection,
    rpb,
    softmax_attention,
)
from fastrpb import feature_maps as fm


def _err_ratio(actual, expected):
    """fla's ``get_err_ratio``: RMS of the error over RMS of the reference."""
    return float(np.sqrt(np.mean((actual - expected) ** 2)) / np.sqrt(np.mean(expected**2)))


def _identity(x):
    return x


def _compensated_den(q, k, *, xp):
    from fastrpb._kernels.causal import compensated_den

    return compensated_den(xp, q, k)


def _masked_with_bias(q, k, v, key_mask, w, **options):
    """``linear_attention`` with the key mask and the bias table as positional arrays
    (``Backend.call`` traces its positional arguments)."""
    return linear_attention(q, k, v, key_mask=key_mask, rpb=w, **options)


def _offsets(backend, offsets):
    """Packed offsets as the test passes them: an array of the backend, or a tuple of
    Python ints where ``Backend.call`` compiles (a traced array cannot set a shape); the
    array offsets keep their compiled-backend tests in the zero-length cases below."""
    return tuple(int(c) for c in offsets) if backend.jit is not None else backend.asarray(np.asarray(offsets), None)


# --------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fla_naive_chunk_err_ratio(backend, seed):
    """fla's ``test_naive_chunk`` case: B = 2, H = 2, T = 256, D = 64, identity map on raw
    randn q/k (signed features, denominators that cancel to ~1e-5), float32 against
    float64: err-ratio <= 1e-3, fla's own tolerance."""
    rng = np.random.default_rng(seed)
    qn, kn, vn = (rng.standard_normal((2, 2, 256, 64)).astype(np.float32) for _ in range(3))
    q, k, v = (backend.asarray(x, "float32") for x in (qn, kn, vn))
    # compiled on JAX (backend.call): one compilation for the four seeds
    out = backend.to_numpy(backend.call(linear_attention, q, k, v, feature_map=_identity, causal=True))
    expected = oracles.kernel_attention(*(x.astype(np.float64) for x in (qn, kn, vn)), causal=True, eps=1e-6)
    assert _err_ratio(out, expected) <= 1e-3


def test_compensated_normaliser_without_float64(backend, rng):
    """The float32 fallback (JAX without x64, MPS): compensated prefix and dot product."""
    qn, kn = (rng.standard_normal((2, 300, 64)).astype(np.float32) for _ in range(2))
    q, k = backend.asarray(qn, "float32"), backend.asarray(kn, "float32")
    den, z = backend.call(_compensated_den, q, k, xp=backend.xp)
    q64, k64 = qn.astype(np.float64), kn.astype(np.float64)
    Z = np.cumsum(k64, axis=-2)
    expected = np.sum(q64 * Z, axis=-1, keepdims=True)
    # an accurate dot product: error of the order of one rounding of the result's terms
    got = backend.to_numpy(den)
    assert (
        np.max(
            np.abs(got - expected) / (np.abs(q64) @ np.abs(Z).swapaxes(-1, -2)).diagonal(axis1=-2, axis2=-1)[..., None]
        )
        < 1e-6
    )
    np.testing.assert_allclose(backend.to_numpy(z), Z[..., -1, :], rtol=1e-6, atol=1e-5)


def test_causal_rff_no_worse_than_noncausal(backend, rng):
    """Signed random Fourier features, float32: the causal call is as accurate as the
    non-causal one on the same inputs (each against its float64 oracle)."""
    qn, kn, vn = (rng.standard_normal((2, 512, 16)) * 0.3 for _ in range(3))
    w = random_projection(64, 16, seed=3, like=backend.asarray(np.zeros(1), "float32"))
    wn = backend.to_numpy(w).astype(np.float64)
    q, k, v = (backend.asarray(x, "float32") for x in (qn, kn, vn))
    fq, fk = oracles.rff(qn, wn), oracles.rff(kn, wn)
    errors = {}
    for causal in (False, True):
        out = backend.to_numpy(backend.call(linear_attention, q, k, v, feature_map=fm.rff(w), causal=causal))
        errors[causal] = _err_ratio(out, oracles.kernel_attention(fq, fk, vn, causal=causal, eps=1e-6))
    assert errors[True] <= max(2 * errors[False], 1e-6), errors


# elsewhere than NumPy and array-api-strict: every map in float32, every dtype for identity
@pytest.mark.subset(lambda name, dtype, **_: dtype == "float32" or name == "identity")
@pytest.mark.parametrize("name", ["identity", "rff", "taylor"])
def test_signed_maps_causal_match_oracle(backend, dtype, rng, name):
    qn, kn, vn = (rng.standard_normal((2, 37, 4)) * 0.5 for _ in range(3))
    q, k, v = (backend.asarray(x, dtype) for x in (qn, kn, vn))
    qn, kn, vn = (backend.to_numpy(x).astype(np.float64) for x in (q, k, v))  # as rounded
    fmap, fq, fk = _features(backend, name, qn, kn)
    out = backend.call(linear_attention, q, k, v, feature_map=fmap, causal=True, chunk_size=8)
    assert_close(backend, out, oracles.kernel_attention(fq, fk, vn, causal=True, eps=1e-6), dtype)


# --------------------------------------------------------------------------- item 4
def _features(backend, name, qn, kn):
    """(feature_map argument, float64 query and key features) for a map by name."""
    d = qn.shape[-1]
    if name == "identity":
        return _identity, qn, kn
    if name == "elu":
        return "elu", oracles.elu1(qn), oracles.elu1(kn)
    if name == "relu":
        return "relu", oracles.relu(qn), oracles.relu(kn)
    if name == "dpfp":
        return "dpfp", oracles.dpfp(qn), oracles.dpfp(kn)
    if name == "taylor":
        return "taylor", oracles.taylor(qn), oracles.taylor(kn)
    w = random_projection(8, d, seed=5, like=backend.asarray(np.zeros(1)))
    wn = backend.to_numpy(w).astype(np.float64)
    if name == "rff":
        return fm.rff(w), oracles.rff(qn, wn), oracles.rff(kn, wn)
    if name == "favor":
        return fm.favor(w), oracles.favor_log(qn, wn), oracles.favor_log(kn, wn)
    if name == "sikf":
        return "sikf", qn, kn
    raise AssertionError(name)


def _unnormalised(name, lq, lk, vn, causal):
    """sum_j K_ij v_j over visible keys, K from features (or log-features: sikf, favor)."""
    if name in ("sikf", "favor"):
        K = np.exp(lq[..., :, None, :] + lk[..., None, :, :]).sum(-1)
    else:
        K = lq @ np.swapaxes(lk, -1, -2)
    K = np.where(oracles.visibility(lq.shape[-2], lk.shape[-2], causal), K, 0.0)
    return K @ vn


MAPS = ["elu", "relu", "dpfp", "taylor", "identity", "rff", "sikf", "favor"]


# elsewhere than NumPy and array-api-strict: every dtype for the plain (elu) and the
# exponential (sikf) kernel, and in float32 a map given as a callable (identity) and one
# with a projection and log-features (favor); the maps themselves are one array-API code
@pytest.mark.subset(
    lambda name, dtype, **_: name in ("elu", "sikf") or (dtype == "float32" and name in ("identity", "favor"))
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", MAPS)
def test_unnormalised_scaled_matches_oracle(backend, dtype, rng, name, causal):
    qn, kn, vn = (rng.standard_normal((2, 11, 4)) for _ in range(3))
    q, k, v = (backend.asarray(x, dtype) for x in (qn, kn, vn))
    qn, kn, vn = (backend.to_numpy(x).astype(np.float64) for x in (q, k, v))  # as rounded
    fmap, fq, fk = _features(backend, name, 0.5 * qn, kn)
    out = backend.call(
        linear_attention, q, k, v, feature_map=fmap, causal=causal, chunk_size=4, normalize=False, scale=0.5
    )
    assert_close(backend, out, _unnormalised(name, fq, fk, vn, causal), dtype)


@pytest.mark.parametrize("name", ["elu", "sikf"])
def test_scale_multiplies_queries(backend, dtype, rng, name):
    qn, kn, vn = (rng.standard_normal((2, 9, 4)) for _ in range(3))
    q, k, v = (backend.asarray(x, dtype) for x in (qn, kn, vn))
    qn, kn, vn = (backend.to_numpy(x).astype(np.float64) for x in (q, k, v))  # as rounded
    for causal in (False, True):
        out = backend.call(linear_attention, q, k, v, feature_map=name, causal=causal, chunk_size=4, scale=2.0)
        if name == "elu":
            expected = oracles.kernel_attention(oracles.elu1(2 * qn), oracles.elu1(kn), vn, causal=causal, eps=1e-6)
        else:
            expected = oracles.exp_kernel_attention(2 * qn, kn, vn, causal=causal, eps=1e-6)
        assert_close(backend, out, expected, dtype)


@pytest.mark.subset(lambda name: name in ("elu", "sikf"))
@pytest.mark.parametrize("name", ["elu", "taylor", "sikf", "favor"])
def test_step_unnormalised_scaled_matches_oracle(backend, rng, name):
    qn, kn, vn = (rng.standard_normal((2, 6, 4)) for _ in range(3))
    q, k, v = (backend.asarray(x, "float64") for x in (qn, kn, vn))
    fmap, fq, fk = _features(backend, name, 0.5 * qn, kn)
    expected = _unnormalised(name, fq, fk, vn, True)
    state = None
    for t in range(6):
        out, state = linear_attention_step(
            state, q[..., t, :], k[..., t, :], v[..., t, :], feature_map=fmap, normalize=False, scale=0.5
        )
        assert_close(backend, out, expected[..., t, :], "float64")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_unnormalised_exponential_overflows_to_inf(backend):
    """The documented limit: the true scale of sikf overflows past exp(~709) in float64."""
    qn = np.full((1, 2, 2), 400.0)
    q = backend.asarray(qn, "float64")
    out = backend.to_numpy(backend.call(linear_attention, q, q, q, feature_map="sikf", normalize=False))
    assert np.all(np.isinf(out))
    ok = backend.to_numpy(backend.call(linear_attention, q, q, q, feature_map="sikf"))
    np.testing.assert_allclose(ok, 400.0, rtol=1e-5)


@pytest.mark.grad
@pytest.mark.subset(lambda name: name in ("elu", "sikf"))
@pytest.mark.parametrize("name", ["elu", "taylor", "sikf"])
def test_gradients_unnormalised_and_causal_normaliser(backend, rng, name):
    qn, kn, vn = (rng.standard_normal((1, 5, 3)) * 0.5 for _ in range(3))

    def unnormalised(q, k, v):
        return linear_attention(q, k, v, feature_map=name, causal=True, chunk_size=2, normalize=False, scale=0.7)

    def normalised(q, k, v):
        return linear_attention(q, k, v, feature_map=name, causal=True, chunk_size=2)

    check_gradients(backend, unnormalised, qn, kn, vn, rtol=1e-5, atol=1e-6)
    check_gradients(backend, normalised, qn, kn, vn, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"normalize": 1}, TypeError, "normalize"),
        ({"scale": float("nan")}, ValueError, "scale"),
        ({"scale": "half"}, TypeError, "scale"),
    ],
    ids=["normalize-not-bool", "scale-nan", "scale-not-number"],
)
@pytest.mark.parametrize("step", [False, True], ids=["attention", "step"])
def test_option_errors(backend, kwargs, error, match, step):
    x = backend.asarray(np.ones((2, 3)), "float64")
    if step:
        with pytest.raises(error, match=match):
            linear_attention_step(None, x[0, ...], x[0, ...], x[0, ...], **kwargs)
    else:
        with pytest.raises(error, match=match):
            linear_attention(x, x, x, **kwargs)


# --------------------------------------------------------------------------- item 2: packed
def _random_offsets(rng, n=5, longest=9):
    lengths = rng.integers(1, longest + 1, size=n)
    lengths[rng.integers(n)] = 1  # always a length-1 sequence
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _per_sequence(offsets, fn):
    """Concatenate ``fn(a, b)`` (a float64 oracle of one sequence) over the sequences."""
    return np.concatenate([fn(a, b) for a, b in itertools.pairwise(offsets)], axis=-2)


# elsewhere than NumPy and array-api-strict: every dtype for elu and sikf, favor in float32
@pytest.mark.subset(lambda name, dtype, **_: name in ("elu", "sikf") or (dtype == "float32" and name == "favor"))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", ["elu", "taylor", "sikf", "favor"])
def test_packed_linear_attention_matches_separate_oracles(backend, dtype, rng, name, causal):
    offsets = _random_offsets(rng)
    T = int(offsets[-1])
    qn, kn, vn = (rng.standard_normal((2, T, 4)) * 0.7 for _ in range(3))
    mask_n = rng.random((2, T)) > 0.2
    wn = rng.standard_normal((2, 2 * 10 - 1))
    q, k, v, w = (backend.asarray(x, dtype) for x in (qn, kn, vn, wn))
    qn, kn, vn, wn = (backend.to_numpy(x).astype(np.float64) for x in (q, k, v, w))  # as rounded
    mask = backend.asarray(mask_n, None)
    fmap, fq, fk = _features(backend, name, qn, kn)
    kernel = oracles.exp_kernel_attention if name in ("sikf", "favor") else oracles.kernel_attention
    out = backend.call(
        _masked_with_bias,
        q,
        k,
        v,
        mask,
        w,
        feature_map=fmap,
        causal=causal,
        chunk_size=3,
        rpb_skip=(1, 0),
        cu_seqlens=_offsets(backend, offsets),
    )

    def one(a, b):
        vm = np.where(mask_n[:, a:b, None], vn[:, a:b], 0.0)
        att = kernel(fq[:, a:b], fk[:, a:b], vn[:, a:b], causal=causal, key_mask=mask_n[:, a:b], eps=1e-6)
        return att + oracles.rpb(vm, wn, causal=causal, skip=(1, 0))

    assert_close(backend, out, _per_sequence(offsets, one), dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_softmax_and_rpb_match_separate_oracles(backend, dtype, rng, causal):
    offsets = _random_offsets(rng)
    T = int(offsets[-1])
    qn, kn, vn = (rng.standard_normal((3, T, 4)) for _ in range(3))
    wn = rng.standard_normal((2 * 9 - 1,))
    q, k, v, w = (backend.asarray(x, dtype) for x in (qn, kn, vn, wn))
    qn, kn, vn, wn = (backend.to_numpy(x).astype(np.float64) for x in (q, k, v, w))
    cu = backend.asarray(offsets, None)
    out = softmax_attention(q, k, v, causal=causal, cu_seqlens=cu, scale=0.5)
    expected = _per_sequence(
        offsets, lambda a, b: oracles.softmax_attention(qn[:, a:b], kn[:, a:b], vn[:, a:b], causal=causal, scale=0.5)
    )
    assert_close(backend, out, expected, dtype)
    skip = (0, 1)  # every sequence has at least one token
    out = rpb(v, w, causal=causal, skip=skip, cu_seqlens=cu)
    assert_close(
        backend, out, _per_sequence(offsets, lambda a, b: oracles.rpb(vn[:, a:b], wn, causal=causal, skip=skip)), dtype
    )


@pytest.mark.parametrize("name", ["elu", "sikf"])
def test_packed_states_continue_each_sequence(backend, rng, name):
    offsets = _random_offsets(rng, n=4)
    T = int(offsets[-1])
    qn, kn, vn = (rng.standard_normal((2, T + 4, 3)) for _ in range(3))
    q, k, v = (backend.asarray(x, "float64") for x in (qn, kn, vn))
    _, state = backend.call(
        linear_attention,
        q[:, :T, :],
        k[:, :T, :],
        v[:, :T, :],
        feature_map=name,
        causal=True,
        chunk_size=2,
        cu_seqlens=_offsets(backend, offsets),
        return_state=True,
    )
    assert tuple(state.S.shape)[:2] == (len(offsets) - 1, 2)  # a new leading axis N
    for n, (a, b) in enumerate(itertools.pairwise(offsets)):
        one = LinearAttentionState(
            S=state.S[n, ...],
            z=state.z[n, ...],
            offset=None if state.offset is None else state.offset[n, ...],
            feature_map=state.feature_map,
        )
        # the next token of sequence n continues it: oracle over its tokens and the new one
        idx = [*range(a, b), T]
        fq = qn[:, idx] if name == "sikf" else oracles.elu1(qn[:, idx])
        fk = kn[:, idx] if name == "sikf" else oracles.elu1(kn[:, idx])
        kernel = oracles.exp_kernel_attention if name == "sikf" else oracles.kernel_attention
        expected = kernel(fq, fk, vn[:, idx], causal=True, eps=1e-6)[:, -1]
        out, _ = linear_attention_step(one, q[:, T, :], k[:, T, :], v[:, T, :], feature_map=name)
        assert_close(backend, out, expected, "float64")


@pytest.mark.grad
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_gradients(backend, causal):
    rng = np.random.default_rng(4)
    offsets = np.array([0, 1, 4, 6])
    qn, kn, vn = (rng.standard_normal((1, 6, 2)) for _ in range(3))
    wn = rng.standard_normal((7,))

    def fn(q, k, v, w):  # static offsets: the gradient check runs under jax.jit
        return linear_attention(q, k, v, causal=causal, chunk_size=2, rpb=w, cu_seqlens=tuple(offsets.tolist()))

    check_gradients(backend, fn, qn, kn, vn, wn, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("offsets", "error", "match"),
    [
        (np.array([0, 3, 2, 6]), ValueError, "non-decreasing"),
        (np.array([1, 3, 6]), ValueError, "start at 0"),
        (np.array([0, 3, 5]), ValueError, "end at T"),
        (np.array([0.0, 3.0, 6.0]), TypeError, "integer"),
        (np.array([[0, 6]]), ValueError, r"shape \(N \+ 1,\)"),
        (np.array([0]), ValueError, r"shape \(N \+ 1,\)"),
        ((0, 4, 3, 6), ValueError, "non-decreasing"),
        ((0, 2.5, 6), TypeError, "int"),
    ],
    ids=[
        "decreasing",
        "not-from-zero",
        "not-to-T",
        "float-dtype",
        "two-d",
        "no-sequence",
        "static-decreasing",
        "static-float",
    ],
)
@pytest.mark.parametrize("fn", ["linear_attention", "softmax_attention", "rpb"])
def test_packed_errors(backend, offsets, error, match, fn):
    x = backend.asarray(np.ones((6, 2)), "float64")
    cu = offsets if isinstance(offsets, tuple) else backend.asarray(offsets, None)
    pattern = f"cu_seqlens.*{match}|{match}.*cu_seqlens" if error is ValueError else "cu_seqlens"
    if fn == "rpb":
        w = backend.asarray(np.ones(11), "float64")
        with pytest.raises(error, match=pattern):
            rpb(x, w, cu_seqlens=cu)
    else:
        with pytest.raises(error, match=pattern):
            getattr(fastrpb, fn)(x, x, x, cu_seqlens=cu)


# zero-length sequences (empty documents, packing to a fixed number of slots), as
# flash-attn and fla accept them: offsets need only be non-decreasing
EMPTY = {
    "first-empty": (0, 0, 3, 5, 9),
    "last-empty": (0, 3, 5, 9, 9),
    "consecutive-empty": (0, 3, 3, 3, 6, 9),
    "one-token-between-empty": (0, 0, 1, 1, 9),
    "all-empty-but-one": (0, 0, 9, 9),
}


# elsewhere than NumPy and array-api-strict: the zero-length sequences first, last
# (all-empty-but-one) and in a run between others (consecutive-empty)
EMPTY_SUBSET = ("all-empty-but-one", "consecutive-empty")


@pytest.mark.subset(lambda case, **_: case in EMPTY_SUBSET)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(EMPTY))
def test_packed_empty_sequences_match_separate_oracles(backend, rng, case, causal):
    offsets = EMPTY[case]
    T = offsets[-1]
    qn, kn, vn = (rng.standard_normal((2, T, 3)) * 0.7 for _ in range(3))
    mask_n = rng.random((2, T)) > 0.2
    wn = rng.standard_normal((2, 2 * 9 - 1))
    q, k, v, w = (backend.asarray(x, "float64") for x in (qn, kn, vn, wn))
    skip = (1, 0) if causal else (0, 1)  # every non-empty sequence skips a token; an empty one has none
    for cu in (offsets, backend.asarray(np.array(offsets), None)):  # static and array offsets
        out = linear_attention(
            q,
            k,
            v,
            feature_map="elu",
            causal=causal,
            key_mask=backend.asarray(mask_n, None),
            chunk_size=2,
            rpb=w,
            cu_seqlens=cu,
        )

        def one(a, b):
            vm = np.where(mask_n[:, a:b, None], vn[:, a:b], 0.0)
            att = oracles.kernel_attention(
                oracles.elu1(qn[:, a:b]),
                oracles.elu1(kn[:, a:b]),
                vn[:, a:b],
                causal=causal,
                key_mask=mask_n[:, a:b],
                eps=1e-6,
            )
            return att + oracles.rpb(vm, wn, causal=causal)

        assert_close(backend, out, _per_sequence(offsets, one), "float64")
        out = softmax_attention(q, k, v, causal=causal, cu_seqlens=cu, scale=0.5)
        expected = _per_sequence(
            offsets,
            lambda a, b: oracles.softmax_attention(qn[:, a:b], kn[:, a:b], vn[:, a:b], causal=causal, scale=0.5),
        )
        assert_close(backend, out, expected, "float64")
        out = rpb(v, w[0, ...], causal=causal, skip=skip, cu_seqlens=cu)
        expected = _per_sequence(
            offsets, lambda a, b: oracles.rpb(vn[:, a:b], wn[0], causal=causal, skip=skip if b > a else (0, 0))
        )
        assert_close(backend, out, expected, "float64")


@pytest.mark.subset(lambda case, **_: case in EMPTY_SUBSET)
@pytest.mark.parametrize("name", ["elu", "sikf"])
@pytest.mark.parametrize("case", list(EMPTY))
def test_packed_empty_sequences_get_the_empty_state(backend, rng, case, name):
    """The state of a zero-length sequence is the empty one: its next token attends to itself alone."""
    offsets = EMPTY[case]
    T = offsets[-1]
    qn, kn, vn = (rng.standard_normal((2, T + 1, 3)) for _ in range(3))
    q, k, v = (backend.asarray(x, "float64") for x in (qn, kn, vn))
    _, state = linear_attention(
        q[:, :T, :],
        k[:, :T, :],
        v[:, :T, :],
        feature_map=name,
        causal=True,
        chunk_size=2,
        cu_seqlens=offsets,
        return_state=True,
    )
    assert tuple(state.S.shape)[:2] == (len(offsets) - 1, 2)
    kernel = oracles.exp_kernel_attention if name == "sikf" else oracles.kernel_attention
    for n, (a, b) in enumerate(itertools.pairwise(offsets)):
        one = LinearAttentionState(
            S=state.S[n, ...],
            z=state.z[n, ...],
            offset=None if state.offset is None else state.offset[n, ...],
            feature_map=state.feature_map,
        )
        idx = [*range(a, b), T]
        fq = qn[:, idx] if name == "sikf" else oracles.elu1(qn[:, idx])
        fk = kn[:, idx] if name == "sikf" else oracles.elu1(kn[:, idx])
        expected = kernel(fq, fk, vn[:, idx], causal=True, eps=1e-6)[:, -1]
        out, _ = linear_attention_step(one, q[:, T, :], k[:, T, :], v[:, T, :], feature_map=name)
        assert_close(backend, out, expected, "float64")


def test_packed_offsets_from_another_library(backend):
    x = backend.asarray(np.ones((6, 2)), "float64")
    with pytest.raises(TypeError, match="cu_seqlens"):
        linear_attention(x, x, x, cu_seqlens=backend.foreign(np.array([0, 6])))


@pytest.mark.jit
def test_packed_traced_offsets_are_an_error(backend):
    x = backend.asarray(np.ones((6, 2)), "float64")

    def f(cu):
        return linear_attention(x, x, x, cu_seqlens=cu)

    with pytest.raises(ValueError, match="cu_seqlens must be concrete"):
        backend.compile(f)(backend.asarray(np.array([0, 2, 6]), None))
    static = backend.compile(lambda q: linear_attention(q, q, q, cu_seqlens=(0, 2, 6)))(x)
    np.testing.assert_allclose(backend.to_numpy(static), 1.0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_packed_layer_forward_equals_separate_calls(framework, causal):
    """The layers' forward with cu_seqlens equals the layer on each sequence alone."""
    from test_layers import Framework, _backend

    fw = Framework("torch" if framework == "torch" else "flax", _backend("torch" if framework == "torch" else "jax"))
    layer = fw.mha(causal=causal, rpb=fw.bias(3, 16, causal=causal, skip=(1, 0)))
    offsets = _random_offsets(np.random.default_rng(7), n=3)  # each length compiles on Flax
    x_n = np.random.default_rng(8).standard_normal((1, int(offsets[-1]), 12))
    x = fw.array(x_n)
    packed = layer(x, cu_seqlens=fw.mask(offsets))
    # each sequence alone: compiled for Flax (one compilation per length, not per operation)
    separate = np.concatenate(
        [fw.numpy(fw.forward(layer, fw.array(x_n[:, a:b]))) for a, b in itertools.pairwise(offsets)], axis=-2
    )
    np.testing.assert_allclose(fw.numpy(packed), separate, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x, cu_seqlens=fw.mask(offsets), inputs_k=x)
    # zero-length sequences: first, consecutive and last
    empty = np.concatenate([[0, 0], offsets[1:3], offsets[2:3], offsets[3:], offsets[-1:]])
    packed = layer(x, cu_seqlens=fw.mask(empty))
    np.testing.assert_allclose(fw.numpy(packed), separate, rtol=1e-10, atol=1e-12)
