"""Framework-native baselines, written directly in each framework (no fastrpb).

Each ``*_for(bench)`` returns plain functions for that backend. They are what a
careful user would write by hand: the comparisons measure what the library's single
array-API implementation costs (or saves) against them.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from fastrpb._compat import next_fast_len


def fft_module(bench: Any) -> SimpleNamespace:
    """``rfft(x, n, axis)`` / ``irfft(x, n, axis)`` / ``swap(x)`` / ``cat`` / ``zeros``, natively."""
    name = bench.name
    if name == "numpy":
        import numpy as np

        try:  # the best NumPy has: SciPy's pocketfft with threads
            import scipy.fft as sfft

            rfft = lambda x, n, axis: sfft.rfft(x, n=n, axis=axis, workers=-1)  # noqa: E731
            irfft = lambda x, n, axis: sfft.irfft(x, n=n, axis=axis, workers=-1, overwrite_x=True)  # noqa: E731
        except ImportError:  # pragma: no cover
            rfft = lambda x, n, axis: np.fft.rfft(x, n=n, axis=axis)  # noqa: E731
            irfft = lambda x, n, axis: np.fft.irfft(x, n=n, axis=axis)  # noqa: E731
        return SimpleNamespace(
            rfft=rfft, irfft=irfft, swap=lambda x: np.swapaxes(x, -1, -2),
            cat=lambda xs: np.concatenate(xs, axis=-1), zeros=lambda s, like: np.zeros(s, dtype=like.dtype),
            matmul=np.matmul,
        )
    if name.startswith("torch"):
        import torch

        return SimpleNamespace(
            rfft=lambda x, n, axis: torch.fft.rfft(x, n=n, dim=axis),
            irfft=lambda x, n, axis: torch.fft.irfft(x, n=n, dim=axis),
            swap=lambda x: x.transpose(-1, -2),
            cat=lambda xs: torch.cat(xs, dim=-1),
            zeros=lambda s, like: torch.zeros(s, dtype=like.dtype, device=like.device),
            matmul=torch.matmul,
        )
    if name.startswith("jax"):
        import jax.numpy as jnp

        return SimpleNamespace(
            rfft=lambda x, n, axis: jnp.fft.rfft(x, n=n, axis=axis),
            irfft=lambda x, n, axis: jnp.fft.irfft(x, n=n, axis=axis),
            swap=lambda x: jnp.swapaxes(x, -1, -2),
            cat=lambda xs: jnp.concatenate(xs, axis=-1),
            zeros=lambda s, like: jnp.zeros(s, dtype=like.dtype),
            matmul=jnp.matmul,
        )
    if name == "cupy":
        import cupy

        return SimpleNamespace(
            rfft=lambda x, n, axis: cupy.fft.rfft(x, n=n, axis=axis),
            irfft=lambda x, n, axis: cupy.fft.irfft(x, n=n, axis=axis),
            swap=lambda x: cupy.swapaxes(x, -1, -2),
            cat=lambda xs: cupy.concatenate(xs, axis=-1),
            zeros=lambda s, like: cupy.zeros(s, dtype=like.dtype),
            matmul=cupy.matmul,
        )
    raise ValueError(name)


# ------------------------------------------------------------------------- FastRPB
def rpb_paper(bench: Any):
    """The paper's reference algorithm: FFTs of length exactly ``2L - 1``.

    The table ``w: (H, 2L - 1)`` holds offsets ``-(L-1) .. L-1``; its circular
    convolution with ``v`` along the sequence axis (axis -2 of ``(B, H, L, D)``, the
    layout the values come in) of length ``2L - 1`` gives the Toeplitz product in
    rows ``L - 1 .. 2L - 2``. ``2L - 1`` is often a prime (8191, 131071) or has
    large prime factors, where FFTs are several times slower.
    """
    f = fft_module(bench)

    def paper(v: Any, w: Any) -> Any:
        L = v.shape[-2]
        N = 2 * L - 1
        v_f = f.rfft(v, N, -2)
        w_f = f.rfft(w, N, -1)
        return f.irfft(v_f * w_f[..., :, None], N, -2)[..., L - 1 :, :]

    return paper


def rpb_native(bench: Any):
    """The library's algorithm written directly in the framework, no dispatch layer.

    Fast 5-smooth length ``n >= 2L - 1``, kernel laid out circularly, FFTs along the
    last axis of the transposed values; no blocking.
    """
    f = fft_module(bench)

    def native(v: Any, w: Any) -> Any:
        L = v.shape[-2]
        M = (w.shape[-1] + 1) // 2
        n = next_fast_len(2 * L - 1)
        kernel = f.cat([w[..., M - 1 : M - 1 + L], f.zeros((*w.shape[:-1], n - 2 * L + 1), w), w[..., M - L : M - 1]])
        k_f = f.rfft(kernel, n, -1)[..., None, :]
        out = f.irfft(f.rfft(f.swap(v), n, -1) * k_f, n, -1)[..., :L]
        return f.swap(out)

    return native


def rpb_floor(bench: Any):
    """The floor: one forward and one inverse real FFT of the values at length ``n``.

    In the layout the transform is fastest in (sequence on the last axis), with no
    kernel, no product and no slicing: nothing an implementation could skip.
    """
    f = fft_module(bench)

    def floor(v: Any) -> Any:
        n = next_fast_len(2 * v.shape[-2] - 1)
        return f.irfft(f.rfft(f.swap(v), n, -1), n, -1)

    return floor


# ------------------------------------------------------------------ linear attention
def _elu1(bench: Any):
    """``elu(x) + 1`` with the framework's own fused kernel where it has one."""
    if bench.name == "numpy":
        import numpy as np

        def elu1(x: Any) -> Any:  # exp(min(x, 0)) + max(x, 0): four passes, two in place
            out = np.minimum(x, 0)
            np.exp(out, out=out)
            out += np.maximum(x, 0)
            return out

        return elu1
    if bench.name.startswith("torch"):
        import torch

        return lambda x: torch.nn.functional.elu(x).add_(1.0)
    if bench.name.startswith("jax"):
        import jax

        return lambda x: jax.nn.elu(x) + 1.0
    import cupy

    return cupy.ElementwiseKernel("T x", "T y", "y = x > 0 ? x + 1 : exp(x)", "fastrpb_bench_elu1")


