"""Helpers shared by the attention kernels: masks, normalisation, the causal product."""

from __future__ import annotations

import math
from typing import Any

from .._compat import cumulative_sum, device_of, known_finite, split_nonfinite
from .._validate import broadcast_shapes as _lead
from ..feature_maps import FeatureMap

__all__ = [
    "as_dtype",
    "neg_inf",
    "finite_or_zero",
    "prepend",
    "unchunk",
    "zero_padding",
    "mask_values",
    "mask_keys",
    "tril_product",
    "with_ones",
    "normalise",
    "features",
]


def as_dtype(xp: Any, x: Any, dtype: Any) -> Any:
    """``astype(x, dtype, copy=False)``, skipping the call (microseconds of wrapper per
    array, several per decoding step) when ``x`` already has ``dtype``."""
    return x if x.dtype == dtype else xp.astype(x, dtype, copy=False)


def neg_inf(xp: Any, like: Any) -> Any:
    """A 0-d ``-inf`` in ``like``'s dtype, on its device."""
    return xp.asarray(-math.inf, dtype=like.dtype, device=device_of(like))


def finite_or_zero(xp: Any, x: Any) -> Any:
    """Replace ``-inf`` (no visible key) by 0 so that offsets never produce ``inf - inf``."""
    return xp.where(x == -math.inf, xp.zeros((), dtype=x.dtype, device=device_of(x)), x)


def prepend(xp: Any, first: Any, rest: Any) -> Any:
    """``concat([first, rest], axis=-2)`` after broadcasting their leading dimensions."""
    lead = _lead(tuple(first.shape[:-2]), tuple(rest.shape[:-2]))
    first = xp.broadcast_to(first, (*lead, *first.shape[-2:]))
    rest = xp.broadcast_to(rest, (*lead, *rest.shape[-2:]))
    return xp.concat([first, rest], axis=-2)


def unchunk(xp: Any, y: Any, L: int) -> Any:
    """``y (..., N, C, D)`` back to its first ``L`` rows ``(..., L, D)``."""
    y = xp.reshape(y, (*y.shape[:-3], y.shape[-3] * y.shape[-2], y.shape[-1]))
    return y[..., :L, :]


def zero_padding(xp: Any, x: Any, key_mask: Any) -> Any:
    """``x (..., Lk, D)`` with the rows of padding keys (``key_mask`` False) set to 0."""
    return xp.where(key_mask[..., None], x, xp.zeros((), dtype=x.dtype, device=device_of(x)))


def mask_values(xp: Any, v: Any, key_mask: Any, *, bias: bool) -> Any:
    """``v`` with the values of padding keys zeroed, where they could reach an output.

    Padding keys get zero weight in every attention product, but ``0 * NaN`` is NaN:
    a NaN or infinite value at a padding key would reach every query. Finite padding
    values cannot, so the attention term alone skips the pass when ``v`` is known to
    be finite; the FastRPB term weighs every value (``bias=True``), so it always needs
    them zeroed.
    """
    if key_mask is None or (not bias and known_finite(xp, v)):
        return v
    return zero_padding(xp, v, key_mask)


def mask_keys(xp: Any, k: Any, key_mask: Any) -> Any:
    """``k`` with the padding keys zeroed when they may hold NaN or infinities.

    Padding keys get zero features (or ``-inf`` logits) afterwards, so a non-finite
    one never reaches an output; but the feature maps and the logits would still
    compute ``inf - inf`` or ``inf * 0`` on it first, and NumPy then warns ("invalid
    value encountered") about values the caller masked. Zeroing them first keeps the
    arithmetic finite. Known-finite keys (``known_finite``) skip the pass.
    """
    if key_mask is None or known_finite(xp, k):
        return k
    return zero_padding(xp, k, key_mask)


def tril_product(xp: Any, scores: Any, v: Any, *, masked: bool = False, finite: bool | None = None) -> Any:
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


def with_ones(xp: Any, v: Any) -> Any:
    """``[v, 1]``: the normaliser rides along as the last column of the same products."""
    return xp.concat([v, xp.ones((*v.shape[:-1], 1), dtype=v.dtype, device=device_of(v))], axis=-1)


def normalise(xp: Any, num: Any, den: Any, eps: Any) -> Any:
    """``num / (den + eps)``; a zero denominator (no visible key) gives 0."""
    den = den + eps
    # The numerator is exactly zero wherever the denominator is (no key was visible),
    # so dividing by 1 there returns the zeros without ever touching small denominators.
    den = xp.where(den == 0, xp.ones((), dtype=den.dtype, device=device_of(den)), den)
    return num / den


def features(xp: Any, fmap: FeatureMap, q: Any, k: Any, key_mask: Any) -> tuple[Any, Any]:
    """Query and key features; padding keys get exactly zero features."""
    fq, fk = fmap._queries(xp, q), fmap._keys(xp, k)
    if fq.shape[-1] != fk.shape[-1]:
        raise ValueError(
            f"feature_map {fmap.signature} gives queries {fq.shape[-1]} features but keys "
            f"{fk.shape[-1]}; they must match"
        )
    if key_mask is not None:
        fk = zero_padding(xp, fk, key_mask)
    return fq, fk
