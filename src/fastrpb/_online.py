"""Streaming causal FastRPB: an online (relaxed) FFT convolution.

The causal bias of token ``t`` is the convolution ``out_t = sum_{j <= t} c_{t-j} v_j``
with the kernel ``c_k = w[M - 1 + k]``. Recomputing it over the history each token
costs O(t log t); the online scheme here costs amortised O(D log^2 t) per token
(van der Hoeven, "Relax, but don't be too lazy", J. Symb. Comput. 2002; the same
tiling as "FutureFill", Agarwal et al. 2024, and "Flash Inference", Oncescu et al.
2024):

- the sequence is cut into aligned windows of ``B = _WINDOW`` tokens. ``window``
  holds the bias of the current window's ``B`` positions accumulated so far; a new
  token at row ``r`` *pushes* its contribution ``c_{i-r} v_t`` to the rows ``i >= r``
  (offsets ``0 .. B - 1`` inside the window: one multiply-add of ``B D`` numbers) and
  reads its own row. A pull (a dot product of the last ``B`` values with
  ``c_0 .. c_{B-1}``) needs the last ``B`` values as one array each token, a copy of
  ``B D`` numbers before the same ``B D`` products: twice the work, measured;
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

Every update builds new arrays (no array is written in place), so a state is never
changed by a later step: it can be kept, branched, or differentiated (torch
autograd, ``jax.grad``).

Under ``jax.jit`` (any JAX tracer) shapes must not depend on the position, so the
state takes a *fixed* layout instead: a ``(..., M, D)`` buffer of all biased values
(zeros ahead) and a 0-d integer count, and a step is an O(M D) dot product of the
buffer with the flipped table; a chunk is one causal FFT over the buffer (O(M log M)).
The two layouts convert into each other when a state crosses from eager code into a
traced function or back.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ._compat import (
    count_array,
    device_of,
    irfft,
    is_lazy,
    is_traced,
    jax_pytree,
    multiply_add,
    multiply_add_into,
    multiply_into,
    next_fast_len,
    rfft,
)
from ._typing import Array, Namespace

__all__ = ["RPBState", "as_dtype", "check_state", "extend", "held", "start", "step", "tokens_seen"]

# Tokens handled by the direct near field, and the granularity of the online levels:
# 32 rows of D values is a few microseconds of dot product, and level work then runs
# only every 32 tokens (its Python overhead amortised over them).
_WINDOW = 32


@jax_pytree(static=("length", "skip", "table_length"))
class RPBState(NamedTuple):
    """What causal FastRPB carries from one token (or chunk) to the next.

    Made by ``rpb(..., causal=True, return_state=True)`` and ``rpb_step``; pass it back
    as ``initial_state=`` / ``state``. All arrays have the leading shape ``lead`` of
    the bias output (``broadcast(w.shape[:-1], v.shape[:-2])``) and the compute dtype
    (float32 for half-precision inputs). ``t`` below is the number of biased tokens
    so far (tokens seen minus ``skip``), ``B = 32``, ``s`` runs over ``B`` (when
    ``M > 1``) and ``2B, 4B, ... < M``.

    Online layout (eager code; ``length`` is an int, ``buffer`` and ``count`` are None):

    - ``blocks``: the biased values so far, in aligned blocks of ``B 2^k`` tokens (a
      binary counter: ``blocks[k]`` is a ``(..., B 2^k, D)`` array or None; oldest
      first when read from the highest ``k`` down), ``t`` rows in all with ``recent``;
    - ``recent``: a tuple of the ``(..., D)`` values of the current window so far
      (``t mod B`` of them, oldest first);
    - ``window``: ``(..., B, D)``, the bias of the ``B`` positions of the current window
      from every value so far, already summed;
    - ``future``: one entry per level ``s``: the ``(..., 2s - 1, D)`` contributions of the
      completed level-``s`` blocks to the positions from the last multiple of ``s``;
    - ``near``: ``(..., 2B - 1, 1)``, ``B - 1`` zeros then ``c_0 .. c_{B-1}`` (zero past
      ``M``), the weights a token pushes into ``window`` (taken from ``w`` once).

    Memory: at most about ``(t + 4 min(t, M) + 2B) D`` numbers per leading index (the
    history, the pending level contributions, the window): O(M D), fixed by the
    table's ``M`` and never more.

    Fixed layout (inside ``jax.jit``, with Dask arrays, and after a chunk,
    ``rpb(..., return_state=True)``; ``length`` is None): ``buffer`` is the
    ``(..., M, D)`` array of all biased values (zeros ahead), ``count`` a 0-d int32
    array of the tokens seen (a NumPy one beside Dask arrays: known when the state is
    made, read without computing anything); ``M D`` numbers per leading index. Eagerly
    after a chunk the history is kept in pieces instead (the earlier chunks in
    ``blocks``, the last one in ``buffer``, no padding) with the spectra of the chunks
    in ``future`` (about twice the history), so that the next chunk of the same size
    reuses them; a traced function joins and pads them. Eagerly, the first
    ``rpb_step`` after a chunk turns it into the online layout (one FFT per level,
    once); a chunk after a chunk reads the pieces. Dask steps stay in the fixed layout
    (O(M D) per token, and a task graph of the same size whatever ``M``).

    Static fields (JAX aux data, not leaves): ``length`` (tokens seen, online layout),
    ``skip`` (the ``a`` of ``skip=(a, 0)``) and ``table_length`` (``M`` of the table
    the state was made for). The state is a JAX pytree of the arrays above, so it
    crosses ``jax.jit`` and is a ``jax.lax.scan`` carry (fixed layout). Only the arrays
    of the fixed layout have fixed shapes: a scan must start from a state made inside
    the traced function (e.g. ``rpb(prompt, w, causal=True, return_state=True)``).

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
    recent: tuple
    window: Array
    future: tuple
    near: Array
    buffer: Array
    count: Array
    length: int | None
    skip: int
    table_length: int


