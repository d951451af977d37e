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

import math
from collections.abc import Sequence
from typing import Any

from ._compat import (
    check_floating,
    compute_dtype,
    device_of,
    grid_arg,
    int_arg,
    irfft,
    multiply_into,
    namespace,
    next_fast_len,
    rfft,
    seeded_normal,
    skip_arg,
)

__all__ = ["rpb", "rpb_nd", "rpb_matrix", "symmetric_table", "rpb_init"]


# --------------------------------------------------------------------------- checks
def _check_values(xp: Any, v: Any, name: str = "v") -> None:
    check_floating(xp, name, v)
    if v.ndim < 2:
        raise ValueError(f"{name} must have shape (..., L, D) with at least 2 dimensions, got shape {tuple(v.shape)}")


def _table_half_length(xp: Any, w: Any, name: str) -> int:
    """Validate a table ``(..., 2M - 1)`` and return ``M``."""
    check_floating(xp, name, w)
    if w.ndim < 1:
        raise ValueError(f"{name} must have shape (..., 2M - 1), got a 0-d array")
    n = w.shape[-1]
    if n % 2 == 0:
        raise ValueError(
            f"{name} must have an odd last dimension 2M - 1 (offsets -(M-1)..M-1), got length {n}"
        )
    return (n + 1) // 2


def _check_length(L: int, M: int, name: str) -> None:
    if L > M:
        raise ValueError(
            f"the sequence is longer than the bias table {name}: L = {L} tokens but the "
            f"table covers at most M = {M} (shape (..., {2 * M - 1}))"
        )


def _check_skip(skip: Any, L: int) -> tuple[int, int]:
    a, b = skip_arg(skip)
    if a + b > L:
        raise ValueError(f"skip = ({a}, {b}) skips {a + b} tokens but the sequence has only L = {L}")
    return a, b


