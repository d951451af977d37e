"""Chunked causal linear attention: chunks of ``C`` tokens, in blocks of chunks.

Inside a chunk a masked ``tril(Qc Kc^T) Vc``; across chunks an exclusive prefix sum
of the chunk states ``Kc^T Vc``. Non-negative features add the normaliser's two parts
directly; signed ones take one dot product with the inclusive prefix of the key
features, accumulated in ``float64`` or as compensated ``float32`` sums.
"""

from __future__ import annotations

import math
from typing import Any

from .._compat import (
    add_into,
    associative_scan,
    cumulative_sum,
    device_of,
    exclusive_sum,
    on_finite,
    scan,
    tril_into,
    wider_float,
)
from .._compat import pad_axis as _pad_axis
from .._compat import pad_chunks as _pad_chunks
from .._validate import broadcast_shapes as _lead
from .common import tril_product, unchunk

__all__ = ["causal_attention", "BLOCK_ELEMENTS", "block_chunks", "compensated_den"]


def causal_attention(xp: Any, fq: Any, fk: Any, v: Any, C: int, *, signed: bool) -> tuple[Any, Any, Any, Any]:
    """Causal linear attention of features ``fq``, ``fk`` and values ``v`` in chunks of ``C``.

    Returns ``(num, den, S, z)``: numerator, denominator and the final state, ``S =
    sum_j phi(k_j) v_j^T`` and ``z = sum_j phi(k_j)``. ``signed``: the features may be
    negative (the normaliser is then accumulated wider, ``_causal_normaliser``).
    ``_causal_chunks``, on its finite path where ``v`` is finite (``on_finite``)."""
    return on_finite(xp, v, lambda finite: _causal_chunks(xp, fq, fk, v, C, signed=signed, finite=finite))


