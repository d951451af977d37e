"""Streaming causal FastRPB (``rpb(..., initial_state=, return_state=)``, ``rpb_step``)
against the float64 dense causal Toeplitz oracle, on every backend."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import fastrpb
import oracles
from backends_tests.backends import assert_close, compile_counter

# lengths that cross the online convolution's block boundaries (blocks of 32, 64, ...)
LENGTHS = [1, 2, 3, 63, 64, 65, 1000]
PRECISIONS = ["float64", "float32"]


def causal_oracle(v, w, skip=(0, 0)):
    """Dense float64 ``B @ v`` with the causal Toeplitz ``B`` (leading dims of w broadcast)."""
    L = v.shape[-2]
    return oracles.toeplitz(w, L, causal=True, skip=skip) @ v


def scale_of(expected, L):
    return float(np.abs(expected).max()) + L**0.5


def step_all(backend, v, w, *, state=None, skip=None, start=0):
    """Feed tokens ``start..`` of ``v (..., L, D)`` one by one; outputs stacked on axis -2."""
    xp = backend.xp
    outs = []
    for t in range(start, v.shape[-2]):
        kwargs = {"skip": skip} if (skip is not None and state is None) else {}
        o, state = fastrpb.rpb_step(state, v[..., t, :], w, **kwargs)
        outs.append(o)
    return (xp.stack(outs, axis=-2) if outs else None), state


# ----------------------------------------------------------------- online convolution
# The lengths and splits lay out blocks from the shapes alone, the same code on every
# backend: every case on NumPy and array-api-strict; elsewhere (eager JAX compiles each
# operation for every new shape, seconds a case) a few that hold each precision, an
# empty or one-token start and a block boundary; the stepping over many levels is
# test_stepping_300_tokens_equals_the_causal_call's and
# test_state_layout_is_fixed_after_any_count's.
@pytest.mark.subset(lambda L, precision: (L, precision) in {(1, "float64"), (65, "float32")})
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("L", LENGTHS)
def test_steps_match_dense(backend, rng, L, precision):
    M = L + 5
    v = rng.standard_normal((2, L, 3))
    w = rng.standard_normal((2 * M - 1,))
    expected = causal_oracle(v, w)
    got, state = step_all(backend, backend.asarray(v, precision), backend.asarray(w, precision))
    assert got.dtype == backend.dtype(precision)
    assert_close(backend, got, expected, precision, scale=scale_of(expected, L))
    assert isinstance(state, fastrpb.RPBState)


@pytest.mark.subset(lambda L, precision: (L, precision) in {(1, "float64"), (64, "float32"), (65, "float64")})
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("L", [1, 2, 63, 64, 65, 300])
def test_prefill_then_steps_match_dense(backend, rng, L, precision):
    # a chunk builds the online state, steps continue it
    M = L
    v = rng.standard_normal((2, L, 4))
    w = rng.standard_normal((2, 2 * M - 1))  # a table per head, values (heads, L, D)
    expected = causal_oracle(v, w)
    vb, wb = backend.asarray(v, precision), backend.asarray(w, precision)
    h = L // 2
    first, state = fastrpb.rpb(vb[..., :h, :], wb, causal=True, return_state=True)
    rest, _ = step_all(backend, vb, wb, state=state, start=h)
    got = first if rest is None else backend.xp.concat([first, rest], axis=-2)
    assert_close(backend, got, expected, precision, scale=scale_of(expected, L))


def test_half_precision_is_computed_in_float32(backend, rng, dtype):
    # the state is kept in the compute dtype; outputs come back in the input dtype
    L, M = 40, 48  # crosses one block boundary
    v = rng.standard_normal((2, L, 3))
    w = rng.standard_normal((2 * M - 1,)) / 4
    expected = causal_oracle(v, w)
    vb, wb = backend.asarray(v, dtype), backend.asarray(w, dtype)
    first, state = fastrpb.rpb(vb[..., :5, :], wb, causal=True, return_state=True)
    rest, state = step_all(backend, vb, wb, state=state, start=5)
    assert first.dtype == rest.dtype == backend.dtype(dtype)
    work = backend.dtype("float64" if dtype == "float64" else "float32")
    assert state.window.dtype == work
    assert all(x.dtype == work for x in (*state.blocks, *state.future, state.near))
    got = backend.xp.concat([first, rest], axis=-2)
    assert_close(backend, got, expected, dtype, scale=scale_of(expected, L))


SPLITS = {
    "empty-and-size-1": [0, 0, 1, 2, 2, 33, 64, 64, 65, 130, 200],
    "one-piece": [0, 200],
    "at-every-block": [0, 32, 64, 96, 128, 160, 192, 200],
    "off-block": [0, 31, 97, 199, 200],
}


# elsewhere the split with empty, one-token and off-block pieces, in float32 (each piece
# length is a new shape for eager JAX: 33 s a split on a loaded CPU)
@pytest.mark.subset(lambda split, precision: split == "empty-and-size-1" and precision == "float32")
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("split", list(SPLITS))
def test_chunks_match_one_call(backend, rng, split, precision):
    cuts = SPLITS[split]
    L, M = cuts[-1], 256
    v = rng.standard_normal((2, L, 3))
    w = rng.standard_normal((2 * M - 1,))
    expected = causal_oracle(v, w)
    vb, wb = backend.asarray(v, precision), backend.asarray(w, precision)
    state, parts = None, []
    for c0, c1 in itertools.pairwise(cuts):
        out, state = fastrpb.rpb(vb[..., c0:c1, :], wb, causal=True, initial_state=state, return_state=True)
        assert out.shape == (2, c1 - c0, 3)
        parts.append(out)
    assert_close(backend, backend.xp.concat(parts, axis=-2), expected, precision, scale=scale_of(expected, L))
    # the final state continues the sequence
    more = rng.standard_normal((2, 40, 3))
    tail = fastrpb.rpb(backend.asarray(more, precision), wb, causal=True, initial_state=state)
    full = causal_oracle(np.concatenate([v, more], axis=-2), w)
    assert_close(backend, tail, full[..., L:, :], precision, scale=scale_of(full, L + 40))


def test_stepping_300_tokens_equals_the_causal_call(backend, rng):
    L = 300
    v = rng.standard_normal((2, 3, L, 5))  # (batch, heads, L, D)
    w = rng.standard_normal((3, 2 * L - 1))  # per-head table, M = L
    got, _ = step_all(backend, backend.asarray(v), backend.asarray(w))
    assert_close(backend, got, causal_oracle(v, w), "float64")


def test_a_state_is_never_changed_by_later_steps(backend, rng):
    # branch twice from one state (beam search): both continuations are exact
    L, M = 80, 100
    v = rng.standard_normal((L, 2))
    w = rng.standard_normal((2 * M - 1,))
    vb, wb = backend.asarray(v), backend.asarray(w)
    _, state = fastrpb.rpb(vb[:31, :], wb, causal=True, return_state=True)
    for _ in range(2):
        got, _ = step_all(backend, vb, wb, state=state, start=31)
        assert_close(backend, got, causal_oracle(v, w)[31:], "float64")


# elsewhere the skip that reaches past the first pieces and a block
@pytest.mark.subset(lambda a: a == 40)
@pytest.mark.parametrize("a", [1, 5, 40])
def test_skip_counts_from_the_sequence_start(backend, rng, a):
    L, M = 90, 90
    v = rng.standard_normal((L, 3))
    w = rng.standard_normal((2 * M - 1,))
    expected = causal_oracle(v, w, skip=(a, 0))
    vb, wb = backend.asarray(v), backend.asarray(w)
    got, _ = step_all(backend, vb, wb, skip=(a, 0))
    assert_close(backend, got, expected, "float64")
    state, parts = None, []
    for c0, c1 in zip([0, 2, 3, 50], [2, 3, 50, L], strict=True):
        out, state = fastrpb.rpb(vb[c0:c1, :], wb, causal=True, skip=(a, 0), initial_state=state, return_state=True)
        parts.append(out)
    assert_close(backend, backend.xp.concat(parts, axis=-2), expected, "float64")


# ----------------------------------------------------------------- jit
def _jax(backend):
    if backend.jit is None or backend.grad != "jax":
        pytest.skip(f"{backend.name} has no jax.jit")
    return backend.native


def test_scan_decoding_loop_under_jit(backend, rng):
    jax = _jax(backend)
    xp = backend.xp
    L, M, a = 70, 80, 2
    v = rng.standard_normal((2, L, 3))
    w = rng.standard_normal((2, 2 * M - 1))

    @jax.jit
    def generate(v, w):
        out, state = fastrpb.rpb(v[..., :20, :], w, causal=True, skip=(a, 0), return_state=True)

        def body(state, v_t):
            o, state = fastrpb.rpb_step(state, v_t, w)
            return state, o

        state, outs = jax.lax.scan(body, state, xp.moveaxis(v[..., 20:, :], -2, 0))
        return xp.concat([out, xp.moveaxis(outs, 0, -2)], axis=-2), state

    got, state = generate(backend.asarray(v), backend.asarray(w))
    assert_close(backend, got, causal_oracle(v, w, skip=(a, 0)), "float64")
    # the traced state continues eagerly
    more = rng.standard_normal((2, 5, 3))
    tail = fastrpb.rpb(backend.asarray(more), backend.asarray(w), causal=True, skip=(a, 0), initial_state=state)
    full = causal_oracle(np.concatenate([v, more], axis=-2), w, skip=(a, 0))
    assert_close(backend, tail, full[..., L:, :], "float64")


def test_jitted_step_continues_an_eager_prefill(backend, rng):
    jax = _jax(backend)
    L, M = 50, 64
    v = rng.standard_normal((L, 3))
    w = rng.standard_normal((2 * M - 1,))
    vb, wb = backend.asarray(v), backend.asarray(w)
    first, state = fastrpb.rpb(vb[:33, :], wb, causal=True, return_state=True)
    step = jax.jit(fastrpb.rpb_step)
    outs = [first]
    for t in range(33, L):
        o, state = step(state, vb[t, :], wb)
        outs.append(o[None, :])
    assert_close(backend, backend.xp.concat(outs, axis=0), causal_oracle(v, w), "float64")


def test_jitted_chunk_continues_eager_equal_pieces(backend, rng):
    # eager pieces of one size keep their spectra and their values in pieces; a traced
    # chunk joins and pads them into the fixed layout, then traced steps continue
    jax = _jax(backend)
    L, M = 70, 80
    v = rng.standard_normal((2, L, 3))
    w = rng.standard_normal((2, 2 * M - 1))
    vb, wb = backend.asarray(v), backend.asarray(w)
    state, outs = None, []
    for a, b in ((0, 16), (16, 32), (32, 48)):
        o, state = fastrpb.rpb(vb[..., a:b, :], wb, causal=True, initial_state=state, return_state=True)
        outs.append(o)
    chunk = jax.jit(lambda x, w, s: fastrpb.rpb(x, w, causal=True, initial_state=s, return_state=True))
    o, state = chunk(vb[..., 48:60, :], wb, state)
    outs.append(o)
    step = jax.jit(fastrpb.rpb_step)
    for t in range(60, L):
        o, state = step(state, vb[..., t, :], wb)
        outs.append(o[..., None, :])
    assert_close(backend, backend.xp.concat(outs, axis=-2), causal_oracle(v, w), "float64")


def test_past_the_table_under_jit_is_nan(backend, rng):
    # no error can be raised from traced values: the output says it instead
    jax = _jax(backend)
    M = 3
    v = rng.standard_normal((M + 1, 2))
    w = rng.standard_normal((2 * M - 1,))
    vb, wb = backend.asarray(v), backend.asarray(w)
    _, state = jax.jit(lambda x, w: fastrpb.rpb(x, w, causal=True, return_state=True))(vb[:M, :], wb)
    out, _ = jax.jit(fastrpb.rpb_step)(state, vb[M, :], wb)
    assert np.all(np.isnan(backend.to_numpy(out)))


def test_a_traced_state_past_the_table_raises_eagerly(backend, rng):
    jax = _jax(backend)
    M = 4
    v = backend.asarray(rng.standard_normal((M + 1, 2)))
    w = backend.asarray(rng.standard_normal((2 * M - 1,)))
    _, state = jax.jit(lambda x, w: fastrpb.rpb(x, w, causal=True, return_state=True))(v[:3, :], w)
    with pytest.raises(ValueError, match="position past the bias table w"):
        fastrpb.rpb(v[3:, :], w, causal=True, initial_state=state)
    _, state = fastrpb.rpb_step(state, v[3, :], w)
    with pytest.raises(ValueError, match="position past the bias table w"):
        fastrpb.rpb_step(state, v[4, :], w)


def test_a_state_of_another_library_is_a_type_error(backend, rng):
    import array_api_strict

    M = 40
    v = rng.standard_normal((M, 3))
    w = rng.standard_normal((2 * M - 1,))
    other = array_api_strict if backend.name == "numpy" else np  # a library that is not the backend's
    _, state = fastrpb.rpb(other.asarray(v[:33]), other.asarray(w), causal=True, return_state=True)
    vb, wb = backend.asarray(v), backend.asarray(w)
    with pytest.raises(TypeError, match="one array library"):
        fastrpb.rpb_step(state, vb[33, :], wb)
    with pytest.raises(TypeError, match="one array library"):
        fastrpb.rpb(vb[33:, :], wb, causal=True, initial_state=state)


# ----------------------------------------------------------------- gradients
def _stream_loss(xp, v1, v2, w):
    """A loss through a state: prefill v1, continue with a chunk and two steps."""
    _, state = fastrpb.rpb(v1, w, causal=True, return_state=True)
    out, state = fastrpb.rpb(v2[:-2, :], w, causal=True, initial_state=state, return_state=True)
    o1, state = fastrpb.rpb_step(state, v2[-2, :], w)
    o2, _ = fastrpb.rpb_step(state, v2[-1, :], w)
    return xp.sum(xp.sin(out)) + xp.sum(o1 * o1) + xp.sum(xp.cos(o2))


def test_gradients_through_initial_state(backend, rng):
    # 33 + 5 tokens: the prefix completes an online block (32 tokens), then a chunk
    # and two steps
    M = 38
    v1 = rng.standard_normal((33, 1))
    v2 = rng.standard_normal((5, 1))
    w = rng.standard_normal((2 * M - 1,))
    if backend.grad == "torch":
        torch = backend.native
        args = [torch.tensor(x, dtype=torch.float64, device=backend.device, requires_grad=True) for x in (v1, v2, w)]
        assert torch.autograd.gradcheck(lambda a, b, c: _stream_loss(backend.xp, a, b, c), args)
    elif backend.grad == "jax":
        jax = backend.native
        # jitted so that the hundreds of evaluations compile once (under any JAX
        # transformation the state takes its fixed layout, eager or not)
        f = jax.jit(lambda a, b, c: _stream_loss(backend.xp, a, b, c))
        grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*(backend.asarray(x) for x in (v1, v2, w)))
        numeric = oracles.finite_differences(lambda *xs: float(f(*(backend.asarray(x) for x in xs))), v1, v2, w)
        for g, n in zip(grads, numeric, strict=True):
            np.testing.assert_allclose(backend.to_numpy(g), n, rtol=1e-6, atol=1e-6)
    else:
        pytest.skip(f"{backend.name} has no automatic differentiation")


# ----------------------------------------------------------------- errors
def _error_cases():
    """name -> (call(xp-arrays), exception, words the message must contain)."""

    def started(b, w, v, n=3, skip=(0, 0)):
        return fastrpb.rpb(v[:n, :], w, causal=True, skip=skip, return_state=True)[1]

    return {
        "initial_state-needs-causal": (
            lambda b, w, v: fastrpb.rpb(v[3:, :], w, initial_state=started(b, w, v)),
            ValueError,
            ["initial_state", "causal=True"],
        ),
        "return_state-needs-causal": (
            lambda b, w, v: fastrpb.rpb(v, w, causal=False, return_state=True),
            ValueError,
            ["return_state", "causal=True"],
        ),
        "skip-end-while-streaming": (
            lambda b, w, v: fastrpb.rpb(v, w, causal=True, skip=(1, 1), return_state=True),
            ValueError,
            ["skip", "skip[1] must be 0"],
        ),
        "skip-end-in-rpb_step": (
            lambda b, w, v: fastrpb.rpb_step(None, v[0, :], w, skip=(0, 2)),
            ValueError,
            ["skip", "skip[1] must be 0"],
        ),
        "past-the-table-in-one-chunk": (
            lambda b, w, v: fastrpb.rpb(v, w, causal=True, return_state=True),
            ValueError,
            ["position past the bias table w", "M = 4"],
        ),
        "past-the-table-in-a-later-chunk": (
            lambda b, w, v: fastrpb.rpb(v[3:5, :], w, causal=True, initial_state=started(b, w, v)),
            ValueError,
            ["position past the bias table w", "5 biased tokens", "M = 4"],
        ),
        "past-the-table-in-a-step": (
            lambda b, w, v: fastrpb.rpb_step(started(b, w, v, n=4), v[4, :], w),
            ValueError,
            ["position past the bias table w", "M = 4"],
        ),
        "state-of-another-table": (
            lambda b, w, v: fastrpb.rpb_step(started(b, w, v), v[3, :], b.xp.concat([w, w[:2]])),
            ValueError,
            ["state", "M = 4", "M = 5"],
        ),
        "state-of-another-skip": (
            lambda b, w, v: fastrpb.rpb(
                v[3:4, :], w, causal=True, skip=(2, 0), initial_state=started(b, w, v, skip=(1, 0))
            ),
            ValueError,
            ["initial_state", "skip = (1, 0)", "(2, 0)"],
        ),
        "state-of-another-width": (
            lambda b, w, v: fastrpb.rpb_step(started(b, w, v), v[3, :2], w),
            ValueError,
            ["state", "D = 3", "D = 2"],
        ),
        "state-of-another-batch": (
            lambda b, w, v: fastrpb.rpb(b.xp.stack([v[3:4, :]] * 2), w, causal=True, initial_state=started(b, w, v)),
            ValueError,
            ["initial_state", "leading shape"],
        ),
        "initial_state-not-a-state": (
            lambda b, w, v: fastrpb.rpb(v, w, causal=True, initial_state=(1, 2)),
            TypeError,
            ["initial_state", "RPBState", "tuple"],
        ),
        "rpb_step-state-not-a-state": (
            lambda b, w, v: fastrpb.rpb_step("state", v[0, :], w),
            TypeError,
            ["state", "RPBState", "str"],
        ),
        "rpb_step-0-d-token": (
            lambda b, w, v: fastrpb.rpb_step(None, b.xp.reshape(v[0, :1], ()), w),
            ValueError,
            ["v_t", "0-d"],
        ),
    }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_streaming_errors(backend, rng, case):
    call, kind, words = _error_cases()[case]
    M = 4
    w = backend.asarray(rng.standard_normal((2 * M - 1,)))
    v = backend.asarray(rng.standard_normal((M + 1, 3)))
    with pytest.raises(kind) as info:
        call(backend, w, v)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


# ----------------------------------------------------------------- one fixed layout
CHECKPOINTS = [1, 2, 31, 32, 33, 100, 300]


def _layout(state):
    """Structure, leaf shapes and dtypes of a state: equal for every count."""
    leaves = (*state.blocks, state.window, *state.future, state.near, state.count)
    return (
        len(state.blocks),
        len(state.future),
        state.skip,
        state.table_length,
        tuple((tuple(x.shape), str(x.dtype)) for x in leaves),
    )


def test_state_layout_is_fixed_after_any_count(backend, rng):
    # steps and chunks, eagerly (and under jax.jit): the same structure, shapes and dtypes
    # as the empty state after every count; each state continues to the dense oracle
    L, M = 300, 310
    v = rng.standard_normal((2, L + 4, 3))
    w = rng.standard_normal((2 * M - 1,))
    vb, wb = backend.asarray(v), backend.asarray(w)
    expected = causal_oracle(v, w)
    _, empty = fastrpb.rpb(vb[..., :0, :], wb, causal=True, return_state=True)
    layout = _layout(empty)
    jit = backend.jit if backend.grad == "jax" else None
    stepped, state = {}, None
    for t in range(L):
        _, state = fastrpb.rpb_step(state, vb[..., t, :], wb)
        if t + 1 in CHECKPOINTS:
            stepped[t + 1] = state
    for n in CHECKPOINTS:
        states = {"step": stepped[n], "chunk": fastrpb.rpb(vb[..., :n, :], wb, causal=True, return_state=True)[1]}
        if jit is not None:
            states["jit"] = jit(lambda x, w: fastrpb.rpb(x, w, causal=True, return_state=True))(vb[..., :n, :], wb)[1]
        for how, s in states.items():
            assert _layout(s) == layout, (n, how)
            assert int(s.count) == n
            got = fastrpb.rpb(vb[..., n : n + 4, :], wb, causal=True, initial_state=s)
            assert_close(backend, got, expected[..., n : n + 4, :], "float64")


def test_jitted_step_compiles_once_and_continues_both_ways(backend, rng):
    # eager prefill -> a jitted step in a Python loop (one compilation over window and
    # level completions) -> eager steps -> a jitted chunk
    jax = _jax(backend)
    L, M = 110, 128
    v = rng.standard_normal((2, L, 3))
    w = rng.standard_normal((2, 2 * M - 1))
    vb, wb = backend.asarray(v), backend.asarray(w)
    traces = []

    def step(state, v_t, w):
        traces.append(None)  # runs once per compilation
        return fastrpb.rpb_step(state, v_t, w)

    step = jax.jit(step)
    first, state = fastrpb.rpb(vb[..., :20, :], wb, causal=True, return_state=True)
    outs = [first]
    for t in range(20, 90):  # windows complete at 32, 64 (levels 32 and 64)
        o, state = step(state, vb[..., t, :], wb)
        outs.append(o[..., None, :])
    assert len(traces) == 1
    rest, state = step_all(backend, vb[..., :100, :], wb, state=state, start=90)
    outs.append(rest)
    tail, state = jax.jit(lambda s, x, w: fastrpb.rpb(x, w, causal=True, initial_state=s, return_state=True))(
        state, vb[..., 100:, :], wb
    )
    outs.append(tail)
    assert_close(backend, backend.xp.concat(outs, axis=-2), causal_oracle(v, w), "float64")


def test_jitted_chunk_builds_the_levels_and_a_jitted_step_needs_them(backend, rng):
    # on JAX a chunk builds the levels at its end, compiled too (ready is 1), so a
    # jitted step has no rebuild branch, which made XLA copy the levels every token;
    # a state without them gives NaN there, not a wrong value
    jax = _jax(backend)
    L, M = 40, 48
    v = rng.standard_normal((2, L, 3))
    w = rng.standard_normal((2 * M - 1,))
    vb, wb = backend.asarray(v), backend.asarray(w)
    _, state = jax.jit(lambda x, w: fastrpb.rpb(x, w, causal=True, return_state=True))(vb[..., :35, :], wb)
    assert int(state.ready) == 1
    step = jax.jit(fastrpb.rpb_step, donate_argnums=0)
    o, state = step(state, vb[..., 35, :], wb)
    assert_close(backend, o, causal_oracle(v, w)[..., 35, :], "float64")
    o, _ = step(state._replace(ready=backend.xp.zeros((), dtype=backend.xp.int32)), vb[..., 36, :], wb)
    assert bool(backend.xp.all(backend.xp.isnan(o)))


def _writable(backend):
    if backend.name not in ("numpy", "torch"):
        pytest.skip(f"{backend.name} arrays are not written in place here")


def test_a_reused_input_buffer_never_changes_later_outputs(backend, rng):
    # a decoding loop that writes every token into one buffer (static addresses, CUDA
    # graphs): the state keeps its own copy of each token
    _writable(backend)
    L, M = 80, 80
    v = rng.standard_normal((2, L, 3))
    w = rng.standard_normal((2 * M - 1,))
    vb, wb = backend.asarray(v), backend.asarray(w)
    buffer = backend.asarray(np.zeros((2, 3)))
    state, outs = None, []
    for t in range(L):
        buffer[...] = vb[..., t, :]
        o, state = fastrpb.rpb_step(state, buffer, wb)
        outs.append(o)
    assert_close(backend, backend.xp.stack(outs, axis=-2), causal_oracle(v, w), "float64")


@pytest.mark.parametrize("n", [20, 40])
def test_overwriting_the_prompt_never_changes_later_outputs(backend, rng, n):
    _writable(backend)
    L, M = 80, 80
    v = rng.standard_normal((2, L, 3))
    w = rng.standard_normal((2 * M - 1,))
    prompt, wb = backend.asarray(v[..., :n, :]), backend.asarray(w)
    _, state = fastrpb.rpb(prompt, wb, causal=True, return_state=True)
    prompt[...] = backend.asarray(rng.standard_normal((2, n, 3)))  # the caller recycles its array
    rest, _ = step_all(backend, backend.asarray(v), wb, state=state, start=n)
    assert_close(backend, rest, causal_oracle(v, w)[..., n:, :], "float64")


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.parametrize("inductor", [False, True], ids=["aot_eager", "inductor"])
@pytest.mark.only_backends("torch", reason="torch.compile runs on the torch CPU backend")
def test_rpb_step_under_torch_compile_compiles_once(backend, rng, inductor):
    # 140 tokens after a prefill cross the windows and the levels 32, 64 and 128
    # (Inductor: 40 tokens, one window; both kept short, compiling is slow on a CPU);
    # the compiled decoding loop compiles once from the eager state, equals eager
    # steps, and its state continues eagerly
    torch = backend.native
    L, n = (140, 20) if not inductor else (40, 20)
    M = L + 4
    v = backend.asarray(rng.standard_normal((2, M, 3)), "float32")
    w = backend.asarray(rng.standard_normal((2, 2 * M - 1)), "float32")
    counted, count = compile_counter("inductor" if inductor else "aot_eager")
    step = torch.compile(fastrpb.rpb_step, fullgraph=True, backend=counted)
    _, state = fastrpb.rpb(v[..., :n, :], w, causal=True, return_state=True)
    eager = state
    for t in range(n, L):
        o, state = step(state, v[..., t, :], w)
        e, eager = fastrpb.rpb_step(eager, v[..., t, :], w)
        assert float((o - e).abs().max()) <= 1e-5, t
    assert count[0] <= 2, count
    tail = fastrpb.rpb(v[..., L:, :], w, causal=True, initial_state=state)
    assert float((tail - fastrpb.rpb(v[..., L:, :], w, causal=True, initial_state=eager)).abs().max()) <= 1e-5


def test_donated_steps_equal_the_oracle(backend, rng):
    # donate=True hands each state over; eagerly (every backend) the step is the same
    # as without it: a prefill, then steps over the levels 32 and 64, equal the dense oracle
    L, n, M = 100, 20, 104
    v = rng.standard_normal((2, L, 3))
    w = rng.standard_normal((2 * M - 1,))
    vb, wb = backend.asarray(v), backend.asarray(w)
    _, state = fastrpb.rpb(vb[..., :n, :], wb, causal=True, return_state=True)
    outs = []
    for t in range(n, L):
        o, state = fastrpb.rpb_step(state, vb[..., t, :], wb, donate=True)
        outs.append(o)
    assert_close(backend, backend.xp.stack(outs, axis=-2), causal_oracle(v, w)[..., n:, :], "float64")
    with pytest.raises(TypeError, match="donate must be a bool"):
        fastrpb.rpb_step(state, vb[..., 0, :], wb, donate=1)


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.parametrize("prefill", [20, 0], ids=["after_a_prefill", "from_none"])
@pytest.mark.only_backends("torch", reason="torch.compile runs on the torch CPU backend")
def test_donated_rpb_step_under_torch_compile_writes_the_levels_in_place(backend, rng, prefill):
    # compiled (Inductor) with donate=True: every level array keeps its address from
    # step to step (written in place, never copied), the loop compiles at most twice,
    # the outputs equal the dense oracle over windows and the levels 32 .. 128
    # completing (and, after a prefill, the rebuild of the levels at the first step),
    # and the last donated state continues eagerly
    torch = backend.native
    L, M = 150, 154
    v = rng.standard_normal((2, M, 3))
    w = rng.standard_normal((2, 2 * M - 1)) / 8
    vb, wb = backend.asarray(v, "float32"), backend.asarray(w, "float32")
    counted, count = compile_counter("inductor")
    step = torch.compile(lambda s, x: fastrpb.rpb_step(s, x, wb, donate=True), fullgraph=True, backend=counted)
    state = fastrpb.rpb(vb[..., :prefill, :], wb, causal=True, return_state=True)[1] if prefill else None
    outs, addresses = [], None
    for t in range(prefill, L):
        o, state = step(state, vb[..., t, :])
        outs.append(o)
        now = [x.data_ptr() for x in (*state.blocks, *state.future)]
        assert addresses in (None, now), t
        addresses = now
    assert count[0] <= 2, count
    expected = causal_oracle(v, w)
    assert_close(backend, torch.stack(outs, dim=-2), expected[..., prefill:L, :], "float32")
    tail = fastrpb.rpb(vb[..., L:, :], wb, causal=True, initial_state=state)
    assert_close(backend, tail, expected[..., L:, :], "float32")


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.only_backends("torch", reason="torch.compile runs on the torch CPU backend")
def test_rpb_step_under_torch_compile_completes_every_level_at_once(backend, rng):
    # M = 256: the window that ends at token 256 completes the levels 32 .. 128 and the
    # counter's slots 0 .. 3 together; as nested conditionals (one per level) Dynamo
    # failed from this depth on ("cond's output stride ... size u1"), so each level is
    # its own conditional. The compiled loop after an eager prefill equals eager steps.
    torch = backend.native
    M, n = 256, 248
    v = backend.asarray(rng.standard_normal((2, M, 3)), "float32")
    w = backend.asarray(rng.standard_normal((2, 2 * M - 1)) / 8, "float32")
    counted, count = compile_counter("aot_eager")
    step = torch.compile(fastrpb.rpb_step, fullgraph=True, backend=counted)
    _, state = fastrpb.rpb(v[..., :n, :], w, causal=True, return_state=True)
    eager = state
    for t in range(n, M):
        o, state = step(state, v[..., t, :], w)
        e, eager = fastrpb.rpb_step(eager, v[..., t, :], w)
        assert float((o - e).abs().max()) <= 1e-5, t
    assert count[0] <= 2, count
