"""Continuing a causal sequence: ``linear_attention(..., initial_state=, return_state=)``
and ``linear_attention_step(..., rpb=)``, the FastRPB history carried in the state,
against dense float64 oracles on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import oracles
from backends_tests.backends import assert_array, assert_close, check_gradients, compile_counter
from fastrpb import (
    LinearAttentionState,
    RPBState,
    linear_attention,
    linear_attention_step,
    random_projection,
)
from fastrpb import feature_maps as fm

MAPS = ["elu", "relu", "sikf", "dpfp", "favor", "rff", "taylor", "hedgehog", "callable"]
EXPONENTIAL = {"sikf", "favor"}
PRECISIONS = ["float64", "float32"]
# pieces of a 9-token sequence: empty and size-1 pieces, a piece longer than a chunk
PIECES = [(0, 0), (0, 1), (1, 4), (4, 4), (4, 5), (5, 9)]
DK, DV, M = 4, 3, 12


def _map(backend, name):
    """The map ``name`` for the library, and its features (or log-features) in NumPy."""
    like = backend.asarray(np.zeros(1))
    if name in ("favor", "rff", "hedgehog"):
        w = random_projection(6, DK, seed=5, like=like)
        wn = backend.to_numpy(w).astype(np.float64)
        make = {"favor": fm.favor, "rff": fm.rff, "hedgehog": fm.hedgehog}[name]
        formula = {"favor": oracles.favor_log, "rff": oracles.rff, "hedgehog": oracles.hedgehog}[name]
        return make(w), (lambda x: formula(x, wn))
    if name == "callable":
        return (lambda x: x * x + 0.5), (lambda x: x * x + 0.5)
    formula = {
        "elu": oracles.elu1,
        "relu": oracles.relu,
        "sikf": lambda x: x,
        "dpfp": oracles.dpfp,
        "taylor": oracles.taylor,
    }[name]
    return name, formula


def _oracle(name, formula, qn, kn, vn, *, key_mask=None, wn=None, skip=(0, 0)):
    """One causal call on the whole sequence, in float64 from the formulas."""
    if name in EXPONENTIAL:
        out = oracles.exp_kernel_attention(formula(qn), formula(kn), vn, causal=True, key_mask=key_mask, eps=1e-6)
    else:
        out = oracles.kernel_attention(formula(qn), formula(kn), vn, causal=True, key_mask=key_mask, eps=1e-6)
    if wn is not None:
        biased = vn if key_mask is None else np.where(key_mask[..., None], vn, 0.0)
        out = out + oracles.rpb(biased, wn, causal=True, skip=skip)
    return out


def _state_oracle(name, formula, kn, vn, key_mask=None):
    """``sum_j phi(k_j) v_j^T`` and ``sum_j phi(k_j)`` (for the exponential maps with the
    offset multiplied back: ``exp(offset) S``)."""
    f = np.exp(formula(kn)) if name in EXPONENTIAL else formula(kn)
    if key_mask is not None:
        f = np.where(key_mask[..., None], f, 0.0)
    return np.swapaxes(f, -1, -2) @ vn, f.sum(-2)


def _data(backend, rng, precision, L=9, mask=False):
    arrays = [rng.standard_normal((2, L, DK)), rng.standard_normal((2, L, DK)), rng.standard_normal((2, L, DV))]
    xs = [backend.asarray(a, precision) for a in arrays]
    ns = [backend.to_numpy(x).astype(np.float64) for x in xs]
    km = None
    if mask:
        km = rng.random((2, L)) > 0.3
        km[:, 0] = False  # a padded first key
    return xs, ns, km


def _run_pieces(backend, q, k, v, pieces, **kw):
    state, outs = None, []
    for a, b in pieces:
        mask = kw.get("key_mask")
        args = dict(kw, key_mask=None if mask is None else mask[..., a:b])
        out, state = linear_attention(
            q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], causal=True, initial_state=state, return_state=True, **args
        )
        outs.append(out)
    return backend.xp.concat(outs, axis=-2), state


def _unoffset(backend, state):
    S, z = backend.to_numpy(state.S), backend.to_numpy(state.z)
    if state.offset is not None:
        off = backend.to_numpy(state.offset)
        S, z = S * np.exp(off)[..., None], z * np.exp(off)
    return S, z


# --------------------------------------------------------------------------- pieces = one call
# every case on NumPy and array-api-strict. Elsewhere the two kernels (elu: plain
# features, sikf: the exponential frame), each on six rows that hold every pair of the
# four options (float32, FastRPB, mask, chunks shorter than the pieces) both ways, the
# last with every option on; the other maps only pick the features, which reach no code
# of torch or JAX of their own (the state keeps the map's signature, a string).
PAIRWISE = {
    ("float64", False, False, 64),
    ("float64", True, True, 2),
    ("float32", False, True, 2),
    ("float32", True, False, 2),
    ("float32", True, True, 64),
    ("float32", True, True, 2),
}
# On JAX the pieces run as one compiled program (Backend.call): eager dispatch compiles
# each operation for every new shape, 3-5x the time; this case keeps the eager path of
# the exponential frame (test_skip_streams_across_pieces keeps elu's).
EAGER = ("sikf", "float32", True, True, 2)


@pytest.mark.subset(
    lambda name, precision, bias, mask, chunk: name in ("elu", "sikf") and (precision, bias, mask, chunk) in PAIRWISE
)
@pytest.mark.parametrize("chunk", [2, 64])
@pytest.mark.parametrize("mask", [False, True], ids=["", "mask"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "rpb"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", MAPS)
def test_pieces_equal_one_call(backend, rng, name, precision, bias, mask, chunk):
    (q, k, v), (qn, kn, vn), km = _data(backend, rng, precision, mask=mask)
    fmap, formula = _map(backend, name)
    wn = rng.standard_normal((2 * M - 1,)) / 4 if bias else None
    key_mask = None if km is None else backend.asarray(km, None)
    w = backend.asarray(wn, precision) if bias else None
    expected = _oracle(name, formula, qn, kn, vn, key_mask=km, wn=wn)

    def pieces(q, k, v, key_mask, w):
        return _run_pieces(backend, q, k, v, PIECES, feature_map=fmap, chunk_size=chunk, key_mask=key_mask, rpb=w)

    if (name, precision, bias, mask, chunk) == EAGER:
        got, state = pieces(q, k, v, key_mask, w)
    else:
        got, state = backend.call(pieces, q, k, v, key_mask, w)
    assert_close(backend, got, expected, precision)
    S, z = _state_oracle(name, formula, kn, vn, km)
    gS, gz = _unoffset(backend, state)
    tol = {"rtol": 1e-9, "atol": 1e-9} if precision == "float64" else {"rtol": 1e-4, "atol": 1e-4}
    np.testing.assert_allclose(gS, S, atol=tol["atol"] * max(1.0, np.abs(S).max()), rtol=tol["rtol"])
    np.testing.assert_allclose(gz, z, atol=tol["atol"] * max(1.0, np.abs(z).max()), rtol=tol["rtol"])
    assert_array(backend, state.S, precision)
    assert (state.rpb is not None) == bias
    if bias:
        assert isinstance(state.rpb, RPBState)


# the two kernels elsewhere: the broadcast lead is laid out alike for every map
@pytest.mark.subset(lambda name: name in ("elu", "sikf"))
@pytest.mark.parametrize("name", MAPS)
def test_keys_shared_across_the_batch_continue(backend, rng, name):
    """Keys broadcast over the batch (``k`` (1, 2, L, .) with ``q``, ``v`` (3, 2, L, .)):
    the state's ``S`` and ``z`` share one lead (3, 2), so pieces and steps continue."""
    fmap, formula = _map(backend, name)
    qn, kn, vn = (
        rng.standard_normal((3, 2, 9, DK)),
        rng.standard_normal((1, 2, 9, DK)),
        rng.standard_normal((3, 2, 9, DV)),
    )
    q, k, v = (backend.asarray(x, "float64") for x in (qn, kn, vn))

    def continued(q, k, v):  # the lead is laid out from the shapes alone: compiled on JAX
        got, pieces = _run_pieces(backend, q, k, v, [(0, 5), (5, 8)], feature_map=fmap, chunk_size=2)
        last, state = linear_attention_step(pieces, q[..., 8, :], k[..., 8, :], v[..., 8, :], feature_map=fmap)
        return got, pieces, last, state

    got, pieces, last, state = backend.call(continued, q, k, v)
    assert tuple(pieces.S.shape) == (3, 2, pieces.z.shape[-1], DV)
    assert tuple(pieces.z.shape[:-1]) == (3, 2)
    expected = _oracle(name, formula, qn, np.broadcast_to(kn, qn.shape), vn)
    assert_close(backend, got, expected[..., :8, :], "float64")
    assert_close(backend, last, expected[..., 8, :], "float64")
    S, z = _state_oracle(name, formula, np.broadcast_to(kn, qn.shape), vn)
    gS, gz = _unoffset(backend, state)
    np.testing.assert_allclose(gS, S, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(S).max()))
    np.testing.assert_allclose(gz, z, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(z).max()))


