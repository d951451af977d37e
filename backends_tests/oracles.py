"""Dense float64 NumPy oracles for the attention tests, written from the definitions.

Nothing here calls fastrpb: every oracle builds the full ``Lq x Lk`` matrix (kernel,
logits or Toeplitz bias) from its formula, masks it and normalises it. The numeric
derivative that the gradient checks compare with (``finite_differences``) lives here
too; ``backends.check_gradients`` is the one checker built on it.
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
    top = pair.max(-1, initial=-np.inf)  # -inf: no features (F = 0), kernel 0
    with np.errstate(divide="ignore"):  # log(0) = -inf: no features, kernel 0
        logk = top + np.log(np.exp(pair - top[..., None]).sum(-1))  # logsumexp over f
    vis = visibility(lq.shape[-2], lk.shape[-2], causal, key_mask)
    vis = np.broadcast_to(vis, logk.shape)
    masked = np.where(vis, logk, -np.inf)
    shift = masked.max(-1, keepdims=True, initial=-np.inf)
    shift = np.where(np.isfinite(shift), shift, 0.0)
    weights = np.exp(masked - shift)
    s = np.where(vis, top, -np.inf).max(-1, keepdims=True, initial=-np.inf)  # log of the largest term
    return _normalise(weights, v, eps * np.exp(s - shift))


def softmax_attention(q, k, v, *, causal=False, key_mask=None, logits_bias=None, scale=None):
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    logits = scale * (q @ np.swapaxes(k, -1, -2))
    if logits_bias is not None:
        logits = logits + logits_bias
    vis = np.broadcast_to(visibility(q.shape[-2], k.shape[-2], causal, key_mask), logits.shape)
    logits = np.where(vis, logits, -np.inf)
    top = logits.max(-1, keepdims=True, initial=-np.inf)
    top = np.where(np.isfinite(top), top, 0.0)
    return _normalise(np.exp(logits - top), v, 0.0)


# ------------------------------------------------------------------ FastRPB
# The one dense Toeplitz oracle of the suite: every test of rpb, rpb_nd, rpb_matrix,
# the attention's FastRPB term and the layers builds its bias matrix here.


def toeplitz(w, L, causal=False, *, skip=(0, 0)):
    """B (..., L, L) with B[i, j] = w[M - 1 + i - j] on the tokens between the skips.

    ``w`` (..., 2M - 1) holds offsets -(M - 1) .. M - 1; only the central entries a
    sequence of the inner length needs are read. Skipped rows and columns are zero;
    ``causal`` keeps j <= i.
    """
    w = np.asarray(w, dtype=np.float64)
    M = (w.shape[-1] + 1) // 2
    a, b = skip
    inner = L - a - b
    i, j = np.arange(inner)[:, None], np.arange(inner)[None, :]
    block = w[..., M - 1 + i - j]
    if causal:
        block = np.where(j <= i, block, 0.0)
    B = np.zeros((*w.shape[:-1], L, L))
    B[..., a : a + inner, a : a + inner] = block
    return B


def toeplitz_nd(tables, grid, *, causal=False, skip=(0, 0)):
    """Separable N-d bias B[..., (p), (p')] = sum_a w_a(p_a - p'_a), row-major grid.

    ``tables[a]`` (..., 2M_a - 1) or None (no bias along that axis); leading
    dimensions broadcast. causal=True keeps only the pairs whose p' comes no later
    than p in raster (row-major) order, i.e. the lower triangle of the grid's
    N x N block. With ``skip`` the grid sits between the skipped tokens and their
    rows and columns are zero.
    """
    positions = np.stack(np.unravel_index(np.arange(int(np.prod(grid))), grid), axis=-1)
    N = positions.shape[0]
    lead = np.broadcast_shapes(*(np.shape(w)[:-1] for w in tables if w is not None))
    inner = np.zeros((*lead, N, N))
    for axis, w in enumerate(tables):
        if w is None:
            continue
        w = np.asarray(w, dtype=np.float64)
        M = (w.shape[-1] + 1) // 2
        offsets = positions[:, None, axis] - positions[None, :, axis]
        inner = inner + w[..., M - 1 + offsets]
    if causal:
        inner = inner * np.tril(np.ones((N, N)))
    a, b = skip
    B = np.zeros((*lead, N + a + b, N + a + b))
    B[..., a : a + N, a : a + N] = inner
    return B


def rpb(v, w, causal=False, skip=(0, 0)):
    """FastRPB's output B v (..., L, D), B the dense Toeplitz matrix of ``w``."""
    return toeplitz(w, v.shape[-2], causal, skip=skip) @ v


def rpb_nd(v, tables, grid, skip=(0, 0), causal=False):
    """The N-d FastRPB output B v with B from ``toeplitz_nd``."""
    return toeplitz_nd(tables, grid, causal=causal, skip=skip) @ v


# ------------------------------------------------------------------ comparison


def check_relative(name, got, want, *, rtol=1e-9):
    """Assert ``max |got - want| <= rtol * max(1, max |want|)``; returns that error ratio.

    For the multi-process scripts (sequence parallel, sharded JAX), which compare whole
    arrays in NumPy outside pytest's fixtures."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    scale = max(1.0, float(np.max(np.abs(want))))
    err = float(np.max(np.abs(got - want))) / scale
    assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:.1g}"
    return err


# ------------------------------------------------------------------ gradients


def finite_differences(f, *args, h=1e-6):
    """Central differences of the scalar ``f(*args)`` (NumPy float64) in every argument."""
    args = [np.asarray(a, dtype=np.float64) for a in args]
    grads = []
    for k, x in enumerate(args):
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[k][idx] += h
            minus[k][idx] -= h
            g[idx] = (f(*plus) - f(*minus)) / (2 * h)
        grads.append(g)
    return grads