def attention_native(bench: Any, eps: float = 1e-6):
    """Non-causal ELU+1 linear attention by hand: ``phi(Q) (phi(K)^T V) / (phi(Q) sum phi(K))``.

    The normaliser is a matrix-vector product. The alternative, a ones column on
    ``V`` riding along in the same matmul, costs a copy of ``V`` and an odd-width
    product; measured single-threaded on the 2-core box (L = 1,024 .. 16,384) it was
    never faster on PyTorch or NumPy, so the best of the two is this one.
    """
    elu1 = _elu1(bench)
    f = fft_module(bench)
    total = _sum_rows(bench)

    def native(q: Any, k: Any, v: Any) -> Any:
        fq, fk = elu1(q), elu1(k)
        num = f.matmul(fq, f.matmul(f.swap(fk), v))
        den = f.matmul(fq, f.swap(total(fk)))
        return num / (den + eps)

    return native


def _sum_rows(bench: Any):
    """``sum(x, axis=-2, keepdims=True)`` natively."""
    if bench.name.startswith("torch"):
        import torch

        return lambda x: torch.sum(x, dim=-2, keepdim=True)
    mod = {"numpy": "numpy", "cupy": "cupy"}.get(bench.name, "jax.numpy")
    import importlib

    lib = importlib.import_module(mod)
    return lambda x: lib.sum(x, axis=-2, keepdims=True)


def _ones(bench: Any):
    if bench.name == "numpy":
        import numpy as np

        return lambda s, like: np.ones(s, dtype=like.dtype)
    if bench.name.startswith("torch"):
        import torch

        return lambda s, like: torch.ones(s, dtype=like.dtype, device=like.device)
    if bench.name.startswith("jax"):
        import jax.numpy as jnp

        return lambda s, like: jnp.ones(s, dtype=like.dtype)
    import cupy

    return lambda s, like: cupy.ones(s, dtype=like.dtype)


def matmul_roofline(bench: Any):
    """The two bare matmuls of non-causal linear attention, ``K^T V`` then ``Q (K^T V)``."""
    f = fft_module(bench)
    return lambda q, k, v: f.matmul(q, f.matmul(f.swap(k), v))


def causal_naive(bench: Any, eps: float = 1e-6):
    """Causal linear attention by a per-token cumulative sum of outer products.

    ``S_i = sum_{j <= i} phi(k_j) v_j^T`` materialised for every token: O(L F Dv)
    memory. Heads are processed one at a time to keep the largest buffer at
    ``L F Dv`` numbers (the cost per head is the same).
    """
    elu1 = _elu1(bench)
    name = bench.name
    if name == "numpy":
        import numpy as np

        def one(fq, fk, v):
            S = fk[:, :, None] * v[:, None, :]
            np.cumsum(S, axis=0, out=S)
            num = np.einsum("lf,lfd->ld", fq, S)
            den = np.sum(fq * np.cumsum(fk, axis=0), axis=-1, keepdims=True)
            return num / (den + eps)

        stack = lambda xs: np.stack(xs)  # noqa: E731
    elif name.startswith("torch"):
        import torch

        def one(fq, fk, v):
            S = fk[:, :, None] * v[:, None, :]
            S = torch.cumsum(S, dim=0, out=S)
            num = torch.einsum("lf,lfd->ld", fq, S)
            den = torch.sum(fq * torch.cumsum(fk, dim=0), dim=-1, keepdim=True)
            return num / (den + eps)

        stack = torch.stack
    elif name.startswith("jax"):
        import jax.numpy as jnp

        def one(fq, fk, v):
            S = jnp.cumsum(fk[:, :, None] * v[:, None, :], axis=0)
            num = jnp.einsum("lf,lfd->ld", fq, S)
            den = jnp.sum(fq * jnp.cumsum(fk, axis=0), axis=-1, keepdims=True)
            return num / (den + eps)

        stack = jnp.stack
    else:
        import cupy

        def one(fq, fk, v):
            S = cupy.cumsum(fk[:, :, None] * v[:, None, :], axis=0)
            num = cupy.einsum("lf,lfd->ld", fq, S)
            den = cupy.sum(fq * cupy.cumsum(fk, axis=0), axis=-1, keepdims=True)
            return num / (den + eps)

        stack = cupy.stack

    def naive(q: Any, k: Any, v: Any) -> Any:
        B, H = q.shape[0], q.shape[1]
        fq, fk = elu1(q), elu1(k)
        rows = [stack([one(fq[b, h], fk[b, h], v[b, h]) for h in range(H)]) for b in range(B)]
        return stack(rows)

    return naive


