"""Streaming the causal N-d FastRPB in raster order (``rpb_nd(..., initial_state=,
return_state=)``, ``rpb_nd_step``, the attention state's N-d term) against the float64
dense raster-causal oracle, on every backend. Grids are small: a few rows cross every
level of the state (row ends, slab ends; on NumPy and array-api-strict also a row
longer than the 1-d window of 32). Every case runs on NumPy and array-api-strict; torch
and JAX run those their code paths need. Eager JAX compiles its kernels again for each
new shape and dtype, so it runs the 2-d grid (3, 4) in float64 eagerly and the 3-d grid
(2, 3, 4) in float32 under jax.jit."""

from __future__ import annotations

import itertools
import math

import pytest
from backends import assert_close, compile_counter

import fastrpb
import oracles

# (grid, skip, the axis without a table or None); 2 x 34 crosses a 1-d window (32) in a row
CASES = [((3, 4), (0, 0), None), ((2, 34), (1, 0), None), ((2, 3, 4), (1, 1), None), ((2, 3, 4), (0, 0), 2)]

# Eager JAX compiles every kernel again for a new grid or dtype (seconds each on CI):
# it runs the 2-d grid in float64 eagerly, and the 3-d grid in float32 under jax.jit
_JAX_JITS_IT = pytest.mark.skip_backends(
    "jax",
    reason="eager JAX compiles every kernel again for it; JAX runs it under jax.jit (test_jitted_steps_from_the_start)",
)


def _paths(grid, skip, none_axis, precision="float64"):
    """The cases torch and JAX run (``subset``): 2-d and 3-d grids with skips, in float64.
    The row longer than a window, the axis without a table and float32 steps are the same
    code, with no framework branch: NumPy and array-api-strict run them (torch float32 in
    the prefill test)."""
    return grid != (2, 34) and none_axis is None and precision == "float64"


def _case(rng, grid, skip, none_axis, *, lead=(2,), D=3):
    a, b = skip
    L = a + math.prod(grid) + b
    v = rng.standard_normal((*lead, L, D))
    # tables longer than their axes (M_a = G_a + 2), one per head on the first axis
    tables = [rng.standard_normal(((2,) if k == 0 else ()) + (2 * g + 3,)) for k, g in enumerate(grid)]
    if none_axis is not None:
        tables[none_axis] = None
    return v, tables, oracles.rpb_nd(v, tables, grid, skip=skip, causal=True)


def _on(backend, tables, precision="float64"):
    return [None if t is None else backend.asarray(t, precision) for t in tables]


def _steps(backend, v, tables, grid, *, state=None, skip=None, start=0):
    outs = []
    for t in range(start, v.shape[-2]):
        kwargs = {"skip": skip} if state is None and skip is not None else {}
        y, state = fastrpb.rpb_nd_step(state, v[..., t, :], tables, grid=grid, **kwargs)
        outs.append(y)
    return backend.xp.stack(outs, axis=-2), state


def _leaf_shapes(state):
    arrays = []
    for x in (*state.row[:-2], *state.sums, *state.carry, *state.marginals, *state.across):  # row[-2:]: static
        arrays.extend(x if isinstance(x, tuple) else (x,))
    return [(tuple(x.shape), str(x.dtype)) for x in arrays]


# --------------------------------------------------------------------------- steps and pieces
@pytest.mark.subset.with_args(_paths)
@pytest.mark.parametrize(
    ("grid", "skip", "none_axis", "precision"),
    [
        (*CASES[0], "float64"),
        (*CASES[1], "float64"),
        pytest.param(*CASES[2], "float64", marks=_JAX_JITS_IT),
        (*CASES[3], "float64"),
        (*CASES[2], "float32"),
    ],
)
def test_steps_match_dense(backend, rng, grid, skip, none_axis, precision):
    v, tables, expected = _case(rng, grid, skip, none_axis)
    got, state = _steps(backend, backend.asarray(v, precision), _on(backend, tables, precision), grid, skip=skip)
    assert_close(backend, got, expected, precision)
    assert isinstance(state, fastrpb.RPBndState)


