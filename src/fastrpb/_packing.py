r"""Packed variable-length sequences (``cu_seqlens``), shared by the public functions.

LM training packs documents into one row of ``T`` tokens; ``cu_seqlens``, an integer
array ``0 = c_0 < c_1 < ... < c_N = T`` (the flash-attention / fla convention), says
where each begins. Sequence ``n`` holds tokens ``c_n .. c_{n+1} - 1`` of the length
axis (-2), and attends and is biased only within itself.

Here a packed array ``(..., T, D)`` is *unpacked* to ``(..., N, Lmax, D)`` (one row per
sequence, padded at the end to the longest, ``Lmax``) by one ``take``, the batched
code runs with the padding masked, and the result is *repacked* by another ``take``:
equal to ``N`` separate calls, in ``O(N Lmax)`` work (at most ``N`` times the packed
length when one sequence is much longer than the rest).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._compat import device_of


class Packing(NamedTuple):
    """The layout of ``N`` packed sequences: offsets, lengths, the longest, and the
    ``take`` indices both ways."""

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    longest: int
    unpack_index: Any  # (N * Lmax,) packed position of each padded slot (clipped)
    valid: Any  # (N, Lmax) bool: a real token, not padding
    repack_index: Any  # (T,) padded slot of each packed token


def packing(xp: Any, offsets: tuple[int, ...], like: Any) -> Packing:
    """The index arrays for ``offsets`` (validated Python ints), on ``like``'s device."""
    lengths = tuple(b - a for a, b in zip(offsets[:-1], offsets[1:]))
    N, Lmax, T = len(lengths), max(lengths), offsets[-1]
    index_dtype = xp.int32 if N * Lmax < 2**31 else xp.int64
    dev = device_of(like)
    t = xp.arange(Lmax, dtype=index_dtype, device=dev)
    start = xp.asarray(offsets[:-1], dtype=index_dtype, device=dev)
    length = xp.asarray(lengths, dtype=index_dtype, device=dev)
    valid = t[None, :] < length[:, None]
    unpack_index = xp.reshape(xp.minimum(start[:, None] + t[None, :], xp.asarray(T - 1, dtype=index_dtype, device=dev)), (-1,))
    # packed token p of sequence n sits in slot n * Lmax + (p - c_n)
    rows = [n * Lmax - offsets[n] for n in range(N) for _ in range(lengths[n])]
    repack_index = xp.asarray(rows, dtype=index_dtype, device=dev) + xp.arange(T, dtype=index_dtype, device=dev)
    return Packing(offsets, lengths, Lmax, unpack_index, valid, repack_index)


def unpack(xp: Any, pk: Packing, x: Any, *, fill: Any = 0) -> Any:
    """``(..., T, D)`` -> ``(..., N, Lmax, D)``, padding slots set to ``fill``."""
    y = xp.take(x, pk.unpack_index, axis=x.ndim - 2)
    y = xp.reshape(y, (*x.shape[:-2], len(pk.lengths), pk.longest, x.shape[-1]))
    return xp.where(pk.valid[..., None], y, xp.asarray(fill, dtype=y.dtype, device=device_of(y)))


def unpack_mask(xp: Any, pk: Packing, mask: Any) -> Any:
    """A key mask ``(..., T)`` -> ``(..., N, Lmax)``, padding slots False."""
    y = xp.take(mask, pk.unpack_index, axis=mask.ndim - 1)
    y = xp.reshape(y, (*mask.shape[:-1], len(pk.lengths), pk.longest))
    return xp.logical_and(y, pk.valid)


def repack(xp: Any, pk: Packing, y: Any) -> Any:
    """``(..., N, Lmax, D)`` -> ``(..., T, D)``."""
    flat = xp.reshape(y, (*y.shape[:-3], y.shape[-3] * y.shape[-2], y.shape[-1]))
    return xp.take(flat, pk.repack_index, axis=flat.ndim - 2)


def per_sequence_table(w: Any) -> Any:
    """A bias table ``(..., 2M - 1)`` broadcasting against unpacked ``(..., N, Lmax, D)``."""
    return w if w.ndim < 2 else w[..., None, :]


def offsets_of(xp: Any, cu_seqlens: Any, T: int) -> tuple[int, ...]:
    """Validated offsets of ``cu_seqlens`` for a packed length ``T``."""
    from . import _validate
    from ._compat import is_traced

    static = isinstance(cu_seqlens, (tuple, list))
    return _validate.cu_seqlens(xp, cu_seqlens, T, traced=not static and is_traced(xp, cu_seqlens))


def array_argument(cu_seqlens: Any) -> Any:
    """``cu_seqlens`` as a namespace argument: ``None`` for static (tuple/list) offsets."""
    return None if isinstance(cu_seqlens, (tuple, list)) else cu_seqlens


def packed_rpb(xp: Any, v: Any, w: Any, *, causal: bool, skip: Any, cu_seqlens: Any) -> Any:
    """``fastrpb.rpb`` of every packed sequence on its own, ``skip`` per sequence."""
    from . import _validate
    from .bias import rpb

    _validate.values(xp, "v", v)
    offsets = offsets_of(xp, cu_seqlens, v.shape[-2])
    a, b = _validate.skip(skip)
    lengths = [hi - lo for lo, hi in zip(offsets[:-1], offsets[1:])]
    for n, length in enumerate(lengths):
        if length < a + b:
            raise ValueError(
                f"skip = ({a}, {b}) skips {a + b} tokens of every sequence but sequence {n} of cu_seqlens "
                f"has only {length}"
            )
    pk = packing(xp, offsets, v)
    vu = unpack(xp, pk, v)
    keep = None
    if b:
        # the last b tokens of each sequence neither give nor receive the bias
        t = xp.arange(pk.longest, dtype=xp.int32, device=device_of(v))
        keep = t[None, :] < xp.asarray([n - b for n in lengths], dtype=xp.int32, device=device_of(v))[:, None]
        vu = xp.where(keep[..., None], vu, xp.zeros((), dtype=vu.dtype, device=device_of(v)))
    out = rpb(vu, per_sequence_table(w), causal=causal, skip=(a, 0))
    if keep is not None:
        out = xp.where(keep[..., None], out, xp.zeros((), dtype=out.dtype, device=device_of(v)))
    return repack(xp, pk, out)