def _check_broadcast(w_lead: tuple, v_lead: tuple, name: str) -> None:
    for dw, dv in zip(reversed(w_lead), reversed(v_lead)):
        if dw != 1 and dv != 1 and dw != dv:
            raise ValueError(
                f"the leading dimensions of {name} {tuple(w_lead)} do not broadcast against "
                f"the leading dimensions of v {tuple(v_lead)}"
            )


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
    kernel_f = rfft(xp, kernel, n=n)[..., None, :]  # (..., 1, n // 2 + 1)
    columns = xp.matrix_transpose(v)  # (..., D, L): the sequence on the last axis

    def convolve(block: Any, k_f: Any) -> Any:
        spectrum = multiply_into(xp, rfft(xp, block, n=n), k_f)
        return irfft(xp, spectrum, n=n, consume=True)[..., :L]

    itemsize = _itemsize(xp, v.dtype)
    per_row = (n // 2 + 1) * 2 * itemsize  # spectrum bytes of one (head, feature) row
    lead = _broadcast_lead(v.shape[:-2], w.shape[:-1])
    G = math.prod(lead)
    if G * D * per_row <= _BLOCK_BYTES:
        return xp.matrix_transpose(convolve(columns, kernel_f))
    # Long input: blocks of (leading index, feature column) rows. A block takes whole
    # cache lines of each row of v (a multiple of 64 bytes of features: reading a
    # few strided columns would drag in their neighbours every time), and as many
    # leading indices as fit in the block budget.
    line = max(1, 64 // itemsize)
    cols = min(D, max(line, (_BLOCK_BYTES // per_row) // line * line))
    heads = max(1, _BLOCK_BYTES // (per_row * cols))
    columns = xp.reshape(xp.broadcast_to(columns, (*lead, D, L)), (G, D, L))
    kernel_f = xp.reshape(xp.broadcast_to(kernel_f, (*lead, 1, n // 2 + 1)), (G, 1, n // 2 + 1))
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


def _itemsize(xp: Any, dtype: Any) -> int:
    return 8 if dtype == xp.float64 else 4


def _pad_rows(xp: Any, x: Any, a: int, b: int) -> Any:
    """Zero rows before and after the sequence axis (-2): the skipped tokens' output."""
    if a == 0 and b == 0:
        return x
    parts = []
    if a:
        parts.append(xp.zeros((*x.shape[:-2], a, x.shape[-1]), dtype=x.dtype, device=device_of(x)))
    parts.append(x)
    if b:
        parts.append(xp.zeros((*x.shape[:-2], b, x.shape[-1]), dtype=x.dtype, device=device_of(x)))
    return xp.concat(parts, axis=-2)


# --------------------------------------------------------------------------- public
def rpb(v: Any, w: Any, *, causal: bool = False, skip: tuple[int, int] = (0, 0)) -> Any:
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

    Returns
    -------
    array, shape broadcast(w.shape[:-1], v.shape[:-2]) + (L, D)
        In the promoted dtype of ``v`` and ``w``, on their device.

    References
    ----------
    Zubkov & Gavrilov (2022), "FastRPB: a Scalable Relative Positional Encoding for
    Long Sequence Tasks", arXiv:2202.11364.
    """
    xp = namespace(v=v, w=w)
    _check_values(xp, v)
    M = _table_half_length(xp, w, "w")
    a, b = _check_skip(skip, v.shape[-2])
    L = v.shape[-2] - a - b
    _check_length(L, M, "w")
    _check_broadcast(w.shape[:-1], v.shape[:-2], "w")
    result, work = compute_dtype(xp, v, w)
    inner = v[..., a : v.shape[-2] - b, :]
    if L == 0:
        out = inner
    else:
        out = _toeplitz(xp, xp.astype(inner, work, copy=False), xp.astype(w, work, copy=False), causal=bool(causal))
    out = _pad_rows(xp, out, a, b)
    shape = (*_broadcast_lead(w.shape[:-1], v.shape[:-2]), *v.shape[-2:])
    return xp.astype(xp.broadcast_to(out, shape), result, copy=False)


def _broadcast_lead(*shapes: tuple) -> tuple:
    n = max(len(s) for s in shapes)
    padded = [(1,) * (n - len(s)) + tuple(s) for s in shapes]
    return tuple(max(dims) if 1 in dims else dims[0] for dims in zip(*padded))


def rpb_matrix(w: Any, L: int, *, causal: bool = False) -> Any:
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
    """
    xp = namespace(w=w)
    M = _table_half_length(xp, w, "w")
    L = int_arg("L", L, minimum=0)
    _check_length(L, M, "w")
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


def symmetric_table(h: Any) -> Any:
    """Build a full table from a symmetric one: ``w(t) = h[..., |t|]``.

    Parameters
    ----------
    h : array, shape (..., M)
        Weights for offsets ``0 .. M - 1`` (the paper's symmetric parameterisation).

    Returns
    -------
    array, shape (..., 2M - 1)
    """
    xp = namespace(h=h)
    check_floating(xp, "h", h)
    if h.ndim < 1 or h.shape[-1] < 1:
        raise ValueError(f"h must have shape (..., M) with M >= 1, got shape {tuple(h.shape)}")
    return xp.concat([xp.flip(h[..., 1:], axis=-1), h], axis=-1)


def rpb_nd(
    v: Any,
    tables: Sequence[Any | None],
    grid: Sequence[int],
    *,
    skip: tuple[int, int] = (0, 0),
) -> Any:
    r"""Separable N-d relative positional bias for tokens on a row-major grid.

    $$
    B_{p, p'} = \sum_a w_a(p_a - p'_a)
    $$

    For each axis ``a`` with a table, ``v`` is summed over the other grid axes, the
    1-d Toeplitz product is applied along axis ``a`` by FFT, and the result is
    broadcast back and added: O(L log L) time, never an ``L x L`` matrix.

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
    skip : (int, int)
        Tokens at the start and end (e.g. a class token) outside the grid; their
        output rows are zero.
    """
    if not isinstance(tables, (tuple, list)):
        raise TypeError(f"tables must be a sequence with one table (or None) per grid axis, got {type(tables).__name__}")
    grid = grid_arg(grid)
    if len(tables) != len(grid):
        raise ValueError(f"tables has {len(tables)} entries but grid has {len(grid)} axes {grid}: give one table (or None) per axis")
    named = {f"tables[{k}]": t for k, t in enumerate(tables)}
    xp = namespace(v=v, **named)
    _check_values(xp, v)
    a, b = _check_skip(skip, v.shape[-2])
    L = v.shape[-2] - a - b
    if math.prod(grid) != L:
        raise ValueError(
            f"grid {grid} holds {math.prod(grid)} tokens but v has L = {L} tokens to lay out "
            f"(sequence length {v.shape[-2]} minus skip ({a}, {b}))"
        )
    present = {name: t for name, t in named.items() if t is not None}
    for k, (name, t) in enumerate(named.items()):
        if t is not None:
            _check_length(grid[k], _table_half_length(xp, t, name), name)
            _check_broadcast(t.shape[:-1], v.shape[:-2], name)
    result, work = compute_dtype(xp, v, *present.values())
    lead = _broadcast_lead(v.shape[:-2], *(t.shape[:-1] for t in present.values()))
    inner = xp.astype(v[..., a : v.shape[-2] - b, :], work, copy=False)
    D = v.shape[-1]
    cube = xp.reshape(inner, (*inner.shape[:-2], *grid, D))
    k_axes = len(grid)
    total = xp.zeros((*lead, *grid, D), dtype=work, device=device_of(v))
    for axis, table in enumerate(tables):
        if table is None:
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


def rpb_init(heads: int | None, max_len: int, *, seed: int, like: Any, scale: float = 1e-2) -> Any:
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
    """
    xp = namespace(like=like)
    max_len = int_arg("max_len", max_len, minimum=1)
    shape: tuple[int, ...] = (2 * max_len - 1,)
    if heads is not None:
        shape = (int_arg("heads", heads, minimum=1), *shape)
    dtype = like.dtype if xp.isdtype(like.dtype, "real floating") else xp.float32
    _, work = compute_dtype(xp, xp.empty((0,), dtype=dtype, device=device_of(like)))
    table = seeded_normal(xp, shape, seed=seed, dtype=work, device=device_of(like)) * scale
    return xp.astype(table, dtype, copy=False)