@pytest.mark.subset.with_args(_paths)
@pytest.mark.skip_backends(
    "jax",
    reason="eager JAX compiles kernels per piece length and position (5 s here); the pieces' code has no JAX "
    "branch, and JAX streams pieces in the prefill, attention and flax tests",
)
@pytest.mark.parametrize(("grid", "skip", "none_axis"), CASES)
def test_random_pieces_equal_one_call(backend, rng, grid, skip, none_axis):
    # split points anywhere: empty and one-token pieces, pieces across rows and slabs
    v, tables, expected = _case(rng, grid, skip, none_axis)
    vb, tb = backend.asarray(v), _on(backend, tables)
    L = v.shape[-2]
    cuts = sorted({0, 1, 2, L - 1, *rng.integers(0, L + 1, size=2).tolist()})
    cuts = [0, *cuts, cuts[-1], L]  # an empty piece, at the start and at a repeated cut
    state, parts = None, []
    for lo, hi in itertools.pairwise(cuts):
        out, state = fastrpb.rpb_nd(
            vb[..., lo:hi, :], tb, grid, causal=True, skip=skip, initial_state=state, return_state=True
        )
        parts.append(out)
    assert_close(backend, backend.xp.concat(parts, axis=-2), expected, "float64")


@pytest.mark.skip_backends(
    "jax",
    reason="eager JAX compiles kernels per prefill length (2 s here): JAX continues prefills with eager steps in "
    "the layout test and in the jit test's eager tail (skip (1, 0)), and runs float32 under jax.jit",
)
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_steps_after_a_prefill(backend, rng, precision):
    grid, skip = (3, 4), (1, 0)
    v, tables, expected = _case(rng, grid, skip, None)
    vb, tb = backend.asarray(v, precision), _on(backend, tables, precision)
    # the prefill ends a row; the steps end the next two rows and the grid
    first, state = fastrpb.rpb_nd(vb[..., :7, :], tb, grid, causal=True, skip=skip, return_state=True)
    rest, _ = _steps(backend, vb, tb, grid, state=state, start=7)
    assert_close(backend, backend.xp.concat([first, rest], axis=-2), expected, precision)


def test_a_causal_call_shorter_than_the_grid_is_a_prefix(backend, rng):
    grid, skip = (3, 4), (1, 2)
    v, tables, expected = _case(rng, grid, skip, None)
    got = fastrpb.rpb_nd(backend.asarray(v[..., :9, :]), _on(backend, tables), grid, causal=True, skip=skip)
    assert_close(backend, got, expected[..., :9, :], "float64")


def test_state_layout_is_fixed_and_owns_its_values(backend, rng):
    # the same leaves after any number of tokens; a recycled prompt and a reused input
    # buffer change nothing
    grid = (3, 4)
    v, tables, expected = _case(rng, grid, (0, 0), None)
    tb = _on(backend, tables)
    prompt = backend.asarray(v[..., :2, :])
    first, state = fastrpb.rpb_nd(prompt, tb, grid, causal=True, return_state=True)
    layout, outs = _leaf_shapes(state), [first]
    if backend.name in ("numpy", "torch"):  # libraries with in-place writes: recycle the prompt
        prompt[...] = 1e6
    for t in range(2, v.shape[-2]):
        buffer = backend.asarray(v[..., t, :])
        y, state = fastrpb.rpb_nd_step(state, buffer, tb, grid=grid)
        if backend.name in ("numpy", "torch"):  # libraries with in-place writes: overwrite the buffer
            buffer[...] = 1e6
        outs.append(y[..., None, :])
        assert _leaf_shapes(state) == layout, t
    assert_close(backend, backend.xp.concat(outs, axis=-2), expected, "float64")


@pytest.mark.skip_backends("jax", reason="JAX arrays are immutable: a step cannot change them")
def test_a_step_never_changes_the_state_it_is_given(backend, rng):
    grid = (3, 4)
    v, tables, expected = _case(rng, grid, (0, 0), None)
    vb, tb = backend.asarray(v), _on(backend, tables)
    _, state = fastrpb.rpb_nd(
        vb[..., :3, :], tb, grid, causal=True, return_state=True
    )  # the row ends at the next token
    first, _ = fastrpb.rpb_nd(vb[..., 3:, :], tb, grid, causal=True, initial_state=state, return_state=True)
    again, _ = fastrpb.rpb_nd(vb[..., 3:, :], tb, grid, causal=True, initial_state=state, return_state=True)
    assert_close(backend, first, expected[..., 3:, :], "float64")
    assert_close(backend, again, expected[..., 3:, :], "float64")


# --------------------------------------------------------------------------- compiled
_GRID = (3, 4)  # the grid of the shared jitted step (static: one compilation for the module)
_JITTED: dict = {}


def _jitted_step(jax, grid):
    """The module's jitted step for ``grid`` (static): each test's shapes and dtype are
    its own, so each compiles once."""
    if grid not in _JITTED:
        _JITTED[grid] = jax.jit(lambda s, v_t, *w: fastrpb.rpb_nd_step(s, v_t, w, grid=grid))
    return _JITTED[grid]


