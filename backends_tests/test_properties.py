"""Property-based tests (hypothesis) of the attention functions on every backend.

Random shapes (zeros and ones included), dtypes, feature maps, key
masks, chunk sizes and split points, each compared with the float64 dense oracles of
``oracles.py``; and the non-finite policy: a NaN or infinity at a later token leaves
every earlier causal output unchanged, one at a masked position leaves every output
unchanged.
"""

from __future__ import annotations

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

import oracles
from backends_tests.backends import property_test, tolerance
from fastrpb import feature_maps as fm
from fastrpb import (
    linear_attention,
    linear_attention_step,
    random_projection,
    rpb_init,
    softmax_attention,
)

#: Hypothesis examples per test (``property_test``: fewer on JAX)
EXAMPLES = 25
#: the least batch, length and width drawn: zero-size inputs are part of every property
LOW = 0

#: maps whose features are positive (denominators bounded away from zero): compared in
#: every dtype; relu and dpfp features can all vanish for a query, so they are compared
#: in float64 only, where a tiny denominator is still exact.
POSITIVE = ("elu", "sikf", "favor")
MAPS = (*POSITIVE, "relu", "dpfp")
BAD = (np.nan, np.inf, -np.inf)

lead_shapes = st.sampled_from([(), (1,), (2,), (2, 1), (0,), (0, 2)])
lengths = st.integers(LOW, 13)
widths = st.integers(LOW, 4)


def _map(backend, name, dk):
    """(feature_map argument, oracle(qn, kn, vn, **kw)) for the map ``name``."""
    if name == "favor":
        w = random_projection(6, max(dk, 1), seed=3, like=backend.asarray(np.zeros(1)))
        wn = backend.to_numpy(w)
        return fm.favor(w), lambda q, k, v, **kw: oracles.exp_kernel_attention(
            oracles.favor_log(q, wn), oracles.favor_log(k, wn), v, **kw
        )
    if name == "sikf":
        return name, oracles.exp_kernel_attention
    phi = {"elu": oracles.elu1, "relu": oracles.relu, "dpfp": oracles.dpfp}[name]
    return name, lambda q, k, v, **kw: oracles.kernel_attention(phi(q), phi(k), v, **kw)


def _dtype(data, backend, name):
    choices = [d for d in backend.dtypes if name in POSITIVE or d == "float64"]
    return data.draw(st.sampled_from(choices), label="dtype")


def _arrays(backend, rng, dtype, *shapes):
    """Backend arrays of ``dtype`` and the float64 NumPy copies the oracle sees."""
    arrays = [backend.asarray(rng.standard_normal(s), dtype) for s in shapes]
    return arrays, [backend.to_numpy(a).astype(np.float64) for a in arrays]


def _mask(data, lead, L):
    bits = data.draw(
        st.lists(
            st.booleans(),
            min_size=int(np.prod(lead, dtype=int)) * L,
            max_size=int(np.prod(lead, dtype=int)) * L,
        ),
        label="mask",
    )
    return np.asarray(bits, dtype=bool).reshape((*lead, L))


# The properties run through ``Backend.call``: on JAX each example's new shapes compile
# once as one program (eager JAX compiles every operation anew, about 3x the time); the
# eager path keeps the fixed-case tests (test_attention, test_numerics, test_state).
def _linear(q, k, v, key_mask, rpb, **options):
    return linear_attention(q, k, v, key_mask=key_mask, rpb=rpb, **options)


def _softmax(q, k, v, key_mask, rpb, **options):
    return softmax_attention(q, k, v, key_mask=key_mask, rpb=rpb, **options)


def _check(backend, got, expected, dtype):
    got = backend.to_numpy(got) if not isinstance(got, np.ndarray) else got
    assert got.shape == expected.shape, f"shape {got.shape} != expected {expected.shape}"
    tol = tolerance(dtype)
    scale = float(np.max(np.abs(expected))) if expected.size else 1.0
    np.testing.assert_allclose(got, expected, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-30))