def causal_chunked(bench: Any, chunk: int = 64, eps: float = 1e-6):
    """The library's chunked causal algorithm written directly in the framework.

    Inside each chunk ``tril(Qc Kc^T) [Vc, 1]``; across chunks an exclusive prefix sum
    of the chunk states ``Kc^T [Vc, 1]``. ``L`` must be a multiple of ``chunk`` here.
    """
    elu1 = _elu1(bench)
    f = fft_module(bench)
    ones = _ones(bench)
    name = bench.name
    if name == "numpy":
        import numpy as np

        tril, cumsum, zeros_like = np.tril, (lambda x: np.cumsum(x, axis=-3)), np.zeros_like
        cat3 = lambda xs: np.concatenate(xs, axis=-3)  # noqa: E731
    elif name.startswith("torch"):
        import torch

        tril, cumsum, zeros_like = torch.tril, (lambda x: torch.cumsum(x, dim=-3)), torch.zeros_like
        cat3 = lambda xs: torch.cat(xs, dim=-3)  # noqa: E731
    elif name.startswith("jax"):
        import jax.numpy as jnp

        tril, cumsum, zeros_like = jnp.tril, (lambda x: jnp.cumsum(x, axis=-3)), jnp.zeros_like
        cat3 = lambda xs: jnp.concatenate(xs, axis=-3)  # noqa: E731
    else:
        import cupy

        tril, cumsum, zeros_like = cupy.tril, (lambda x: cupy.cumsum(x, axis=-3)), cupy.zeros_like
        cat3 = lambda xs: cupy.concatenate(xs, axis=-3)  # noqa: E731

    def chunked(q: Any, k: Any, v: Any) -> Any:
        *lead, L, D = q.shape
        C = min(chunk, L)
        N = L // C
        v1 = f.cat([v, ones((*v.shape[:-1], 1), v)])
        qc = elu1(q).reshape(*lead, N, C, D)
        kc = elu1(k).reshape(*lead, N, C, D)
        vc = v1.reshape(*lead, N, C, v1.shape[-1])
        y = f.matmul(tril(f.matmul(qc, f.swap(kc))), vc)
        states = f.matmul(f.swap(kc), vc)
        prefix = cumsum(states)
        before = cat3([zeros_like(states[..., :1, :, :]), prefix[..., :-1, :, :]])
        y = (y + f.matmul(qc, before)).reshape(*lead, L, v1.shape[-1])
        return y[..., :-1] / (y[..., -1:] + eps)

    return chunked


def softmax_native(bench: Any):
    """The framework's own exact causal softmax attention, or ``None`` if it has none.

    PyTorch: ``scaled_dot_product_attention(is_causal=True)`` on ``(B, H, L, D)``.
    JAX: ``jax.nn.dot_product_attention(is_causal=True)``, which wants ``(B, L, H, D)``:
    the transposes are done once outside the timed call.
    """
    if bench.name.startswith("torch"):
        import torch

        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    if bench.name.startswith("jax"):
        import jax

        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return None


def step_native(bench: Any, eps: float = 1e-6):
    """One decoding step by hand, functional like the library's (the state is not mutated)."""
    elu1 = _elu1(bench)
    f = fft_module(bench)
    if bench.name == "numpy":
        import numpy as np

        total = lambda x: np.sum(x, axis=-1, keepdims=True)  # noqa: E731
    elif bench.name.startswith("torch"):
        import torch

        total = lambda x: torch.sum(x, dim=-1, keepdim=True)  # noqa: E731
    elif bench.name.startswith("jax"):
        import jax.numpy as jnp

        total = lambda x: jnp.sum(x, axis=-1, keepdims=True)  # noqa: E731
    else:
        import cupy

        total = lambda x: cupy.sum(x, axis=-1, keepdims=True)  # noqa: E731

    def step(S: Any, z: Any, q: Any, k: Any, v: Any) -> tuple[Any, Any, Any]:
        fq, fk = elu1(q), elu1(k)
        S = S + fk[..., :, None] * v[..., None, :]
        z = z + fk
        num = f.matmul(fq[..., None, :], S)[..., 0, :]
        return num / (total(fq * z) + eps), S, z

    return step