@pytest.mark.jit
def test_jitted_steps_continue_an_eager_prefill_and_back(backend, rng):
    jax = backend.native
    v, tables, expected = _case(rng, _GRID, (1, 0), None)
    vb, tb = backend.asarray(v), _on(backend, tables)
    first, state = fastrpb.rpb_nd(vb[..., :4, :], tb, _GRID, causal=True, skip=(1, 0), return_state=True)
    structure, layout = jax.tree_util.tree_structure(state), _leaf_shapes(state)
    step, outs = _jitted_step(jax, _GRID), [first]
    for t in range(4, 9):  # across two rows' ends
        y, state = step(state, vb[..., t, :], *tb)
        assert jax.tree_util.tree_structure(state) == structure
        assert _leaf_shapes(state) == layout
        outs.append(y[..., None, :])
    rest, _ = _steps(backend, vb, tb, _GRID, state=state, start=9)  # eager again
    assert_close(backend, backend.xp.concat([*outs, rest], axis=-2), expected, "float64")
    assert step._cache_size() == 1


@pytest.mark.jit
def test_jitted_steps_from_the_start(backend, rng):
    # the 3-d grid in float32, every token jitted from the state of an empty piece: the
    # skipped tokens at both ends, row ends, slab ends cascading up two levels
    jax = backend.native
    grid, skip = CASES[2][:2]
    v, tables, expected = _case(rng, grid, skip, None)
    vb, tb = backend.asarray(v, "float32"), _on(backend, tables, "float32")
    _, state = fastrpb.rpb_nd(vb[..., :0, :], tb, grid, causal=True, skip=skip, return_state=True)
    step, outs = _jitted_step(jax, grid), []
    for t in range(v.shape[-2]):
        y, state = step(state, vb[..., t, :], *tb)
        outs.append(y)
    assert_close(backend, backend.xp.stack(outs, axis=-2), expected, "float32")
    assert step._cache_size() == 1


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.only_backends("torch", reason="torch.compile runs on the torch CPU backend")
def test_steps_under_torch_compile_compile_at_most_twice(backend, rng):
    import torch

    counted, count = compile_counter()
    # skip (0, 0): the compiled skip is a conditional around the whole step, which doubles
    # the trace (7 s here); the same conditional runs under jax.jit above
    v, tables, expected = _case(rng, _GRID, (0, 0), None)
    vb, tb = backend.asarray(v), _on(backend, tables)
    step = torch.compile(
        lambda s, v_t, w0, w1: fastrpb.rpb_nd_step(s, v_t, (w0, w1), grid=_GRID), fullgraph=True, backend=counted
    )
    first, state = fastrpb.rpb_nd(vb[..., :2, :], tb, _GRID, causal=True, return_state=True)
    outs = [first]
    for t in range(2, v.shape[-2]):  # every row's end, the grid's end
        y, state = step(state, vb[..., t, :], *tb)
        outs.append(y[..., None, :])
    assert_close(backend, backend.xp.concat(outs, axis=-2), expected, "float64", rtol=1e-5, atol=1e-5)
    assert count[0] <= 2


# --------------------------------------------------------------------------- attention and layers
def test_attention_continues_the_nd_bias(backend, rng):
    # a prefill, steps across a row's end, a last piece: the dense causal attention plus
    # the dense raster-causal bias
    grid, skip = (3, 4), (1, 1)
    v, tables, bias_oracle = _case(rng, grid, skip, None)
    q, k = rng.standard_normal((2, *v.shape))
    expected = oracles.kernel_attention(oracles.elu1(q), oracles.elu1(k), v, causal=True, eps=1e-6) + bias_oracle
    qb, kb, vb = (backend.asarray(x) for x in (q, k, v))
    bias = {"rpb_tables": _on(backend, tables), "rpb_grid": grid}
    first, state = fastrpb.linear_attention(
        qb[..., :5, :], kb[..., :5, :], vb[..., :5, :], causal=True, rpb_skip=skip, return_state=True, **bias
    )
    assert isinstance(state.rpb, fastrpb.RPBndState)
    outs = [first]
    for t in range(5, 9):
        y, state = fastrpb.linear_attention_step(state, qb[..., t, :], kb[..., t, :], vb[..., t, :], **bias)
        outs.append(y[..., None, :])
    rest = (qb[..., 9:, :], kb[..., 9:, :], vb[..., 9:, :])
    outs.append(fastrpb.linear_attention(*rest, causal=True, rpb_skip=skip, initial_state=state, **bias))
    assert_close(backend, backend.xp.concat(outs, axis=-2), expected, "float64")
    with pytest.raises(ValueError, match="rpb_tables"):  # the N-d history needs its tables
        fastrpb.linear_attention_step(state, qb[..., 9, :], kb[..., 9, :], vb[..., 9, :])
    with pytest.raises(ValueError, match="rpb_tables"):
        fastrpb.linear_attention(*rest, causal=True, initial_state=state)