def _make(xp: Any, **fields: Any) -> RPBState:
    base: dict[str, Any] = {
        "blocks": (),
        "recent": (),
        "window": None,
        "future": (),
        "near": None,
        "buffer": None,
        "count": None,
        "length": None,
    }
    base.update(fields)
    return RPBState(**base)


# --------------------------------------------------------------------------- shapes
def _levels(M: int) -> list[tuple[int, int]]:
    """Block size ``s`` and first offset of each online level: ``(B, 1)`` (the offsets
    across windows, when ``M > 1``), then ``(s, s)`` for ``s = 2B, 4B, ... < M``."""
    levels, s = ([(_WINDOW, 1)] if M > 1 else []), 2 * _WINDOW
    while s < M:
        levels.append((s, s))
        s *= 2
    return levels


def _lead_of(state: RPBState) -> tuple:
    x = state.window if state.length is not None else state.buffer
    return tuple(x.shape[:-2])


def held(state: RPBState | None) -> Array | None:
    """One array of the state (its library and device stand for all), or None (also for
    what is not a state: the checks that follow name it)."""
    if not isinstance(state, RPBState):
        return None
    return state.window if state.length is not None else state.buffer


def _width_of(state: RPBState) -> int:
    x = state.window if state.length is not None else state.buffer
    return int(x.shape[-1])


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
    if _width_of(state) != D:
        raise ValueError(f"{name} holds values of width D = {_width_of(state)} but the new values have width D = {D}")
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


def start(xp: Namespace, lead: tuple, D: int, M: int, a: int, like: Array, *, fixed: bool) -> RPBState:
    """The state of an empty sequence (``like`` gives dtype and device)."""
    if fixed:
        return _make(
            xp,
            buffer=_zeros(xp, (*lead, M, D), like),
            count=count_array(xp, 0, like=like),
            skip=a,
            table_length=M,
        )
    return _make(
        xp,
        window=_zeros(xp, (*lead, _WINDOW, D), like),
        future=(None,) * len(_levels(M)),
        length=0,
        skip=a,
        table_length=M,
    )


def _history(xp: Any, state: RPBState, work: Any) -> Any:
    """The biased values of an online state, chronological, ``(..., t, D)``."""
    t = max(0, _length(state) - state.skip)
    parts = [b for b in reversed(state.blocks) if b is not None]
    r = t % _WINDOW
    if r:
        parts.append(xp.stack(state.recent, axis=-2))
    if not parts:
        return xp.astype(state.window[..., :0, :], work, copy=False)
    out = parts[0] if len(parts) == 1 else xp.concat(parts, axis=-2)
    return xp.astype(out, work, copy=False)


def tokens_seen(xp: Namespace, state: RPBState) -> int | None:
    """Tokens a state has seen, or None when only a traced count knows it."""
    if state.length is not None:
        return state.length
    return None if is_traced(xp, state.count) else int(state.count)


