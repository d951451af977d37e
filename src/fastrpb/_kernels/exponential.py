"""The exponential maps' frame (``sikf``, ``favor``): log-features and offsets.

Their features are ``exp`` of a log-feature, and ``exp`` of raw logits overflows.
The features are never formed raw: per-feature key offsets are folded into the
queries, so every key feature is <= 1 and every query row's largest feature is 1
(see ``fastrpb.attention``). Non-causal, the offset is the maximum over all keys;
causal, the running maximum up to each chunk's end, with the carried state
rescaled as it grows.
"""

from __future__ import annotations

import math
from typing import Any

from .._compat import add_into, device_of, known_finite, on_finite, tril_into
from .._compat import cumulative_max as _cummax
from .._compat import pad_chunks as _pad_chunks
from .._compat import rescaled_scan as _rescaled_scan
from .._compat import shift as _shift
from ..feature_maps import FeatureMap
from .common import finite_or_zero, neg_inf, tril_product, unchunk
from .noncausal import noncausal_attention

__all__ = ["state_keys", "log_features", "fold_queries", "noncausal_exp_attention", "causal_exp_attention"]


def state_keys(xp: Any, offset: Any) -> Any:
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


def log_features(xp: Any, fmap: FeatureMap, q: Any, k: Any, key_mask: Any) -> tuple[Any, Any, Any]:
    """Log-features of an exponential map; padding keys get ``-inf`` (feature 0).

    The query rows come relative to their maximum, which is returned third (the true
    scale of the kernel, for ``normalize=False``)."""
    lq, lk = fmap._log_queries(xp, q), fmap._log_keys(xp, k)
    if key_mask is not None:
        lk = xp.where(key_mask[..., None], lk, neg_inf(xp, lk))
    # each query row relative to its maximum: later sums stay small and exact
    mq = xp.max(lq, axis=-1, keepdims=True)
    return lq - mq, lk, mq


def fold_queries(xp: Any, lq: Any, offset: Any) -> tuple[Any, Any, Any]:
    """Query features ``exp(lq + offset - top - m)``, each row's largest feature 1.

    ``offset (..., F)`` (key offsets per feature, folded into the queries) broadcasts
    against ``lq (..., F)``. ``top`` is the largest offset, subtracted first so that no
    sum of two large logits is ever rounded; ``m`` is the row maximum after that.
    Returns ``(features, m, top)`` with ``m`` and ``top`` finite.
    """
    top = finite_or_zero(xp, xp.max(offset, axis=-1, keepdims=True))
    t = lq + (offset - top)
    m = finite_or_zero(xp, xp.max(t, axis=-1, keepdims=True))
    return xp.exp(t - m), m, top


def noncausal_exp_attention(xp: Any, lq: Any, lk: Any, v: Any, eps: float) -> tuple[Any, Any, Any, Any]:
    """Non-causal attention of an exponential map over log-features ``lq``, ``lk`` (from
    ``log_features``): the key offset per feature is its maximum over all keys.

    Returns ``(num, den, eps, log_scale)``: ``eps`` as given (every query sees every
    key, so the largest kernel term is 1 in this frame) and the per-row log of the
    factor back to the true scale of the kernel."""
    offset = xp.max(lk, axis=-2, keepdims=True)  # (..., 1, F): per feature, over all keys
    fk = xp.exp(lk - finite_or_zero(xp, offset))
    fq, m, top = fold_queries(xp, lq, offset)
    # every query sees every key, so the largest kernel term is 1 in this frame: eps as is;
    # last: the log of the factor that takes a row back to the true scale of the kernel
    return (*noncausal_attention(xp, fq, fk, v), eps, m + top)


def causal_exp_attention(xp: Any, lq: Any, lk: Any, v1: Any, C: int, eps: float) -> tuple[Any, Any, Any, Any, Any]:
    """Causal attention of an exponential map over log-features ``lq``, ``lk`` (from
    ``log_features``) and values ``v1 = [V, 1]`` (``with_ones``), in chunks of ``C``.

    Returns ``([num, den], eps_rows, X, R, log_scale)``: numerator and denominator as
    one array, the per-row eps in the chunk frame (a float where ``eps`` is 0), the
    final state ``[S, z]`` and its offset (the running key maximum), and the per-row
    log of the factor back to the true scale of the kernel. ``_causal_exp_chunks``,
    on its finite path where ``v1`` is finite (``on_finite``)."""
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
    frame = lk if known_finite(xp, lk, negative_infinity=True) else xp.where(lk < math.inf, lk, neg_inf(xp, lk))
    running = _cummax(xp, frame, -2) if eps > 0 else None  # per token, inside each chunk
    chunk_max = running[..., -1, :] if running is not None else xp.max(frame, axis=-2)
    R = _cummax(xp, chunk_max, -2)  # (..., N, F), inclusive over chunks
    R_safe = finite_or_zero(xp, R)
    kc = xp.exp(lk - R_safe[..., None, :])
    qc, m, top = fold_queries(xp, lq, R[..., None, :])
    if running is not None:
        # the largest kernel term query i sees, in this chunk's frame (<= 1)
        R_before = _shift(xp, R, 1, -2, -math.inf)
        seen = xp.maximum(running, R_before[..., None, :])  # key running max up to token i
        s = xp.max(lq + (seen - top), axis=-1, keepdims=True)
        eps_rows = eps * xp.exp(s - m)
    else:
        eps_rows = 0.0
    y = tril_product(xp, tril_into(xp, xp.matmul(qc, xp.matrix_transpose(kc))), vc, masked=True, finite=finite)
    X = xp.matmul(xp.matrix_transpose(kc), vc)  # chunk states, chunk n in frame R_n
    X = _rescaled_scan(xp, X, R, R_safe)  # engines: the scan lives in _compat (a Dask path)
    if X.shape[-3] > 1:
        carried = _shift(xp, X, 1, -3, 0.0)  # chunk n-1's inclusive state, frame R_{n-1}
        rescale = xp.exp(_shift(xp, R, 1, -2, -math.inf) - R_safe)  # to frame R_n
        y = add_into(xp, y, xp.matmul(qc, rescale[..., None] * carried))
    eps_rows = unchunk(xp, eps_rows, L) if running is not None else eps_rows
    log_scale = unchunk(xp, m + top, L)
    return unchunk(xp, y, L), eps_rows, X[..., -1, :, :], R[..., -1, :], log_scale
