"""Real FFTs: the standard's FFT extension, SciPy's faster pocketfft for NumPy, and
JAX's FFTs partitioned over the leading axes (XLA cannot partition them itself).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .dispatch import _compiling, _dask_whole, _is

__all__ = ["fft_namespace", "next_fast_len", "rfft", "irfft", "rfftn", "irfftn", "blocks_allowed"]


def fft_namespace(xp: Any) -> Any:
    """The FFT extension of ``xp``; it is optional in the standard, so say so if missing."""
    fft = getattr(xp, "fft", None)
    if fft is None:
        raise TypeError(
            f"the array library {getattr(xp, '__name__', xp)!r} does not provide the array "
            "API FFT extension, which FastRPB needs (for array-api-strict, enable the "
            "'fft' extension)"
        )
    return fft


def next_fast_len(n: int) -> int:
    """The smallest 5-smooth integer (2^a 3^b 5^c) that is ``>= n``.

    The standard has no ``next_fast_len``; every FFT library is fastest on
    5-smooth sizes and slow on sizes with large prime factors (2L - 1 = 1567 is
    prime for L = 784). Native path: ``scipy.fft.next_fast_len(n, real=True)`` when
    SciPy is installed (the same values; 0.17 us a call against 14 us for n = 1567
    and 50 us for n = 2^20 + 1 in pure Python, measured 2026-11-30).
    """
    known = _FAST_LENGTHS.get(n)
    if known is not None:
        return known
    scipy_fft = None if _compiling() else _scipy_fft()
    # (inside torch.compile SciPy's C function cannot be traced: the portable version,
    # which gives the same values)
    best = (
        int(scipy_fft.next_fast_len(max(int(n), 1), real=True)) if scipy_fft is not None else _next_fast_len_portable(n)
    )
    if len(_FAST_LENGTHS) < 4096:
        _FAST_LENGTHS[n] = best
    return best


# n -> next_fast_len(n): a dict lookup is cheaper than either computation
_FAST_LENGTHS: dict[int, int] = {}


def _next_fast_len_portable(n: int) -> int:
    """``next_fast_len`` in pure Python: the candidates are few (O(log^3 n))."""
    if n <= 1:
        return 1
    best = 2 ** math.ceil(math.log2(n))
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            # smallest power of two lifting p35 to >= n
            quotient = -(-n // p35)
            candidate = p35 * (1 << max(0, (quotient - 1).bit_length()))
            best = min(best, candidate)
            p35 *= 3
        p5 *= 5
    return best


# NumPy's own FFT (numpy.fft, pocketfft behind a thin wrapper) runs single-threaded
# and, on the sizes FastRPB uses, 1.5-4x slower than SciPy's pocketfft build with
# ``workers``. SciPy is optional (imported on first use, not at import time):
# without it NumPy arrays use ``xp.fft``.
_SCIPY_FFT: list[Any] = []


def _scipy_fft() -> Any:
    """``scipy.fft`` if SciPy is installed (imported once, on first use), else ``None``."""
    if not _SCIPY_FFT:
        try:
            import scipy.fft as scipy_fft
        except ImportError:  # pragma: no cover - depends on the environment
            scipy_fft = None
        _SCIPY_FFT.append(scipy_fft)
    return _SCIPY_FFT[0]


def _scipy_fft_for(xp: Any, x: Any) -> Any:
    """``scipy.fft`` when ``x`` is a NumPy array and SciPy is installed, else ``None``."""
    if not (_is(xp, "numpy") and isinstance(x, np.ndarray)):
        return None
    return _scipy_fft()


def rfft(xp: Any, x: Any, *, n: int, axis: int = -1) -> Any:
    """Real FFT of length ``n`` along ``axis`` (zero-padded), in ``x``'s namespace.

    Native fast path: NumPy arrays go to ``scipy.fft`` with all CPU workers (see
    above); every other library uses its array API FFT extension.
    """
    x = _dask_whole(xp, x, axis)
    scipy_fft = _scipy_fft_for(xp, x)
    if scipy_fft is not None:
        return scipy_fft.rfft(x, n=n, axis=axis, workers=-1)
    if _jax_partitioned(xp, x) and axis in (-1, x.ndim - 1):
        return _jax_fft("rfft", (n,), x)
    return fft_namespace(xp).rfft(x, n=n, axis=axis)


def irfft(xp: Any, x: Any, *, n: int, axis: int = -1, consume: bool = False) -> Any:
    """Inverse real FFT of length ``n`` along ``axis``.

    ``consume=True`` says the caller owns ``x`` and never reads it again, so the
    native path may overwrite it (SciPy's ``overwrite_x``: one copy fewer, which
    matters for the O(L) memory bound of FastRPB).
    """
    x = _dask_whole(xp, x, axis)
    scipy_fft = _scipy_fft_for(xp, x)
    if scipy_fft is not None:
        return scipy_fft.irfft(x, n=n, axis=axis, workers=-1, overwrite_x=consume)
    if _jax_partitioned(xp, x) and axis in (-1, x.ndim - 1):
        return _jax_fft("irfft", (n,), x)
    return fft_namespace(xp).irfft(x, n=n, axis=axis)


def rfftn(xp: Any, x: Any, *, s: tuple[int, ...], axes: tuple[int, ...]) -> Any:
    """N-d real FFT of sizes ``s`` over ``axes`` (zero-padded), in ``x``'s namespace.

    Same native fast path as ``rfft``: NumPy arrays go to ``scipy.fft`` with all CPU
    workers; every other library uses its array API FFT extension.
    """
    x = _dask_whole(xp, x, axes)
    scipy_fft = _scipy_fft_for(xp, x)
    if scipy_fft is not None:
        return scipy_fft.rfftn(x, s=s, axes=axes, workers=-1)
    if _jax_partitioned(xp, x) and _trailing(axes, x.ndim):
        return _jax_fft("rfftn", tuple(s), x)
    return fft_namespace(xp).rfftn(x, s=s, axes=axes)


def irfftn(xp: Any, x: Any, *, s: tuple[int, ...], axes: tuple[int, ...], consume: bool = False) -> Any:
    """Inverse N-d real FFT of sizes ``s`` over ``axes``; ``consume`` as in ``irfft``."""
    x = _dask_whole(xp, x, axes)
    scipy_fft = _scipy_fft_for(xp, x)
    if scipy_fft is not None:
        return scipy_fft.irfftn(x, s=s, axes=axes, workers=-1, overwrite_x=consume)
    if _jax_partitioned(xp, x) and _trailing(axes, x.ndim):
        return _jax_fft("irfftn", tuple(s), x)
    return fft_namespace(xp).irfftn(x, s=s, axes=axes)


# JAX: FFTs that XLA cannot partition.
# XLA's SPMD partitioner does not partition FFTs (jax#15680): under ``jax.jit`` with
# values sharded over a leading axis (batch, heads) it all-gathers the whole array
# onto every device and transforms every example everywhere (measured: an
# ``all-gather f32[8,4,32,512]`` for values sharded over a batch of 8), and with the
# heads axis sharded the gathered, transposed layout reaches the CPU FFT thunk, which
# aborts at run time (``RET_CHECK ... fft_thunk.cc:168 IsMonotonicWithDim0Major``).
# But fastrpb's FFTs transform only trailing axes, independently for every leading
# index, so each device can transform its own shard: ``custom_partitioning`` tells the
# partitioner exactly that (leading axes keep their sharding, the transformed axes are
# replicated). The primitive has no autodiff or batching rules, so it is wrapped in a
# ``custom_vjp`` (an FFT is linear: its VJP is the linear transpose, partitioned the
# same way) and a ``custom_vmap`` (a vmapped axis is one more leading axis).
# ``custom_partitioning`` lowers to the plain FFT on one device or inside
# ``shard_map``; it is used only when JAX has more than one device or ``x`` is
# spread over several, so single-device programs are unchanged. (Forward-mode
# autodiff, ``jax.jvp``/``jacfwd``, of the FFT then is unavailable, as for any
# ``custom_vjp``.)


def _jax_partitioned(xp: Any, x: Any) -> bool:
    """Whether a JAX FFT of ``x`` should go through the leading-axis partitioning."""
    if not _is(xp, "jax"):
        return False
    import jax  # already imported: xp is jax.numpy

    if _JAX_DEVICES[0] is None:
        _JAX_DEVICES[0] = jax.device_count()
    if _JAX_DEVICES[0] <= 1:
        return False
    # inside jax.shard_map every array is already one device's block: the plain FFT
    # (the partitioned one's transpose would also clash with shard_map's varying types)
    mesh = jax.sharding.get_abstract_mesh()
    return not getattr(mesh, "manual_axes", ())


_JAX_DEVICES: list[Any] = [None]


def blocks_allowed(xp: Any, x: Any) -> bool:
    """Whether a long FFT product may go in blocks of leading indices (``bias._toeplitz``).

    Blocking merges the leading axes into one and slices it, which bounds eager
    memory. With JAX on several devices the FFTs are partitioned over the leading
    axes instead (above), and slices of merged leading axes cut across the shards:
    XLA gathered them (17 MB per device for causal FastRPB on (8, 8, 1,024, 64)
    float32 values sharded over a batch of 8 on 2 devices). There XLA plans the
    memory of the whole program anyway, so the product runs unblocked.
    """
    return not _jax_partitioned(xp, x)


def _trailing(axes: Any, ndim: int) -> bool:
    """``axes`` are the last ``len(axes)`` axes, in order."""
    k = len(axes)
    return [a % ndim for a in axes] == list(range(ndim - k, ndim))


def _jax_fft(kind: str, sizes: tuple[int, ...], x: Any) -> Any:
    """``jnp.fft.<kind>`` over the last ``len(sizes)`` axes, partitioned over the leading ones."""
    key = (kind, sizes, tuple(x.shape[x.ndim - len(sizes) :]), str(x.dtype))
    f = _JAX_FFTS.get(key)
    if f is None:
        f = _JAX_FFTS.setdefault(key, _jax_partitioned_fft(kind, sizes, key[2], x.dtype))
    return f(x)


# (kind, sizes, the input's trailing shape, its dtype) -> the partitioned transform
_JAX_FFTS: dict[tuple, Any] = {}


def _jax_partitioned_fft(kind: str, sizes: tuple[int, ...], trailing: tuple[int, ...], dtype: Any) -> Any:
    import jax
    import jax.numpy as jnp

    k = len(sizes)
    axes = tuple(range(-k, 0))
    transform = getattr(jnp.fft, kind)

    def forward(x: Any) -> Any:
        if k == 1:
            return transform(x, n=sizes[0], axis=-1)
        return transform(x, s=sizes, axes=axes)

    def backward(ct: Any) -> Any:
        # an FFT is linear: its VJP is its linear transpose, for the input's shape
        (out,) = jax.linear_transpose(forward, jax.ShapeDtypeStruct((*ct.shape[:-k], *trailing), dtype))(ct)
        return out

    fwd_local = _leading_partitioned(forward, k)
    bwd_local = _leading_partitioned(backward, k)

    @jax.custom_vjp
    def fft(x: Any) -> Any:
        return fwd_local(x)

    def fft_fwd(x: Any) -> tuple[Any, None]:
        return fwd_local(x), None

    def fft_bwd(_: None, ct: Any) -> tuple[Any]:
        return (bwd_local(ct),)

    fft.defvjp(fft_fwd, fft_bwd)
    return fft


def _leading_partitioned(local: Any, k: int) -> Any:
    """``local`` (independent over all but the last ``k`` axes) as a partitioned JAX op.

    The leading axes keep the input's sharding; the last ``k`` axes are replicated
    (gathered, if the caller sharded them, before ``local`` runs on each shard).
    """
    import jax
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as Spec

    op = custom_partitioning(local)

    def lead_sharding(mesh: Any, sharding: Any, ndim: int) -> Any:
        spec = tuple(getattr(sharding, "spec", ())) + (None,) * ndim
        return NamedSharding(mesh, Spec(*spec[: ndim - k], *([None] * k)))

    def infer(mesh: Any, arg_shapes: Any, result_shape: Any) -> Any:
        return lead_sharding(mesh, arg_shapes[0].sharding, len(arg_shapes[0].shape))

    def partition(mesh: Any, arg_shapes: Any, result_shape: Any) -> Any:
        sharding = lead_sharding(mesh, arg_shapes[0].sharding, len(arg_shapes[0].shape))
        return mesh, local, sharding, (sharding,)

    ins = " ".join(f"i{j}" for j in range(k))
    outs = " ".join(f"o{j}" for j in range(k))
    factors = tuple(f"i{j}" for j in range(k)) + tuple(f"o{j}" for j in range(k))
    op.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=f"... {ins} -> ... {outs}",
        need_replication_factors=factors,
    )

    @jax.custom_batching.custom_vmap
    def apply(x: Any) -> Any:
        return op(x)

    @apply.def_vmap
    def _batched(axis_size: int, in_batched: Any, x: Any) -> Any:
        # the vmapped axis is one more leading axis (custom_vmap puts it first)
        return apply(x), True

    return apply