# elu is the control without offsets (NumPy and array-api-strict)
@pytest.mark.subset(lambda name: name == "sikf")
@pytest.mark.parametrize("name", ["elu", "sikf"])
def test_sikf_large_spread_across_pieces(backend, rng, name):
    # keys that rise by 60 units between pieces: the pseudo-keys keep the offsets exact
    L = 8
    qn, kn, vn = rng.standard_normal((L, DK)), rng.standard_normal((L, DK)), rng.standard_normal((L, DV))
    kn[5:] += 60.0 if name == "sikf" else 0.0
    q, k, v = (backend.asarray(a, "float32") for a in (qn, kn, vn))

    def pieces(q, k, v):  # compiled on JAX; test_pieces_equal_one_call keeps sikf's eager pieces
        return _run_pieces(backend, q, k, v, [(0, 3), (3, 6), (6, 8)], feature_map=name, chunk_size=2)

    got, state = backend.call(pieces, q, k, v)
    formula = (lambda x: x) if name == "sikf" else oracles.elu1
    assert_close(backend, got, _oracle(name, formula, qn, kn, vn), "float32")
    assert np.all(np.isfinite(backend.to_numpy(state.S)))


def test_skip_streams_across_pieces(backend, rng):
    (q, k, v), (qn, kn, vn), _ = _data(backend, rng, "float64")
    wn = rng.standard_normal((2 * M - 1,))
    expected = _oracle("elu", oracles.elu1, qn, kn, vn, wn=wn, skip=(2, 0))
    got, _ = _run_pieces(backend, q, k, v, [(0, 1), (1, 5), (5, 9)], rpb=backend.asarray(wn), rpb_skip=(2, 0))
    assert_close(backend, got, expected, "float64")


