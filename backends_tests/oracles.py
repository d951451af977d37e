"""Dense float64 NumPy oracles for the attention tests, written from the definitions.

Nothing here calls fastrpb: every oracle builds the full ``Lq x Lk`` matrix (kernel,
logits or Toeplitz bias) from its formula, masks it and normalises it.
"""

from __future__ import annotations

import numpy as np

# ------------------------------------------------------------------ feature formulas


def elu1(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def relu(x):
    return np.maximum(x, 0.0)


def dpfp(x, nu=1):
    r = np.concatenate([relu(x), relu(-x)], axis=-1)
    return np.concatenate([r * np.roll(r, i, axis=-1) for i in range(1, nu + 1)], axis=-1)


def favor_log(x, w):
    """log of Performer's positive features, exp(W x - |x|^2 / 2) / sqrt(m)."""
    return x @ w.T - 0.5 * np.sum(x * x, axis=-1, keepdims=True) - 0.5 * np.log(w.shape[0])


def rff(x, w):
    wx = x @ w.T
    return np.concatenate([np.cos(wx), np.sin(wx)], axis=-1) / np.sqrt(w.shape[0])


def taylor(x):
    """Based's second-order Taylor features in fla's order: 1, x / d^(1/4), x_i^2 / sqrt(2d),
    x_i x_j / sqrt(d) for i < j (row by row), so phi(q).phi(k) = 1 + s + s^2 / 2, s = q.k / sqrt(d)."""
    d = x.shape[-1]
    i, j = np.triu_indices(d, 1)
    ones = np.ones((*x.shape[:-1], 1))
    return np.concatenate([ones, x / d**0.25, x**2 / np.sqrt(2 * d), x[..., i] * x[..., j] / np.sqrt(d)], axis=-1)


def hedgehog(x, w):
    """Hedgehog features [softmax(x W^T), softmax(-x W^T)], each softmax over its m features."""

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    z = x @ w.T
    return np.concatenate([softmax(z), softmax(-z)], axis=-1)


# ------------------------------------------------------------------ attention


def visibility(Lq, Lk, causal, key_mask=None):
    """Bool (..., Lq, Lk): which keys each query sees."""
    vis = np.ones((Lq, Lk), dtype=bool)
    if causal:
        vis = np.tril(vis)
    if key_mask is not None:
        vis = vis & np.asarray(key_mask, dtype=bool)[..., None, :]
    return vis


def _normalise(weights, v, extra):
    num = weights @ v
    den = weights.sum(-1, keepdims=True) + extra
    safe = np.where(den == 0, 1.0, den)
    return num / safe


def kernel_attention(fq, fk, v, *, causal=False, key_mask=None, eps=0.0):
    """out_i = sum_j K_ij v_j / (sum_j K_ij + eps), K = phi(Q) phi(K)^T over visible keys."""
    K = fq @ np.swapaxes(fk, -1, -2)
    K = np.where(visibility(fq.shape[-2], fk.shape[-2], causal, key_mask), K, 0.0)
    return _normalise(K, v, eps)


def exp_kernel_attention(lq, lk, v, *, causal=False, key_mask=None, eps=0.0):
    """Attention with K_ij = sum_f exp(lq_if + lk_jf), computed in log space.

    eps is relative to s_i = max over visible j, f of exp(lq_if + lk_jf) (the library's
    documented convention for exponential maps).
    """
    pair = lq[..., :, None, :] + lk[..., None, :, :]  # (..., Lq, Lk, F)
    top = pair.max(-1)
    logk = top + np.log(np.exp(pair - top[..., None]).sum(-1))  # logsumexp over f
    vis = visibility(lq.shape[-2], lk.shape[-2], causal, key_mask)
    vis = np.broadcast_to(vis, logk.shape)
    masked = np.where(vis, logk, -np.inf)
    shift = masked.max(-1, keepdims=True)
    shift = np.where(np.isfinite(shift), shift, 0.0)
    weights = np.exp(masked - shift)
    s = np.where(vis, top, -np.inf).max(-1, keepdims=True)  # log of the largest term
    return _normalise(weights, v, eps * np.exp(s - shift))


def softmax_attention(q, k, v, *, causal=False, key_mask=None, logits_bias=None, scale=None):
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    logits = scale * (q @ np.swapaxes(k, -1, -2))
    if logits_bias is not None:
        logits = logits + logits_bias
    vis = np.broadcast_to(visibility(q.shape[-2], k.shape[-2], causal, key_mask), logits.shape)
    logits = np.where(vis, logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return _normalise(np.exp(logits - top), v, 0.0)


# ------------------------------------------------------------------ FastRPB


def toeplitz(w, L, *, causal=False, skip=(0, 0)):
    """B (..., L, L) with B[i, j] = w[M - 1 + i - j] on the tokens between the skips."""
    w = np.asarray(w)
    M = (w.shape[-1] + 1) // 2
    a, b = skip
    inner = L - a - b
    B = np.zeros((*w.shape[:-1], L, L))
    for i in range(inner):
        for j in range(inner):
            if causal and j > i:
                continue
            B[..., a + i, a + j] = w[..., M - 1 + i - j]
    return B


def toeplitz_nd(tables, grid, *, causal=False):
    """Separable N-d bias matrix B[..., (p), (p')] = sum_a w_a(p_a - p'_a), row-major grid.

    Tables may have leading (head) dimensions; they broadcast. causal=True keeps only
    the pairs whose p' comes no later than p in raster (row-major) order, i.e. the
    lower triangle of the L x L matrix.
    """
    positions = np.stack(np.unravel_index(np.arange(int(np.prod(grid))), grid), axis=-1)
    L = positions.shape[0]
    lead = np.broadcast_shapes(*(np.shape(w)[:-1] for w in tables if w is not None))
    B = np.zeros((*lead, L, L))
    for axis, w in enumerate(tables):
        if w is None:
            continue
        M = (w.shape[-1] + 1) // 2
        offsets = positions[:, None, axis] - positions[None, :, axis]
        B = B + w[..., M - 1 + offsets]
    if causal:
        B = B * np.tril(np.ones((L, L)))
    return B
