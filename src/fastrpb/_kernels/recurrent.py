r"""The recurrent form of causal linear attention: one token, O(F Dv).

$$
S \leftarrow S + \phi(k_t) v_t^\top, \quad z \leftarrow z + \phi(k_t), \quad
\mathrm{out}_t = \frac{\phi(q_t)^\top S}{\phi(q_t)^\top z + \varepsilon}
$$

For the exponential maps the state is kept relative to a running key offset per
feature and rescaled when it grows (``fastrpb._kernels.exponential``).
"""

from __future__ import annotations

from typing import Any

from .._compat import device_of, eager_jit
from ..feature_maps import FeatureMap
from .common import features, finite_or_zero
from .exponential import fold_queries, log_features

__all__ = ["decode_token", "token_features", "recurrent_step"]


def token_features(xp: Any, q: Any, k: Any, *, fmap: FeatureMap, scale: float | None = None) -> tuple[Any, Any, Any]:
    """The features of one token's query (times ``scale``, if given) and key,
    ``(phi(q), phi(k), None)``; for an exponential map its log-features ``(l(q) - m,
    l(k), m)``, ``m`` the query row's maximum (``log_features``)."""
    if scale is not None:
        q = q * scale
    if fmap.exponential:
        return log_features(xp, fmap, q, k, None)
    fq, fk = features(xp, fmap, q, k, None)
    return fq, fk, None


def recurrent_step(
    xp: Any, token: tuple[Any, Any, Any], S: Any, z: Any, offset: Any, v: Any, *, eps: float, normalize: bool
) -> tuple[Any, Any, Any, Any]:
    """The state ``(S, z, offset)`` after one more token and the token's output.

    ``token`` comes from ``token_features`` (log-features when its third entry is not
    ``None``: then ``offset`` is the state's running key maximum per feature, ``-inf``
    before any key, else ``None``); ``v`` is the token's value. All in the compute
    dtype. Returns ``(out, S, z, offset)``: ``out`` normalised (``eps`` added to the
    denominator) or, with ``normalize=False``, the numerator in the kernel's true scale.
    """
    q_part, k_part, mq = token
    log_scale = None
    if mq is not None:
        lq, lk = q_part, k_part
        new_offset = xp.maximum(offset, lk)
        safe = finite_or_zero(xp, new_offset)  # never -inf: lk is finite
        decay = xp.exp(offset - safe)
        fk = xp.exp(lk - safe)
        S = decay[..., None] * S + fk[..., None] * v[..., None, :]
        z = decay * z + fk
        fq, m, top = fold_queries(xp, lq, new_offset)  # token frame: the largest term is 1
        log_scale = mq + m + top
        offset = new_offset
    else:
        fq, fk = q_part, k_part
        S = S + fk[..., None] * v[..., None, :]
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
    return out, S, z, offset


@eager_jit(static=("fmap", "scale", "eps", "normalize"))
def decode_token(
    xp: Any,
    q: Any,
    k: Any,
    v: Any,
    S: Any,
    z: Any,
    offset: Any,
    *,
    fmap: FeatureMap,
    scale: float | None,
    eps: float,
    normalize: bool,
) -> tuple[Any, Any, Any, Any]:
    """``token_features`` then ``recurrent_step``: ``(out, S, z, offset)`` after the
    token ``(q, k, v)``. Eager JAX: one cached jitted computation, not two."""
    token = token_features(xp, q, k, fmap=fmap, scale=scale)
    return recurrent_step(xp, token, S, z, offset, v, eps=eps, normalize=normalize)
