"""Streaming causal FastRPB: an online (relaxed) FFT convolution in a fixed-shape state.

The causal bias of token ``t`` is the convolution ``out_t = sum_{j <= t} c_{t-j} v_j``
with the kernel ``c_k = w[M - 1 + k]``. Recomputing it over the history each token
costs O(t log t); the online scheme here costs amortised O(D log^2 t) per token
(van der Hoeven, "Relax, but don't be too lazy", J. Symb. Comput. 2002; the same
tiling as "FutureFill", Agarwal et al. 2024, and "Flash Inference", Oncescu et al.
2024):

- the sequence is cut into aligned windows of ``B = _WINDOW`` tokens. ``window``
  holds the bias of the current window's ``B`` positions accumulated so far; a new
  token at row ``r`` *pushes* its contribution ``c_{i-r} v_t`` to the rows ``i >= r``
  (offsets ``0 .. B - 1`` inside the window: one multiply-add) and reads its own
  row. The same multiply-add writes the token into the window's value rows (a unit
  pulse beside the kernel), so the state holds its own copy of every token;
- offsets ``k`` in ``[1, 2B)`` across windows: when the window ``[E - B, E)``
  completes, one FFT of length ``4B`` convolves it with ``c_1 .. c_{2B-1}`` and
  gives its contribution to the outputs ``E .. E + 2B - 2`` (level ``s = B``);
- offsets ``k`` in ``[s, 2s)`` for ``s = 2B, 4B, ...`` (``s < M``): the values are
  cut into aligned blocks of ``s`` tokens; when the block ``[E - s, E)`` completes,
  one FFT of length ``2s`` convolves it with ``c_s .. c_{2s-1}`` and gives its
  contribution to the outputs ``E .. E + 2s - 2``, all still in the future. Each
  level keeps one pending array of those contributions; every ``B`` tokens the rows
  of all levels for the next ``B`` positions are summed into the new ``window``.
  Each level costs O(t log s) over ``t`` tokens: O(log^2 t) per token in all, never
  an FFT over the whole history.

One layout for every library and mode: every array is preallocated from the table
capacity ``M``, so the state's structure and leaf shapes never change with the
number of tokens, eagerly or under ``jax.jit`` / ``torch.compile``, and a state
crosses between them as it is. Eagerly the count is read once per step and Python
decides which levels complete; under a compiler (``is_compiled``) the same decisions
are compiled conditionals (``cond``) and positions are dynamic slices (``_rows``).

The levels are built lazily. A chunk (``extend``) leaves them stale (``ready`` is 0)
and keeps only the history, in the counter's top slot (its capacity is at least
``M``): a chunked prefill pays the chunks' convolutions and one copy of the history
per chunk, never a rebuild of every level per chunk. The first step after a chunk
rebuilds the levels once (one FFT per level, ``_rebuild``). Dask never builds them:
its steps are an O(M D) product with the history (``_step_history``), the same few
tasks whatever ``M`` and ``t``, where the levels would add a task group per level.

Every update builds new arrays (no array is written in place), so a state is never
changed by a later step: it can be kept, branched, or differentiated (torch
autograd, ``jax.grad``). No state holds a caller's array: tokens enter it through
arithmetic or a concatenation, both fresh arrays. The one exception is asked for: a
step with ``donate=True`` under ``torch.compile`` writes the levels of the state it
was given in place (``_step_in_place``), where a compiled step would otherwise copy
them at every token. Under ``jax.jit`` the step touches the levels only inside the
conditional of a window's completion (``_step_nested``), so XLA updates a donated
state in place.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._compat import (
    concat_rows,
    cond,
    conditionals_nest,
    count_array,
    device_of,
    eager_jit,
    in_place_update,
    irfft,
    is_compiled,
    is_lazy,
    jax_pytree,
    multiply_add,
    multiply_add_into,
    multiply_into,
    next_fast_len,
    owned,
    rfft,
    slices_compile,
    write_in_place,
    writes_in_place,
)
from ._typing import Array, Namespace

__all__ = ["RPBState", "as_dtype", "check_state", "extend", "held", "start", "step", "tokens_seen"]

# Tokens handled by the direct near field, and the granularity of the online levels:
# 32 rows of D values is a few microseconds of multiply-add, and level work then runs
# only every 32 tokens (its Python overhead amortised over them).
_WINDOW = 32


@jax_pytree(static=("skip", "table_length"))
class RPBState(NamedTuple):
    """What causal FastRPB carries from one token (or chunk) to the next.

    Made by ``rpb(..., causal=True, return_state=True)`` and ``rpb_step``; pass it back
    as ``initial_state=`` / ``state``. All arrays have the leading shape ``lead`` of
    the bias output (``broadcast(w.shape[:-1], v.shape[:-2])``; ``near`` has ``w``'s)
    and the compute dtype (float32 for half-precision inputs). ``t`` below is the
    number of biased tokens so far (tokens seen minus ``skip``), ``B = 32``, ``s``
    runs over ``B`` (when ``M > 1``) and ``2B, 4B, ... < M``.

    - ``blocks``: the biased values so far in aligned blocks of ``B 2^k`` tokens, a
      binary counter: slot ``k`` is a ``(..., B 2^k, D)`` array, holding a block when
      bit ``k`` of ``t // B`` is set (oldest first when read from the highest ``k``
      down); one slot per bit of ``M // B``;
    - ``window``: ``(..., B, 2, D)``: ``[..., 0, :]`` the bias of the ``B`` positions of
      the current window from every value so far, already summed; ``[..., 1, :]`` the
      window's values so far (zeros ahead);
    - ``future``: one ``(..., 2s - 1, D)`` array per level ``s``: the contributions of
      the completed level-``s`` blocks to the positions from the last multiple of ``s``;
    - ``near``: ``(..., 2B - 1, 2, 1)``: ``B - 1`` zeros then ``c_0 .. c_{B-1}`` (zero
      past ``M``), the weights a token pushes into the window, beside a unit pulse at
      row ``B - 1`` that writes the token into the window's value rows;
    - ``count``: a 0-d int32 array, the tokens seen (a NumPy one beside Dask arrays:
      known when the state is made, read without computing anything);
    - ``ready``: a 0-d int32 array (NumPy beside Dask, as ``count``): 1 when the fields
      above are the online levels; 0 after a chunk, when only the history is kept, in
      the first ``t`` rows of the top slot ``blocks[-1]`` (the rows after them are
      unspecified; its capacity is at least ``M``), and the other fields are stale. The first step after a chunk
      rebuilds the levels from it (once); a chunk after a chunk only reads it.

    Memory: about ``4 M D`` numbers per leading index (``2 M`` of blocks, ``2 M`` of
    pending rows), fixed by the table's ``M`` whatever the number of tokens.

    Static fields (JAX aux data, not leaves): ``skip`` (the ``a`` of ``skip=(a, 0)``)
    and ``table_length`` (``M`` of the table the state was made for). The state is a
    JAX pytree of the arrays above with the same structure, shapes and dtypes after
    any number of tokens, so it is a ``jax.lax.scan`` carry and a ``jax.jit`` argument
    that compiles once, and ``torch.compile`` does not recompile per token.

    Examples
    --------
    Two calls that pass the state equal one call over the whole sequence:

    >>> import numpy as np
    >>> from fastrpb import rpb
    >>> rng = np.random.default_rng(0)
    >>> v = rng.standard_normal((6, 2))
    >>> w = rng.standard_normal(11)  # M = 6
    >>> first, state = rpb(v[:4], w, causal=True, return_state=True)
    >>> second = rpb(v[4:], w, causal=True, initial_state=state)
    >>> bool(np.allclose(np.concatenate([first, second]), rpb(v, w, causal=True)))
    True
    """

    blocks: tuple
    window: Array
    future: tuple
    near: Array
    count: Array
    ready: Array
    skip: int
    table_length: int


# --------------------------------------------------------------------------- shapes
def _levels(M: int) -> list[tuple[int, int]]:
    """Block size ``s`` and first offset of each online level: ``(B, 1)`` (the offsets
    across windows, when ``M > 1``), then ``(s, s)`` for ``s = 2B, 4B, ... < M``."""
    levels, s = ([(_WINDOW, 1)] if M > 1 else []), 2 * _WINDOW
    while s < M:
        levels.append((s, s))
        s *= 2
    return levels


def _slots(M: int) -> int:
    """Block slots: one per bit of ``t // B`` for ``t <= M``, and a top slot of at least
    ``M`` rows (the whole history after a chunk)."""
    return ((max(M, 1) - 1) // _WINDOW).bit_length() + 1


def _lead_of(state: RPBState) -> tuple:
    return tuple(state.window.shape[:-3])


def held(state: RPBState | None) -> Array | None:
    """One array of the state (its library and device stand for all), or None (also for
    what is not a state: the checks that follow name it)."""
    return state.window if isinstance(state, RPBState) else None


def check_state(state: Any, M: int, a: int, D: int, lead: tuple, name: str) -> None:
    """The state fits these inputs: type, table length, skip, feature width, leading shape."""
    if not isinstance(state, RPBState):
        raise TypeError(
            f"{name} must be an RPBState (from rpb(..., return_state=True) or rpb_step) or None, got {type(state).__name__}"
        )
    if state.table_length != M:
        raise ValueError(
            f"{name} was made for a table with M = {state.table_length} but w has M = {M} "
            f"(shape (..., {2 * M - 1})); continue a sequence with the table that started it"
        )
    if state.skip != a:
        raise ValueError(
            f"{name} was started with skip = ({state.skip}, 0) but skip is ({a}, 0); pass the skip of the sequence's start"
        )
    width = int(state.window.shape[-1])
    if width != D:
        raise ValueError(f"{name} holds values of width D = {width} but the new values have width D = {D}")
    if _lead_of(state) != tuple(lead):
        raise ValueError(
            f"{name} has leading shape {_lead_of(state)} but w and the new values broadcast to {tuple(lead)}; "
            "continue a sequence with the same batch and head shapes"
        )


def as_dtype(xp: Namespace, x: Array, dtype: Any) -> Array:
    """``x`` in ``dtype``; no call at all when it already is (a step calls this often)."""
    return x if x.dtype == dtype else xp.astype(x, dtype)


def _zeros(xp: Any, shape: tuple, like: Any) -> Any:
    return xp.zeros(shape, dtype=like.dtype, device=device_of(like))


def _near_kernel(xp: Any, w: Any, M: int) -> Any:
    """``(..., 2B - 1, 2, 1)``: column 0 ``B - 1`` zeros, then ``c_0 .. c_{B-1}`` (zeros
    past ``M``); column 1 a unit pulse at row ``B - 1``.

    Rows ``B - 1 - r .. 2B - 2 - r`` are the weights ``c_{i-r}`` (zero for ``i < r``)
    of the window rows ``i`` for a token at row ``r``, and the pulse at row ``r``.
    """
    nb = min(_WINDOW, M)
    lead = tuple(w.shape[:-1])
    parts = [_zeros(xp, (*lead, _WINDOW - 1), w), w[..., M - 1 : M - 1 + nb]]
    if nb < _WINDOW:
        parts.append(_zeros(xp, (*lead, _WINDOW - nb), w))
    kernel = xp.concat(parts, axis=-1)
    rows = xp.arange(2 * _WINDOW - 1, device=device_of(w))
    pulse = xp.broadcast_to(xp.astype(rows == _WINDOW - 1, w.dtype), kernel.shape)
    return xp.stack([kernel, pulse], axis=-1)[..., None]


def start(xp: Namespace, lead: tuple, D: int, M: int, a: int, w: Array, like: Array) -> RPBState:
    """The state of an empty sequence (``like`` gives dtype and device)."""
    return RPBState(
        blocks=tuple(_zeros(xp, (*lead, _WINDOW << k, D), like) for k in range(_slots(M))),
        window=_zeros(xp, (*lead, _WINDOW, 2, D), like),
        future=tuple(_zeros(xp, (*lead, 2 * s - 1, D), like) for s, _ in _levels(M)),
        near=_near_kernel(xp, as_dtype(xp, w, like.dtype), M),
        count=count_array(xp, 0, like=like),
        ready=count_array(xp, 1, like=like),
        skip=a,
        table_length=M,
    )


def tokens_seen(xp: Namespace, state: RPBState) -> int | None:
    """Tokens a state has seen, or None when only a compiled count knows it."""
    return None if is_compiled(xp, state.count) else int(state.count)


def _rows(xp: Any, x: Any, start: Any, size: int, axis: int = -2) -> Any:
    """``size`` consecutive entries of ``x`` along ``axis`` from ``start`` (an int, or a
    0-d integer array under a compiler), zeros where the index is outside ``x``."""
    n = x.shape[axis]
    if isinstance(start, int):
        lo, hi = max(0, start), min(n, start + size)
        hi = max(lo, hi)
        part = x[(slice(None),) * (x.ndim + axis) + (slice(lo, hi),) + (slice(None),) * (-axis - 1)]
        if hi - lo == size:
            return part
        before, after = list(x.shape), list(x.shape)
        before[axis] = min(size, lo - start)
        after[axis] = size - before[axis] - (hi - lo)
        return xp.concat([_zeros(xp, tuple(before), x), part, _zeros(xp, tuple(after), x)], axis=axis)
    index = start + xp.arange(size, dtype=start.dtype, device=device_of(x))
    inside = (index >= 0) & (index < n)
    taken = xp.take(x, xp.clip(index, 0, n - 1), axis=axis)
    mask = xp.reshape(inside, (size,) + (1,) * (-axis - 1))
    return xp.where(mask, taken, _zeros(xp, (), x))


def _band_conv(xp: Any, x: Any, w: Any, d0: int, d1: int, n: int, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of the linear convolution of ``x (..., m, D)`` with ``c_{d0} .. c_{d1-1}``.

    FFT of length ``n`` (no wrap-around onto the rows kept: ``n >= hi`` and ``n >= m +
    d1 - d0 - 1``), along the last axis of the transposed values (contiguous
    transforms, as in ``bias._toeplitz``).
    """
    M = (w.shape[-1] + 1) // 2
    band = w[..., M - 1 + d0 : M - 1 + d1]
    band_f = rfft(xp, band, n=n)[..., None, :]
    spectrum = multiply_into(xp, rfft(xp, xp.matrix_transpose(x), n=n), band_f)
    return xp.matrix_transpose(irfft(xp, spectrum, n=n, consume=True)[..., lo:hi])


