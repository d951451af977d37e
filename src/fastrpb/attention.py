r"""Linear attention (non-causal, chunked causal, decoding) and exact softmax attention.

Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs: Fast
Autoregressive Transformers with Linear Attention", ICML) replaces ``exp(q . k)`` by a
kernel ``phi(q) . phi(k)`` that factorises, so

$$
\mathrm{out}_i = \frac{\sum_j \phi(q_i) \cdot \phi(k_j)\, v_j}
{\sum_j \phi(q_i) \cdot \phi(k_j) + \varepsilon}
= \frac{\phi(q_i)^\top (\sum_j \phi(k_j) v_j^\top)}
{\phi(q_i)^\top \sum_j \phi(k_j) + \varepsilon}
$$

costs O(L F Dv) instead of O(L^2). In the causal (chunked) algorithm the normaliser
rides along as a ones column of the values, ``[V, 1]``, so every product serves both;
non-causal it is one extra matrix-vector product (cheaper there than the column).

The FastRPB term ``B V`` (Zubkov & Gavrilov 2022, arXiv:2202.11364) is added by
``fastrpb.bias``; nothing here repeats its maths.

Exponential maps (``sikf``, ``favor``)
--------------------------------------
Their features are ``exp`` of a log-feature, ``phi(x)_f = exp(l(x)_f)``, and
``exp`` of raw logits overflows. We never form them: with per-feature key offsets
``c_f`` folded into the queries, ``sum_f exp(a_f) exp(b_f) = sum_f exp(a_f + c_f)
exp(b_f - c_f)``, every key feature is <= 1 and every query row is scaled so that its
largest feature is 1. Non-causal, ``c_f`` is the maximum of ``l(k)_f`` over all keys.
Causal, the offsets only look back: chunk ``n`` uses the running maximum up to its
own end, and the carried state of earlier chunks is rescaled as that maximum grows,
so a large late key cannot underflow earlier ones (decoding does the same per
token). One limit remains: inside a chunk the keys share the chunk's frame, so a key
feature more than ~80 units (float32; ~700 in float64) above an earlier key's in
the same chunk underflows the earlier key for the queries between them. For these maps ``eps`` is *relative*: it is added in the frame where the
largest single kernel term a query sees, ``max_{j, f} exp(l(q_i)_f + l(k_j)_f)``, is 1,

$$
\mathrm{out}_i = \frac{\sum_j K_{ij} v_j}{\sum_j K_{ij} + \varepsilon\, s_i},
\qquad s_i = \max_{j \text{ visible}, f} e^{l(q_i)_f + l(k_j)_f},
$$

which is invariant to shifting a query row or all keys (as the kernel is), never
swamps a denominator (it is at least ``s_i``), and does not depend on the chunk size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from . import _packing, _validate
from . import bias as _bias
from ._compat import (
    add_into,
    associative_scan,
    compute_dtype,
    cumulative_sum,
    device_of,
    exclusive_sum,
    jax_pytree,
    known_finite,
    namespace,
    on_finite,
    scan,
    split_nonfinite,
    tril_into,
    wider_float,
)
from ._compat import cumulative_max as _cummax
from ._compat import pad_axis as _pad_axis
from ._compat import pad_chunks as _pad_chunks
from ._compat import rescaled_scan as _rescaled_scan
from ._compat import shift as _shift
from ._typing import Array
from ._validate import broadcast_shapes as _lead
from .feature_maps import FeatureMap, FeatureMapLike, resolve

__all__ = ["linear_attention", "linear_attention_step", "softmax_attention", "LinearAttentionState"]


@jax_pytree(static=("feature_map",))
class LinearAttentionState(NamedTuple):
    """What causal linear attention carries from one token to the next.

    ``S[..., f, :] = sum_j phi(k_j)_f v_j`` and ``z[..., f] = sum_j phi(k_j)_f`` over the
    keys seen so far, in the compute dtype (float32 for half-precision inputs). For the
    exponential maps both are stored relative to ``offset``: the running maximum of the
    log-features of the keys, per feature, so ``S`` and ``z`` hold
    ``exp(l(k_j)_f - offset_f)``-weighted sums, every weight <= 1 (``offset`` is
    ``-inf`` before any key); it is ``None`` for the other maps. ``feature_map`` is the
    signature of the map that made the state (static under ``jax.jit``: the state is
    a JAX pytree of ``S``, ``z``, ``offset`` and ``rpb``).

    ``rpb`` is the history of the FastRPB term (a ``fastrpb.RPBState``) when the state
    was made with ``rpb=w``, else ``None``: the bias of a new token is a weighted sum
    of all earlier values, which ``S`` and ``z`` do not summarise.

    Memory per leading index: ``F (Dv + 2)`` numbers (``F (Dv + 1)`` without an
    offset), independent of the tokens seen; with ``rpb`` add the ``RPBState``'s, at
    most about ``(t + 4 min(t, M) + 64) Dv`` numbers after ``t`` tokens (``M`` the
    table's maximum length; ``M Dv`` under ``jax.jit``).

    Examples
    --------
    >>> import numpy as np
    >>> from fastrpb import linear_attention
    >>> x = np.ones((3, 4))
    >>> _, state = linear_attention(x, x, x, causal=True, return_state=True)
    >>> state.S.shape, state.z.shape, state.offset, state.feature_map
    ((4, 4), (4,), None, 'elu')
    """

    S: Array  # (..., F, Dv)
    z: Array  # (..., F)
    offset: Array | None  # (..., F) or None
    feature_map: str
    rpb: Any = None  # RPBState or None


# --------------------------------------------------------------------------- checks
def _add_bias(
    xp: Any,
    out: Any,
    v: Any,
    *,
    rpb: Any,
    rpb_tables: Any,
    rpb_grid: Any,
    rpb_skip: Any,
    causal: bool,
) -> Any:
    """``out + B v`` (the FastRPB term), in ``out``'s dtype.

    ``v`` comes from ``_mask_values(..., bias=True)``: padding keys' values are zero,
    so they give no bias, whatever they held (NaN included).
    """
    if rpb is None and rpb_tables is None:
        return out
    Lq, Lk = out.shape[-2], v.shape[-2]
    if Lq != Lk:
        raise ValueError(
            f"the FastRPB term (rpb=/rpb_tables=) needs as many queries as keys (B is L x L), "
            f"got Lq = {Lq} and Lk = {Lk}"
        )
    try:
        if rpb is not None:
            term = _bias.rpb(v, rpb, causal=causal, skip=rpb_skip)
        else:
            term = _bias.rpb_nd(v, rpb_tables, rpb_grid, causal=causal, skip=rpb_skip)
    except (TypeError, ValueError) as exc:
        # fastrpb.bias names its own arguments (w, tables, grid, skip); say where they came from
        given = "rpb" if rpb is not None else "rpb_tables/rpb_grid"
        raise type(exc)(f"in the FastRPB term ({given}=, rpb_skip=): {exc}") from exc
    return out + xp.astype(term, out.dtype, copy=False)


# --------------------------------------------------------------------------- helpers
def _as(xp: Any, x: Any, dtype: Any) -> Any:
    """``astype(x, dtype, copy=False)``, skipping the call (microseconds of wrapper per
    array, several per decoding step) when ``x`` already has ``dtype``."""
    return x if x.dtype == dtype else xp.astype(x, dtype, copy=False)


def _neg_inf(xp: Any, like: Any) -> Any:
    return xp.asarray(-math.inf, dtype=like.dtype, device=device_of(like))


def _finite_or_zero(xp: Any, x: Any) -> Any:
    """Replace ``-inf`` (no visible key) by 0 so that offsets never produce ``inf - inf``."""
    return xp.where(x == -math.inf, xp.zeros((), dtype=x.dtype, device=device_of(x)), x)


def _state_keys(xp: Any, offset: Any) -> Any:
    """Log-features of ``F`` pseudo-keys that stand for an exponential map's state.

    Pseudo-key ``f`` has log-feature ``offset_f`` at feature ``f`` and ``-inf`` (feature
    0) elsewhere; with the state's rows ``S[f]`` as its value it adds exactly
    ``sum_f exp(l(q)_f + offset_f) S[f]``, the state's contribution to a query. So the
    single-device cores see one more (earlier, or for non-causal any) block of keys and
    keep their offsets and their relative eps exact (used by ``initial_state`` and by
    ``fastrpb.parallel``).
    """
    F = offset.shape[-1]
    i = xp.arange(F, dtype=xp.int32, device=device_of(offset))
    diagonal = i[:, None] == i[None, :]
    return xp.where(diagonal, offset[..., None, :], xp.asarray(-math.inf, dtype=offset.dtype, device=device_of(offset)))


def _prepend(xp: Any, first: Any, rest: Any) -> Any:
    """``concat([first, rest], axis=-2)`` after broadcasting their leading dimensions."""
    lead = _lead(tuple(first.shape[:-2]), tuple(rest.shape[:-2]))
    first = xp.broadcast_to(first, (*lead, *first.shape[-2:]))
    rest = xp.broadcast_to(rest, (*lead, *rest.shape[-2:]))
    return xp.concat([first, rest], axis=-2)


def _unchunk(xp: Any, y: Any, L: int) -> Any:
    y = xp.reshape(y, (*y.shape[:-3], y.shape[-3] * y.shape[-2], y.shape[-1]))
    return y[..., :L, :]


def _zero_padding(xp: Any, x: Any, key_mask: Any) -> Any:
    """``x (..., Lk, D)`` with the rows of padding keys (``key_mask`` False) set to 0."""
    return xp.where(key_mask[..., None], x, xp.zeros((), dtype=x.dtype, device=device_of(x)))


def _mask_values(xp: Any, v: Any, key_mask: Any, *, bias: bool) -> Any:
    """``v`` with the values of padding keys zeroed, where they could reach an output.

    Padding keys get zero weight in every attention product, but ``0 * NaN`` is NaN:
    a NaN or infinite value at a padding key would reach every query. Finite padding
    values cannot, so the attention term alone skips the pass when ``v`` is known to
    be finite; the FastRPB term weighs every value (``bias=True``), so it always needs
    them zeroed.
    """
    if key_mask is None or (not bias and known_finite(xp, v)):
        return v
    return _zero_padding(xp, v, key_mask)


def _mask_keys(xp: Any, k: Any, key_mask: Any) -> Any:
    """``k`` with the padding keys zeroed when they may hold NaN or infinities.

    Padding keys get zero features (or ``-inf`` logits) afterwards, so a non-finite
    one never reaches an output; but the feature maps and the logits would still
    compute ``inf - inf`` or ``inf * 0`` on it first, and NumPy then warns ("invalid
    value encountered") about values the caller masked. Zeroing them first keeps the
    arithmetic finite. Known-finite keys (``known_finite``) skip the pass.
    """
    if key_mask is None or known_finite(xp, k):
        return k
    return _zero_padding(xp, k, key_mask)


def _tril_product(xp: Any, scores: Any, v: Any, *, masked: bool = False, finite: bool | None = None) -> Any:
    """``tril(scores) @ v`` over the last two axes, causal for non-finite values too.

    ``tril`` zeroes the weights of later tokens exactly (a select, NaN included), but
    the product then multiplies those zeros by the later values, and ``0 * NaN`` is
    NaN: one NaN value would reach every earlier token. So when ``v`` may hold NaN or
    infinities (``known_finite``) the product is taken on its finite part and the
    rest is added back with an inclusive prefix sum along the sequence: a non-finite
    value reaches its own row and the rows after it, in its own column, and no other.
    For finite ``v`` both paths give the same numbers (the prefix sum adds zeros).
    ``masked=True``: ``scores`` is already lower triangular. ``finite``: whether ``v``
    is known to be finite (``None``: ask ``known_finite``).
    """
    if not masked:
        scores = xp.tril(scores)
    if known_finite(xp, v) if finite is None else finite:
        return xp.matmul(scores, v)
    clean, rest = split_nonfinite(xp, v)
    return xp.matmul(scores, clean) + cumulative_sum(xp, rest, axis=-2)


def _with_ones(xp: Any, v: Any) -> Any:
    """``[v, 1]``: the normaliser rides along as the last column of the same products."""
    return xp.concat([v, xp.ones((*v.shape[:-1], 1), dtype=v.dtype, device=device_of(v))], axis=-1)


def _normalise(xp: Any, num: Any, den: Any, eps: Any) -> Any:
    """``num / (den + eps)``; a zero denominator (no visible key) gives 0."""
    den = den + eps
    # The numerator is exactly zero wherever the denominator is (no key was visible),
    # so dividing by 1 there returns the zeros without ever touching small denominators.
    den = xp.where(den == 0, xp.ones((), dtype=den.dtype, device=device_of(den)), den)
    return num / den


# --------------------------------------------------------------------------- cores
def _features(xp: Any, fmap: FeatureMap, q: Any, k: Any, key_mask: Any) -> tuple[Any, Any]:
    """Query and key features; padding keys get exactly zero features."""
    fq, fk = fmap._queries(xp, q), fmap._keys(xp, k)
    if fq.shape[-1] != fk.shape[-1]:
        raise ValueError(
            f"feature_map {fmap.signature} gives queries {fq.shape[-1]} features but keys "
            f"{fk.shape[-1]}; they must match"
        )
    if key_mask is not None:
        fk = _zero_padding(xp, fk, key_mask)
    return fq, fk


def _log_features(xp: Any, fmap: FeatureMap, q: Any, k: Any, key_mask: Any) -> tuple[Any, Any, Any]:
    """Log-features of an exponential map; padding keys get ``-inf`` (feature 0).

    The query rows come relative to their maximum, which is returned third (the true
    scale of the kernel, for ``normalize=False``)."""
    lq, lk = fmap._log_queries(xp, q), fmap._log_keys(xp, k)
    if key_mask is not None:
        lk = xp.where(key_mask[..., None], lk, _neg_inf(xp, lk))
    # each query row relative to its maximum: later sums stay small and exact
    mq = xp.max(lq, axis=-1, keepdims=True)
    return lq - mq, lk, mq


def _fold_queries(xp: Any, lq: Any, offset: Any) -> tuple[Any, Any, Any]:
    """Query features ``exp(lq + offset - top - m)``, each row's largest feature 1.

    ``offset (..., F)`` (key offsets per feature, folded into the queries) broadcasts
    against ``lq (..., F)``. ``top`` is the largest offset, subtracted first so that no
    sum of two large logits is ever rounded; ``m`` is the row maximum after that.
    Returns ``(features, m, top)`` with ``m`` and ``top`` finite.
    """
    top = _finite_or_zero(xp, xp.max(offset, axis=-1, keepdims=True))
    t = lq + (offset - top)
    m = _finite_or_zero(xp, xp.max(t, axis=-1, keepdims=True))
    return xp.exp(t - m), m, top


def _noncausal(xp: Any, fq: Any, fk: Any, v: Any) -> tuple[Any, Any]:
    """``phi(Q) (phi(K)^T V)`` and ``phi(Q) sum_j phi(k_j)``: O(L F Dv) time, O(F Dv) memory.

    The normaliser is a separate matrix-vector product here, not a ones column on
    ``V``: that column costs a copy of ``V`` and an odd-width (Dv + 1) product, about
    20 % of the whole call on CPU (measured with PyTorch, L = 1024, F = Dv = 64).
    """
    num = xp.matmul(fq, xp.matmul(xp.matrix_transpose(fk), v))
    den = xp.matmul(fq, xp.matrix_transpose(xp.sum(fk, axis=-2, keepdims=True)))
    return num, den


def _noncausal_exp(xp: Any, lq: Any, lk: Any, v: Any, eps: float) -> tuple[Any, Any, Any, Any]:
    offset = xp.max(lk, axis=-2, keepdims=True)  # (..., 1, F): per feature, over all keys
    fk = xp.exp(lk - _finite_or_zero(xp, offset))
    fq, m, top = _fold_queries(xp, lq, offset)
    # every query sees every key, so the largest kernel term is 1 in this frame: eps as is;
    # last: the log of the factor that takes a row back to the true scale of the kernel
    return (*_noncausal(xp, fq, fk, v), eps, m + top)


def _causal(xp: Any, fq: Any, fk: Any, v: Any, C: int, *, signed: bool) -> tuple[Any, Any, Any, Any]:
    """``_causal_chunks`` on the finite path where ``v`` is finite (``on_finite``)."""
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

    The chunks are taken in blocks of ``G`` (``_block_chunks``), one after another
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
    G = _block_chunks(chunks[1], chunks[2])

    def block(carry: Any, b: tuple) -> tuple[tuple[Any, Any], tuple[Any, ...]]:
        return _causal_block(xp, carry, b, signed=signed, finite=finite)

    if N <= G:
        (S, z), outs = block(None, chunks)
    else:
        full = N - N % G
        S0 = xp.zeros((*_lead(fk.shape[:-2], v.shape[:-2]), fk.shape[-1], v.shape[-1]), dtype=v.dtype, device=device_of(v))
        z0 = xp.zeros((*fk.shape[:-2], fk.shape[-1]), dtype=fk.dtype, device=device_of(fk))
        blocks = tuple(xp.reshape(x[..., :full, :, :], (*x.shape[:-3], full // G, G, *x.shape[-2:])) for x in chunks)
        (S, z), outs = scan(xp, block, (S0, z0), blocks, -4)
        outs = tuple(xp.reshape(y, (*y.shape[:-4], full, *y.shape[-2:])) for y in outs)
        if full < N:
            (S, z), rest = block((S, z), tuple(x[..., full:, :, :] for x in chunks))
            outs = tuple(xp.concat([y, r], axis=-3) for y, r in zip(outs, rest, strict=True))
    y = _unchunk(xp, outs[0], L)
    if signed:
        den, z = _causal_normaliser(xp, fq, fk)
        return y, den, S, z
    return y, _unchunk(xp, outs[1], L), S, z


_BLOCK_ELEMENTS = 1 << 17  # chunk-state elements per block of causal attention (tests lower it)


def _block_chunks(kc: Any, vc: Any) -> int:
    """Chunks per block of causal attention: about ``_BLOCK_ELEMENTS = 2**17`` elements of chunk states
    per block (512 KiB in float32, a quarter of this machine's L2 cache per core), at
    least one chunk. Measured on 2 CPU cores, one thread, ELU, (1, 8, L, 64), causal
    time at L = 16,384 / 65,536 for 2**15 .. 2**19 elements and all chunks at once:
    JAX ``jit`` 147 / 564, 150 / 585, 137 / 517, 139 / 547, 143 / 548, 220 / 875 ms;
    PyTorch 201 / 848, 223-234 / 633-789, 181-191 / 735-803, 317 / 1079, 317 / 1085,
    277 / 1005 ms (2026-12-01)."""
    lead = math.prod(_lead(kc.shape[:-3], vc.shape[:-3]))
    return max(1, _BLOCK_ELEMENTS // max(1, lead * kc.shape[-1] * vc.shape[-1]))


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
    y = _tril_product(xp, scores, vc, masked=True, finite=finite)
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
    compensated ``float32`` sums (``_compensated_den``); fla's err-ratio then drops
    from 4e-2 (two cancelling dot products) to ~3e-7. (Non-negative features cannot
    cancel: ``_causal`` sums their two parts directly.)
    """
    work = fq.dtype
    wide = wider_float(xp, fq)
    if wide is None and work == xp.float64:
        wide = work
    if wide is not None:
        Z = cumulative_sum(xp, xp.astype(fk, wide), axis=-2)
        den = xp.sum(xp.astype(fq, wide) * Z, axis=-1, keepdims=True)
        return xp.astype(den, work), xp.astype(Z[..., -1, :], work)
    return _compensated_den(xp, fq, fk)


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


def _compensated_den(xp: Any, fq: Any, fk: Any) -> tuple[Any, Any]:
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


def _causal_exp(xp: Any, lq: Any, lk: Any, v1: Any, C: int, eps: float) -> tuple[Any, Any, Any, Any, Any]:
    """``_causal_exp_chunks`` on the finite path where ``v1`` is finite (``on_finite``)."""
    return on_finite(xp, v1, lambda finite: _causal_exp_chunks(xp, lq, lk, v1, C, eps, finite=finite))


def _causal_exp_chunks(
    xp: Any, lq: Any, lk: Any, v1: Any, C: int, eps: float, *, finite: bool
) -> tuple[Any, Any, Any, Any, Any]:
    """Chunked causal attention for an exponential map, with look-back offsets.

    Chunk ``n`` works relative to ``R_n``, the running maximum (per feature) of the
    key log-features up to the end of chunk ``n``. The chunk states are summed by a
    rescaled scan, ``X_n = sum_{m <= n} exp(R_m - R_n) Kc_m^T [Vc_m, 1]``, every factor
    <= 1, so no sum overflows and a key is only lost when it is negligible next to a
    key that the same queries see. Returns ``[num, den]``, the per-row eps in the
    chunk frame, the final chunk state, its offset and the per-row log of the factor
    back to the true scale of the kernel.
    """
    L = lq.shape[-2]
    length = -(-L // C) * C
    lq = _pad_chunks(xp, lq, length, C, 0.0)
    lk = _pad_chunks(xp, lk, length, C, -math.inf)  # padding keys: feature 0
    vc = _pad_chunks(xp, v1, length, C, 0.0)
    # The frame (running maximum) is taken over the keys' finite log-features only: a
    # NaN or +inf key would otherwise set the frame of the keys before it in its chunk
    # and reach their queries. It still reaches its own and later queries through kc.
    frame = lk if known_finite(xp, lk, negative_infinity=True) else xp.where(lk < math.inf, lk, _neg_inf(xp, lk))
    running = _cummax(xp, frame, -2) if eps > 0 else None  # per token, inside each chunk
    chunk_max = running[..., -1, :] if running is not None else xp.max(frame, axis=-2)
    R = _cummax(xp, chunk_max, -2)  # (..., N, F), inclusive over chunks
    R_safe = _finite_or_zero(xp, R)
    kc = xp.exp(lk - R_safe[..., None, :])
    qc, m, top = _fold_queries(xp, lq, R[..., None, :])
    if running is not None:
        # the largest kernel term query i sees, in this chunk's frame (<= 1)
        R_before = _shift(xp, R, 1, -2, -math.inf)
        seen = xp.maximum(running, R_before[..., None, :])  # key running max up to token i
        s = xp.max(lq + (seen - top), axis=-1, keepdims=True)
        eps_rows = eps * xp.exp(s - m)
    else:
        eps_rows = 0.0
    y = _tril_product(xp, tril_into(xp, xp.matmul(qc, xp.matrix_transpose(kc))), vc, masked=True, finite=finite)
    X = xp.matmul(xp.matrix_transpose(kc), vc)  # chunk states, chunk n in frame R_n
    X = _rescaled_scan(xp, X, R, R_safe)  # engines: the scan lives in _compat (a Dask path)
    if X.shape[-3] > 1:
        carried = _shift(xp, X, 1, -3, 0.0)  # chunk n-1's inclusive state, frame R_{n-1}
        rescale = xp.exp(_shift(xp, R, 1, -2, -math.inf) - R_safe)  # to frame R_n
        y = add_into(xp, y, xp.matmul(qc, rescale[..., None] * carried))
    eps_rows = _unchunk(xp, eps_rows, L) if running is not None else eps_rows
    log_scale = _unchunk(xp, m + top, L)
    return _unchunk(xp, y, L), eps_rows, X[..., -1, :, :], R[..., -1, :], log_scale


def _state(xp: Any, fmap: FeatureMap, final: Any, offset: Any) -> LinearAttentionState:
    """The state from ``(S, z)`` or from a ``(..., F, Dv + 1)`` array ``[S, z]``."""
    S, z = final if isinstance(final, tuple) else (final[..., :-1], final[..., -1])
    # z comes from the keys alone, S from keys and values: one lead for both (broadcast
    # keys, as k (1, H) with v (B, H), gave a z that initial_state= then refused)
    lead = _lead(tuple(S.shape[:-2]), tuple(z.shape[:-1]))
    S, z = xp.broadcast_to(S, (*lead, *S.shape[-2:])), xp.broadcast_to(z, (*lead, z.shape[-1]))
    if offset is not None:
        offset = xp.broadcast_to(offset, z.shape)
    return LinearAttentionState(S=S, z=z, offset=offset, feature_map=fmap.signature)


# --------------------------------------------------------------------------- states in
def _initial_arguments(fmap: FeatureMap, state: Any, causal: bool, rpb: Any, rpb_tables: Any) -> dict[str, Any]:
    """Checks of ``initial_state`` that need no array; returns its arrays by name (for
    the namespace: a state of another library or device is an error naming it)."""
    if state is None:
        return {}
    if not isinstance(state, LinearAttentionState):
        raise TypeError(
            "initial_state must be a LinearAttentionState (from linear_attention(..., return_state=True) "
            f"or linear_attention_step) or None, got {type(state).__name__}"
        )
    if not causal:
        raise ValueError("initial_state needs causal=True: only a causal sequence can be continued, got causal=False")
    if state.feature_map != fmap.signature:
        raise ValueError(
            f"initial_state was made by feature map {state.feature_map!r} but feature_map is {fmap.signature!r}; "
            "continue a sequence with the map that started it"
        )
    if rpb_tables is not None:
        raise ValueError(
            "initial_state cannot continue the N-d FastRPB term (rpb_tables=/rpb_grid=): only the 1-d "
            "causal bias (rpb=) streams"
        )
    if state.rpb is not None and rpb is None:
        raise ValueError(
            "initial_state carries a FastRPB history (it was made with rpb=) but rpb is None; pass the same table"
        )
    if state.rpb is None and rpb is not None:
        raise ValueError(
            "initial_state was made without rpb=, so it holds no bias history for the rpb= given; "
            "pass rpb= from the start of the sequence (or start from initial_state=None)"
        )
    from ._online import held

    return {"initial_state": state.S, "initial_state.z": state.z, "initial_state.offset": state.offset,
            "initial_state.rpb": held(state.rpb)}


def _carried(xp: Any, fmap: FeatureMap, state: LinearAttentionState, F: int, Dv: int, lead: tuple, work: Any) -> tuple[Any, Any]:
    """``[S, z]`` of a checked initial state as one ``(..., F, Dv + 1)`` array, and its offset."""
    S, z, offset = _check_state(xp, fmap, state, F, Dv, lead, name="initial_state", inputs="q, k, v")
    total = xp.concat([_as(xp, S, work), _as(xp, z, work)[..., None]], axis=-1)
    return total, None if offset is None else _as(xp, offset, work)


def _add_bias_streaming(
    xp: Any, out: Any, v: Any, w: Any, skip: Any, state: LinearAttentionState | None
) -> tuple[Any, Any]:
    """``out + B v`` continued from (and returning) the bias history of the state.

    ``v`` comes from ``_mask_values(..., bias=True)``: padding keys' values are zero,
    so they give no bias, now or later.
    """
    try:
        term, history = _bias.rpb(
            v, w, causal=True, skip=skip, initial_state=None if state is None else state.rpb, return_state=True
        )
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"in the FastRPB term (rpb=, rpb_skip=, initial_state): {exc}") from exc
    return out + xp.astype(term, out.dtype, copy=False), history


# --------------------------------------------------------------------------- public
def linear_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    feature_map: FeatureMapLike = "elu",
    causal: bool = False,
    key_mask: Array | None = None,
    eps: float = 1e-6,
    chunk_size: int = 64,
    rpb: Array | None = None,
    rpb_tables: Sequence[Array | None] | None = None,
    rpb_grid: Sequence[int] | None = None,
    rpb_skip: tuple[int, int] = (0, 0),
    initial_state: LinearAttentionState | None = None,
    return_state: bool = False,
    normalize: bool = True,
    scale: float | None = None,
    cu_seqlens: Array | Sequence[int] | None = None,
) -> Array:
    r"""Kernelised linear attention, optionally with the FastRPB term.

    $$
    \mathrm{out}_i = \frac{\sum_j \phi(q_i) \cdot \phi(k_j)\, v_j}
    {\sum_j \phi(q_i) \cdot \phi(k_j) + \varepsilon}
    \;+\; \sum_j w_{i - j}\, v_j
    $$

    over all keys ``j`` (non-causal) or ``j <= i`` (causal); the second term is
    present only with ``rpb=`` (or ``rpb_tables=``/``rpb_grid=``).

    Non-causal: ``phi(Q) (phi(K)^T V)`` over ``phi(Q) sum_j phi(k_j)``, O(L F Dv) time.
    Causal: chunks of ``C``
    tokens, a masked ``tril(Qc Kc^T) [Vc, 1]`` inside each chunk and an exclusive prefix
    sum of the chunk states ``Kc^T [Vc, 1]`` across chunks, O(L C F + L F Dv) time and
    O(L (F + Dv) + (L / C) F Dv) memory. For ``sikf``/``favor`` the exponentials are
    formed with offsets that cancel (see the module docstring): outputs are finite
    for any finite logits, and ``eps`` is relative to the largest kernel term.
    Non-causal results and decoding are accurate at any logit scale; causal results
    while no key feature rises more than ~80 (float32) above an earlier key's inside
    one chunk (else the queries between lose the earlier key: finite, possibly zero
    output; a smaller ``chunk_size`` helps, 1 is exact).

    Parameters
    ----------
    q : array, shape (..., Lq, Dk)
        Queries, one row per query token.
    k : array, shape (..., Lk, Dk)
        Keys, one row per key token, as wide as the queries.
    v : array, shape (..., Lk, Dv)
        Values, one row per key. All three real floating; leading dimensions broadcast. float16/bfloat16 are computed in
        float32 and returned in their dtype.
    feature_map : str, FeatureMap or callable
        ``"elu"``, ``"relu"``, ``"sikf"``, ``"dpfp"``, ``"taylor"``, a map from
        ``fastrpb.feature_maps`` (e.g. ``favor(projection)``) or a callable applied to
        both queries and keys.
    causal : bool
        Query ``i`` sees keys ``j <= i``; needs ``Lq == Lk``.
    key_mask : bool array, shape (..., Lk), optional
        False marks a padding key: excluded from numerator and normaliser (and from
        the FastRPB term). A query that sees no key gets zeros.
    eps : float
        Added to the normaliser (relative to the largest kernel term for the
        exponential maps).
    chunk_size : int
        Chunk length ``C`` of the causal algorithm.
    rpb : array, shape (..., 2M - 1), optional
        FastRPB table: adds ``fastrpb.rpb(v, rpb, causal=causal, skip=rpb_skip)``.
    rpb_tables, rpb_grid : optional
        N-d FastRPB instead: adds ``fastrpb.rpb_nd(v, rpb_tables, rpb_grid, causal=causal, skip=rpb_skip)``
        (causal: raster order over the grid).
    rpb_skip : (int, int)
        Tokens at the start and end that neither give nor receive the bias.
    initial_state : LinearAttentionState, optional
        Causal only: continue the sequence this state ends (from ``return_state=True``
        or ``linear_attention_step``, made with the same feature map, the same
        ``rpb=`` table or none, and leading dimensions that broadcast with the
        inputs'). Calls that pass the state along equal one call on the whole
        sequence, the FastRPB term included: a prompt can be prefilled in pieces.
        Costs one matrix product ``phi(Q) [S, z]`` more (``F`` pseudo-keys before the
        chunk for ``sikf``/``favor``, so their offsets and relative ``eps`` are those
        of one call); the 1-d FastRPB term continues from the state's ``RPBState``.
        ``None`` starts a sequence.
    return_state : bool
        Causal only: also return the ``LinearAttentionState`` after the last token, so
        ``linear_attention_step`` or another call continues the sequence. With
        ``rpb=`` it carries the bias history (``rpb_skip`` must then be ``(a, 0)``);
        the N-d term (``rpb_tables=``) is not carried.
    normalize : bool
        ``False``: return the unnormalised ``sum_j K_ij v_j`` with
        ``K_ij = phi(q_i) . phi(k_j)`` (fla's ``normalize=False``, the Performer's
        ``renormalize_attention=False``), ``eps`` unused. The exponential maps
        (``sikf``, ``favor``) are then in their true scale, ``K_ij = sum_f
        exp(l(q_i)_f + l(k_j)_f)``: finite while every log-kernel stays below ~88
        (float32; ~709 in float64), ``inf`` beyond; the normalised output has no such
        limit. The FastRPB term is added either way.
    scale : float, optional
        Multiplies the queries before the feature map, ``phi(s q_i)`` (``None``: 1),
        e.g. ``1 / sqrt(Dk)`` to match softmax attention's temperature.
    cu_seqlens : int array, shape (N + 1,), or tuple of ints, optional
        Packed sequences, the flash-attention / fla convention: offsets ``0 = c_0 <
        c_1 < ... < c_N = L`` along the length axis of ``q``, ``k``, ``v`` (``Lq = Lk
        = L``; leading dimensions allowed, batch 1 typical). Sequence ``n`` is tokens
        ``c_n .. c_{n+1} - 1``; it attends (causal or not) and is biased only within
        itself, ``rpb_skip`` applied to each sequence: equal to ``N`` separate calls.
        With ``return_state=True`` the state holds one state per sequence, stacked
        along a new *leading* axis ``N`` (``state.S`` of shape ``(N, ..., F, Dv)``);
        these states carry no FastRPB history (``state.rpb`` is None), and
        ``initial_state`` cannot be combined with ``cu_seqlens`` (a ``ValueError``).
        Also a tuple/list of Python ints (static offsets, usable under ``jax.jit``); a
        traced array is a ``ValueError`` (the packing sets shapes). Cost: sequences
        of one length class (``ceil(log2 length)``) are unpacked together to
        ``(..., n, longest, .)`` and the results repacked (``fastrpb._packing``):
        less than ``2 L`` tokens of work, ``O(L)``, in at most ``log2 L + 1`` batched
        calls. The N-d bias is not available with packing.

    Returns
    -------
    array, shape (..., Lq, Dv)
        Or ``(out, state)`` with ``return_state=True``.

    Raises
    ------
    TypeError
        If ``q``, ``k``, ``v`` (or ``rpb``) are not real floating, ``key_mask`` is not
        boolean, ``feature_map`` is neither a name, a map nor a callable, or the arrays
        come from two libraries or devices.
    ValueError
        If the shapes do not agree (widths, lengths, leading dimensions), ``feature_map``
        is an unknown name, ``chunk_size`` or ``eps`` is out of range,
        ``return_state=True`` without ``causal=True``, or a bias table is shorter than
        the sequence.

    Examples
    --------
    >>> import numpy as np
    >>> from fastrpb import linear_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 5, 4))  # batch 2, L = 5, D = 4 each
    >>> linear_attention(q, k, v).shape
    (2, 5, 4)

    Causal, the first query sees only the first key, so its output is that key's value:

    >>> out, state = linear_attention(q, k, v, causal=True, return_state=True)
    >>> bool(np.allclose(out[:, 0], v[:, 0], atol=1e-5))
    True
    >>> state.S.shape, state.z.shape
    ((2, 4, 4), (2, 4))

    References
    ----------
    Katharopoulos et al. (2020), "Transformers are RNNs: Fast Autoregressive
    Transformers with Linear Attention", ICML. Zubkov & Gavrilov (2022), "FastRPB: a
    Scalable Relative Positional Encoding for Long Sequence Tasks", arXiv:2202.11364.
    """
    # -- validate, resolve the namespace once
    fmap = resolve(feature_map)
    causal = _validate.flag("causal", causal)
    return_state = _validate.flag("return_state", return_state)
    normalize = _validate.flag("normalize", normalize)
    scale = None if scale is None else _validate.finite("scale", scale)
    eps = _validate.non_negative("eps", eps)
    C = _validate.integer("chunk_size", chunk_size, minimum=1)
    tables = _validate.bias_arguments(rpb, rpb_tables, rpb_grid, rpb_skip)
    _validate.required(q=q, k=k, v=v)
    if cu_seqlens is not None and initial_state is not None:
        raise ValueError(
            "initial_state cannot be combined with cu_seqlens (packed sequences): continue each sequence "
            "with its own call, got both"
        )
    carried = _initial_arguments(fmap, initial_state, causal, rpb, rpb_tables)  # initial_state
    xp = namespace(
        q=q, k=k, v=v, key_mask=key_mask, cu_seqlens=_packing.array_argument(cu_seqlens), **tables,
        **fmap._arrays(), **carried,
    )
    lead = _validate.attention_inputs(xp, q, k, v)
    out_lead = _validate.key_mask(xp, key_mask, k.shape[-2], lead)
    fmap._check_width(q.shape[-1], "q")
    Lq, Lk = q.shape[-2], k.shape[-2]
    _validate.causal_lengths(causal, Lq, Lk)
    if return_state and not causal:
        raise ValueError("return_state=True needs causal=True: a decoding state continues a causal sequence")
    if cu_seqlens is not None:
        return _packed_linear_attention(
            xp, q, k, v, cu_seqlens, key_mask=key_mask, rpb=rpb, rpb_tables=rpb_tables, rpb_skip=rpb_skip,
            causal=causal, return_state=return_state,
            options={"feature_map": fmap, "eps": eps, "chunk_size": C, "normalize": normalize, "scale": scale},
        )
    # -- compute
    result, work = compute_dtype(xp, q, k, v, *tables.values())
    qw, kw, vw = (xp.astype(x, work, copy=False) for x in (q, k, v))
    if scale is not None:
        qw = qw * scale
    kw = _mask_keys(xp, kw, key_mask)
    vw = _mask_values(xp, vw, key_mask, bias=rpb is not None or rpb_tables is not None)
    offset = None
    if Lq == 0 or Lk == 0 or math.prod(out_lead) == 0 or (fmap.exponential and fmap.features(q.shape[-1]) == 0):
        # nothing to attend to (an empty batch or sequence, or no features: the kernel
        # is 0): zeros, without reductions over empty axes
        fk = fmap._keys(xp, kw)
        shape = (*out_lead, Lq, v.shape[-1])
        out = xp.zeros(shape, dtype=work, device=device_of(v))
        final = xp.zeros((*shape[:-2], fk.shape[-1], v.shape[-1] + 1), dtype=work, device=device_of(v))
        if fmap.exponential:
            offset = _neg_inf(xp, final[..., 0])
        if initial_state is not None:  # nothing new: the state passes through
            S0, offset0 = _carried(xp, fmap, initial_state, fk.shape[-1], v.shape[-1], out_lead, work)
            final = final + S0
            offset = None if offset0 is None else xp.maximum(offset, offset0)
    elif fmap.exponential:
        lq, lk, mq = _log_features(xp, fmap, qw, kw, key_mask)
        if causal:
            v1, skipped = _with_ones(xp, vw), 0
            if initial_state is not None:  # the state enters as F pseudo-keys before the chunk
                S0, offset0 = _carried(xp, fmap, initial_state, lk.shape[-1], v.shape[-1], out_lead, work)
                skipped = lk.shape[-1]
                lq = _prepend(xp, xp.zeros((skipped, skipped), dtype=work, device=device_of(lq)), lq)
                lk, v1 = _prepend(xp, _state_keys(xp, offset0), lk), _prepend(xp, S0, v1)
            total, eps_rows, final, offset, log_scale = _causal_exp(xp, lq, lk, v1, min(C, skipped + Lq), eps)
            if skipped:
                total, log_scale = total[..., skipped:, :], log_scale[..., skipped:, :]
                eps_rows = eps_rows if isinstance(eps_rows, float) else eps_rows[..., skipped:, :]
            num, den = total[..., :-1], total[..., -1:]
        else:
            num, den, eps_rows, log_scale = _noncausal_exp(xp, lq, lk, vw, eps)
        # unnormalised: back to the true scale exp(l(q_i) . + l(k_j) .), which may overflow
        out = _normalise(xp, num, den, eps_rows) if normalize else num * xp.exp(log_scale + mq)
    else:
        fq, fk = _features(xp, fmap, qw, kw, key_mask)
        if causal:
            num, den, S_end, z_end = _causal(xp, fq, fk, vw, min(C, Lq), signed=not fmap.nonnegative)
            if initial_state is not None:  # y += phi(Q) S0, den += phi(Q) . z0; the state += [S0, z0]
                S0, _ = _carried(xp, fmap, initial_state, fk.shape[-1], v.shape[-1], out_lead, work)
                carried_out = xp.matmul(fq, S0)
                num, den = num + carried_out[..., :-1], den + carried_out[..., -1:]
                S_end, z_end = S_end + S0[..., :-1], z_end + S0[..., -1]
            final = (S_end, z_end)
        else:
            num, den = _noncausal(xp, fq, fk, vw)
        out = _normalise(xp, num, den, eps) if normalize else num
    rpb_state = None
    if rpb is not None and (initial_state is not None or return_state):  # the bias continues too
        out, rpb_state = _add_bias_streaming(xp, out, vw, rpb, rpb_skip, initial_state)
    else:
        out = _add_bias(
            xp, out, vw, rpb=rpb, rpb_tables=rpb_tables, rpb_grid=rpb_grid, rpb_skip=rpb_skip, causal=causal
        )
    out = xp.astype(out, result, copy=False)
    if return_state:
        return out, _state(xp, fmap, final, offset)._replace(rpb=rpb_state)
    return out


def _packed_lengths(
    xp: Any, cu_seqlens: Any, Lq: int, Lk: int, rpb_tables: Any, like: Any, *, align: int = 1
) -> Any:
    """The packing of ``cu_seqlens`` for attention over ``Lq = Lk`` packed tokens."""
    if Lq != Lk:
        raise ValueError(f"cu_seqlens packs queries and keys alike: it needs Lq == Lk, got Lq = {Lq} and Lk = {Lk}")
    if rpb_tables is not None:
        raise ValueError("cu_seqlens does not combine with the N-d bias (rpb_tables/rpb_grid): a grid spans one sequence")
    return _packing.packing(xp, _packing.offsets_of(xp, cu_seqlens, Lq), like, align=align)


def _packed_bias(xp: Any, out: Any, v: Any, key_mask: Any, rpb: Any, rpb_skip: Any, causal: bool, cu_seqlens: Any) -> Any:
    """``out`` plus the FastRPB term of every packed sequence on its own."""
    if rpb is None:
        return out
    if key_mask is not None:
        v = _zero_padding(xp, v, key_mask)
    try:
        term = _packing.packed_rpb(xp, v, rpb, causal=causal, skip=rpb_skip, cu_seqlens=cu_seqlens)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"in the FastRPB term (rpb=, rpb_skip=): {exc}") from exc
    return out + xp.astype(term, out.dtype, copy=False)


def _packed_linear_attention(
    xp: Any, q: Any, k: Any, v: Any, cu_seqlens: Any, *, key_mask: Any, rpb: Any, rpb_tables: Any,
    rpb_skip: Any, causal: bool, return_state: bool, options: dict,
) -> Any:
    """``linear_attention`` of packed sequences: unpack, attend with the padding masked, repack."""
    # causal: groups padded to whole chunks; their padding is masked by key_mask below
    align = options["chunk_size"] if causal else 1
    pk = _packed_lengths(xp, cu_seqlens, q.shape[-2], k.shape[-2], rpb_tables, q, align=align)
    outs: list[Any] = []
    states: list[Any] = []
    for g in pk.groups:
        mask = g.valid if key_mask is None else _packing.unpack_mask(xp, g, key_mask)
        qu, ku, vu = (_packing.unpack(xp, g, x, fill=None) for x in (q, k, v))
        res = linear_attention(qu, ku, vu, causal=causal, key_mask=mask, return_state=return_state, **options)
        outs.append(res[0] if return_state else res)
        states.append(res[1] if return_state else None)
    out = _packed_bias(xp, _packing.repack(xp, pk, outs), v, key_mask, rpb, rpb_skip, causal, cu_seqlens)
    if not return_state:
        return out
    # one state per sequence, stacked along a new leading axis N (cu_seqlens order)
    S = _packing.per_sequence(xp, pk, [st.S for st in states], -3)
    z = _packing.per_sequence(xp, pk, [st.z for st in states], -2)
    offset = None if states[0].offset is None else _packing.per_sequence(xp, pk, [st.offset for st in states], -2)
    S, z = xp.moveaxis(S, -3, 0), xp.moveaxis(z, -2, 0)
    offset = None if offset is None else xp.moveaxis(offset, -2, 0)
    return out, LinearAttentionState(S=S, z=z, offset=offset, feature_map=states[0].feature_map)


def linear_attention_step(
    state: LinearAttentionState | None,
    q_t: Array,
    k_t: Array,
    v_t: Array,
    *,
    feature_map: FeatureMapLike = "elu",
    eps: float = 1e-6,
    normalize: bool = True,
    scale: float | None = None,
    rpb: Array | None = None,
    rpb_skip: tuple[int, int] | None = None,
) -> tuple[Array, LinearAttentionState]:
    r"""One decoding step of causal linear attention: O(F Dv) per token.

    $$
    S \leftarrow S + \phi(k_t) v_t^\top, \quad z \leftarrow z + \phi(k_t), \quad
    \mathrm{out}_t = \frac{\phi(q_t)^\top S}{\phi(q_t)^\top z + \varepsilon}
    $$

    Stepping token by token reproduces ``linear_attention(..., causal=True)``; start
    from ``state=None`` or from the state that ``linear_attention(...,
    return_state=True)`` returns after a prompt. For ``sikf``/``favor`` the state keeps
    a running key offset per feature and rescales ``S`` and ``z`` when it grows, so
    no step overflows whatever the key magnitudes.

    Parameters
    ----------
    state : LinearAttentionState or None
        The state after the previous tokens (made with the same feature map).
    q_t : array, shape (..., Dk)
        The new token's query.
    k_t : array, shape (..., Dk)
        The new token's key.
    v_t : array, shape (..., Dv)
        The new token's value. Half precision is computed in float32; the state stays in the
        compute dtype.
    feature_map, eps, normalize, scale
        As in ``linear_attention``: ``normalize=False`` returns ``phi(q_t)^T S`` (true
        scale for the exponential maps), ``scale`` multiplies ``q_t`` first.
    rpb : array, shape (..., 2M - 1), optional
        FastRPB table: adds ``sum_{j <= t} w[M - 1 + t - j] v_j`` from the bias history
        the state carries (``fastrpb.rpb_step``: amortised O(Dv log^2 t) per token,
        O(M Dv) under ``jax.jit``), so stepping equals ``linear_attention(...,
        causal=True, rpb=w)``. Pass it at every step of a sequence, or at none.
    rpb_skip : (int, 0), optional
        When the bias history starts (``state`` is None): the first ``a`` tokens
        neither give nor receive the bias. Later steps take it from the state (a
        value given must match it); ``b > 0`` is a ValueError while streaming.

    Returns
    -------
    (array of shape (..., Dv), LinearAttentionState)

    Raises
    ------
    TypeError
        If the tokens are not real floating or come from two libraries or devices.
    ValueError
        If the token widths disagree with each other or with ``state``, or
        ``feature_map`` is an unknown name or not the map that made ``state``.

    Examples
    --------
    Decoding token by token gives causal ``linear_attention`` over the whole sequence:

    >>> import numpy as np
    >>> from fastrpb import linear_attention, linear_attention_step
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 6, 4))  # L = 6 tokens of width 4
    >>> state = None
    >>> for t in range(6):
    ...     out_t, state = linear_attention_step(state, q[t], k[t], v[t])
    >>> out_t.shape
    (4,)
    >>> bool(np.allclose(out_t, linear_attention(q, k, v, causal=True)[-1]))
    True
    """
    # -- validate, resolve the namespace once
    fmap = resolve(feature_map)
    eps = _validate.non_negative("eps", eps)
    normalize = _validate.flag("normalize", normalize)
    scale = None if scale is None else _validate.finite("scale", scale)
    if state is not None and not isinstance(state, LinearAttentionState):
        raise TypeError(f"state must be a LinearAttentionState or None, got {type(state).__name__}")
    _validate.required(q_t=q_t, k_t=k_t, v_t=v_t)
    held = {} if state is None else {"state.S": state.S, "state.z": state.z, "state.offset": state.offset}
    if rpb is not None or (state is not None and state.rpb is not None):  # the bias term's arrays too
        from ._online import held as _held

        held = {**held, "rpb": rpb, "state.rpb": None if state is None else _held(state.rpb)}
    xp = namespace(q_t=q_t, k_t=k_t, v_t=v_t, **held, **fmap._arrays())
    lead = _validate.attention_inputs(xp, q_t, k_t, v_t, token=True)
    fmap._check_width(q_t.shape[-1], "q_t")
    if fmap.exponential and fmap.features(q_t.shape[-1]) == 0:
        return _featureless_step(xp, fmap, state, q_t, k_t, v_t, lead)
    # -- compute
    result, work = compute_dtype(xp, q_t, k_t, v_t)
    qw, kw, vw = (_as(xp, x, work) for x in (q_t, k_t, v_t))
    if scale is not None:
        qw = qw * scale
    Dv = v_t.shape[-1]
    log_scale = None
    if fmap.exponential:
        lq, lk, mq = _log_features(xp, fmap, qw, kw, None)
        F = lk.shape[-1]
    else:
        fq, fk = _features(xp, fmap, qw, kw, None)
        F = fk.shape[-1]
    if state is None:
        S = xp.zeros((F, Dv), dtype=work, device=device_of(v_t))
        z = xp.zeros((F,), dtype=work, device=device_of(v_t))
        offset = _neg_inf(xp, z) if fmap.exponential else None
    elif _fits(state, fmap, F, Dv, lead, work):  # a state this function made for these shapes
        S, z, offset = state.S, state.z, state.offset
    else:
        S, z, offset = _check_state(xp, fmap, state, F, Dv, lead)
        S, z = _as(xp, S, work), _as(xp, z, work)
        offset = None if offset is None else _as(xp, offset, work)
    if fmap.exponential:
        new_offset = xp.maximum(offset, lk)
        safe = _finite_or_zero(xp, new_offset)  # never -inf: lk is finite
        decay = xp.exp(offset - safe)
        fk = xp.exp(lk - safe)
        S = decay[..., None] * S + fk[..., None] * vw[..., None, :]
        z = decay * z + fk
        fq, m, top = _fold_queries(xp, lq, new_offset)  # token frame: the largest term is 1
        log_scale = mq + m + top
        offset = new_offset
    else:
        S = S + fk[..., None] * vw[..., None, :]
        z = z + fk
    # the ``@`` operator, not xp.matmul / xp.sum: array_api_compat's wrappers re-derive
    # the result dtype on every call, a tenth of a PyTorch decoding step
    num = (fq[..., None, :] @ S)[..., 0, :]
    if normalize:
        den = (fq[..., None, :] @ z[..., :, None])[..., 0, :] + eps
        if not eps:  # with eps > 0 the denominator is >= eps wherever the numerator can be nonzero
            den = xp.where(den == 0, xp.ones((), dtype=den.dtype, device=device_of(den)), den)
        out = num / den
    else:  # unnormalised: exponential maps back to the true scale of the kernel
        out = num if log_scale is None else num * xp.exp(log_scale)
    history = None
    if rpb is not None or (state is not None and state.rpb is not None):
        out, history = _step_bias(xp, out, state, vw, rpb, rpb_skip)
    out = _as(xp, out, result)
    if offset is not None:
        offset = xp.broadcast_to(offset, z.shape)
    return out, LinearAttentionState(S=S, z=z, offset=offset, feature_map=fmap.signature, rpb=history)


def _step_bias(xp: Any, out: Any, state: LinearAttentionState | None, v_t: Any, w: Any, skip: Any) -> tuple[Any, Any]:
    """``out + sum_{j <= t} w[M - 1 + t - j] v_j`` through ``rpb_step`` and the state's history."""
    if w is None:
        raise ValueError("state carries a FastRPB history (it was made with rpb=) but rpb is None; pass the same table")
    if state is not None and state.rpb is None:
        raise ValueError(
            "state was made without rpb=, so it holds no bias history for the rpb= given; "
            "pass rpb= from the start of the sequence (or start from state=None)"
        )
    try:
        # not the public rpb_step: the namespace (w and the history included) and v_t are
        # already checked, and those checks were a third of the bias term's cost per token
        term, history = _bias._step(xp, None if state is None else state.rpb, v_t, w, skip)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"in the FastRPB term (rpb=, rpb_skip=): {exc}") from exc
    return out + _as(xp, term, out.dtype), history