# --------------------------------------------------------------------------- stepping
# elsewhere each kernel without the bias: eager JAX compiles the FastRPB history's
# operations anew at each level the 300 steps complete (86 s of 106 on a loaded CPU);
# rpb_step's 300 steps are test_streaming's, and this file's steps with rpb= are
# test_step_honours_skip's (40 steps, across the first level)
@pytest.mark.subset(lambda name, bias: not bias)
@pytest.mark.parametrize("bias", [False, True], ids=["", "rpb"])
@pytest.mark.parametrize("name", ["elu", "sikf"])
def test_stepping_300_tokens_equals_causal(backend, rng, name, bias):
    L = 300
    (q, k, v), (qn, kn, vn), _ = _data(backend, rng, "float64", L=L)
    wn = rng.standard_normal((2 * L - 1,)) / 8 if bias else None
    formula = oracles.elu1 if name == "elu" else (lambda x: x)
    expected = _oracle(name, formula, qn, kn, vn, wn=wn)
    w = None if wn is None else backend.asarray(wn)
    # a prompt of 40 tokens, then 260 steps
    prompt, state = linear_attention(
        q[:, :40, :], k[:, :40, :], v[:, :40, :], feature_map=name, causal=True, rpb=w, return_state=True
    )
    outs = [prompt]
    for t in range(40, L):
        out_t, state = linear_attention_step(state, q[:, t, :], k[:, t, :], v[:, t, :], feature_map=name, rpb=w)
        outs.append(out_t[:, None, :])
    assert_close(backend, backend.xp.concat(outs, axis=-2), expected, "float64")
    # and from the very first token
    state, outs = None, []
    for t in range(L):
        out_t, state = linear_attention_step(state, q[:, t, :], k[:, t, :], v[:, t, :], feature_map=name, rpb=w)
        outs.append(out_t)
    assert_close(backend, backend.xp.stack(outs, axis=-2), expected, "float64")