def _length(state: RPBState) -> int:
    """Tokens seen by an online state."""
    assert state.length is not None, "an online state"
    return state.length


def _pieces(xp: Any, state: RPBState, work: Any) -> list[Any]:
    """The biased values of a fixed-layout state, chronological, as pieces to concatenate.

    Eagerly after chunks: ``blocks`` holds the earlier chunks' values and ``buffer`` the
    last one's (no copy of the history per chunk); from a traced function: ``buffer`` has
    ``M`` rows, the first ``t`` of them the history.
    """
    t = max(0, int(state.count) - state.skip)
    if not state.blocks:
        return [as_dtype(xp, state.buffer[..., :t, :], work)]
    return [as_dtype(xp, x, work) for x in (*state.blocks, state.buffer)]


def _joined(xp: Any, pieces: list[Any]) -> Any:
    return pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=-2)


def _to_fixed(xp: Any, state: RPBState, work: Any) -> RPBState:
    if state.length is None:  # eagerly after a chunk: only the rows so far, and the chunk spectra
        M = state.table_length
        if not state.blocks and state.buffer.shape[-2] == M and not state.future:
            return state
        # all rows of the pieces (an eager chunk's pieces hold exactly the history; no count
        # needed, which may be traced here)
        hist = _joined(xp, [as_dtype(xp, x, work) for x in (*state.blocks, state.buffer)])
        rows = hist.shape[-2]
        pad = _zeros(xp, (*hist.shape[:-2], M - rows, hist.shape[-1]), hist)
        return state._replace(buffer=xp.concat([hist, pad], axis=-2) if rows < M else hist, blocks=(), future=())
    hist = _history(xp, state, work)
    M = state.table_length
    pad = _zeros(xp, (*hist.shape[:-2], M - hist.shape[-2], hist.shape[-1]), hist)
    return _make(
        xp,
        buffer=xp.concat([hist, pad], axis=-2),
        count=count_array(xp, state.length, like=hist),
        skip=state.skip,
        table_length=M,
    )


def _to_online(xp: Any, state: RPBState, w: Any, work: Any) -> RPBState:
    if state.length is not None:
        return state
    hist = _joined(xp, _pieces(xp, state, work))
    return _rebuild(xp, hist, w, length=int(state.count), a=state.skip)


# --------------------------------------------------------------------------- online
def _near_kernel(xp: Any, w: Any, M: int) -> Any:
    """``(..., 2B - 1, 1)``: ``B - 1`` zeros, then ``c_0 .. c_{B-1}`` (zeros past ``M``).

    Rows ``B - 1 - r .. 2B - 2 - r`` are the weights ``c_{i-r}`` (zero for ``i < r``)
    of the window rows ``i`` for a token at row ``r``.
    """
    nb = min(_WINDOW, M)
    parts = [_zeros(xp, (*w.shape[:-1], _WINDOW - 1), w), w[..., M - 1 : M - 1 + nb]]
    if nb < _WINDOW:
        parts.append(_zeros(xp, (*w.shape[:-1], _WINDOW - nb), w))
    return xp.concat(parts, axis=-1)[..., None]


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