def _featureless_step(
    xp: Any, fmap: FeatureMap, state: LinearAttentionState | None, q_t: Any, k_t: Any, v_t: Any, lead: tuple
) -> tuple[Any, LinearAttentionState]:
    """A step of an exponential map with no features (``Dk = 0``): the kernel is 0, so the
    output is zeros and the state keeps its (empty) sums; no maximum over an empty axis."""
    result, work = compute_dtype(xp, q_t, k_t, v_t)
    Dv = v_t.shape[-1]
    if state is not None:
        _check_state(xp, fmap, state, 0, Dv, lead)
        lead = _lead(lead, tuple(state.z.shape[:-1]))
    dev = device_of(v_t)
    S = xp.zeros((*lead, 0, Dv), dtype=work, device=dev)
    z = xp.zeros((*lead, 0), dtype=work, device=dev)
    out = xp.zeros((*lead, Dv), dtype=result, device=dev)
    return out, LinearAttentionState(S=S, z=z, offset=_neg_inf(xp, z) + z, feature_map=fmap.signature)


def _fits(state: LinearAttentionState, fmap: FeatureMap, F: int, Dv: int, lead: tuple, work: Any) -> bool:
    """The cheap test a decoding step runs per token: the state has the map, the compute
    dtype and exactly the shapes that this step would give it (as every state a step or
    a call made for the same inputs has). Only a state that fails it goes through the
    full check (``_check_state``), whose messages name what is wrong; library and
    device are checked by the namespace either way."""
    S, z, offset = state.S, state.z, state.offset
    if state.feature_map != fmap.signature or S.dtype != work or z.dtype != work:
        return False
    shape = (*lead, F)
    if tuple(z.shape) != shape or tuple(S.shape) != (*shape, Dv):
        return False
    if offset is None:
        return not fmap.exponential
    return fmap.exponential and offset.dtype == work and tuple(offset.shape) == shape