# ----------------------------------------------------------------- against the oracles
@property_test(
    EXAMPLES,
    data=st.data(),
    lead=lead_shapes,
    L=lengths,
    dk=widths,
    dv=widths,
    chunk=st.integers(1, 8),
    name=st.sampled_from(MAPS),
    causal=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_attention_property(backend, data, lead, L, dk, dv, chunk, name, causal, masked, seed):
    assume(name != "favor" or dk > 0)  # a projection (m, d) has d >= 1
    rng = np.random.default_rng(seed)
    dtype = _dtype(data, backend, name)
    (q, k, v), (qn, kn, vn) = _arrays(backend, rng, dtype, (*lead, L, dk), (*lead, L, dk), (*lead, L, dv))
    mask = _mask(data, lead, L) if masked else None
    fmap, oracle = _map(backend, name, dk)
    km = None if mask is None else backend.asarray(mask, None)
    out = backend.call(_linear, q, k, v, km, None, feature_map=fmap, causal=causal, chunk_size=chunk)
    assert out.dtype == q.dtype
    _check(backend, out, oracle(qn, kn, vn, causal=causal, key_mask=mask, eps=1e-6), dtype)


@property_test(
    EXAMPLES,
    data=st.data(),
    lead=lead_shapes,
    Lq=lengths,
    Lk=lengths,
    dk=widths,
    dv=widths,
    causal=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_softmax_attention_property(backend, data, lead, Lq, Lk, dk, dv, causal, masked, seed):
    rng = np.random.default_rng(seed)
    Lk = Lq if causal else Lk
    dtype = _dtype(data, backend, "elu")
    (q, k, v), (qn, kn, vn) = _arrays(backend, rng, dtype, (*lead, Lq, dk), (*lead, Lk, dk), (*lead, Lk, dv))
    mask = _mask(data, lead, Lk) if masked else None
    km = None if mask is None else backend.asarray(mask, None)
    out = backend.call(_softmax, q, k, v, km, None, causal=causal)
    _check(
        backend,
        out,
        oracles.softmax_attention(qn, kn, vn, causal=causal, key_mask=mask, scale=1.0 if dk == 0 else None),
        dtype,
    )


@property_test(
    EXAMPLES,
    data=st.data(),
    L=st.integers(1, 13),
    split=st.integers(0, 13),
    chunk=st.integers(1, 8),
    name=st.sampled_from(MAPS),
    seed=st.integers(0, 2**16),
)
def test_prefill_then_decode_property(backend, data, L, split, chunk, name, seed):
    """Causal attention over the first ``split`` tokens, then one step per token, is
    causal attention over the whole sequence, whatever the split and the chunk size."""
    rng = np.random.default_rng(seed)
    split = min(split, L)
    dtype = _dtype(data, backend, name)
    (q, k, v), (qn, kn, vn) = _arrays(backend, rng, dtype, (2, L, 3), (2, L, 3), (2, L, 2))
    fmap, oracle = _map(backend, name, 3)
    expected = oracle(qn, kn, vn, causal=True, eps=1e-6)

    def decode(q, k, v):
        state, outs = None, []
        if split:
            out, state = linear_attention(
                q[:, :split, :],
                k[:, :split, :],
                v[:, :split, :],
                feature_map=fmap,
                causal=True,
                chunk_size=chunk,
                return_state=True,
            )
            outs.append(out)
        for t in range(split, L):
            out_t, state = linear_attention_step(state, q[:, t, :], k[:, t, :], v[:, t, :], feature_map=fmap)
            outs.append(out_t[:, None, :])
        return outs

    outs = backend.call(decode, q, k, v)
    if split:
        _check(backend, outs[0], expected[:, :split], dtype)
    for t, out_t in zip(range(split, L), outs[1 if split else 0 :], strict=True):
        _check(backend, out_t[:, 0, :], expected[:, t], dtype)


# ----------------------------------------------------------------- non-finite policy
@property_test(
    EXAMPLES,
    data=st.data(),
    L=st.integers(2, 13),
    chunk=st.integers(1, 8),
    name=st.sampled_from((*MAPS, "softmax")),
    where=st.sampled_from(["q", "k", "v"]),
    bad=st.sampled_from(BAD),
    seed=st.integers(0, 2**16),
)
def test_later_tokens_never_reach_earlier_outputs(backend, data, L, chunk, name, where, bad, seed):
    """Poison token ``j`` (one entry of its query, key or value) with NaN or an
    infinity: every causal output before ``j`` (for a query: every other output) is the
    oracle's for the clean inputs."""
    rng = np.random.default_rng(seed)
    j = data.draw(st.integers(1, L - 1), label="j")
    shapes = {"q": (2, L, 3), "k": (2, L, 3), "v": (2, L, 2)}
    clean = {n: rng.standard_normal(s) for n, s in shapes.items()}
    poisoned = dict(clean)
    poisoned[where] = clean[where].copy()
    poisoned[where][..., j, data.draw(st.integers(0, shapes[where][-1] - 1), label="column")] = bad
    q, k, v = (backend.asarray(poisoned[n]) for n in "qkv")
    # rows from j on are NaN on purpose (inf - inf, 0 * inf): NumPy's "invalid value"
    # warnings say just that
    with np.errstate(invalid="ignore"):
        if name == "softmax":
            out = backend.call(_softmax, q, k, v, None, None, causal=True)
            expected = oracles.softmax_attention(clean["q"], clean["k"], clean["v"], causal=True)
        else:
            fmap, oracle = _map(backend, name, 3)
            out = backend.call(_linear, q, k, v, None, None, feature_map=fmap, causal=True, chunk_size=chunk)
            expected = oracle(clean["q"], clean["k"], clean["v"], causal=True, eps=1e-6)
        out = backend.to_numpy(out)
    kept = [i for i in range(L) if i != j] if where == "q" else list(range(j))
    _check(backend, out[:, kept], expected[:, kept], "float64")


@property_test(
    EXAMPLES,
    data=st.data(),
    lead=st.sampled_from([(), (1,), (2,)]),
    L=st.integers(1, 13),
    chunk=st.integers(1, 8),
    name=st.sampled_from((*MAPS, "softmax")),
    causal=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_masked_positions_never_reach_any_output(backend, data, lead, L, chunk, name, causal, bias, seed):
    """NaN and infinities in the keys and values of masked positions change no output,
    the FastRPB term included."""
    rng = np.random.default_rng(seed)
    qn, kn, vn = (rng.standard_normal((*lead, L, 3)) for _ in range(3))
    mask = _mask(data, lead, L)
    pick = st.sampled_from(BAD)
    k_bad, v_bad = kn.copy(), vn.copy()
    for index in zip(*np.nonzero(~mask), strict=False):
        k_bad[(*index, data.draw(st.integers(0, 2), label="k column"))] = data.draw(pick, label="k value")
        v_bad[(*index, data.draw(st.integers(0, 2), label="v column"))] = data.draw(pick, label="v value")
    q, k, v, km = (
        backend.asarray(qn),
        backend.asarray(k_bad),
        backend.asarray(v_bad),
        backend.asarray(mask, None),
    )
    w = rpb_init(None, L, seed=seed, like=q, scale=0.3) if bias else None
    if name == "softmax":
        out = backend.call(_softmax, q, k, v, km, w, causal=causal)
        expected = oracles.softmax_attention(qn, kn, vn, causal=causal, key_mask=mask)
    else:
        fmap, oracle = _map(backend, name, 3)
        out = backend.call(_linear, q, k, v, km, w, feature_map=fmap, causal=causal, chunk_size=chunk)
        expected = oracle(qn, kn, vn, causal=causal, key_mask=mask, eps=1e-6)
    if bias:
        expected = expected + oracles.toeplitz(backend.to_numpy(w), L, causal=causal) @ np.where(
            mask[..., None], vn, 0.0
        )
    _check(backend, out, expected, "float64")