def test_step_honours_skip(backend, rng):
    L = 40
    (q, k, v), (qn, kn, vn), _ = _data(backend, rng, "float64", L=L)
    wn = rng.standard_normal((2 * L - 1,)) / 8
    w = backend.asarray(wn)
    expected = _oracle("elu", oracles.elu1, qn, kn, vn, wn=wn, skip=(3, 0))
    state, outs = None, []
    for t in range(L):
        out_t, state = linear_attention_step(state, q[:, t, :], k[:, t, :], v[:, t, :], rpb=w, rpb_skip=(3, 0))
        outs.append(out_t)
    assert_close(backend, backend.xp.stack(outs, axis=-2), expected, "float64")


def test_eager_jax_steps_compile_once_per_piece(backend, rng):
    """Eager JAX runs a step's pieces as cached jitted computations: the first step and
    the first completion of each kind compile, every other step reuses them."""
    if backend.grad != "jax" or backend.jit is None:
        pytest.skip(f"{backend.name}: eager JAX only")
    import logging

    L = 70  # window completions at tokens 31 (one level) and 63 (two levels)
    (q, k, v), (qn, kn, vn), _ = _data(backend, rng, "float64", L=L)
    wn = rng.standard_normal((2 * L - 1,)) / 8
    w = backend.asarray(wn)
    tokens = [(q[:, t, :], k[:, t, :], v[:, t, :]) for t in range(L)]  # sliced before counting
    compiled: list[str] = []

    class Compiles(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Finished XLA compilation"):
                compiled.append(record.getMessage())

    handler, logger = Compiles(), logging.getLogger("jax")
    logger.addHandler(handler)
    state, outs, per_step = None, [], []
    try:
        with backend.native.log_compiles():
            for t in range(L):
                before = len(compiled)
                out_t, state = linear_attention_step(state, *tokens[t], feature_map="sikf", rpb=w)
                outs.append(out_t)
                per_step.append(len(compiled) - before)
    finally:
        logger.removeHandler(handler)
    assert_close(backend, backend.xp.stack(outs, axis=-2), _oracle("sikf", lambda x: x, qn, kn, vn, wn=wn), "float64")
    # the first step (which also makes the state) compiles; then only the first window
    # completion of each kind, once (per operation it was twenty and more)
    assert [t for t, n in enumerate(per_step) if n and t not in (0, 31, 63)] == []
    assert per_step[31] <= 1
    assert per_step[63] <= 1


# --------------------------------------------------------------------------- jit, gradients
@pytest.mark.jit
@pytest.mark.parametrize("bias", [False, True], ids=["", "rpb"])
@pytest.mark.parametrize("name", ["elu", "sikf"])
def test_pieces_under_jit(backend, rng, name, bias):
    (q, k, v), (qn, kn, vn), _ = _data(backend, rng, "float64")
    wn = rng.standard_normal((2 * M - 1,)) / 4 if bias else None
    w = None if wn is None else backend.asarray(wn)
    formula = oracles.elu1 if name == "elu" else (lambda x: x)

    def whole(q, k, v, w):
        return _run_pieces(backend, q, k, v, [(0, 1), (1, 4), (4, 4), (4, 9)], feature_map=name, chunk_size=2, rpb=w)

    got, _ = backend.jit(whole)(q, k, v, w)
    assert_close(backend, got, _oracle(name, formula, qn, kn, vn, wn=wn), "float64")
    # a state crossing into a jitted call and back
    part = backend.jit(
        lambda s, q, k, v, w: linear_attention(
            q, k, v, feature_map=name, causal=True, rpb=w, initial_state=s, return_state=True
        )
    )
    first, s = linear_attention(
        q[:, :4, :], k[:, :4, :], v[:, :4, :], feature_map=name, causal=True, rpb=w, return_state=True
    )
    second, s = part(s, q[:, 4:, :], k[:, 4:, :], v[:, 4:, :], w)
    assert_close(
        backend, backend.xp.concat([first, second], axis=-2), _oracle(name, formula, qn, kn, vn, wn=wn), "float64"
    )


@pytest.mark.grad
@pytest.mark.subset(lambda name, bias: (name == "sikf") == bias)
@pytest.mark.parametrize("bias", [False, True], ids=["", "rpb"])
@pytest.mark.parametrize("name", ["elu", "sikf"])
def test_gradients_through_initial_state(backend, rng, name, bias):
    L, h = 5, 2
    qn, kn, vn = rng.standard_normal((L, 2)), rng.standard_normal((L, 2)), rng.standard_normal((L, 2))
    wn = rng.standard_normal((2 * L - 1,)) / 4

    def fn(q, k, v, w):
        table = w if bias else None
        _, state = linear_attention(q[:h], k[:h], v[:h], feature_map=name, causal=True, rpb=table, return_state=True)
        return linear_attention(q[h:], k[h:], v[h:], feature_map=name, causal=True, rpb=table, initial_state=state)

    check_gradients(backend, fn, qn, kn, vn, wn)


# --------------------------------------------------------------------------- errors
def _state_of(backend, name="elu", w=None, L=3):
    xs = [backend.asarray(np.ones((2, L, DK)) * 0.1)] * 2 + [backend.asarray(np.ones((2, L, DV)))]
    return linear_attention(*xs, feature_map=name, causal=True, rpb=w, return_state=True)[1]


def _qkv(backend, L=2, dv=DV, lead=2):
    return tuple(backend.asarray(np.ones((lead, L, d))) for d in (DK, DK, dv))


ERRORS = [
    (
        "noncausal",
        lambda b, w: linear_attention(*_qkv(b), initial_state=_state_of(b)),
        ValueError,
        r"initial_state needs causal=True",
    ),
    (
        "other-map",
        lambda b, w: linear_attention(*_qkv(b), causal=True, feature_map="sikf", initial_state=_state_of(b)),
        ValueError,
        r"initial_state was made by feature map 'elu'",
    ),
    (
        "wrong-width",
        lambda b, w: linear_attention(*_qkv(b, dv=5), causal=True, initial_state=_state_of(b)),
        ValueError,
        r"initial_state\.S must have shape",
    ),
    (
        "wrong-lead",
        lambda b, w: linear_attention(*_qkv(b, lead=3), causal=True, initial_state=_state_of(b)),
        ValueError,
        r"initial_state",
    ),
    (
        "not-a-state",
        lambda b, w: linear_attention(*_qkv(b), causal=True, initial_state=(1, 2)),
        TypeError,
        r"initial_state must be a LinearAttentionState",
    ),
    (
        "rpb-missing",
        lambda b, w: linear_attention(*_qkv(b), causal=True, initial_state=_state_of(b, w=w)),
        ValueError,
        r"initial_state carries a FastRPB history",
    ),
    (
        "rpb-extra",
        lambda b, w: linear_attention(*_qkv(b), causal=True, rpb=w, initial_state=_state_of(b)),
        ValueError,
        r"initial_state was made without rpb=",
    ),
    (
        "rpb-skip-end",
        lambda b, w: linear_attention(*_qkv(b), causal=True, rpb=w, rpb_skip=(0, 1), return_state=True),
        ValueError,
        r"rpb_skip.*skip\[1\] must be 0",
    ),
    (
        "rpb-past-table",
        lambda b, w: linear_attention(*_qkv(b, L=M), causal=True, rpb=w, initial_state=_state_of(b, w=w)),
        ValueError,
        r"position past the bias table",
    ),
    (
        "rpb-nd",
        lambda b, w: linear_attention(*_qkv(b), causal=True, rpb_tables=[w], rpb_grid=(2,), initial_state=_state_of(b)),
        ValueError,
        r"initial_state was made without rpb_tables=",
    ),
    (
        "step-rpb-missing",
        lambda b, w: linear_attention_step(_state_of(b, w=w), *(x[:, 0, :] for x in _qkv(b))),
        ValueError,
        r"state carries a FastRPB history",
    ),
    (
        "step-rpb-extra",
        lambda b, w: linear_attention_step(_state_of(b), *(x[:, 0, :] for x in _qkv(b)), rpb=w),
        ValueError,
        r"state was made without rpb=",
    ),
    (
        "step-skip-end",
        lambda b, w: linear_attention_step(None, *(x[:, 0, :] for x in _qkv(b)), rpb=w, rpb_skip=(0, 1)),
        ValueError,
        r"skip\[1\] must be 0",
    ),
    (
        "step-past-table",
        lambda b, w: linear_attention_step(_state_of(b, w=w, L=M), *(x[:, 0, :] for x in _qkv(b)), rpb=w),
        ValueError,
        r"position past the bias table",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(backend, call, error, match):
    w = backend.asarray(np.full((2 * M - 1,), 0.1))
    with pytest.raises(error, match=match):
        call(backend, w)


def test_state_is_a_jax_pytree():
    jax = pytest.importorskip("jax")
    q = jax.numpy.ones((2, 3, DK))
    w = jax.numpy.ones((2 * M - 1,)) * 0.1
    _, state = linear_attention(q, q, q[..., :DV], feature_map="sikf", causal=True, rpb=w, return_state=True)
    leaves, tree = jax.tree_util.tree_flatten(state)
    assert all(isinstance(x, jax.Array) for x in leaves)
    again = jax.tree_util.tree_unflatten(tree, leaves)
    assert isinstance(again, LinearAttentionState)
    assert again.feature_map == state.feature_map
    assert isinstance(again.rpb, RPBState)


# --------------------------------------------------------------------------- compiled decoding loops
@pytest.mark.parametrize("name", MAPS)
@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.only_backends("torch", reason="torch.compile runs on the torch CPU backend")
def test_step_with_rpb_under_torch_compile_compiles_at_most_twice(backend, rng, name):
    # 36 tokens after a 4-token prompt cross a window completion (the level-32 FFT):
    # every feature map compiles at most twice (aot_eager) and equals eager steps to 1e-5
    # (the 300-token run over several levels is rpb_step's, test_streaming)
    torch = backend.native
    L = 36
    (q, k, v), _, _ = _data(backend, rng, "float32", L=L)
    w = backend.asarray(rng.standard_normal((2, 2 * L - 1)) / 8, "float32")
    fmap, _ = _map(backend, name)
    counted, count = compile_counter()
    step = torch.compile(
        lambda s, a, b, c: linear_attention_step(s, a, b, c, feature_map=fmap, rpb=w), fullgraph=True, backend=counted
    )
    _, state = linear_attention(q[:, :4], k[:, :4], v[:, :4], feature_map=fmap, causal=True, rpb=w, return_state=True)
    eager = state
    for t in range(4, L):
        out, state = step(state, q[:, t], k[:, t], v[:, t])
        want, eager = linear_attention_step(eager, q[:, t], k[:, t], v[:, t], feature_map=fmap, rpb=w)
        assert float((out - want).abs().max()) <= 1e-5, t
    assert count[0] <= 2, count


@pytest.mark.parametrize("name", ["elu", "sikf"])
@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.only_backends("torch", reason="torch.compile runs on the torch CPU backend")
def test_donated_step_with_rpb_under_torch_compile_equals_the_causal_call(backend, rng, name):
    # donate=True under torch.compile (aot_eager): the bias levels are updated in place
    # by the eager update inside the graph; 66 tokens after a 4-token prompt (windows
    # complete at 32 and 64, the level 64 with them) equal the causal call over the
    # whole sequence, and the loop compiles at most twice
    torch = backend.native
    L = 70
    (q, k, v), _, _ = _data(backend, rng, "float32", L=L)
    w = backend.asarray(rng.standard_normal((2, 2 * L - 1)) / 8, "float32")
    counted, count = compile_counter()
    step = torch.compile(
        lambda s, a, b, c: linear_attention_step(s, a, b, c, feature_map=name, rpb=w, donate=True),
        fullgraph=True,
        backend=counted,
    )
    _, state = linear_attention(q[:, :4], k[:, :4], v[:, :4], feature_map=name, causal=True, rpb=w, return_state=True)
    outs = []
    for t in range(4, L):
        out, state = step(state, q[:, t], k[:, t], v[:, t])
        outs.append(out)
    want = linear_attention(q, k, v, feature_map=name, causal=True, rpb=w)[:, 4:]
    assert float((torch.stack(outs, dim=1) - want).abs().max()) <= 1e-4
    assert count[0] <= 2, count


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.only_backends("torch", reason="torch.compile runs on the torch CPU backend")
def test_step_under_torch_compile_compiles_once_from_an_empty_dtype_memo(backend, rng):
    # compute_dtype's memo is not read under Dynamo: a first trace that filled it made
    # Dynamo's guard on the dict fail at the next call, and the step compiled twice
    torch = backend.native
    from fastrpb._compat import dispatch

    (q, k, v), _, _ = _data(backend, rng, "float32", L=8)
    _, state = linear_attention(q[:, :4], k[:, :4], v[:, :4], feature_map="elu", causal=True, return_state=True)
    counted, count = compile_counter()
    dispatch._PROMOTED.clear()
    step = torch.compile(
        lambda s, a, b, c: linear_attention_step(s, a, b, c, feature_map="elu"), fullgraph=True, backend=counted
    )
    for t in range(4, 8):
        _, state = step(state, q[:, t], k[:, t], v[:, t])
    assert count[0] == 1, count


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.only_backends("torch", reason="torch.compile runs on the torch CPU backend")
def test_layer_step_under_torch_compile_compiles_at_most_twice(backend, rng):
    torch = backend.native
    from fastrpb.torch import FastRPB
    from fastrpb.torch import LinearAttention as Layer

    torch.manual_seed(0)
    L = 36
    layer = Layer(8, 2, feature_map="elu", rpb=FastRPB(2, L, causal=True), causal=True)
    x = backend.asarray(rng.standard_normal((1, L, 8)), "float32")
    counted, count = compile_counter()
    step = torch.compile(layer.step, fullgraph=True, backend=counted)
    cache = eager = None
    with torch.no_grad():
        for t in range(L):
            y, cache = step(x[:, t], cache)
            want, eager = layer.step(x[:, t], eager)
            assert float((y - want).abs().max()) <= 1e-5, t
        full = layer(x)
    assert float((y - full[:, -1]).abs().max()) <= 1e-5
    assert count[0] <= 2, count