def _check_state(
    xp: Any, fmap: FeatureMap, state: LinearAttentionState, F: int, Dv: int, lead: tuple,
    *, name: str = "state", inputs: str = "q_t, k_t, v_t",
) -> tuple:
    if state.feature_map != fmap.signature:
        raise ValueError(
            f"{name} was made by feature map {state.feature_map!r} but feature_map is {fmap.signature!r}; "
            "continue a sequence with the map that started it"
        )
    S, z, offset = state.S, state.z, state.offset
    for label, x in ((f"{name}.S", S), (f"{name}.z", z)):
        _validate.floating(xp, label, x)
    if S.ndim < 2 or tuple(S.shape[-2:]) != (F, Dv):
        raise ValueError(
            f"{name}.S must have shape (..., F, Dv) = (..., {F}, {Dv}) for these inputs, got shape {tuple(S.shape)}"
        )
    if tuple(z.shape) != tuple(S.shape[:-1]):
        raise ValueError(f"{name}.z must have shape {tuple(S.shape[:-1])} (that of {name}.S without Dv), got {tuple(z.shape)}")
    if fmap.exponential:
        if offset is None or tuple(offset.shape) != tuple(z.shape):
            got = None if offset is None else tuple(offset.shape)
            raise ValueError(f"{name}.offset must have shape {tuple(z.shape)} for feature map {fmap.signature!r}, got {got}")
    elif offset is not None:
        raise ValueError(f"{name}.offset must be None for feature map {fmap.signature!r}, got an array")
    _validate.broadcast({name: tuple(z.shape[:-1]), inputs: lead})
    return S, z, offset


