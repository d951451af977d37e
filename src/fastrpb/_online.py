"""Streaming causal FastRPB: an online (relaxed) FFT convolution.

The causal bias of token ``t`` is the convolution ``out_t = sum_{j <= t} c_{t-j} v_j``
with the kernel ``c_k = w[M - 1 + k]``. Recomputing it over the history each token
costs O(t log t); the online scheme here costs amortised O(D log^2 t) per token
(van der Hoeven, "Relax, but don't be too lazy", J. Symb. Comput. 2002; the same
tiling as "FutureFill", Agarwal et al. 2024, and "Flash Inference", Oncescu et al.
2024):

- offsets ``k < B`` (``B = _WINDOW``): a direct dot product of the last ``B`` values
  with ``c_0 .. c_{B-1}`` (O(B D) per token);
- offsets ``k`` in ``[s, 2s)`` for ``s = B, 2B, 4B, ...`` (``s < M``): the values are
  cut into aligned blocks of ``s`` tokens; when the block ``[E - s, E)`` completes,
  one FFT of length ``2s`` convolves it with ``c_s .. c_{2s-1}`` and gives its
  contribution to the outputs ``E .. E + 2s - 2``, all still in the future. Level
  ``s`` keeps one pending array of those contributions; every ``B`` tokens the rows
  of all levels for the next ``B`` positions are summed into one ``window``, so a
  token reads one row. Each level costs O(t log s) over ``t`` tokens: O(log^2 t)
  per token in all, never an FFT over the whole history.

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

from typing import Any, NamedTuple

from ._compat import count_array, device_of, irfft, is_lazy, is_traced, jax_pytree, multiply_into, rfft
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
    so far (tokens seen minus ``skip``), ``B = 32``, ``s`` runs over ``B, 2B, 4B, ...
    < M``.

    Online layout (eager code; ``length`` is an int, ``buffer`` and ``count`` are None):

    - ``blocks``: the biased values so far, in aligned blocks of ``B 2^k`` tokens (a
      binary counter: ``blocks[k]`` is a ``(..., B 2^k, D)`` array or None; oldest
      first when read from the highest ``k`` down), ``t`` rows in all with ``recent``;
    - ``recent``: ``(..., B, D)``, the last ``B`` values, newest first (zeros before the
      first token);
    - ``window``: ``(..., B, D)``, the far-field bias (offsets ``>= B``) of the ``B``
      positions of the current window, already summed;
    - ``future``: one entry per level ``s``: the ``(..., 2s - 1, D)`` contributions of the
      completed level-``s`` blocks to the positions from the last multiple of ``s``.

    Memory: at most about ``(t + 4 min(t, M) + 2B) D`` numbers per leading index (the
    history, the pending level contributions, two windows): O(M D), fixed by the
    table's ``M`` and never more.

    Fixed layout (inside ``jax.jit``, with Dask arrays, and after a chunk,
    ``rpb(..., return_state=True)``;
    ``length`` is None): ``buffer`` is the ``(..., M, D)`` array of all biased values
    (zeros ahead), ``count`` a 0-d int32 array of the tokens seen (a NumPy one beside
    Dask arrays: known when the state is made, read without computing anything);
    ``M D`` numbers per leading index. Eagerly, the first ``rpb_step`` after a chunk
    turns it into the online layout (one FFT per level, once); a chunk after a chunk
    reads the buffer. Dask steps stay in the fixed layout (O(M D) per token, and a
    task graph of the same size whatever ``M``).

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
    recent: Array
    window: Array
    future: tuple
    buffer: Array
    count: Array
    length: int | None
    skip: int
    table_length: int





def _make(xp: Any, **fields: Any) -> RPBState:
    base: dict[str, Any] = {"blocks": (), "recent": None, "window": None, "future": (), "buffer": None, "count": None, "length": None}
    base.update(fields)
    return RPBState(**base)


# --------------------------------------------------------------------------- shapes
def _levels(M: int) -> list[int]:
    """Block sizes ``s = B, 2B, ... < M`` of the online levels."""
    sizes, s = [], _WINDOW
    while s < M:
        sizes.append(s)
        s *= 2
    return sizes


def _lead_of(state: RPBState) -> tuple:
    x = state.recent if state.length is not None else state.buffer
    return tuple(x.shape[:-2])


def held(state: RPBState | None) -> Array | None:
    """One array of the state (its library and device stand for all), or None."""
    if state is None:
        return None
    return state.recent if state.length is not None else state.buffer


def _width_of(state: RPBState) -> int:
    x = state.recent if state.length is not None else state.buffer
    return int(x.shape[-1])


def check_state(state: Any, M: int, a: int, D: int, lead: tuple, name: str) -> None:
    """The state fits these inputs: type, table length, skip, feature width, leading shape."""
    if not isinstance(state, RPBState):
        raise TypeError(f"{name} must be an RPBState (from rpb(..., return_state=True) or rpb_step) or None, got {type(state).__name__}")
    if state.table_length != M:
        raise ValueError(
            f"{name} was made for a table with M = {state.table_length} but w has M = {M} "
            f"(shape (..., {2 * M - 1})); continue a sequence with the table that started it"
        )
    if state.skip != a:
        raise ValueError(f"{name} was started with skip = ({state.skip}, 0) but skip is ({a}, 0); pass the skip of the sequence's start")
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
        recent=_zeros(xp, (*lead, _WINDOW, D), like),
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
        parts.append(xp.flip(state.recent[..., :r, :], axis=-2))
    if not parts:
        return xp.astype(state.recent[..., :0, :], work, copy=False)
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


def _to_fixed(xp: Any, state: RPBState, work: Any) -> RPBState:
    if state.length is None:
        return state
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
    length = int(state.count)
    t = max(0, length - state.skip)
    hist = xp.astype(state.buffer[..., :t, :], work, copy=False)
    return _rebuild(xp, hist, w, length=length, a=state.skip)


# --------------------------------------------------------------------------- online
def _band_conv(xp: Any, x: Any, w: Any, s: int, n: int, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of the linear convolution of ``x (..., m, D)`` with ``c_s .. c_{2s-1}``.

    FFT of length ``n`` (no wrap-around: ``n >= m + s - 1``), along the last axis of
    the transposed values (contiguous transforms, as in ``bias._toeplitz``).
    """
    M = (w.shape[-1] + 1) // 2
    band = w[..., M - 1 + s : M - 1 + min(2 * s, M)]  # offsets s .. min(2s, M) - 1
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
    tail = xp.flip(hist[..., max(0, t - _WINDOW) :, :], axis=-2)
    recent = tail if tail.shape[-2] == _WINDOW else xp.concat([tail, _zeros(xp, (*lead, _WINDOW - tail.shape[-2], D), hist)], axis=-2)
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
    for s in _levels(M):
        first = (E // s) * s  # end of the last completed level-s block
        if first == 0:
            future.append(None)
            continue
        lo = max(0, first - 2 * s)
        x = hist[..., lo:first, :]
        # rows of x start at first - 2s + (2s - m); output row i is position first + i
        m = first - lo
        future.append(_band_conv(xp, x, w, s, 3 * s, m - s, m + s - 1))
    window = _window_rows(xp, tuple(future), E, recent)
    return _make(
        xp,
        blocks=tuple(stored),
        recent=recent,
        window=window,
        future=tuple(future),
        length=length,
        skip=a,
        table_length=M,
    )


def _step_online(xp: Any, state: RPBState, v: Any, w: Any, work: Any) -> tuple[Any, RPBState]:
    M, a, length = state.table_length, state.skip, _length(state)
    t = length - a  # biased position of this token
    lead, D = _lead_of(state), v.shape[-1]
    if t < 0:  # a skipped token: no bias given or received
        return _zeros(xp, (*lead, D), state.recent), state._replace(length=length + 1)
    v = xp.broadcast_to(v, (*lead, D)) if tuple(v.shape[:-1]) != lead else v
    recent = xp.concat([v[..., None, :], as_dtype(xp, state.recent[..., :-1, :], work)], axis=-2)
    nb = min(_WINDOW, M)
    taps = w[..., M - 1 : M - 1 + nb]  # offsets 0 .. nb - 1, against newest-first rows
    near = recent if nb == _WINDOW else recent[..., :nb, :]
    r = t % _WINDOW
    out = (taps[..., None, :] @ near)[..., 0, :] + as_dtype(xp, state.window[..., r, :], work)
    if r != _WINDOW - 1:
        return out, state._replace(recent=recent, length=length + 1)
    # the aligned window [t + 1 - B, t] is complete: feed the binary counter of blocks
    E = t + 1
    carry = xp.flip(recent, axis=-2)
    blocks = list(state.blocks)
    future = list(state.future)
    k = 0
    while True:
        s = _WINDOW << k
        if k < len(future):  # s < M: the block [E - s, E) reaches offsets s .. 2s - 1
            tile = _band_conv(xp, xp.astype(carry, work, copy=False), w, s, 2 * s, 0, 2 * s - 1)
            old = future[k]
            if old is not None:  # the previous block's rows from E on: its rows s .. 2s - 2
                tile = xp.concat([tile[..., : s - 1, :] + xp.astype(old[..., s:, :], work, copy=False), tile[..., s - 1 :, :]], axis=-2)
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
    window = _window_rows(xp, tuple(future), E, recent)
    return out, state._replace(
        blocks=tuple(blocks), recent=recent, window=window, future=tuple(future), length=length + 1
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
def step(xp: Namespace, state: RPBState | None, v: Array, w: Array, *, lead: tuple, M: int, a: int, work: Array) -> tuple[Array, RPBState]:
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


def extend(
    xp: Namespace, state: RPBState | None, v: Array, w: Array, *, lead: tuple, M: int, a: int, work: Array, toeplitz: Array
) -> tuple[Array, RPBState]:
    """A chunk ``v (..., L, D)`` (validated, compute dtype) after ``state``; returns ``(out, state)``.

    Online layout: one causal FFT over the history and the chunk (the cost of one call
    on the whole prefix), then the online state of the longer sequence is rebuilt
    (one FFT per level, over its last two blocks).
    """
    fixed = is_traced(xp, v, w) or (state is not None and is_traced(xp, state.buffer, state.recent))
    D, L = v.shape[-1], v.shape[-2]
    if state is None:
        state = start(xp, lead, D, M, a, v, fixed=fixed)
    v = xp.broadcast_to(v, (*lead, L, D))
    if fixed:
        return _extend_fixed(xp, _to_fixed(xp, state, work), v, w, work, toeplitz)
    if state.length is None:  # the fixed layout, eagerly: its buffer is the history
        length = int(state.count)
        hist = xp.astype(state.buffer[..., : max(0, length - a), :], work, copy=False)
    else:
        length = _length(state)
        hist = _history(xp, state, work)
    skipped = min(L, max(0, a - length))  # tokens of this chunk still inside skip
    biased = v[..., skipped:, :]
    t_old = hist.shape[-2]
    full = xp.concat([hist, biased], axis=-2) if t_old else biased
    out = toeplitz(xp, full, w, causal=True)[..., t_old:, :] if full.shape[-2] else full
    if skipped:
        out = xp.concat([_zeros(xp, (*lead, skipped, D), full), out], axis=-2)
    # The history in the fixed layout, not the online one: rebuilding the online levels
    # costs one FFT per level (about 1.5 causal FFTs of the whole history), which a
    # following chunk would throw away; the first rpb_step rebuilds them once.
    pad = _zeros(xp, (*lead, M - full.shape[-2], D), full)
    return out, _make(
        xp,
        buffer=xp.concat([full, pad], axis=-2) if full.shape[-2] < M else full,
        count=count_array(xp, length + L, like=full),
        skip=a,
        table_length=M,
    )
