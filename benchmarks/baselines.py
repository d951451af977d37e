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
    """The framework's own operations the baselines are written in, one namespace per library.

    ``rfft(x, n, axis)`` / ``irfft(x, n, axis)``, ``swap`` (last two axes), ``cat`` (last
    axis), ``cat3`` (axis -3), ``zeros``/``ones(shape, like)``, ``zeros_like``, ``matmul``,
    ``einsum``, ``stack``, ``tril``, ``sum(x, axis)`` (keeping the axis), ``cumsum(x, axis)``
    and ``cumsum_(x, axis)``: in place where the library can (NumPy, PyTorch), which keeps
    the naive causal reference's largest buffer single.
    """
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
            rfft=rfft,
            irfft=irfft,
            swap=lambda x: np.swapaxes(x, -1, -2),
            cat=lambda xs: np.concatenate(xs, axis=-1),
            cat3=lambda xs: np.concatenate(xs, axis=-3),
            zeros=lambda s, like: np.zeros(s, dtype=like.dtype),
            ones=lambda s, like: np.ones(s, dtype=like.dtype),
            zeros_like=np.zeros_like,
            matmul=np.matmul,
            einsum=np.einsum,
            stack=np.stack,
            tril=np.tril,
            sum=lambda x, axis: np.sum(x, axis=axis, keepdims=True),
            cumsum=lambda x, axis: np.cumsum(x, axis=axis),
            cumsum_=lambda x, axis: np.cumsum(x, axis=axis, out=x),
        )
    if name.startswith("torch"):
        import torch

        return SimpleNamespace(
            rfft=lambda x, n, axis: torch.fft.rfft(x, n=n, dim=axis),
            irfft=lambda x, n, axis: torch.fft.irfft(x, n=n, dim=axis),
            swap=lambda x: x.transpose(-1, -2),
            cat=lambda xs: torch.cat(xs, dim=-1),
            cat3=lambda xs: torch.cat(xs, dim=-3),
            zeros=lambda s, like: torch.zeros(s, dtype=like.dtype, device=like.device),
            ones=lambda s, like: torch.ones(s, dtype=like.dtype, device=like.device),
            zeros_like=torch.zeros_like,
            matmul=torch.matmul,
            einsum=torch.einsum,
            stack=torch.stack,
            tril=torch.tril,
            sum=lambda x, axis: torch.sum(x, dim=axis, keepdim=True),
            cumsum=lambda x, axis: torch.cumsum(x, dim=axis),
            cumsum_=lambda x, axis: torch.cumsum(x, dim=axis, out=x),
        )
    if name.startswith("jax") or name == "cupy":
        if name == "cupy":
            import cupy as lib
        else:
            import jax.numpy as lib
        # JAX arrays are immutable, and CuPy's cumsum has no out=: both functional
        return SimpleNamespace(
            rfft=lambda x, n, axis: lib.fft.rfft(x, n=n, axis=axis),
            irfft=lambda x, n, axis: lib.fft.irfft(x, n=n, axis=axis),
            swap=lambda x: lib.swapaxes(x, -1, -2),
            cat=lambda xs: lib.concatenate(xs, axis=-1),
            cat3=lambda xs: lib.concatenate(xs, axis=-3),
            zeros=lambda s, like: lib.zeros(s, dtype=like.dtype),
            ones=lambda s, like: lib.ones(s, dtype=like.dtype),
            zeros_like=lib.zeros_like,
            matmul=lib.matmul,
            einsum=lib.einsum,
            stack=lib.stack,
            tril=lib.tril,
            sum=lambda x, axis: lib.sum(x, axis=axis, keepdims=True),
            cumsum=lambda x, axis: lib.cumsum(x, axis=axis),
            cumsum_=lambda x, axis: lib.cumsum(x, axis=axis),
        )
    raise ValueError(f"no native baselines for backend {name!r}")


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

    def native(q: Any, k: Any, v: Any) -> Any:
        fq, fk = elu1(q), elu1(k)
        num = f.matmul(fq, f.matmul(f.swap(fk), v))
        den = f.matmul(fq, f.swap(f.sum(fk, -2)))
        return num / (den + eps)

    return native


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
    f = fft_module(bench)

    def one(fq: Any, fk: Any, v: Any) -> Any:
        S = f.cumsum_(fk[:, :, None] * v[:, None, :], 0)
        num = f.einsum("lf,lfd->ld", fq, S)
        den = f.sum(fq * f.cumsum(fk, 0), -1)
        return num / (den + eps)

    def naive(q: Any, k: Any, v: Any) -> Any:
        B, H = q.shape[0], q.shape[1]
        fq, fk = elu1(q), elu1(k)
        rows = [f.stack([one(fq[b, h], fk[b, h], v[b, h]) for h in range(H)]) for b in range(B)]
        return f.stack(rows)

    return naive


def causal_chunked(bench: Any, chunk: int = 64, eps: float = 1e-6):
    """The library's chunked causal algorithm written directly in the framework.

    Inside each chunk ``tril(Qc Kc^T) [Vc, 1]``; across chunks an exclusive prefix sum
    of the chunk states ``Kc^T [Vc, 1]``. ``L`` must be a multiple of ``chunk`` here.
    """
    elu1 = _elu1(bench)
    f = fft_module(bench)

    def chunked(q: Any, k: Any, v: Any) -> Any:
        *lead, L, D = q.shape
        C = min(chunk, L)
        N = L // C
        v1 = f.cat([v, f.ones((*v.shape[:-1], 1), v)])
        qc = elu1(q).reshape(*lead, N, C, D)
        kc = elu1(k).reshape(*lead, N, C, D)
        vc = v1.reshape(*lead, N, C, v1.shape[-1])
        y = f.matmul(f.tril(f.matmul(qc, f.swap(kc))), vc)
        states = f.matmul(f.swap(kc), vc)
        prefix = f.cumsum(states, -3)
        before = f.cat3([f.zeros_like(states[..., :1, :, :]), prefix[..., :-1, :, :]])
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

    def step(S: Any, z: Any, q: Any, k: Any, v: Any) -> tuple[Any, Any, Any]:
        fq, fk = elu1(q), elu1(k)
        S = S + fk[..., :, None] * v[..., None, :]
        z = z + fk
        num = f.matmul(fq[..., None, :], S)[..., 0, :]
        return num / (f.sum(fq * z, -1) + eps), S, z

    return step
