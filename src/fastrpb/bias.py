"""FastRPB: relative positional bias on the values, applied by FFT.

For a sequence of length ``L`` the bias is the Toeplitz matrix ``B[i, j] = w(i - j)``
and the layer adds ``B @ V`` to the attention output (Zubkov & Gavrilov, "FastRPB: a
Scalable Relative Positional Encoding for Long Sequence Tasks", arXiv:2202.11364).
A Toeplitz product is a linear convolution, so it costs O(L log L) time and O(L)
memory by real FFTs along the sequence axis; ``rpb_matrix`` is the only function that
builds the dense ``L x L`` matrix.

A bias **table** ``w`` has shape ``(..., 2M - 1)``; ``w[..., M - 1 + t]`` is the weight
of offset ``t = i - j``. Leading dimensions of the table broadcast against the leading
dimensions of the values (e.g. a per-head table ``(H, 2M - 1)`` with values
``(B, H, L, D)``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

from . import _online, _online_nd, _packing, _validate
from ._compat import (
    blocks_allowed,
    compute_dtype,
    device_of,
    irfft,
    irfftn,
    multiply_into,
    namespace,
    next_fast_len,
    owned,
    rfft,
    rfftn,
)
from ._compat import pad_axis as _pad_rows
from ._online import RPBState
from ._online_nd import RPBndState
from ._random import seeded_normal
from ._typing import Array
from ._validate import broadcast_shapes as _broadcast_lead

__all__ = [
    "rpb",
    "rpb_step",
    "RPBState",
    "rpb_nd",
    "rpb_nd_step",
    "RPBndState",
    "rpb_matrix",
    "symmetric_table",
    "rpb_init",
]


# --------------------------------------------------------------------------- kernels
def _toeplitz(xp: Any, v: Any, w: Any, *, causal: bool) -> Any:
    """``out[..., i, :] = sum_j w[..., M-1 + i-j] v[..., j, :]`` by real FFT.

    ``v`` has shape ``(..., L, D)`` and ``w`` shape ``(..., 2M - 1)`` with ``L <= M``;
    both are already in the compute dtype. The kernel is laid out circularly:
    offset ``t >= 0`` at index ``t``, offset ``t < 0`` at ``n + t``. With
    ``n >= 2L - 1`` no product wraps around, so the first ``L`` outputs of the
    circular convolution are exactly the Toeplitz product.

    Non-finite values: every position of a column of ``v`` enters every frequency
    of its spectrum, so a NaN or infinity at ``v[..., j, d]`` makes column ``d`` of
    the output non-finite at every token, ``i < j`` included and causal as well (as
    any FFT convolution does); the other (leading index, feature) columns are
    untouched. The attention functions zero padding values before they get here.

    Speed and memory (see ``docs/performance.md``):

    - the FFTs run along the *last* axis of the transposed values ``(..., D, L)``:
      CPU FFT libraries (MKL, pocketfft) are several times faster on contiguous
      transforms than on the strided sequence axis of ``(..., L, D)``;
    - long inputs are transformed in blocks of (leading index, feature column) rows
      of at most ``_BLOCK_BYTES`` of spectrum, so the padded copies and complex
      spectra (each about twice the size of ``v``) are never all alive at once:
      peak extra memory is about three times ``v``, the output included, instead of
      six to eight, and each block's buffers are reused by the allocator and stay
      closer to cache.
    """
    L = v.shape[-2]
    D = v.shape[-1]
    M = (w.shape[-1] + 1) // 2
    n = next_fast_len(2 * L - 1)
    nonneg = w[..., M - 1 : M - 1 + L]  # offsets 0 .. L-1
    if causal or L == 1:
        kernel = nonneg
    else:
        negative = w[..., M - L : M - 1]  # offsets -(L-1) .. -1, in that order
        zeros = xp.zeros((*w.shape[:-1], n - (2 * L - 1)), dtype=w.dtype, device=device_of(w))
        kernel = xp.concat([nonneg, zeros, negative], axis=-1)
    # A spectrum is only ever made (rfft), multiplied and inverted, never reshaped or
    # broadcast: torch.onnx lowers complex tensors through few operators (no unsqueeze,
    # no expand), so the kernel gets its D axis, and its leading shape, while still real.
    kernel = kernel[..., None, :]  # (..., 1, n) or (..., 1, L)
    columns = xp.matrix_transpose(v)  # (..., D, L): the sequence on the last axis

    def convolve(block: Any, k_f: Any) -> Any:
        spectrum = multiply_into(xp, rfft(xp, block, n=n), k_f)
        return irfft(xp, spectrum, n=n, consume=True)[..., :L]

    itemsize = _itemsize(xp, v.dtype)
    per_row = (n // 2 + 1) * 2 * itemsize  # spectrum bytes of one (head, feature) row
    lead = _broadcast_lead(v.shape[:-2], w.shape[:-1])
    G = math.prod(lead)
    if not _blocked(G * D * per_row) or not blocks_allowed(xp, v):  # engines: sharded JAX
        # a copy of the cropped rows: the result owns its memory, and the padded
        # irfft buffer (about twice the result) is freed at once
        return xp.matrix_transpose(owned(xp, convolve(columns, rfft(xp, kernel, n=n))))
    # Long input: blocks of (leading index, feature column) rows. A block takes whole
    # cache lines of each row of v (a multiple of 64 bytes of features: reading a
    # few strided columns would drag in their neighbours every time), and as many
    # leading indices as fit in the block budget.
    line = max(1, 64 // itemsize)
    cols = min(D, max(line, (_BLOCK_BYTES // per_row) // line * line))
    heads = max(1, _BLOCK_BYTES // (per_row * cols))
    columns = xp.reshape(xp.broadcast_to(columns, (*lead, D, L)), (G, D, L))
    kernel_f = rfft(xp, xp.reshape(xp.broadcast_to(kernel, (*lead, *kernel.shape[-2:])), (G, *kernel.shape[-2:])), n=n)
    rows = []
    for g in range(0, G, heads):
        g_end = min(g + heads, G)
        parts = [convolve(columns[g:g_end, d : min(d + cols, D), :], kernel_f[g:g_end, ...]) for d in range(0, D, cols)]
        rows.append(parts[0] if len(parts) == 1 else xp.concat(parts, axis=-2))
    out = rows[0] if len(rows) == 1 else xp.concat(rows, axis=0)
    return xp.matrix_transpose(xp.reshape(out, (*lead, D, L)))


# Spectrum bytes per block in ``_toeplitz``: small enough that a block's buffers are a
# small fraction of a long input (and below glibc's 32 MiB mmap ceiling, so freed
# blocks are recycled instead of page-faulted in again), large enough that the
# per-call overhead of an FFT is negligible. Inputs below it are not blocked.
_BLOCK_BYTES = 32 * 2**20


def _blocked(spectrum_bytes: Any) -> bool:
    """Whether a transform of ``spectrum_bytes`` of spectrum goes in blocks.

    Only a known size is blocked: under ``torch.export`` or ``jax.export`` with a
    symbolic batch the size is an expression (a SymInt, a JAX dimension), which
    cannot be compared with the budget (the answer would depend on the batch) nor
    cut into a Python loop of blocks, so the transform is one call, as for small
    inputs.
    """
    return isinstance(spectrum_bytes, int) and spectrum_bytes > _BLOCK_BYTES


def _itemsize(xp: Any, dtype: Any) -> int:
    return xp.finfo(dtype).bits // 8


# --------------------------------------------------------------------------- public
def rpb(
    v: Array,
    w: Array,
    *,
    causal: bool = False,
    skip: tuple[int, int] = (0, 0),
    initial_state: RPBState | None = None,
    return_state: bool = False,
    cu_seqlens: Any = None,
) -> Array:
    r"""Apply the relative positional bias ``B @ v`` with Toeplitz ``B[i, j] = w(i - j)``.

    $$
    \mathrm{out}_{i} = \sum_{j} w_{M-1+i-j}\, v_{j}
    $$

    computed by real FFTs of the smallest 5-smooth length ``>= 2L - 1``: O(L log L)
    time and O(L) extra memory, never an ``L x L`` matrix.

    Parameters
    ----------
    v : array, shape (..., L, D)
        Values. Real floating dtype; float16/bfloat16 are computed in float32.
    w : array, shape (..., 2M - 1)
        Bias table with ``M >= L``: ``w[..., M - 1 + t]`` weighs offset ``t = i - j``.
        Leading dimensions broadcast against ``v.shape[:-2]``.
    causal : bool
        Only ``j <= i`` contributes (offsets ``t >= 0``).
    skip : (int, int)
        The first ``a`` and last ``b`` tokens (e.g. BOS/EOS) neither receive nor give
        bias: their output rows are zero and the bias acts on the tokens between.
        While streaming, ``a`` counts from the start of the sequence across calls
        and ``b`` must be 0.
    initial_state : RPBState, optional
        Causal only: continue the sequence that this state ends (from
        ``return_state=True`` or ``rpb_step``); ``v`` holds the next tokens. Calls that
        pass the state along equal one call on the whole sequence, which must still
        fit the table (``M`` biased tokens in all). A chunk of ``P`` tokens costs
        FFTs of length about ``2P`` and one product of spectra per ``P`` tokens of
        history (the state keeps the spectra of earlier chunks of the same size), so
        ``k`` equal pieces cost about one call; token by token, use ``rpb_step``.
    return_state : bool
        Causal only: also return the ``RPBState`` after the last token.
    cu_seqlens : int array, shape (N + 1,), optional
        Packed sequences (flash-attention / fla convention): offsets ``0 = c_0 <= ... <=
        c_N = L`` along ``v``'s length axis; every sequence is biased only within
        itself, ``skip`` applied to each non-empty one (a zero-length sequence gives
        no rows; see ``fastrpb.linear_attention``). Must be
        concrete (not traced under ``jax.jit``); each sequence of at most ``M`` tokens
        after ``skip[0]``.

    Returns
    -------
    array, shape broadcast(w.shape[:-1], v.shape[:-2]) + (L, D)
        In the promoted dtype of ``v`` and ``w``, on their device; with
        ``return_state=True`` the pair ``(out, state)``.

    Raises
    ------
    TypeError
        If ``v`` or ``w`` is not real floating, or they come from two libraries or
        devices.
    ValueError
        If ``w`` has an even last dimension, covers fewer than ``L`` tokens, its leading
        dimensions do not broadcast against ``v``'s, or ``skip``, ``initial_state`` or
        ``return_state`` do not fit the call (a state needs ``causal=True``).

    Examples
    --------
    A table with ``w(0) = 1`` and ``w(1) = 0.5`` adds half of the previous token:

    >>> import numpy as np
    >>> from fastrpb import rpb, rpb_matrix
    >>> v = np.arange(1.0, 7.0).reshape(3, 2)  # L = 3 tokens, 2 features
    >>> w = np.array([0.0, 0.0, 1.0, 0.5, 0.0])  # offsets -2..2, M = 3
    >>> np.round(rpb(v, w), 6)
    array([[1. , 2. ],
           [3.5, 5. ],
           [6.5, 8. ]])
    >>> bool(np.allclose(rpb(v, w), rpb_matrix(w, 3) @ v))
    True

    References
    ----------
    Zubkov & Gavrilov (2022), "FastRPB: a Scalable Relative Positional Encoding for
    Long Sequence Tasks", arXiv:2202.11364.
    """
    # -- validate, resolve the namespace once
    causal = _validate.flag("causal", causal)
    return_state = _validate.flag("return_state", return_state)
    _validate.required(v=v, w=w)
    if cu_seqlens is not None:  # packed sequences (fastrpb._packing), each biased on its own
        if initial_state is not None or return_state:
            raise ValueError("cu_seqlens does not combine with initial_state/return_state (streaming one sequence)")
        xp = namespace(v=v, w=w, cu_seqlens=_packing.array_argument(cu_seqlens))
        return _packed_rpb(xp, v, w, causal=causal, skip=skip, cu_seqlens=cu_seqlens)
    if initial_state is not None or return_state:
        return _rpb_stream(v, w, causal, skip, initial_state, return_state)
    xp = namespace(v=v, w=w)
    _validate.values(xp, "v", v)
    M = _validate.table(xp, "w", w)
    a, b = _validate.skip_fits(skip, v.shape[-2])
    L = v.shape[-2] - a - b
    _validate.table_length(L, M, "w")
    lead = _validate.broadcast({"w": w.shape[:-1], "v": v.shape[:-2]})
    # -- compute
    result, work = compute_dtype(xp, v, w)
    inner = v[..., a : v.shape[-2] - b, :]
    if math.prod((*lead, L, v.shape[-1])) == 0:
        # nothing to transform (PyTorch's CPU FFT fails on empty arrays)
        out = xp.zeros((*lead, L, v.shape[-1]), dtype=work, device=device_of(v))
    else:
        out = _toeplitz(xp, xp.astype(inner, work, copy=False), xp.astype(w, work, copy=False), causal=causal)
    out = _pad_rows(xp, out, a, b)  # (*lead, *v.shape[-2:]): a plain array, writable, its own memory
    return xp.astype(out, result, copy=False)


# --------------------------------------------------------------------------- streaming
def _check_stream(causal: Any, skip: Any, initial_state: Any, return_state: Any) -> int:
    """Arguments of a streaming call; returns the skip ``a`` (``b`` must be 0)."""
    if not causal:
        given = "initial_state" if initial_state is not None else "return_state=True"
        raise ValueError(
            f"{given} needs causal=True: only the causal bias can be continued token by token, got causal={causal!r}"
        )
    if initial_state is not None and not isinstance(initial_state, RPBState):
        raise TypeError(
            f"initial_state must be an RPBState (from rpb(..., return_state=True) or rpb_step) or None, got {type(initial_state).__name__}"
        )
    a, b = _validate.skip(skip)
    if b:
        raise ValueError(
            f"skip = ({a}, {b}): while streaming the end of the sequence is unknown, so skip[1] must be 0; "
            "drop the trailing tokens' output rows yourself"
        )
    return a


def _packed_rpb(xp: Any, v: Any, w: Any, *, causal: bool, skip: Any, cu_seqlens: Any) -> Any:
    """``fastrpb.rpb`` of every packed sequence on its own, ``skip`` per sequence."""
    _validate.values(xp, "v", v)
    offsets = _packing.offsets_of(xp, cu_seqlens, v.shape[-2])
    a, b = _validate.skip(skip)
    lengths = [hi - lo for lo, hi in itertools.pairwise(offsets)]
    for n, length in enumerate(lengths):
        if 0 < length < a + b:  # an empty sequence has no token to skip
            raise ValueError(
                f"skip = ({a}, {b}) skips {a + b} tokens of every sequence but sequence {n} of cu_seqlens "
                f"has only {length}"
            )
    pk = _packing.packing(xp, offsets, v)
    outs = []
    for g in pk.groups:
        vu = _packing.unpack(xp, g, v)
        keep = None
        if b:
            # the last b tokens of each sequence neither give nor receive the bias
            t = xp.arange(g.longest, dtype=xp.int32, device=device_of(v))
            ends = xp.asarray([lengths[n] - b for n in g.members], dtype=xp.int32, device=device_of(v))
            keep = t[None, :] < ends[:, None]
            vu = xp.where(keep[..., None], vu, xp.zeros((), dtype=vu.dtype, device=device_of(v)))
        out = rpb(vu, _packing.per_sequence_table(w), causal=causal, skip=(a, 0))
        if keep is not None:
            out = xp.where(keep[..., None], out, xp.zeros((), dtype=out.dtype, device=device_of(v)))
        outs.append(out)
    return _packing.repack(xp, pk, outs)


def _check_position(end: int, a: int, M: int, name: str) -> None:
    """A streamed sequence of ``end`` tokens (``a`` skipped) must fit the table."""
    if end - a > M:
        raise ValueError(
            f"position past the bias table {name}: the sequence reaches {end - a} biased tokens "
            f"({end} tokens, skip ({a}, 0)) but the table covers at most M = {M} (shape (..., {2 * M - 1}))"
        )


def _rpb_stream(v: Any, w: Any, causal: Any, skip: Any, state: RPBState | None, return_state: bool) -> Any:
    a = _check_stream(causal, skip, state, return_state)
    xp = namespace(v=v, w=w, initial_state=_online.held(state))
    _validate.values(xp, "v", v)
    M = _validate.table(xp, "w", w)
    lead = _validate.broadcast({"w": w.shape[:-1], "v": v.shape[:-2]})
    if state is not None:
        _online.check_state(state, M, a, v.shape[-1], lead, "initial_state")
        seen = _online.tokens_seen(xp, state)
        if seen is not None:
            _check_position(seen + v.shape[-2], a, M, "w")
    elif v.shape[-2] > 0:
        _check_position(v.shape[-2], a, M, "w")
    result, work = compute_dtype(xp, v, w)
    out, new = _online.extend(
        xp,
        state,
        xp.astype(v, work, copy=False),
        xp.astype(w, work, copy=False),
        lead=lead,
        M=M,
        a=a,
        work=work,
        toeplitz=_toeplitz,
    )
    out = xp.astype(out, result, copy=False)
    return (out, new) if return_state else out


def rpb_step(
    state: RPBState | None, v_t: Array, w: Array, *, skip: tuple[int, int] | None = None, donate: bool = False
) -> tuple[Array, RPBState]:
    r"""One decoding step of the causal bias: the output of token ``t`` and the new state.

    $$
    \mathrm{out}_t = \sum_{j \le t} w_{M-1+t-j}\, v_j
    $$

    Stepping token by token equals ``rpb(v, w, causal=True)`` on the whole sequence.
    Amortised O(D log^2 t) per token: an online (relaxed) FFT convolution over
    blocks of doubling size (see ``RPBState``), never an FFT over the history. The
    state has the same structure and shapes after any number of tokens, so a step
    under ``jax.jit`` / ``torch.compile`` compiles once (its level completions become
    compiled conditionals) and a ``jax.lax.scan`` decoding loop traces once; compiled,
    past the table (``t >= M``) it gives NaN there instead of an error. The state
    keeps its own copy of ``v_t``: the caller may reuse its buffer.

    Parameters
    ----------
    state : RPBState or None
        The state after the previous tokens, or ``None`` to start a sequence.
    v_t : array, shape (..., D)
        The new token's values.
    w : array, shape (..., 2M - 1)
        Bias table (the same in every step of a sequence); ``t < M``.
    skip : (int, 0), optional
        Only when starting (``state=None``): the first ``a`` tokens neither give nor
        receive bias (their output is zero). Later steps take it from the state.
    donate : bool, default False
        Hand ``state`` over: the step may write the new state into its arrays, so
        neither ``state`` nor an earlier state of the same sequence (they share the
        arrays a step leaves unchanged) may be used again. Under ``torch.compile`` the
        levels (O(M D) numbers) are then updated in place, once per 32 tokens, where a
        compiled step without it copies them at every token (``torch.cond`` may not
        return its operands): the compiled step's cost stays flat in ``t``. Eagerly,
        on JAX (immutable arrays: give the state to ``jax.jit(...,
        donate_argnums=...)`` instead) and when a gradient flows through the step,
        the step is the same as without it.

    Returns
    -------
    (array of shape broadcast(w.shape[:-1], v_t.shape[:-1]) + (D,), RPBState)

    Raises
    ------
    TypeError
        If ``v_t`` or ``w`` is not real floating, or they come from two libraries or
        devices.
    ValueError
        If ``skip[1] != 0`` (the end of a stream is unknown), ``v_t``'s width or leading
        dimensions do not match ``state``, or the stream outgrows the table.
    TypeError
        If ``donate`` is not a bool.

    Examples
    --------
    Token by token, the stream equals causal ``rpb`` over the whole sequence:

    >>> import numpy as np
    >>> from fastrpb import rpb, rpb_step
    >>> rng = np.random.default_rng(0)
    >>> v = rng.standard_normal((5, 2))
    >>> w = rng.standard_normal(9)  # M = 5
    >>> state, rows = None, []
    >>> for t in range(5):
    ...     out_t, state = rpb_step(state, v[t], w)
    ...     rows.append(out_t)
    >>> bool(np.allclose(np.stack(rows), rpb(v, w, causal=True)))
    True

    References
    ----------
    van der Hoeven (2002), "Relax, but don't be too lazy", J. Symbolic Computation;
    Zubkov & Gavrilov (2022), arXiv:2202.11364.
    """
    if state is not None and not isinstance(state, RPBState):
        raise TypeError(
            f"state must be an RPBState (from rpb(..., return_state=True) or rpb_step) or None, got {type(state).__name__}"
        )
    _validate.required(v_t=v_t, w=w)
    xp = namespace(v_t=v_t, w=w, state=_online.held(state))
    _validate.values(xp, "v_t", v_t, ndim=1)
    return _step(xp, state, v_t, w, skip, _validate.flag("donate", donate))


def _step(xp: Any, state: RPBState | None, v_t: Any, w: Any, skip: Any, donate: bool = False) -> tuple[Any, RPBState]:
    """``rpb_step`` after its namespace and ``v_t`` checks (``linear_attention_step`` makes
    those for its own inputs, ``w`` and the state included, and calls this directly)."""
    M = _validate.table(xp, "w", w)
    a = (0 if state is None else state.skip) if skip is None else _check_stream(True, skip, state, True)
    lead = tuple(v_t.shape[:-1])
    if w.ndim > 1 and tuple(w.shape[:-1]) != lead:  # a decoding step's hot path skips this
        lead = _validate.broadcast({"w": w.shape[:-1], "v_t": v_t.shape[:-1]})
    if state is not None:
        _online.check_state(state, M, a, v_t.shape[-1], lead, "state")
        seen = _online.tokens_seen(xp, state)
        if seen is not None:
            _check_position(seen + 1, a, M, "w")
    else:
        _check_position(1, a, M, "w")
    result, work = compute_dtype(xp, v_t, w)
    out, new = _online.step(
        xp,
        state,
        _online.as_dtype(xp, v_t, work),
        _online.as_dtype(xp, w, work),
        lead=lead,
        M=M,
        a=a,
        work=work,
        donate=donate,
    )
    return _online.as_dtype(xp, out, result), new


def rpb_matrix(w: Array, L: int, *, causal: bool = False) -> Array:
    """The dense Toeplitz matrix ``B[..., i, j] = w[..., M - 1 + i - j]``, shape ``(..., L, L)``.

    Use it as an additive logits bias for softmax attention (``logits_bias=``) or as
    a reference. It needs O(L^2) memory by nature; it is the only function in the
    library that materialises it.

    Parameters
    ----------
    w : array, shape (..., 2M - 1)
        Bias table, ``M >= L``.
    L : int
        Sequence length.
    causal : bool
        Zero the entries above the diagonal (``j > i``).

    Returns
    -------
    array, shape (..., L, L)
        In the namespace, device and dtype of ``w``.

    Raises
    ------
    TypeError
        If ``w`` is not real floating.
    ValueError
        If ``w`` has an even last dimension or covers fewer than ``L`` tokens.

    Examples
    --------
    >>> import numpy as np
    >>> from fastrpb import rpb_matrix
    >>> w = np.array([0.0, 0.0, 1.0, 0.5, 0.0])  # w(0) = 1, w(1) = 0.5, M = 3
    >>> rpb_matrix(w, 3)
    array([[1. , 0. , 0. ],
           [0.5, 1. , 0. ],
           [0. , 0.5, 1. ]])
    """
    L = _validate.integer("L", L, minimum=0)
    causal = _validate.flag("causal", causal)
    _validate.required(w=w)
    xp = namespace(w=w)
    M = _validate.table(xp, "w", w)
    _validate.table_length(L, M, "w")
    dev = device_of(w)
    # int32 indices suffice below 46341 tokens (and JAX has int64 only with x64 on)
    index_dtype = xp.int32 if L * L < 2**31 else xp.int64
    i = xp.arange(L, dtype=index_dtype, device=dev)
    offsets = i[:, None] - i[None, :]
    index = xp.reshape(offsets + (M - 1), (L * L,))
    dense = xp.reshape(xp.take(w, index, axis=-1), (*w.shape[:-1], L, L))
    if causal:
        dense = xp.where(offsets >= 0, dense, xp.zeros((), dtype=w.dtype, device=dev))
    return dense


def symmetric_table(h: Array) -> Array:
    """Build a full table from a symmetric one: ``w(t) = h[..., |t|]``.

    Parameters
    ----------
    h : array, shape (..., M)
        Weights for offsets ``0 .. M - 1`` (the paper's symmetric parameterisation).

    Returns
    -------
    array, shape (..., 2M - 1)

    Raises
    ------
    TypeError
        If ``h`` is not real floating.
    ValueError
        If ``h`` has no last dimension (a 0-d array) or an empty one.

    Examples
    --------
    >>> import numpy as np
    >>> from fastrpb import symmetric_table
    >>> symmetric_table(np.array([1.0, 0.5, 0.25]))
    array([0.25, 0.5 , 1.  , 0.5 , 0.25])
    """
    _validate.required(h=h)
    xp = namespace(h=h)
    _validate.floating(xp, "h", h)
    if h.ndim < 1 or h.shape[-1] < 1:
        raise ValueError(f"h must have shape (..., M) with M >= 1, got shape {tuple(h.shape)}")
    return xp.concat([xp.flip(h[..., 1:], axis=-1), h], axis=-1)


def rpb_nd(
    v: Array,
    tables: Sequence[Array | None],
    grid: Sequence[int],
    *,
    causal: bool = False,
    skip: tuple[int, int] = (0, 0),
    initial_state: RPBndState | None = None,
    return_state: bool = False,
) -> Any:
    r"""Separable N-d relative positional bias for tokens on a row-major grid.

    $$
    B_{p, p'} = \sum_a w_a(p_a - p'_a)
    \qquad \big(\text{causal: } 0 \text{ unless } p' \preceq p \text{ in raster order}\big)
    $$

    For each axis ``a`` with a table, ``v`` is summed over the other grid axes, the
    1-d Toeplitz product is applied along axis ``a`` by FFT, and the result is
    broadcast back and added: O(L log L) time, never an ``L x L`` matrix.

    ``causal=True`` keeps only the tokens ``p'`` that come no later than ``p`` in
    row-major (raster) order. Whether ``p'`` comes first depends only on the offset
    ``t = p - p'`` (its first non-zero component is positive, or ``t = 0``), so the
    causal bias is one N-d convolution of ``v`` with the masked kernel
    ``K(t) = sum_a w_a(t_a)`` on the offset lattice; it is computed by one N-d real
    FFT of 5-smooth sizes ``>= 2 G_a - 1``: O(L log L) time, about ``2^k L`` numbers
    of extra memory per feature column for ``k`` grid axes.

    Parameters
    ----------
    v : array, shape (..., L, D)
        Values; ``L - a - b`` tokens laid out row-major on ``grid``.
    tables : sequence of arrays or None
        One per grid axis: a table ``(..., 2M_a - 1)`` with ``M_a >= G_a``, or ``None``
        for an axis without bias (e.g. colour channels).
    grid : sequence of int
        ``(G_1, ..., G_k)`` with ``prod(grid) == L - a - b``. The paper's 2-d image
        bias is ``grid=(H, W)``; with colour channels as tokens ``grid=(H, W, C)`` and
        ``tables=(w, w, None)``.
    causal : bool
        Raster order: ``p'`` contributes to ``p`` only if it comes no later
        row-major (the lower triangle of ``B`` in token order).
    skip : (int, int)
        Tokens at the start and end (e.g. a class token) outside the grid; their
        output rows are zero.
    initial_state : RPBndState, optional
        Causal only: continue the raster sequence that this state ends (from
        ``return_state=True`` or ``rpb_nd_step``); ``v`` holds the next positions.
        The sequence is the ``a + prod(grid) + b`` tokens of ``skip`` and the grid; a
        piece (or, causal, a whole call) may be shorter than that, and pieces split
        at any points equal one call. Amortised cost per token flat in the number
        of tokens (see ``RPBndState``).
    return_state : bool
        Causal only: also return the ``RPBndState`` after the last token.

    Returns
    -------
    array, shape broadcast(v.shape[:-2], tables' leading dimensions) + (L, D)
        In the promoted dtype of ``v`` and the tables, on their device; with
        ``return_state=True`` the pair ``(out, state)``.

    Raises
    ------
    TypeError
        If ``v`` or a table is not real floating, or they come from two libraries or
        devices.
    ValueError
        If ``grid`` does not hold the ``L - skip[0] - skip[1]`` tokens (causal: if the
        tokens pass the end of the grid and ``skip[1]``), ``tables`` does not give one
        entry per axis (or gives none), a table is shorter than its axis, or
        ``initial_state`` does not fit the call.

    Examples
    --------
    With only ``w(0) = 1`` on both axes of a 2 x 3 grid, ``B[p, p'] = [p, p' in one
    row] + [p, p' in one column]``: a token receives its row's sum plus its column's:

    >>> import numpy as np
    >>> from fastrpb import rpb_nd
    >>> v = np.arange(6.0).reshape(6, 1)  # 6 tokens laid out row-major on (2, 3)
    >>> w = np.array([0.0, 0.0, 1.0, 0.0, 0.0])  # M = 3
    >>> np.round(rpb_nd(v, (w, w), (2, 3)), 6).reshape(2, 3)
    array([[ 6.,  8., 10.],
           [15., 17., 19.]])

    References
    ----------
    Zubkov & Gavrilov (2022), "FastRPB: a Scalable Relative Positional Encoding for
    Long Sequence Tasks", arXiv:2202.11364 (the 2-d bias; the causal raster form is
    ours).
    """
    # -- validate, resolve the namespace once
    causal = _validate.flag("causal", causal)
    grid = _tables_and_grid(tables, grid)
    _validate.required(v=v)
    return_state = _validate.flag("return_state", return_state)
    if initial_state is not None or return_state or (causal and _short(v, grid, skip)):
        return _rpb_nd_stream(v, tables, grid, causal, skip, initial_state, return_state)
    named = {f"tables[{k}]": t for k, t in enumerate(tables)}
    xp = namespace(v=v, **named)
    _validate.values(xp, "v", v)
    a, b = _validate.skip_fits(skip, v.shape[-2])
    L = v.shape[-2] - a - b
    if math.prod(grid) != L:
        raise ValueError(
            f"grid {grid} holds {math.prod(grid)} tokens but v has L = {L} tokens to lay out "
            f"(sequence length {v.shape[-2]} minus skip ({a}, {b}))"
        )
    present = {name: t for name, t in named.items() if t is not None}
    for k, (name, t) in enumerate(named.items()):
        if t is not None:
            _validate.table_length(grid[k], _validate.table(xp, name, t), name)
            _validate.broadcast({name: t.shape[:-1], "v": v.shape[:-2]})
    # the tables must fit each other too, not only v
    lead = _validate.broadcast({"v": v.shape[:-2], **{name: t.shape[:-1] for name, t in present.items()}})
    # -- compute
    result, work = compute_dtype(xp, v, *present.values())
    inner = xp.astype(v[..., a : v.shape[-2] - b, :], work, copy=False)
    D = v.shape[-1]
    cube = xp.reshape(inner, (*inner.shape[:-2], *grid, D))
    k_axes = len(grid)
    total = xp.zeros((*lead, *grid, D), dtype=work, device=device_of(v))
    if causal and present and math.prod(total.shape) > 0:
        works = [None if t is None else xp.astype(t, work, copy=False) for t in tables]
        total = _raster_causal(xp, cube, works, grid)  # already (*lead, *grid, D)
    for axis, table in enumerate(tables):
        if table is None or causal or math.prod(total.shape) == 0:  # nothing to transform (as in rpb)
            continue
        # grid axis `axis` sits at position -(k_axes + 1) + axis of `cube`
        others = tuple(-(k_axes + 1) + o for o in range(k_axes) if o != axis)
        line = xp.sum(cube, axis=others) if others else cube  # (..., G_axis, D)
        line = _toeplitz(xp, line, xp.astype(table, work, copy=False), causal=False)
        shape = [1] * k_axes
        shape[axis] = grid[axis]
        total = total + xp.reshape(line, (*line.shape[:-2], *shape, D))
    out = xp.reshape(total, (*lead, L, D))
    out = _pad_rows(xp, out, a, b)
    return xp.astype(out, result, copy=False)


def _short(v: Any, grid: tuple, skip: Any) -> bool:
    """A causal call with fewer tokens than the sequence (a prefix in raster order)."""
    a, b = _validate.skip(skip)
    return bool(getattr(v, "ndim", 0) >= 2) and v.shape[-2] < a + math.prod(grid) + b


def _nd_stream_arguments(
    v: Any, tables: Sequence[Any], grid: tuple, skip: tuple, state: Any, v_name: str, state_name: str, *, ndim: int
) -> tuple[Any, tuple, tuple, Any, Any]:
    """Validate a streaming N-d call; returns ``(xp, lead, lengths, result, work)``."""
    named = {f"tables[{k}]": t for k, t in enumerate(tables)}
    xp = namespace(**{v_name: v}, **named, **{state_name: _online_nd.held(state)})
    _validate.values(xp, v_name, v, ndim=ndim)
    lengths: list[int | None] = []
    for k, (name, t) in enumerate(named.items()):
        if t is None:
            lengths.append(None)
            continue
        M = _validate.table(xp, name, t)
        _validate.table_length(grid[k], M, name)
        lengths.append(M)
    present = {name: t for name, t in named.items() if t is not None}
    lead = _validate.broadcast(
        {v_name: v.shape[: v.ndim - ndim], **{name: t.shape[:-1] for name, t in present.items()}}
    )
    D = v.shape[-1]
    if state is not None:
        _online_nd.check_state(state, grid, skip, tuple(lengths), D, lead, state_name)
    seen = 0 if state is None else _online_nd.tokens_seen(xp, state)
    L = v.shape[-2] if ndim == 2 else 1
    a, b = skip
    end = a + math.prod(grid) + b
    if seen is not None and seen + L > end:
        raise ValueError(
            f"{v_name} goes past the end of the sequence: {seen} tokens seen plus {L} new make {seen + L}, but "
            f"grid {grid} with skip ({a}, {b}) holds {end} tokens in all"
        )
    result, work = compute_dtype(xp, v, *present.values())
    return xp, lead, tuple(lengths), result, work


def _rpb_nd_stream(
    v: Any, tables: Sequence[Any], grid: tuple, causal: bool, skip: Any, state: Any, return_state: bool
) -> Any:
    if not causal:
        given = "initial_state" if state is not None else "return_state=True"
        raise ValueError(
            f"{given} needs causal=True: only the raster-causal bias can be continued, got causal={causal!r}"
        )
    if state is not None and not isinstance(state, RPBndState):
        raise TypeError(
            f"initial_state must be an RPBndState (from rpb_nd(..., return_state=True) or rpb_nd_step) or None, got {type(state).__name__}"
        )
    skip = _validate.skip(skip)
    xp, lead, lengths, result, work = _nd_stream_arguments(v, tables, grid, skip, state, "v", "initial_state", ndim=2)
    works = tuple(None if t is None else _online.as_dtype(xp, t, work) for t in tables)
    vw = _online.as_dtype(xp, v, work)
    if state is None:
        state = _nd_start(xp, lead, v.shape[-1], grid, skip, lengths, works, vw)
    out, new = _online_nd.extend(xp, state, vw, works, lead=lead, work=work, toeplitz=_toeplitz)
    out = xp.astype(out, result, copy=False)
    return (out, new) if return_state else out


def _nd_start(
    xp: Any, lead: tuple, D: int, grid: tuple, skip: tuple, lengths: tuple, tables: tuple, like: Any
) -> RPBndState:
    cut = _online_nd.central(xp, tables, grid, like.dtype, like)
    e_last = _online_nd.effective(xp, cut, grid, len(grid) - 1, like)
    return _online_nd.start(xp, lead, D, grid, skip, lengths, e_last, like)


def rpb_nd_step(
    state: RPBndState | None,
    v_t: Array,
    tables: Sequence[Array | None],
    *,
    grid: Sequence[int],
    skip: tuple[int, int] | None = None,
) -> tuple[Array, RPBndState]:
    r"""One raster position of the causal N-d bias: its output and the new state.

    $$
    y_p = \sum_{p' \preceq p} \Big(\sum_a w_a(p_a - p'_a)\Big) v_{p'}
    $$

    Stepping through the ``a + prod(grid) + b`` tokens equals ``rpb_nd(v, tables,
    grid, causal=True, skip=(a, b))`` on the whole sequence. Within a row the bias is
    a 1-d online convolution (``rpb_step``'s); the earlier rows enter through per-axis
    running terms updated once per finished row (see ``RPBndState``), so the
    amortised cost per token is flat in the number of tokens. The state has the
    same structure and shapes after any number of tokens (``jax.jit`` /
    ``torch.compile`` compile once) and keeps its own copy of ``v_t``. Compiled, a
    position past the sequence gives NaN instead of an error.

    Parameters
    ----------
    state : RPBndState or None
        The state after the previous tokens, or ``None`` to start a sequence.
    v_t : array, shape (..., D)
        The new token's values.
    tables : sequence of arrays or None
        One table ``(..., 2M_a - 1)`` (``M_a >= G_a``) or ``None`` per grid axis, the
        same in every step of a sequence.
    grid : sequence of int
        ``(G_1, ..., G_k)``, the same in every step.
    skip : (int, int), optional
        Only when starting (``state=None``): ``a`` tokens before the grid and ``b``
        after it, which neither give nor receive bias (their output is zero). Later
        steps take it from the state.

    Returns
    -------
    (array of shape broadcast(v_t.shape[:-1], tables' leading dimensions) + (D,), RPBndState)

    Raises
    ------
    TypeError
        If ``v_t`` or a table is not real floating, or they come from two libraries or
        devices, or ``state`` is not an ``RPBndState``.
    ValueError
        If ``grid``, ``tables``, ``skip``, ``v_t``'s width or leading dimensions do not
        match ``state``, or the stream passes the end of the sequence.

    Examples
    --------
    Token by token, the stream equals the causal bias over the whole grid:

    >>> import numpy as np
    >>> from fastrpb import rpb_nd, rpb_nd_step
    >>> rng = np.random.default_rng(0)
    >>> v = rng.standard_normal((6, 2))  # a 2 x 3 grid, row-major
    >>> tables = (rng.standard_normal(3), rng.standard_normal(5))  # M = 2 and 3
    >>> state, rows = None, []
    >>> for t in range(6):
    ...     y_t, state = rpb_nd_step(state, v[t], tables, grid=(2, 3))
    ...     rows.append(y_t)
    >>> bool(np.allclose(np.stack(rows), rpb_nd(v, tables, (2, 3), causal=True)))
    True
    """
    if state is not None and not isinstance(state, RPBndState):
        raise TypeError(
            f"state must be an RPBndState (from rpb_nd(..., return_state=True) or rpb_nd_step) or None, got {type(state).__name__}"
        )
    grid = _tables_and_grid(tables, grid)
    _validate.required(v_t=v_t)
    if skip is None:
        skip = (0, 0) if state is None else state.skip
    skip = _validate.skip(skip)
    xp, lead, lengths, result, work = _nd_stream_arguments(v_t, tables, grid, skip, state, "v_t", "state", ndim=1)
    works = tuple(None if t is None else _online.as_dtype(xp, t, work) for t in tables)
    vw = _online.as_dtype(xp, v_t, work)
    if state is None:
        state = _nd_start(xp, lead, v_t.shape[-1], grid, skip, lengths, works, vw)
    out, new = _online_nd.step(xp, state, vw, works, lead=lead, work=work, toeplitz=_toeplitz)
    return _online.as_dtype(xp, out, result), new


def _raster_causal(xp: Any, cube: Any, tables: list[Any | None], grid: tuple[int, ...]) -> Any:
    """Causal (raster order) N-d bias of ``cube: (..., G_1, ..., G_k, D)`` by one N-d FFT.

    ``out[p] = sum_{p'} K(p - p') cube[p']`` with ``K(t) = sum_a w_a(t_a)`` where ``t``
    is raster-non-negative (its first non-zero component positive, or ``t = 0``) and
    0 elsewhere. Offsets are laid out circularly on each axis as in ``_toeplitz``
    (``t_a >= 0`` at index ``t_a``, ``t_a < 0`` at ``n_a + t_a``); with
    ``n_a >= 2 G_a - 1`` nothing wraps around, so the first ``G_a`` outputs along
    every axis are the linear convolution. Tables are in the compute dtype with
    ``M_a >= G_a``. The grid axes go last (``(..., D, G_1, ..., G_k)``) so the FFTs
    run over contiguous axes.
    """
    k = len(grid)
    n = tuple(next_fast_len(2 * g - 1) for g in grid)
    dev = device_of(cube)
    kernel: Any = None  # rpb_nd calls this only with at least one table
    mask: Any = None  # raster-non-negative offsets, built from the last axis forwards
    for axis in reversed(range(k)):
        shape = [1] * k
        shape[axis] = n[axis]
        index = xp.reshape(xp.arange(n[axis], dtype=xp.int32, device=dev), tuple(shape))
        positive = (index >= 1) & (index < grid[axis])  # offsets 1 .. G - 1 (the rest: < 0 or unused)
        mask = (index >= 0) & (index < grid[axis]) if mask is None else positive | ((index == 0) & mask)
        w = tables[axis]
        if w is None:
            continue
        G, M = grid[axis], (w.shape[-1] + 1) // 2
        parts = [w[..., M - 1 : M - 1 + G]]  # offsets 0 .. G - 1
        if n[axis] > G:
            parts.append(xp.zeros((*w.shape[:-1], n[axis] - (2 * G - 1)), dtype=w.dtype, device=dev))
            parts.append(w[..., M - G : M - 1])  # offsets -(G - 1) .. -1
        line = xp.reshape(xp.concat(parts, axis=-1), (*w.shape[:-1], *shape))
        kernel = line if kernel is None else kernel + line
    kernel = xp.where(mask, kernel, xp.zeros((), dtype=kernel.dtype, device=dev))
    axes = tuple(range(-k, 0))
    # a D axis, added before the FFT (the spectrum is never reshaped: see ``_toeplitz``)
    kernel = xp.reshape(kernel, (*kernel.shape[:-k], 1, *kernel.shape[-k:]))
    nlead = cube.ndim - k - 1
    columns = xp.permute_dims(cube, (*range(nlead), cube.ndim - 1, *range(nlead, nlead + k)))
    crop = (..., *(slice(0, g) for g in grid))

    def convolve(block: Any, k_f: Any) -> Any:
        spectrum = multiply_into(xp, rfftn(xp, block, s=n, axes=axes), k_f)
        return irfftn(xp, spectrum, s=n, axes=axes, consume=True)[crop]

    # The padded spectrum of one (leading index, feature) column is about 2^k times
    # the column: long inputs go in blocks of columns of at most _BLOCK_BYTES of
    # spectrum (as in ``_toeplitz``), so the work space stays bounded.
    D = cube.shape[-1]
    per_col = math.prod(n[:-1]) * (n[-1] // 2 + 1) * 2 * _itemsize(xp, cube.dtype)
    lead = _broadcast_lead(columns.shape[:nlead], kernel.shape[: -k - 1])
    G = math.prod(lead)
    if not _blocked(G * D * per_col) or not blocks_allowed(xp, cube):  # engines: sharded JAX
        out = convolve(columns, rfftn(xp, kernel, s=n, axes=axes))
    else:
        cols = max(1, min(D, _BLOCK_BYTES // per_col))
        heads = max(1, _BLOCK_BYTES // (per_col * cols))
        columns = xp.reshape(xp.broadcast_to(columns, (*lead, D, *grid)), (G, D, *grid))
        kernel_f = rfftn(xp, xp.reshape(xp.broadcast_to(kernel, (*lead, 1, *n)), (G, 1, *n)), s=n, axes=axes)
        rows = []
        for g in range(0, G, heads):
            g_end = min(g + heads, G)
            # a copy of each cropped block, so its padded output is freed at once
            parts = [
                owned(xp, convolve(columns[g:g_end, d : min(d + cols, D), ...], kernel_f[g:g_end, ...]))
                for d in range(0, D, cols)
            ]
            rows.append(parts[0] if len(parts) == 1 else xp.concat(parts, axis=1))
        out = xp.reshape(rows[0] if len(rows) == 1 else xp.concat(rows, axis=0), (*lead, D, *grid))
    return xp.permute_dims(out, (*range(out.ndim - k - 1), *range(out.ndim - k, out.ndim), out.ndim - k - 1))


def rpb_init(heads: int | None, max_len: int, *, seed: int, like: Array, scale: float = 1e-2) -> Array:
    """A bias table initialised as in the paper: small random values near zero.

    Parameters
    ----------
    heads : int or None
        Number of heads; the table has shape ``(heads, 2 max_len - 1)``, or
        ``(2 max_len - 1,)`` for ``None``.
    max_len : int
        ``M``, the longest sequence the table serves.
    seed : int
        Seed of the random draw (NumPy's ``default_rng``); the same on every backend.
    like : array
        The table is created in the namespace, on the device and (if floating) in the
        dtype of ``like``.
    scale : float
        Standard deviation of the normal draw.

    Returns
    -------
    array, shape (heads, 2 max_len - 1) or (2 max_len - 1,)
        Normal draws of standard deviation ``scale``.

    Raises
    ------
    TypeError
        If ``seed``, ``heads`` or ``max_len`` is not an int.
    ValueError
        If ``heads`` or ``max_len`` is below 1.

    Examples
    --------
    >>> import numpy as np
    >>> from fastrpb import rpb_init
    >>> w = rpb_init(8, 128, seed=0, like=np.zeros(1, dtype=np.float32))
    >>> w.shape, w.dtype
    ((8, 255), dtype('float32'))
    >>> bool(np.abs(w).max() < 0.1)
    True
    """
    max_len = _validate.integer("max_len", max_len, minimum=1)
    shape: tuple[int, ...] = (2 * max_len - 1,)
    if heads is not None:
        shape = (_validate.integer("heads", heads, minimum=1), *shape)
    seed = _validate.seed(seed)
    scale = _validate.non_negative("scale", scale)
    _validate.required(like=like)
    xp = namespace(like=like)
    dtype = like.dtype if xp.isdtype(like.dtype, "real floating") else xp.float32
    _, work = compute_dtype(xp, xp.empty((0,), dtype=dtype, device=device_of(like)))
    table = seeded_normal(xp, shape, seed=seed, dtype=work, device=device_of(like)) * scale
    return xp.astype(table, dtype, copy=False)


def _tables_and_grid(tables: Any, grid: Any) -> tuple:
    """The checked grid, with one table (or None) per axis in ``tables``."""
    if not isinstance(tables, (tuple, list)):
        raise TypeError(
            f"tables must be a sequence with one table (or None) per grid axis, got {type(tables).__name__}"
        )
    grid = _validate.grid(grid)
    if len(tables) != len(grid):
        raise ValueError(
            f"tables has {len(tables)} entries but grid has {len(grid)} axes {grid}: give one table (or None) per axis"
        )
    return grid