# --------------------------------------------------------------------------- online
def _levels_complete(
    xp: Any, carry: Any, blocks: tuple, future: tuple, q: Any, w: Any, M: int, done: Any = None
) -> tuple[tuple, tuple]:
    """The levels that complete with window ``q`` (``q = E / B`` windows done, ``E`` an
    aligned end): ``carry`` the window's values, ``blocks`` and ``future`` the state's.

    Level ``k`` completes iff ``q`` is a multiple of ``2^k``: its block (the carry: the
    lower blocks of the binary counter joined to the window) is convolved with its
    band of the kernel into the level's pending rows and becomes the counter's slot
    ``k`` (where level ``k + 1`` completes too, that slot's bit is clear and its
    contents unused). Eagerly ``blocks`` holds only the slots of the levels that
    complete (``_fired``), and just those are computed; under a compiler (``done``:
    whether the window completes at all) each level is one conditional, side by side:
    nested ones failed in Dynamo from three levels deep. Returns ``(blocks, future)``.
    """
    levels = _levels(M)
    counter = max(1, (M // _WINDOW).bit_length())  # the slots a carry reaches (t <= M)
    old, new_blocks, new_future = blocks, list(blocks), list(future)
    for k in range(counter if done is not None else len(blocks)):
        if k:
            carry = xp.concat([old[k - 1], carry], axis=-2)
        has_level = k < len(levels)

        def fire(*ops: Any, carry: Any = carry, k: int = k) -> tuple:
            if len(ops) == 1:
                return (carry,)
            return (carry, _level_rows(xp, carry, ops[1], w, M, *levels[k]))

        ops: tuple = (new_blocks[k], new_future[k]) if has_level else (new_blocks[k],)
        ops = fire(*ops) if done is None else cond(xp, done & (q % (1 << k) == 0), fire, lambda *ops: ops, ops)
        new_blocks[k] = ops[0]
        if has_level:
            new_future[k] = ops[1]
    return tuple(new_blocks), tuple(new_future)


def _level_rows(xp: Any, carry: Any, old: Any, w: Any, M: int, s: int, d0: int) -> Any:
    """Level ``s``'s pending rows after its block ``carry`` (the ``s`` values before an
    aligned end ``E``) completes: its contributions to the positions from ``E``, and
    ``old``'s (the previous block's rows from ``E`` on: its rows ``s .. 2s - 2``)."""
    # rows: position E + u is row s - d0 + u of the convolution (carry starts at E - s)
    tile = _band_conv(xp, carry, w, d0, min(2 * s, M), 2 * s if d0 == s else 4 * s, s - d0, 3 * s - d0 - 1)
    return xp.concat([tile[..., : s - 1, :] + old[..., s:, :], tile[..., s - 1 :, :]], axis=-2)


def _window_rows(xp: Any, future: tuple, E: Any, like: Any) -> Any:
    """Sum over levels of the pending rows for positions ``E .. E + B - 1``."""
    total = _zeros(xp, tuple(like.shape), like)
    for k, f in enumerate(future):
        s = _WINDOW << k
        total = total + _rows(xp, f, E % s, _WINDOW)  # the level's rows start at the last multiple of s
    return total


def _fired(q: int, M: int) -> int:
    """How many levels complete with window ``q`` (an int): those ``k`` (below the
    counter's slots) with ``q`` a multiple of ``2^k``."""
    counter = max(1, (M // _WINDOW).bit_length())
    return min(counter, (q & -q).bit_length())


@eager_jit(static=("a",))
def _push(xp: Any, window: Any, near: Any, v: Any, count: Any, *, a: int) -> tuple:
    """The token ``v`` after ``count`` tokens seen (an int, or a 0-d array on JAX and
    under a compiler): its weights ``c_{i-r}`` pushed onto the window rows ``i >= r``
    and the token written into row ``r`` (``r`` its position in the window); returns
    ``(its bias, read from row r, window, count + 1)``. One multiply-add; eager JAX:
    one cached jitted computation."""
    r = (count - a) % _WINDOW
    window = multiply_add(xp, window, _rows(xp, near, _WINDOW - 1 - r, _WINDOW, axis=-3), v[..., None, None, :])
    row = window[..., r, 0, :] if isinstance(r, int) else _rows(xp, window[..., 0, :], r, 1)[..., 0, :]
    return owned(xp, row), window, count + 1


@eager_jit(static=("a", "M"))
def _complete(xp: Any, window: Any, blocks: tuple, future: tuple, w: Any, count: Any, *, a: int, M: int) -> tuple:
    """The window ending with token ``count - 1`` (``count`` the tokens seen: an int, or
    a 0-d array on JAX) is complete, and with it the levels of the slots ``blocks``
    (the first ``_fired`` of the state's): feed them and start the next window from
    the pending rows of all levels (``future``, the state's). Returns ``(window,
    blocks, future of the levels fed)``: only what changed, so that eager JAX, which
    runs this as one cached jitted computation per number of levels (``eager_jit``),
    does not copy the untouched levels (a jitted call returns fresh arrays, O(M D))."""
    window, blocks, future = _finish_window(xp, window, blocks, future, (count - a) // _WINDOW, w, M)
    return window, blocks, future[: len(blocks)]


def _finish_window(
    xp: Any, window: Any, blocks: tuple, future: tuple, q: Any, w: Any, M: int, done: Any = None
) -> tuple[Any, tuple, tuple]:
    """Window ``q`` (``q = E / B`` windows done) is complete: the levels it feeds
    (``_levels_complete``, with its ``done``) and the next window, started from their
    pending rows; returns ``(next window, blocks, future)``."""
    blocks, future = _levels_complete(xp, window[..., 1, :], blocks, future, q, w, M, done=done)
    rows = _window_rows(xp, future, q * _WINDOW, window[..., 0, :])
    return xp.stack([rows, _zeros(xp, tuple(rows.shape), rows)], axis=-2), blocks, future


def step(
    xp: Namespace,
    state: RPBState | None,
    v: Array,
    w: Array,
    *,
    lead: tuple,
    M: int,
    a: int,
    work: Array,
    donate: bool = False,
) -> tuple[Array, RPBState]:
    """One token ``v (..., D)`` (validated, compute dtype); returns ``(out, state)``.

    Eagerly the count is read (once) and Python decides whether the levels need a
    rebuild (after a chunk) and whether the window completes; under a compiler the
    decisions are compiled conditionals and positions past the table give NaN (no
    error can be raised there). Dask: ``_step_history``. ``donate``: the state's
    arrays may be overwritten (``_step_in_place`` under ``torch.compile``).
    """
    D = v.shape[-1]
    if state is None:
        state = start(xp, lead, D, M, a, w, v)
    v = xp.broadcast_to(v, (*lead, D)) if tuple(v.shape[:-1]) != lead else v
    if donate and writes_in_place(xp, state.window, *state.blocks, *state.future, v, w) and state.window.dtype == work:
        return _step_in_place(xp, state, v, w, M=M, a=a)
    compiled = is_compiled(xp, state.count, v, w)
    if compiled and conditionals_nest(xp):
        return _step_nested(xp, state, v, w, M=M, a=a, work=work)
    if not compiled and is_lazy(xp, v, w, state.window):
        return _step_history(xp, state, v, w, M=M, a=a, work=work)
    seen = -1 if compiled else int(state.count)  # -1: unknown here
    if not compiled and seen < a:  # a skipped token: no bias given or received
        return _zeros(xp, (*lead, D), v), state._replace(count=count_array(xp, seen + 1, like=v))
    if compiled:
        state = _ready_compiled(xp, state, w, M, a, work)
    elif not int(state.ready):  # the first step after a chunk: the levels, once
        state = _rebuild(xp, _history(xp, state, seen - a, work), seen - a, state.count, a, w, M)
    # the count as an array under a compiler, and for eager JAX, whose jitted kernels
    # (``eager_jit``) then compile once, not once per position
    arrays = compiled or slices_compile(xp)
    count = state.count if arrays else seen
    near = as_dtype(xp, state.near, work)
    window = as_dtype(xp, state.window, work)
    if compiled and a:
        v = xp.where(state.count < a, _zeros(xp, (), v), v)
    out, window, after = _push(xp, window, near, v, count, a=a)
    if not compiled:  # the hot path: one multiply-add, then only every B tokens the levels
        count = after if arrays else count_array(xp, after, like=v)
        if (seen - a) % _WINDOW != _WINDOW - 1:
            return out, state._replace(window=window, near=near, count=count)
        blocks = tuple(as_dtype(xp, b, work) for b in state.blocks)
        future = tuple(as_dtype(xp, f, work) for f in state.future)
        fired = _fired((seen - a + 1) // _WINDOW, M)
        window, fed, pending = _complete(xp, window, blocks[:fired], future, w, after, a=a, M=M)
        return out, state._replace(
            blocks=(*fed, *blocks[fired:]),
            window=window,
            future=(*pending, *future[len(pending) :]),
            near=near,
            count=count,
        )
    t = state.count - a  # biased position of this token
    out = _mask_positions(xp, out, t, M)
    blocks = tuple(as_dtype(xp, b, work) for b in state.blocks)
    future = tuple(as_dtype(xp, f, work) for f in state.future)
    done = t % _WINDOW == _WINDOW - 1
    if a:
        done = done & (t >= 0)
    next_window, blocks, future = _finish_window(xp, window, blocks, future, (t + 1) // _WINDOW, w, M, done=done)
    window = xp.where(done, next_window, window)
    return out, state._replace(blocks=blocks, window=window, future=future, near=near, count=state.count + 1)


def _step_nested(xp: Any, state: RPBState, v: Any, w: Any, *, M: int, a: int, work: Any) -> tuple[Any, RPBState]:
    """A compiled step where conditionals nest (``jax.jit``): the push, then one
    conditional taken when the token ends a window (the levels that complete, the
    next window). The other tokens touch nothing of the O(M D) levels, so XLA can
    update a donated state (``donate_argnums``) in place.

    A state here has its levels built (``ready`` 1): on JAX a chunk builds them at its
    end, eagerly and compiled (``extend``). A rebuild branch in the step made XLA copy
    the levels at every token (3.1 ms a step against 0.35 ms without, t = 1,024, 8 x 64
    values), so a state without them gives NaN here, never a silently wrong value."""
    n, n_future = len(state.blocks), len(state.future)
    count = state.count
    t = count - a  # biased position of this token
    if a:
        v = xp.where(t < 0, _zeros(xp, (), v), v)
    near, window = as_dtype(xp, state.near, work), as_dtype(xp, state.window, work)
    out, window, _ = _push(xp, window, near, v, count, a=a)
    done = (t % _WINDOW == _WINDOW - 1) & (t >= 0)
    q = (t + 1) // _WINDOW

    def complete(*ops: Any) -> tuple:
        window, blocks, future = _finish_window(xp, ops[-1], ops[:n], ops[n:-1], q, w, M, done=done)
        return (*blocks, *future, window)

    ops = (*(as_dtype(xp, x, work) for x in (*state.blocks, *state.future)), window)
    ops = cond(xp, done, complete, lambda *ops: ops, ops)
    nan = xp.asarray(float("nan"), dtype=out.dtype, device=device_of(out))
    out = xp.where(state.ready == 1, _mask_positions(xp, out, t, M), nan)
    return out, state._replace(blocks=ops[:n], future=ops[n : n + n_future], window=ops[-1], near=near, count=count + 1)


def _step_in_place(xp: Any, state: RPBState, v: Any, w: Any, *, M: int, a: int) -> tuple[Any, RPBState]:
    """A step under ``torch.compile`` that writes the donated state's levels in place.

    The push is compiled (one multiply-add on the small window); what writes the
    O(M D) levels, once per ``B`` tokens (and once after a chunk), is one eager update
    of the state's own buffers (``write_in_place``), so no call copies the levels (the
    compiled conditionals of ``step`` copy each of them at every call: ``torch.cond``
    may not return its operands)."""
    if a:
        v = xp.where(state.count < a, _zeros(xp, (), v), v)
    out, window, count = _push(xp, state.window, state.near, v, state.count, a=a)
    buffers = (out, window, state.near, state.ready, *state.blocks, *state.future)
    write_in_place(xp, _levels_in_place, buffers, (v, w, state.count), a, M)
    return _mask_positions(xp, out, state.count - a, M), state._replace(window=window, count=count)


@in_place_update
def _levels_in_place(xp: Any, buffers: tuple, inputs: tuple, a: int, M: int) -> None:
    """``_step_in_place``'s eager update after the push of token ``v`` (``count`` tokens
    before it), written into ``buffers`` (its output, the window after its push, and
    the state's near, ready, blocks, future): after a chunk (``ready`` 0) the levels
    from the history and the token's push again (its output too); when the token
    ends a window, the levels that complete and the next window; else nothing."""
    _, window, near, ready, *rest = buffers
    v, w, count = inputs
    n, seen = _slots(M), int(count)
    blocks, future = rest[:n], rest[n:]
    if not int(ready):
        stale = RPBState(tuple(blocks), window, tuple(future), near, count, ready, a, M)
        t = max(seen - a, 0)
        new = _rebuild(xp, _history(xp, stale, t, window.dtype), t, count, a, w, M)
        row, pushed, _ = _push(xp, new.window, new.near, v, seen, a=a)
        values = (row, pushed, new.near, new.ready, *new.blocks, *new.future)
        for buffer, value in zip(buffers, values, strict=True):
            buffer[...] = value
    t = seen - a
    if t < 0 or t % _WINDOW != _WINDOW - 1:
        return
    fired = _fired((t + 1) // _WINDOW, M)
    next_window, fed, pending = _complete(xp, window, tuple(blocks[:fired]), tuple(future), w, seen + 1, a=a, M=M)
    # the window last: the lowest block fed is a view of its value rows
    fed_buffers = (*blocks[:fired], *future[: len(pending)], window)
    for buffer, value in zip(fed_buffers, (*fed, *pending, next_window), strict=True):
        buffer[...] = value


def _ready_compiled(xp: Any, state: RPBState, w: Any, M: int, a: int, work: Any) -> RPBState:
    """Under a compiler: the state with its levels built (a conditional on ``ready``:
    the rebuild from the top slot runs only after a chunk)."""
    n, n_future = _slots(M), len(_levels(M))
    t = xp.maximum(state.count - a, 0 * state.count)

    def build(*ops: Any) -> tuple:
        new = _rebuild(xp, ops[n - 1], t, state.count, a, w, M)
        return (*new.blocks, new.window, *new.future, new.near)

    ops = tuple(as_dtype(xp, x, work) for x in (*state.blocks, state.window, *state.future, state.near))
    ops = cond(xp, state.ready == 1, lambda *ops: ops, build, ops)
    return state._replace(
        blocks=ops[:n],
        window=ops[n],
        future=ops[n + 1 : n + 1 + n_future],
        near=ops[-1],
        ready=count_array(xp, 1, like=state.window),
    )


def _step_history(xp: Any, state: RPBState, v: Any, w: Any, *, M: int, a: int, work: Any) -> tuple[Any, RPBState]:
    """A Dask step (the count is known, the values are not): the token written into the
    history (the top slot) and its bias as one product of the history with the
    reversed kernel, O(M D) and the same few tasks whatever ``M`` and ``t``. The levels
    are never built (``ready`` stays 0): they would add a task group per level."""
    seen = int(state.count)
    t = seen - a
    lead, D = tuple(v.shape[:-1]), v.shape[-1]
    count = count_array(xp, seen + 1, like=v)
    if t < 0:
        return _zeros(xp, (*lead, D), v), state._replace(count=count)
    top = _history_top(xp, state, t, work)
    rows = xp.arange(top.shape[-2], device=device_of(top))
    top = xp.where((rows == t)[:, None], v[..., None, :], xp.where((rows < t)[:, None], top, _zeros(xp, (), top)))
    kernel = xp.take(w, xp.clip(M - 1 + t - rows, 0, 2 * M - 2), axis=-1)
    kernel = xp.where(rows <= t, kernel, _zeros(xp, (), kernel))
    out = (kernel[..., None, :] @ top)[..., 0, :]
    ready = count_array(xp, 0, like=v)
    return out, state._replace(blocks=(*state.blocks[:-1], top), count=count, ready=ready)


def _mask_positions(xp: Any, out: Any, t: Any, M: int) -> Any:
    """Zero for skipped tokens (``t < 0``); NaN past the table (``t >= M``: no error can be raised under a compiler)."""
    zero = xp.zeros((), dtype=out.dtype, device=device_of(out))
    nan = xp.asarray(float("nan"), dtype=out.dtype, device=device_of(out))
    return xp.where(t < 0, zero, xp.where(t < M, out, nan))


# --------------------------------------------------------------------------- chunks
def _capacity(M: int) -> int:
    """Rows of the top slot (at least ``M``): the history after a chunk."""
    return _WINDOW << (_slots(M) - 1)


def _history(xp: Any, state: RPBState, t: int, work: Any) -> Any:
    """The ``t`` biased values of a state (an int count), chronological, ``(..., t, D)``."""
    if not int(state.ready):
        return as_dtype(xp, state.blocks[-1][..., :t, :], work)
    q, E = t // _WINDOW, (t // _WINDOW) * _WINDOW
    parts = [b for k, b in reversed(list(enumerate(state.blocks))) if (q >> k) & 1]
    parts.append(state.window[..., : t - E, 1, :])
    return xp.concat([as_dtype(xp, x, work) for x in parts], axis=-2)


def _history_top(xp: Any, state: RPBState, t: int, work: Any) -> Any:
    """The top slot of a state after its ``t`` biased values (an int count): those values,
    then unspecified rows."""
    if not int(state.ready):
        return as_dtype(xp, state.blocks[-1], work)
    return concat_rows(xp, [_history(xp, state, t, work)], _capacity(state.table_length))


def _history_buffer(xp: Any, state: RPBState, t: Any, rows: int, work: Any) -> Any:
    """The biased values of a state as ``(..., rows, D)``, zeros after the first ``t``
    (``t`` a 0-d array under a compiler): each block placed where its bit puts it."""
    q = t // _WINDOW
    recent = as_dtype(xp, state.window[..., 1, :], work)
    out = _zeros(xp, (*recent.shape[:-2], rows, recent.shape[-1]), recent)
    position = xp.arange(rows, dtype=state.count.dtype, device=device_of(recent))
    places = [(q // (2 << k) * (2 << k) * _WINDOW, b, (q // (1 << k)) % 2 == 1) for k, b in enumerate(state.blocks)]
    places.append((q * _WINDOW, recent, None))  # zeros ahead of t
    for first, block, present in places:
        size = block.shape[-2]
        inside = (position >= first) & (position < first + size)
        if present is not None:
            inside = inside & present
        gathered = xp.take(as_dtype(xp, block, work), xp.clip(position - first, 0, size - 1), axis=-2)
        out = xp.where(inside[:, None], gathered, out)
    return out


def _rebuild(xp: Any, H: Any, t: Any, count: Any, a: int, w: Any, M: int) -> RPBState:
    """The state after the biased values ``H (..., t, D)`` (``t`` an int), or after the
    first ``t`` rows of ``H`` (``t`` a 0-d array under a compiler; the later rows are
    ignored)."""
    lead, D = tuple(H.shape[:-2]), H.shape[-1]
    q = t // _WINDOW
    E = q * _WINDOW
    blocks = []
    for k in range(_slots(M)):  # slot k: the block from the higher bits' end, if bit k is set
        size = _WINDOW << k
        first = q // (2 << k) * (2 << k) * _WINDOW
        if isinstance(t, int) and not (q >> k) & 1:
            blocks.append(_zeros(xp, (*lead, size, D), H))
        else:
            blocks.append(owned(xp, _rows(xp, H, first, size)))
    future = []
    for s, d0 in _levels(M):
        first = E // s * s  # end of the last completed level-s block
        if isinstance(t, int) and first == 0:
            future.append(_zeros(xp, (*lead, 2 * s - 1, D), H))
            continue
        # x = the two blocks before first (zeros before 0): position first + u is row 2s - d0 + u
        x = _rows(xp, H, first - 2 * s, 2 * s)
        future.append(owned(xp, _band_conv(xp, x, w, d0, min(2 * s, M), 4 * s, 2 * s - d0, 4 * s - d0 - 1)))
    if isinstance(E, int) and slices_compile(xp):  # the gathers a step's window completion compiles
        E = count_array(xp, E, like=H)
    rows = _window_rows(xp, tuple(future), E, _zeros(xp, (*lead, _WINDOW, D), H))
    recent = _rows(xp, H, E, _WINDOW)
    if not isinstance(t, int):  # rows t and after are not values yet
        ahead = xp.arange(_WINDOW, dtype=E.dtype, device=device_of(H)) >= t - E
        recent = xp.where(ahead[:, None], _zeros(xp, (), H), recent)
    near = _near_kernel(xp, w, M)
    # the window's tokens push as the steps would have: rows += T recent, T[i, j] = c_{i-j}
    i = xp.arange(_WINDOW, device=device_of(H))
    toeplitz = xp.take(near[..., 0, 0], xp.reshape(_WINDOW - 1 + i[:, None] - i[None, :], (-1,)), axis=-1)
    rows = rows + xp.reshape(toeplitz, (*toeplitz.shape[:-1], _WINDOW, _WINDOW)) @ recent
    return RPBState(
        blocks=tuple(blocks),
        window=xp.stack([rows, recent], axis=-2),
        future=tuple(future),
        near=near,
        count=count,
        ready=count_array(xp, 1, like=H),
        skip=a,
        table_length=M,
    )


def _chunk_conv(xp: Any, hist: Any, x: Any, w: Any) -> Any:
    """The causal bias of a chunk ``x (..., P, D)`` after the history ``hist (..., T, D)``.

    The history is cut into blocks of ``P`` tokens, aligned to its end; block ``b``
    (``b = 1, 2, ...`` back from the chunk, ``b = 0`` the chunk itself) reaches the
    chunk at offsets ``bP - P + 1 .. bP + P - 1``, so its contribution is rows
    ``P - 1 .. 2P - 2`` of its convolution with those ``2P - 1`` taps: a middle
    product, exact in a circular convolution of length ``n >= 2P - 1`` (what wraps
    around lands on rows ``< P - 1``). All blocks share ``n``, so the products are
    summed as spectra and one inverse FFT gives the chunk: O(P log P) for the chunk's
    own FFTs plus one per block of history within the table's reach, never an FFT
    over the whole history at once.
    """
    M = (w.shape[-1] + 1) // 2
    T, P = hist.shape[-2], x.shape[-2]
    n = next_fast_len(2 * P - 1)
    lead_w = tuple(w.shape[:-1])

    def spectrum(block: Any) -> Any:
        return rfft(xp, xp.matrix_transpose(block), n=n)

    taps = xp.concat(
        [_zeros(xp, (*lead_w, P - 1), w), w[..., M - 1 : M - 1 + P]], axis=-1
    )  # offsets -(P-1) .. P-1, causal
    total = spectrum(x) * rfft(xp, taps, n=n)[..., None, :]  # a new array: the sum accumulates into it
    for b, end in enumerate(range(T, 0, -P), start=1):  # back from the chunk; the oldest block zero-padded in front
        first = b * P - P + 1  # the block's smallest offset into the chunk
        if first >= M:
            break  # older blocks are out of the table's reach
        taps = w[..., M - 1 + first : min(M - 1 + first + 2 * P - 1, 2 * M - 1)]
        total = multiply_add_into(xp, total, spectrum(_rows(xp, hist, end - P, P)), rfft(xp, taps, n=n)[..., None, :])
    # a copy of the rows kept: the chunk's output owns its memory, the padded buffer is freed
    return owned(xp, xp.matrix_transpose(irfft(xp, total, n=n, consume=True)[..., P - 1 : 2 * P - 1]))


def extend(
    xp: Namespace,
    state: RPBState | None,
    v: Array,
    w: Array,
    *,
    lead: tuple,
    M: int,
    a: int,
    work: Array,
    toeplitz: Array,
) -> tuple[Array, RPBState]:
    """A chunk ``v (..., L, D)`` (validated, compute dtype) after ``state``; returns ``(out, state)``.

    The new state keeps the history in its top slot with the levels stale (``ready``
    0): the first step rebuilds them once, and a chunk after a chunk does not pay
    for them. Eagerly: the history's contribution by blocks of the chunk's size,
    summed as spectra (``_chunk_conv``). Dask (whose graph would grow with the
    blocks of history) and under a compiler (where the count is not known): one
    causal FFT over the history and the chunk in a buffer of fixed rows.
    """
    D, L = v.shape[-1], v.shape[-2]
    if state is None:
        state = start(xp, lead, D, M, a, w, v)
    v = xp.broadcast_to(v, (*lead, L, D))
    cap = _capacity(M)
    if is_compiled(xp, state.count, v, w):
        t0 = state.count - a  # biased position of the chunk's first token
        rows = max(M + L, cap)
        first = xp.maximum(t0, 0 * t0)
        top = _rows(xp, as_dtype(xp, state.blocks[-1], work), 0, rows)
        H = xp.where(state.ready == 1, _history_buffer(xp, state, first, rows, work), top)
        position = xp.arange(rows, dtype=t0.dtype, device=device_of(H))
        inside = (position >= t0) & (position < t0 + L)
        if L:
            H = xp.where(inside[:, None], xp.take(v, xp.clip(position - t0, 0, L - 1), axis=-2), H)
        H = xp.where((position < t0 + L)[:, None], H, _zeros(xp, (), H))  # the rows ahead may be anything
        out = _rows(xp, toeplitz(xp, H, w, causal=True), t0, L)
        out = _mask_positions(xp, out, (t0 + xp.arange(L, dtype=t0.dtype, device=device_of(H)))[:, None], M)
        if conditionals_nest(xp):  # jax.jit: the levels now, which its steps then need not build (_step_nested)
            end = xp.maximum(t0 + L, 0 * t0)
            return out, _rebuild(xp, H[..., :cap, :], end, state.count + L, a, w, M)
        ready = count_array(xp, 0, like=v)
        return out, state._replace(blocks=(*state.blocks[:-1], H[..., :cap, :]), count=state.count + L, ready=ready)
    seen = int(state.count)
    t0 = max(0, seen - a)
    skipped = min(L, max(0, a - seen))  # tokens of this chunk still inside skip
    biased = v[..., skipped:, :]
    P = biased.shape[-2]
    count = count_array(xp, seen + L, like=v)
    if P == 0:  # nothing biased: the history is unchanged
        return _zeros(xp, (*lead, L, D), v), state._replace(count=count)
    hist = _history(xp, state, t0, work)
    # the history and the chunk (rows ahead unspecified): a copy, so the state never holds the caller's v
    H = concat_rows(xp, [hist, biased], cap)
    if is_lazy(xp, v, w, state.window):
        out = _rows(xp, toeplitz(xp, H, w, causal=True), t0, P)
    else:
        out = _chunk_conv(xp, hist, biased, w)
    if skipped:
        out = xp.concat([_zeros(xp, (*lead, skipped, D), v), out], axis=-2)
    if slices_compile(xp):  # eager JAX: the levels now, where their kernels' compilations are
        # a share of the prefill's, not the first decoding step's (seconds: one per operation)
        return out, _rebuild(xp, H[..., : t0 + P, :], t0 + P, count, a, w, M)
    return out, state._replace(blocks=(*state.blocks[:-1], H), count=count, ready=count_array(xp, 0, like=v))