@pytest.mark.only_backends("torch", reason="the torch layers run on the torch CPU backend")
def test_torch_layer_streams_a_causal_nd_bias(backend, rng):
    import torch

    from fastrpb.torch import FastRPBnd, LinearAttention

    bias = FastRPBnd(2, (3, 4), skip=(1, 0), causal=True, seed=0, scale=0.3, dtype=torch.float64)
    layer = LinearAttention(8, 2, causal=True, rpb=bias, dtype=torch.float64)
    x = backend.asarray(rng.standard_normal((2, 13, 8)))
    whole = layer(x)
    first, cache = layer(x[:, :6], return_cache=True)
    outs = [first]
    for t in range(6, 10):
        y, cache = layer.step(x[:, t], cache)
        outs.append(y[:, None])
    outs.append(layer(x[:, 10:], cache=cache, return_cache=True)[0])
    assert_close(backend, torch.cat(outs, dim=1), whole, "float64")
    with pytest.raises(ValueError, match=r"FastRPBnd\(\.\.\., causal=True\)"):
        LinearAttention(8, 2, causal=True, rpb=FastRPBnd(2, (3, 4)))


@pytest.mark.only_backends("jax", reason="the flax layers run on the JAX CPU backend")
def test_flax_bias_module_streams(backend, rng):
    # the flax FastRPBnd's streaming calls (the attention layers around it are the
    # torch layers' code, tested above; an eager flax attention layer costs ~40 s here)
    from fastrpb.flax import FastRPBnd

    grid, skip = (3, 4), (1, 0)
    bias = FastRPBnd(2, grid, skip=skip, causal=True, seed=0, scale=0.3, param_dtype=backend.xp.float64)
    v = rng.standard_normal((2, 13, 3))  # (heads, L, D): the shapes of the tests above (compiled kernels shared)
    expected = oracles.rpb_nd(v, [backend.to_numpy(w) for w in bias.weights()], grid, skip=skip, causal=True)
    vb = backend.asarray(v)
    first, state = bias(vb[..., :6, :], return_state=True)
    outs = [first]
    for t in range(6, 10):  # across a row's end
        y, state = bias(vb[..., t, :], initial_state=state, step=True)
        outs.append(y[..., None, :])
    outs.append(bias(vb[..., 10:, :], initial_state=state))
    assert_close(backend, backend.xp.concat(outs, axis=-2), expected, "float64")


# --------------------------------------------------------------------------- errors
def test_bad_streams_are_errors_that_name_the_argument(backend, rng):
    grid = (3, 4)
    v, tables, _ = _case(rng, grid, (0, 0), None)
    vb, tb = backend.asarray(v), _on(backend, tables)
    _, state = fastrpb.rpb_nd(vb[..., :4, :], tb, grid, causal=True, return_state=True)
    with pytest.raises(ValueError, match="grid"):
        fastrpb.rpb_nd_step(state, vb[..., 4, :], tb, grid=(4, 3))
    full = fastrpb.rpb_nd(vb, tb, grid, causal=True, return_state=True)[1]
    with pytest.raises(ValueError, match="v_t goes past the end"):
        fastrpb.rpb_nd_step(full, vb[..., 5, :], tb, grid=grid)
    with pytest.raises(ValueError, match="v goes past the end"):
        fastrpb.rpb_nd(vb[..., :9, :], tb, grid, causal=True, initial_state=state)
    with pytest.raises(ValueError, match="tables"):
        fastrpb.rpb_nd_step(state, vb[..., 4, :], [tb[0], None], grid=grid)
    longer = backend.asarray(rng.standard_normal(2 * 4 + 5))
    with pytest.raises(ValueError, match="tables"):
        fastrpb.rpb_nd_step(state, vb[..., 4, :], [tb[0], longer], grid=grid)
    with pytest.raises(ValueError, match=r"tables\[1\]"):
        fastrpb.rpb_nd_step(None, vb[..., 4, :], [tb[0], tb[1][..., 3:-3]], grid=grid)  # shorter than its axis
    with pytest.raises(ValueError, match="skip"):
        fastrpb.rpb_nd(vb[..., 4:, :], tb, grid, causal=True, skip=(1, 0), initial_state=state)
    with pytest.raises(ValueError, match="causal"):
        fastrpb.rpb_nd(vb, tb, grid, return_state=True)
    with pytest.raises(TypeError, match="state"):
        fastrpb.rpb_nd_step(object(), vb[..., 4, :], tb, grid=grid)
    with pytest.raises(ValueError, match="width"):
        fastrpb.rpb_nd_step(state, vb[..., 4, :2], tb, grid=grid)