def _window_rows(xp: Any, future: tuple, E: int, like: Any) -> Any:
    """Sum over levels of the pending rows for positions ``E .. E + B - 1``."""
    total = None
    for k, f in enumerate(future):
        if f is None:
            continue
        s = _WINDOW << k
        off = E - (E // s) * s  # the level's pending array starts at the last multiple of s
        rows = f[..., off : off + _WINDOW, :]
        total = rows if total is None else total + rows
    return _zeros(xp, tuple(like.shape), like) if total is None else total


def _rebuild(xp: Any, hist: Any, w: Any, *, length: int, a: int) -> RPBState:
    """The online state after the biased values ``hist (..., t, D)`` (``length`` tokens seen)."""
    M = (w.shape[-1] + 1) // 2
    lead, t, D = tuple(hist.shape[:-2]), hist.shape[-2], hist.shape[-1]
    q = t // _WINDOW
    E = q * _WINDOW
    blocks: list[Any] = []
    cursor = 0
    for k in reversed(range(q.bit_length())):
        if (q >> k) & 1:
            size = _WINDOW << k
            blocks.append((k, hist[..., cursor : cursor + size, :]))
            cursor += size
    stored: list[Any] = [None] * q.bit_length()
    for k, b in blocks:
        stored[k] = b
    future: list[Any] = []
    for s, d0 in _levels(M):
        first = (E // s) * s  # end of the last completed level-s block
        if first == 0:
            future.append(None)
            continue
        lo = max(0, first - 2 * s)
        x = hist[..., lo:first, :]
        # x starts at position lo; output row i of the convolution is position lo + d0 + i,
        # so position first + u (u < 2s - 1) is row m - d0 + u
        m = first - lo
        future.append(_band_conv(xp, x, w, d0, min(2 * s, M), 4 * s, m - d0, m - d0 + 2 * s - 1))
    window = _window_rows(xp, tuple(future), E, _zeros(xp, (*lead, _WINDOW, D), hist))
    near = _near_kernel(xp, w, M)
    recent = tuple(hist[..., E + i, :] for i in range(t - E))
    for i, v in enumerate(recent):  # the current window's tokens push as the steps would have
        window = window + near[..., _WINDOW - 1 - i : 2 * _WINDOW - 1 - i, :] * v[..., None, :]
    return _make(
        xp,
        blocks=tuple(stored),
        recent=recent,
        window=window,
        future=tuple(future),
        near=near,
        length=length,
        skip=a,
        table_length=M,
    )


def _step_online(xp: Any, state: RPBState, v: Any, w: Any, work: Any) -> tuple[Any, RPBState]:
    M, a, length = state.table_length, state.skip, _length(state)
    t = length - a  # biased position of this token
    lead, D = _lead_of(state), v.shape[-1]
    if t < 0:  # a skipped token: no bias given or received
        return _zeros(xp, (*lead, D), state.window), state._replace(length=length + 1)
    v = xp.broadcast_to(v, (*lead, D)) if tuple(v.shape[:-1]) != lead else v
    near = _near_kernel(xp, w, M) if state.near is None else state.near
    r = t % _WINDOW
    # push: this token's weights c_{i-r} onto the window rows i >= r (one multiply-add)
    window = multiply_add(
        xp, as_dtype(xp, state.window, work), near[..., _WINDOW - 1 - r : 2 * _WINDOW - 1 - r, :], v[..., None, :]
    )
    out = xp.asarray(window[..., r, :], copy=True)  # not a view into the state's window
    recent = (*state.recent, xp.asarray(v, copy=True))  # a copy: the caller may reuse its v_t array
    if r != _WINDOW - 1:
        return out, state._replace(recent=recent, window=window, near=near, length=length + 1)
    # the aligned window [t + 1 - B, t] is complete: feed the binary counter of blocks
    E = t + 1
    carry = xp.stack(recent, axis=-2)
    levels = _levels(M)
    blocks = list(state.blocks)
    future = list(state.future)
    k = 0
    while True:
        s = _WINDOW << k
        if k < len(levels):  # the block [E - s, E) reaches offsets d0 .. 2s - 1
            d0 = levels[k][1]
            # rows: position E + u is row s - d0 + u of the convolution (x starts at E - s)
            tile = _band_conv(
                xp, as_dtype(xp, carry, work), w, d0, min(2 * s, M), 2 * s if d0 == s else 4 * s, s - d0, 3 * s - d0 - 1
            )
            old = future[k]
            if old is not None:  # the previous block's rows from E on: its rows s .. 2s - 2
                tile = xp.concat(
                    [tile[..., : s - 1, :] + as_dtype(xp, old[..., s:, :], work), tile[..., s - 1 :, :]], axis=-2
                )
            future[k] = tile
        if k < len(blocks) and blocks[k] is not None:
            carry = xp.concat([blocks[k], carry], axis=-2)
            blocks[k] = None
            k += 1
            continue
        if k == len(blocks):
            blocks.append(None)
        blocks[k] = carry
        break
    window = _window_rows(xp, tuple(future), E, window)
    return out, state._replace(
        blocks=tuple(blocks), recent=(), window=window, future=tuple(future), near=near, length=length + 1
    )


# --------------------------------------------------------------------------- fixed
def _positions(xp: Any, n: int, like: Any) -> Any:
    return xp.arange(n, dtype=xp.int32, device=device_of(like))


def _step_fixed(xp: Any, state: RPBState, v: Any, w: Any, work: Any) -> tuple[Any, RPBState]:
    M = state.table_length
    buffer = xp.astype(state.buffer, work, copy=False)
    t = state.count - state.skip  # traced biased position
    rows = _positions(xp, M, buffer)
    buffer = xp.where((rows == t)[:, None], v[..., None, :], buffer)
    index = xp.clip(M - 1 + t - rows, 0, 2 * M - 2)
    kernel = xp.where(rows <= t, xp.take(w, index, axis=-1), xp.zeros((), dtype=work, device=device_of(buffer)))
    out = (kernel[..., None, :] @ buffer)[..., 0, :]
    out = _mask_positions(xp, out, t, M)
    return out, state._replace(buffer=buffer, count=state.count + 1)


def _mask_positions(xp: Any, out: Any, t: Any, M: int) -> Any:
    """Zero for skipped tokens (``t < 0``); NaN past the table (``t >= M``: no error can be raised under jit)."""
    zero = xp.zeros((), dtype=out.dtype, device=device_of(out))
    nan = xp.asarray(float("nan"), dtype=out.dtype, device=device_of(out))
    return xp.where(t < 0, zero, xp.where(t < M, out, nan))


def _extend_fixed(xp: Any, state: RPBState, v: Any, w: Any, work: Any, toeplitz: Any) -> tuple[Any, RPBState]:
    M, L = state.table_length, v.shape[-2]
    buffer = xp.astype(state.buffer, work, copy=False)
    t0 = state.count - state.skip
    rows = _positions(xp, M, buffer)
    rel = rows - t0  # chunk row written at each buffer row
    inside = (rel >= 0) & (rel < L)
    if L:
        gathered = xp.take(v, xp.clip(rel, 0, L - 1), axis=-2)
        buffer = xp.where(inside[:, None], gathered, buffer)
    full = toeplitz(xp, buffer, w, causal=True)
    pos = t0 + _positions(xp, L, buffer)
    out = xp.take(full, xp.clip(pos, 0, M - 1), axis=-2)
    out = _mask_positions(xp, out, pos[:, None], M)
    return out, state._replace(buffer=buffer, count=state.count + L)


# --------------------------------------------------------------------------- entry points
def step(
    xp: Namespace, state: RPBState | None, v: Array, w: Array, *, lead: tuple, M: int, a: int, work: Array
) -> tuple[Array, RPBState]:
    """One token ``v (..., D)`` (validated, compute dtype); returns ``(out, state)``.

    Traced (``jax.jit``) and Dask steps take the fixed layout (``is_lazy``): its step
    is the same few operations whatever ``M`` and ``t``, where the online layout's
    rebuild after a chunk adds one FFT per level (``log2(M / B)`` of them) to a Dask
    graph. The count stays readable there (``count_array``), so a Dask stream past
    the table is still an error, not NaN.
    """
    fixed = is_lazy(xp, v, w)
    if state is None:
        state = start(xp, lead, v.shape[-1], M, a, v, fixed=fixed)
    if fixed:
        v = xp.broadcast_to(v, (*lead, v.shape[-1]))
        return _step_fixed(xp, _to_fixed(xp, state, work), v, w, work)
    return _step_online(xp, _to_online(xp, state, w, work), v, w, work)


def _chunk_conv(xp: Any, pieces: list[Any], x: Any, w: Any, cache: tuple) -> tuple[Any, tuple]:
    """The causal bias of a chunk ``x (..., P, D)`` after the history ``pieces`` (``T`` rows in all),
    and the chunk spectra to keep.

    The history is cut into blocks of ``P`` tokens, aligned to its end; block ``b``
    (``b = 1, 2, ...`` back from the chunk, ``b = 0`` the chunk itself) reaches the
    chunk at offsets ``bP - P + 1 .. bP + P - 1``, so its contribution is rows
    ``P - 1 .. 2P - 2`` of its convolution with those ``2P - 1`` taps: a middle
    product, exact in a circular convolution of length ``n >= 2P - 1`` (what wraps
    around lands on rows ``< P - 1``). All blocks share ``n``, so the products are
    summed as spectra and one inverse FFT gives the chunk: O(P log P) for the chunk's
    own FFTs plus ``T / P`` products of spectra, never an FFT over the history. The
    spectra of the blocks are kept (``cache``): the next chunk of the same size reuses
    them, so ``k`` equal pieces cost about what one call does (plus the products).
    """
    M = (w.shape[-1] + 1) // 2
    T, P = sum(p.shape[-2] for p in pieces), x.shape[-2]
    n = next_fast_len(2 * P - 1)
    lead_w = tuple(w.shape[:-1])

    def spectrum(block: Any) -> Any:
        return rfft(xp, xp.matrix_transpose(block), n=n)

    aligned = T % P == 0
    if aligned and len(cache) * P == T and all(c.shape[-1] == n // 2 + 1 for c in cache):
        blocks = list(cache)  # oldest first
    else:
        blocks = []
        hist = _joined(xp, pieces) if pieces else x[..., :0, :]
        for end in range(T, 0, -P):  # back from the chunk; the oldest block zero-padded in front
            part = hist[..., max(0, end - P) : end, :]
            if part.shape[-2] < P:
                part = xp.concat(
                    [_zeros(xp, (*part.shape[:-2], P - part.shape[-2], part.shape[-1]), part), part], axis=-2
                )
            blocks.append(spectrum(part))
        blocks.reverse()
    own = spectrum(x)
    taps = xp.concat(
        [_zeros(xp, (*lead_w, P - 1), w), w[..., M - 1 : M - 1 + P]], axis=-1
    )  # offsets -(P-1) .. P-1, causal
    total = own * rfft(xp, taps, n=n)[..., None, :]  # a new array: the sum accumulates into it
    for b, block in enumerate(reversed(blocks), start=1):
        first = b * P - P + 1  # the block's smallest offset into the chunk
        if first >= M:
            break  # older blocks are out of the table's reach
        taps = w[..., M - 1 + first : min(M - 1 + first + 2 * P - 1, 2 * M - 1)]
        total = multiply_add_into(xp, total, block, rfft(xp, taps, n=n)[..., None, :])
    # a copy of the rows kept: the chunk's output owns its memory, the padded buffer is freed
    out = xp.matrix_transpose(xp.asarray(irfft(xp, total, n=n, consume=True)[..., P - 1 : 2 * P - 1], copy=True))
    return out, (*blocks, own) if aligned else ()


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

    Eagerly: the history's contribution by blocks of the chunk's size, summed as
    spectra (``_chunk_conv``); the new state is in the fixed layout with the history
    in pieces and the chunk spectra kept, and the first ``rpb_step`` after it rebuilds
    the online levels once. Traced and Dask (``is_lazy``): one causal FFT over the
    ``M``-row buffer; the eager blocks, one per ``L`` tokens of history, would give
    Dask a graph that grows with the history.
    """
    fixed = is_lazy(xp, v, w) or (state is not None and is_traced(xp, state.buffer, state.window))
    D, L = v.shape[-1], v.shape[-2]
    if state is None:
        state = start(xp, lead, D, M, a, v, fixed=fixed)
    v = xp.broadcast_to(v, (*lead, L, D))
    if fixed:
        return _extend_fixed(xp, _to_fixed(xp, state, work), v, w, work, toeplitz)
    cache: tuple = ()
    if state.length is None:  # the fixed layout, eagerly: the history in pieces
        length = int(state.count)
        pieces = [x for x in _pieces(xp, state, work) if x.shape[-2]]
        cache = state.future
    else:
        length = _length(state)
        pieces = [_history(xp, state, work)]
    skipped = min(L, max(0, a - length))  # tokens of this chunk still inside skip
    biased = v[..., skipped:, :]
    if biased.shape[-2] == 0 or math.prod(biased.shape) == 0:
        out = biased
    else:
        out, cache = _chunk_conv(xp, pieces, biased, w, cache)
    if skipped:
        out = xp.concat([_zeros(xp, (*lead, skipped, D), v), out], axis=-2)
    # The history in the fixed layout, not the online one: rebuilding the online levels
    # costs one FFT per level (about 1.5 causal FFTs of the whole history), which a
    # following chunk would throw away; the first rpb_step rebuilds them once. Eagerly
    # the history stays in pieces, one per chunk (``blocks`` and ``buffer``: joining or
    # padding it to M rows would copy the history every chunk); ``_to_fixed`` joins and
    # pads it when it enters a traced function. ``future`` keeps the chunks' spectra.
    return out, _make(
        xp,
        blocks=tuple(x for x in pieces if x.shape[-2]),
        buffer=xp.asarray(biased, copy=True),  # a copy: the caller may reuse its v array
        future=cache,
        count=count_array(xp, length + L, like=v),
        skip=a,
        table_length=M,
    )