def _causal_chunks(
    xp: Any, fq: Any, fk: Any, v: Any, C: int, *, signed: bool, finite: bool
) -> tuple[Any, Any, Any, Any]:
    r"""Chunked causal linear attention; returns ``num``, ``den`` and the final ``S``, ``z``.

    Numerator: inside each chunk of ``C`` tokens a masked ``A_n = tril(Qc_n Kc_n^T)``
    times ``Vc_n``; across chunks an exclusive prefix sum of the chunk states
    ``Kc_m^T Vc_m``, applied as ``Qc_n S_{<n}``. Normaliser,
    ``den_i = phi(q_i) . sum_{j <= i} phi(k_j)``:

    - non-negative features: the row sums of ``A_n`` plus ``Qc_n z_{<n}`` (the exclusive
      prefix of the chunks' key-feature sums). Every term is ``>= 0``, so the two parts
      cannot cancel; this drops the per-token prefix of the key features (a strided
      running sum over ``(..., N, C, F)``, 27 % of the call with PyTorch at L = 16,384,
      F = Dv = 64, measured 2026-11-30) and its elementwise dot products. ``z`` is kept
      apart from the states: riding along as their last column it cost a copy of the
      states and an odd-width product (PyTorch, one thread, L = 16,384, ELU: 360 ms
      against 305 ms for the call, 2026-11-30, with ``exclusive_sum`` in order);
    - signed features (``rff``, ``taylor``, a callable): one dot product per query with
      the inclusive prefix of the key features (``_causal_normaliser``), never the sum
      of an in-chunk and a cross-chunk part, which cancel.

    The chunks are taken in blocks of ``G`` (``block_chunks``), one after another
    with the state of the blocks before carried along (``scan``): every intermediate
    of a block (scores, chunk states, their prefix) then stays in the cache, where
    all chunks at once stream their chunk states through memory several times.
    Causal time before -> after, ELU, (1, 8, L, 64) float32, one thread, L = 4,096 /
    16,384 / 65,536 (2026-12-01): PyTorch 35 -> 35, 253 -> 197, 992 -> 618 ms; JAX
    ``jit`` 36 -> 34, 217 -> 137, 880 -> 527 ms; NumPy (4,096 / 16,384) 41 -> 28,
    180 -> 163 ms.
    """
    L = fq.shape[-2]
    length = -(-L // C) * C
    chunks = tuple(_pad_chunks(xp, x, length, C, 0.0) for x in (fq, fk, v))  # padding keys: zero features
    N = length // C
    G = block_chunks(chunks[1], chunks[2])

    def block(carry: Any, b: tuple) -> tuple[tuple[Any, Any], tuple[Any, ...]]:
        return _causal_block(xp, carry, b, signed=signed, finite=finite)

    if N <= G:
        (S, z), outs = block(None, chunks)
    else:
        full = N - N % G
        S0 = xp.zeros(
            (*_lead(fk.shape[:-2], v.shape[:-2]), fk.shape[-1], v.shape[-1]), dtype=v.dtype, device=device_of(v)
        )
        z0 = xp.zeros((*fk.shape[:-2], fk.shape[-1]), dtype=fk.dtype, device=device_of(fk))
        blocks = tuple(xp.reshape(x[..., :full, :, :], (*x.shape[:-3], full // G, G, *x.shape[-2:])) for x in chunks)
        (S, z), outs = scan(xp, block, (S0, z0), blocks, -4)
        outs = tuple(xp.reshape(y, (*y.shape[:-4], full, *y.shape[-2:])) for y in outs)
        if full < N:
            (S, z), rest = block((S, z), tuple(x[..., full:, :, :] for x in chunks))
            outs = tuple(xp.concat([y, r], axis=-3) for y, r in zip(outs, rest, strict=True))
    y = unchunk(xp, outs[0], L)
    if signed:
        den, z = _causal_normaliser(xp, fq, fk)
        return y, den, S, z
    return y, unchunk(xp, outs[1], L), S, z


BLOCK_ELEMENTS = 1 << 17  # chunk-state elements per block of causal attention (tests lower it)


def block_chunks(kc: Any, vc: Any) -> int:
    """Chunks per block of causal attention: about ``BLOCK_ELEMENTS = 2**17`` elements of chunk states
    per block (512 KiB in float32, a quarter of this machine's L2 cache per core), at
    least one chunk. Measured on 2 CPU cores, one thread, ELU, (1, 8, L, 64), causal
    time at L = 16,384 / 65,536 for 2**15 .. 2**19 elements and all chunks at once:
    JAX ``jit`` 147 / 564, 150 / 585, 137 / 517, 139 / 547, 143 / 548, 220 / 875 ms;
    PyTorch 201 / 848, 223-234 / 633-789, 181-191 / 735-803, 317 / 1079, 317 / 1085,
    277 / 1005 ms (2026-12-01)."""
    # Known sizes only: under torch.export / jax.export a batch may be symbolic (a
    # SymInt, a JAX dimension), and the count must be a Python int; a symbolic size
    # counts as 1, so blocks are then sized from the static dimensions.
    lead = math.prod([d for d in _lead(kc.shape[:-3], vc.shape[:-3]) if isinstance(d, int)])
    return max(1, BLOCK_ELEMENTS // max(1, lead * kc.shape[-1] * vc.shape[-1]))


def _causal_block(
    xp: Any, carry: Any, chunks: tuple, *, signed: bool, finite: bool
) -> tuple[tuple[Any, Any], tuple[Any, ...]]:
    """Causal attention over a block of chunks ``(..., G, C, .)``, given ``carry``, the
    state ``(S, z)`` of all chunks before it (``None``: none). Returns the state after
    the block and ``(num, den)`` chunked (``(num,)`` for ``signed``: ``z`` passes
    through, the normaliser is ``_causal_normaliser``'s). ``finite``: the values are."""
    qc, kc, vc = chunks
    S, z = (None, None) if carry is None else carry
    scores = tril_into(xp, xp.matmul(qc, xp.matrix_transpose(kc)))
    y = tril_product(xp, scores, vc, masked=True, finite=finite)
    S, before = _exclusive_prefix(xp, xp.matmul(xp.matrix_transpose(kc), vc), S, -3)  # chunk states (..., G, F, Dv)
    if before is not None:
        y = add_into(xp, y, xp.matmul(qc, before))
    if signed:
        return (S, z), (y,)
    den = xp.sum(scores, axis=-1, keepdims=True)
    z, z_before = _exclusive_prefix(xp, xp.sum(kc, axis=-2), z, -2)  # the chunks' key-feature sums
    if z_before is not None:
        den = den + xp.matmul(qc, z_before[..., None])
    return (S, z), (y, den)


def _exclusive_prefix(xp: Any, x: Any, start: Any, axis: int) -> tuple[Any, Any]:
    """``start`` plus the total of ``x`` along the chunk ``axis``, and ``start`` plus
    its exclusive prefix sum (``start`` ``None``: from zero; the prefix is ``None``
    where there is nothing before, one chunk and no ``start``)."""
    if start is None and x.shape[axis] == 1:
        return xp.squeeze(x, axis=axis), None
    return exclusive_sum(xp, x, axis, start)


def _causal_normaliser(xp: Any, fq: Any, fk: Any) -> tuple[Any, Any]:
    r"""``den_i = phi(q_i) . Z_i`` with ``Z_i = sum_{j <= i} phi(k_j)``, and ``Z_L``, for signed features.

    One dot product per query with the inclusive prefix of the key features. With
    signed features (``rff``, ``taylor``, a callable) that dot product can cancel to a
    tiny denominator (fla's ``test_naive_chunk`` data, identity map: 2.4e-5 against
    terms of ~10), so the prefix and the dot product are accumulated in ``float64``
    (``wider_float``), or, where the library has no ``float64`` on the device, as
    compensated ``float32`` sums (``compensated_den``); fla's err-ratio then drops
    from 4e-2 (two cancelling dot products) to ~3e-7. (Non-negative features cannot
    cancel: ``causal_attention`` sums their two parts directly.)
    """
    work = fq.dtype
    wide = wider_float(xp, fq)
    if wide is None and work == xp.float64:
        wide = work
    if wide is not None:
        Z = cumulative_sum(xp, xp.astype(fk, wide), axis=-2)
        den = xp.sum(xp.astype(fq, wide) * Z, axis=-1, keepdims=True)
        return xp.astype(den, work), xp.astype(Z[..., -1, :], work)
    return compensated_den(xp, fq, fk)


def _two_sum(xp: Any, a: Any, b: Any) -> tuple[Any, Any]:
    """Knuth's TwoSum: ``a + b = s + e`` exactly, ``s = fl(a + b)``."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(x: Any) -> tuple[Any, Any]:
    """Dekker's split of ``x`` into two halves of 12 bits (float32), ``x = hi + lo``."""
    c = x * 4097.0
    hi = c - (c - x)
    return hi, x - hi


def compensated_den(xp: Any, fq: Any, fk: Any) -> tuple[Any, Any]:
    """``_causal_normaliser`` for signed features without ``float64``: the prefix as an
    unevaluated sum ``hi + lo`` (an ``associative_scan`` of TwoSums) and the dot
    product with Dekker's exact products summed by a pairwise TwoSum tree (Ogita, Rump
    & Oishi 2005, "Accurate sum and dot product", SIAM J. Sci. Comput.)."""

    def join(a: tuple, b: tuple) -> tuple:
        t, e = _two_sum(xp, a[0], b[0])
        lo = a[1] + b[1] + e
        hi = t + lo
        return hi, lo - (hi - t)

    hi, lo = associative_scan(xp, join, (fk, xp.zeros_like(fk)), -2)
    qh, ql = _split(fq)
    zh, zl = _split(hi)
    p = fq * hi
    terms = xp.concat([p, ((qh * zh - p) + qh * zl + ql * zh) + ql * zl + fq * lo], axis=-1)
    r = xp.zeros_like(terms)
    while terms.shape[-1] > 1:
        if terms.shape[-1] % 2:
            terms, r = (_pad_axis(xp, x, 0, 1, axis=-1) for x in (terms, r))
        t, e = _two_sum(xp, terms[..., 0::2], terms[..., 1::2])
        r = r[..., 0::2] + r[..., 1::2] + e
        terms = t
    return terms + r, hi[..., -1, :] + lo[..., -1, :]