def softmax_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = False,
    key_mask: Array | None = None,
    logits_bias: Array | None = None,
    scale: float | None = None,
    rpb: Array | None = None,
    rpb_tables: Sequence[Array | None] | None = None,
    rpb_grid: Sequence[int] | None = None,
    rpb_skip: tuple[int, int] = (0, 0),
    cu_seqlens: Array | Sequence[int] | None = None,
) -> Array:
    r"""Exact (quadratic) softmax attention, the reference for linear attention.

    $$
    \mathrm{out}_i = \sum_j \frac{e^{a_{ij}}}{\sum_{j'} e^{a_{ij'}}}\, v_j
    \;+\; \sum_j w_{i - j}\, v_j, \qquad
    a_{ij} = s\, q_i \cdot k_j + b_{ij}
    $$

    over the visible keys, computed max-subtracted (stable for any finite logits).
    O(Lq Lk) time and memory.

    Parameters
    ----------
    q : array, shape (..., Lq, Dk)
        Queries. Real floating; leading dimensions broadcast.
    k : array, shape (..., Lk, Dk)
        Keys, as wide as the queries.
    v : array, shape (..., Lk, Dv)
        Values, one row per key.
    causal : bool
        Query ``i`` sees keys ``j <= i``; needs ``Lq == Lk``.
    key_mask : bool array, shape (..., Lk), optional
        False marks a padding key. A query that sees no key gets zeros.
    logits_bias : array, broadcastable to (..., Lq, Lk), optional
        Added to the logits, e.g. ``rpb_matrix(w, L)`` (the T5-style use of a table).
    scale : float, optional
        ``s``; default ``1 / sqrt(Dk)``.
    rpb, rpb_tables, rpb_grid, rpb_skip
        Add the FastRPB term, as in ``linear_attention``.
    cu_seqlens : int array, shape (N + 1,), or tuple of ints, optional
        Packed sequences, as in ``linear_attention``: every sequence attends only
        within itself, O(sum of squared lengths) (not ``logits_bias``).

    Returns
    -------
    array, shape (..., Lq, Dv)
        In the dtype of the inputs (half precision is computed in float32).

    Raises
    ------
    TypeError
        If ``q``, ``k``, ``v`` (or ``logits_bias``, ``rpb``) are not real floating,
        ``key_mask`` is not boolean, or the arrays come from two libraries or devices.
    ValueError
        If the shapes do not agree, or ``causal=True`` with ``Lq != Lk``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastrpb import softmax_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 5, 4))
    >>> out = softmax_attention(q, k, v, causal=True)
    >>> out.shape
    (2, 5, 4)
    >>> bool(np.allclose(out[:, 0], v[:, 0]))  # the first query sees only the first key
    True
    """
    # -- validate, resolve the namespace once
    causal = _validate.flag("causal", causal)
    scale = None if scale is None else _validate.finite("scale", scale)
    tables = _validate.bias_arguments(rpb, rpb_tables, rpb_grid, rpb_skip)
    _validate.required(q=q, k=k, v=v)
    xp = namespace(q=q, k=k, v=v, key_mask=key_mask, logits_bias=logits_bias, cu_seqlens=_packing.array_argument(cu_seqlens), **tables)
    lead = _validate.attention_inputs(xp, q, k, v)
    _validate.key_mask(xp, key_mask, k.shape[-2], lead)
    Lq, Lk = q.shape[-2], k.shape[-2]
    _validate.causal_lengths(causal, Lq, Lk)
    _validate.logits_bias(xp, logits_bias, Lq, Lk, lead)
    if cu_seqlens is not None:
        if logits_bias is not None:
            raise ValueError("cu_seqlens does not combine with logits_bias (an Lq x Lk matrix over the packed row)")
        pk = _packed_lengths(xp, cu_seqlens, Lq, Lk, rpb_tables, q)
        outs = []
        for g in pk.groups:
            mask = g.valid if key_mask is None else _packing.unpack_mask(xp, g, key_mask)
            qu, ku, vu = (_packing.unpack(xp, g, x) for x in (q, k, v))
            outs.append(softmax_attention(qu, ku, vu, causal=causal, key_mask=mask, scale=scale))
        return _packed_bias(xp, _packing.repack(xp, pk, outs), v, key_mask, rpb, rpb_skip, causal, cu_seqlens)
    # -- compute
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    named = {"logits_bias": logits_bias} if logits_bias is not None else {}
    result, work = compute_dtype(xp, q, k, v, *tables.values(), *named.values())
    qw, kw, vw = (xp.astype(x, work, copy=False) for x in (q, k, v))
    kw = _mask_keys(xp, kw, key_mask)
    vw = _mask_values(xp, vw, key_mask, bias=rpb is not None or rpb_tables is not None)
    logits = xp.matmul(qw, xp.matrix_transpose(kw)) * scale
    if logits_bias is not None:
        logits = logits + xp.astype(logits_bias, work, copy=False)
    visible = None
    if causal:
        i = xp.arange(Lq, dtype=xp.int32, device=device_of(q))
        visible = i[:, None] >= i[None, :]
    if key_mask is not None:
        km = key_mask[..., None, :]
        visible = km if visible is None else xp.logical_and(visible, km)
    if visible is not None:
        logits = xp.where(visible, logits, _neg_inf(xp, logits))
    if Lk == 0:
        out = xp.zeros((*logits.shape[:-1], v.shape[-1]), dtype=work, device=device_of(v))
    else:
        top = _finite_or_zero(xp, xp.max(logits, axis=-1, keepdims=True))
        p = xp.exp(logits - top)
        den = xp.sum(p, axis=-1, keepdims=True)
        den = xp.where(den == 0, xp.ones((), dtype=den.dtype, device=device_of(den)), den)
        # causal: p is tril, and a later NaN value must not reach earlier rows through 0 * NaN
        out = (_tril_product(xp, p, vw) if causal else xp.matmul(p, vw)) / den
    out = _add_bias(
        xp, out, vw, rpb=rpb, rpb_tables=rpb_tables, rpb_grid=rpb_grid, rpb_skip=rpb_skip, causal=causal
    )
    return xp.astype(out, result, copy=False)
