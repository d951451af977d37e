"""Where fastrpb meets array libraries: namespace dispatch, gaps of the standard, fast paths.

Every public function resolves its array namespace here, once (``namespace``), and
passes ``xp`` down to private helpers. The namespace must implement the array API
standard **2023.12 or newer** (``moveaxis``, ``cumulative_sum``, ``isdtype`` with
``include_initial``/keyword forms that 2022.12 lacks): a library reporting an older
``__array_api_version__`` is a ``TypeError`` when its namespace is first resolved.

This module is also the single home of what the standard does not give us, written
as array-api-extra's ``_delegation`` does: each helper holds the portable version
(pure standard) and, beside it, the native fast path of a library where one was
measured faster, with the measurement in a comment. Where array-api-extra does the
job (``xpx.pad``) it is used. No argument checks live here (``fastrpb._validate``),
and no random numbers (``fastrpb._random``). No other module imports a framework or
branches on one.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable
from typing import Any

import array_api_compat
import array_api_extra as xpx
import numpy as np

# Re-exported for ``fastrpb.torch``/``fastrpb.flax``, which import these names from
# here; the rules themselves live in ``fastrpb._validate``.
from ._validate import check_floating, grid_arg, int_arg, skip_arg  # noqa: F401

__all__ = [
    "MIN_API_VERSION",
    "namespace",
    "device_of",
    "compute_dtype",
    "fft_namespace",
    "next_fast_len",
    "rfft",
    "irfft",
    "elu_plus_one",
    "softmax",
    "multiply_into",
    "add_into",
    "tril_into",
    "multiply_add_into",
    "multiply_add",
    "known_finite",
    "on_finite",
    "split_nonfinite",
    "cumulative_sum",
    "cumulative_max",
    "exclusive_sum",
    "wider_float",
    "shift",
    "pad_axis",
    "pad_chunks",
    "jax_pytree",
    "is_traced",
    "is_lazy",
    "count_array",
    "blocks_allowed",
    "rescaled_scan",
]

#: The oldest array API standard fastrpb runs on (``moveaxis``, ``cumulative_sum``
#: and the 2023.12 ``isdtype`` kinds are used; 2022.12 namespaces fail).
MIN_API_VERSION = "2023.12"


def namespace(**arrays: Any) -> Any:
    """Resolve the array namespace of named inputs (``None`` values are ignored).

    Every value must be an array of a library the array API knows; all must come
    from one library and live on one device. Errors name the offending argument.
    """
    given = {name: x for name, x in arrays.items() if x is not None}
    kinds = {type(x) for x in given.values()}
    if len(kinds) == 1:
        # Fast path, called once per public call (a decoding step is a few microseconds
        # of arithmetic): the namespace of one array type is always the same, and
        # NumPy arrays all live on the CPU.
        kind = kinds.pop()
        xp = _NAMESPACES.get(kind)
        if xp is not None:
            if kind is np.ndarray:
                return xp
            if _is(xp, "torch"):
                # a tensor's device is an attribute; array_api_compat.device() runs a
                # chain of type checks first
                first = next(iter(given.values())).device
                if any(x.device != first for x in given.values()):
                    _check_devices(given)  # raises, naming the arguments
                return xp
            _check_devices(given)
            return xp
    if given:
        # PyTorch tensors of several types (a Parameter beside a Tensor) or a type not
        # seen yet: no array_api_compat dispatch (see _KINDS)
        spaces = [_direct_namespace(x) for x in given.values()]
        if spaces[0] is not None and all(xp is spaces[0] for xp in spaces):
            _check_devices(given)
            if len({type(x) for x in given.values()}) == 1:
                _NAMESPACES[type(next(iter(given.values())))] = spaces[0]
            return spaces[0]
    for name, x in given.items():
        if not array_api_compat.is_array_api_obj(x) or isinstance(x, (bool, int, float, complex)):
            raise TypeError(
                f"{name} must be an array (NumPy, CuPy, PyTorch, JAX or any array API "
                f"library), got {type(x).__name__}"
            )
    try:
        xp = array_api_compat.array_namespace(*given.values())
    except TypeError as exc:
        kinds_text = ", ".join(f"{n}: {type(x).__module__}.{type(x).__name__}" for n, x in given.items())
        raise TypeError(f"all arrays must come from one array library, got {kinds_text}") from exc
    _check_version(xp)
    _check_devices(given)
    if _is(xp, "jax"):
        register_pytrees()  # before any state of ours can meet jax.jit
    if len({type(x) for x in given.values()}) == 1:
        _NAMESPACES[type(next(iter(given.values())))] = xp
    return xp


# array type -> namespace, filled by ``namespace`` once a type has been resolved
_NAMESPACES: dict[type, Any] = {}

# The library behind a namespace, by the namespace's module name (as array_api_compat's
# ``is_*_namespace`` tell them). Not array_api_compat's own functions: they go through
# ``functools.lru_cache``d helpers, and every such call inside ``torch.compile`` makes
# Dynamo warn ("Dynamo detected a call to a functools.lru_cache-wrapped function"),
# several times per public call; a string compare traces cleanly.
_KINDS = {
    "numpy": ("numpy", "array_api_compat.numpy"),
    "torch": ("torch", "array_api_compat.torch"),
    "jax": ("jax.numpy", "jax.experimental.array_api"),
    "dask": ("dask.array", "array_api_compat.dask.array"),
}


def _is(xp: Any, kind: str) -> bool:
    """Whether the namespace ``xp`` is that of the library ``kind`` (see ``_KINDS``)."""
    return getattr(xp, "__name__", None) in _KINDS[kind]


def _direct_namespace(x: Any) -> Any:
    """The namespace of a PyTorch tensor without array_api_compat's ``lru_cache``d
    dispatch (for the first call inside ``torch.compile``); ``None`` otherwise."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        import array_api_compat.torch as compat_torch  # torch is imported: x is a tensor

        return compat_torch
    return None


def _check_version(xp: Any) -> None:
    """Reject a namespace older than ``MIN_API_VERSION`` (checked once per array type)."""
    reported = getattr(xp, "__array_api_version__", None)
    if reported is None:  # not declared: nothing to judge by
        return
    try:
        version = tuple(int(part) for part in str(reported).split("."))
    except ValueError:
        return
    if version < tuple(int(part) for part in MIN_API_VERSION.split(".")):
        raise TypeError(
            f"fastrpb needs an array API namespace of version {MIN_API_VERSION} or newer, but "
            f"{getattr(xp, '__name__', xp)!r} reports __array_api_version__ = {reported!r}"
            + (
                " (array-api-strict: set_array_api_strict_flags(api_version='2023.12') or newer)"
                if "array_api_strict" in str(getattr(xp, "__name__", ""))
                else ""
            )
        )


def _check_devices(given: dict[str, Any]) -> None:
    devices = {name: _placement(x) for name, x in given.items()}
    # Under jax.jit the device of a tracer is unknown (None); there is nothing to compare.
    known = {name: d for name, d in devices.items() if d is not None}
    first = next(iter(known.items()), None)
    if first is not None:
        for name, d in known.items():
            if d != first[1]:
                raise ValueError(
                    f"all arrays must be on one device: {first[0]} is on {first[1]!r} "
                    f"but {name} is on {d!r}"
                )


def device_of(x: Any) -> Any:
    """The device on which to create arrays beside ``x`` (``None``: the library decides).

    ``None`` for a JAX tracer inside ``jit`` and for a JAX array spread over several
    devices: array_api_compat gives its ``Sharding`` there, which
    ``jnp.zeros(shape, device=sharding)`` cannot take for another rank (an
    ``IndexError``); an array created without a device is uncommitted and JAX
    places it beside the sharded operands of the next operation.
    """
    if isinstance(x, np.ndarray):
        return "cpu"  # as array_api_compat.device says
    if _direct_namespace(x) is not None:
        return x.device  # a tensor's own attribute (no lru_cache'd dispatch, see _KINDS)
    d = array_api_compat.device(x)
    if d is not None and hasattr(d, "device_set") and len(d.device_set) > 1:
        return None
    return d


def _placement(x: Any) -> Any:
    """What must agree between arrays for them to meet in one call.

    A device; for a JAX array spread over several devices, the set of those devices:
    arrays on the same devices are compatible whatever their sharding (a table
    replicated on all devices beside values sharded over the batch is the usual data
    parallel layout; JAX reshards as the operations need), arrays on different sets of
    devices are not (JAX would refuse to combine them).
    """
    if isinstance(x, np.ndarray) or _direct_namespace(x) is not None:
        return device_of(x)
    d = array_api_compat.device(x)
    if d is not None and hasattr(d, "device_set"):
        devices = d.device_set
        return next(iter(devices)) if len(devices) == 1 else frozenset(devices)
    return d


def compute_dtype(xp: Any, *arrays: Any) -> tuple[Any, Any]:
    """Return ``(result_dtype, compute_dtype)`` for floating inputs.

    The result dtype follows the library's promotion (``xp.result_type``). Half
    precision (float16, bfloat16) is computed in float32: CPU backends lack
    half-precision FFTs, CUDA ones need power-of-two sizes for them, and reductions
    over long sequences lose too much in 8 bits of mantissa.
    """
    # ``result_type`` costs microseconds per call, several times per decoding step, so
    # the answer is remembered -- under a key that determines it. Promotion is not a
    # function of the dtypes alone: a JAX array created from a Python scalar is *weakly
    # typed* (``bfloat16`` with a weak ``float32`` gives ``bfloat16``, with a strong one
    # ``float32``), so the weak flag is part of the key; and NumPy < 2 (value-based
    # casting) or a library with its own rules may look at 0-d values, so calls with a
    # 0-d input are not cached at all.
    key: tuple | None = None
    known = None
    try:
        if all(x.ndim > 0 for x in arrays):
            key = (xp.__name__, *((x.dtype, getattr(x, "weak_type", False)) for x in arrays))
            known = _PROMOTED.get(key)
    except (TypeError, AttributeError):
        key, known = None, None
    if known is not None:
        return known
    result = xp.result_type(*arrays)
    pair = (result, xp.float64 if result == xp.float64 else xp.float32)
    if key is not None:
        _PROMOTED[key] = pair
    return pair


_PROMOTED: dict[tuple, tuple[Any, Any]] = {}


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
    best = int(scipy_fft.next_fast_len(max(int(n), 1), real=True)) if scipy_fft is not None else _next_fast_len_portable(n)
    if len(_FAST_LENGTHS) < 4096:
        _FAST_LENGTHS[n] = best
    return best


# n -> next_fast_len(n): a dict lookup is cheaper than either computation
_FAST_LENGTHS: dict[int, int] = {}


def _compiling() -> bool:
    """Whether PyTorch's Dynamo is tracing this call (``torch.compile``)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


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


def _dask_whole(xp: Any, x: Any, axes: Any) -> Any:
    """A Dask array in one chunk along ``axes`` (an int or a tuple), for an FFT there.

    Dask transforms only along an axis held in a single chunk ("Dask array only
    supports taking an FFT along an axis that has a single chunk"), and fastrpb's
    kernels and padded values are concatenated from several pieces (the non-negative
    offsets, zeros, the negative offsets): rechunk them whole along the transformed
    axes. The leading axes keep their chunks, so the graph still has one task per
    leading chunk, whatever ``L``. Every other library: ``x`` unchanged.
    """
    if not _is(xp, "dask"):
        return x
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    if all(len(x.chunks[a]) == 1 for a in axes):
        return x
    return x.rechunk({a % x.ndim: -1 for a in axes})


# --------------------------------------------------------------------------- JAX: FFTs that XLA cannot partition
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


def cumulative_sum(xp: Any, x: Any, *, axis: int, include_initial: bool = False) -> Any:
    """``xp.cumulative_sum``, with native paths on JAX (faster) and PyTorch (traceable).

    XLA lowers ``jnp.cumsum`` on CPU to a windowed reduction that runs at a fraction of
    memory speed: for the chunk states of causal linear attention (L = 16,384) it took
    a third of the whole call. ``jax.lax.associative_scan`` computes the same sums
    (in a different order of additions) 1.7x faster there, under ``jit`` and ``grad``.
    """
    if _is(xp, "jax") or _is(xp, "torch"):
        axis = axis % x.ndim
        if _is(xp, "torch"):
            # array_api_compat's torch wrapper resolves a namespace through an
            # lru_cache'd dispatch on every call, which torch.compile warns about
            import torch  # already imported: x is a torch.Tensor

            out = torch.cumsum(x, dim=axis)
        else:
            from jax import lax  # already imported: xp is jax.numpy

            out = lax.associative_scan(xp.add, x, axis=axis)
        if include_initial:
            shape = list(x.shape)
            shape[axis] = 1
            out = xp.concat([xp.zeros(shape, dtype=out.dtype, device=device_of(x)), out], axis=axis)
        return out
    return xp.cumulative_sum(x, axis=axis, include_initial=include_initial)


def along(x: Any, axis: int, index: Any) -> Any:
    """``x`` indexed by ``index`` (an integer or a slice) along a negative ``axis``."""
    return x[(..., index) + (slice(None),) * (-axis - 1)]


def exclusive_sum(xp: Any, x: Any, axis: int, start: Any = None) -> tuple[Any, Any]:
    """The total of ``x`` along a negative ``axis`` and its exclusive prefix sum
    (position ``n`` holds the sum of positions ``< n``), contiguous; with ``start`` (an
    array shaped as one slice of ``x``) both begin from it instead of zero.

    Eager arrays on a CPU (``associative_scan``'s rule) add one slice at a time and
    stack the partial sums; elsewhere the running sum of ``x`` shifted by one. The
    causal chunk states of PyTorch, (1, 8, 256, 64, 65) float32 along the chunk axis,
    one thread: 25 ms in order against 48 ms for ``torch.cumsum`` of the shifted copy,
    and 24 against 129 ms at width 64, where ``torch.cumsum``'s stride is a power of
    two (2026-11-30).
    """
    n = x.shape[axis]
    if _in_order(xp, x, n):
        partial = [xp.zeros_like(along(x, axis, 0)) if start is None else start]
        for i in range(n - 1):
            partial.append(partial[-1] + along(x, axis, i))
        return partial[-1] + along(x, axis, n - 1), xp.stack(partial, axis=axis)
    before = cumulative_sum(xp, shift(xp, x, 1, axis, 0.0), axis=axis)
    if start is not None:
        before = before + xp.expand_dims(start, axis=axis)
    return along(before, axis, n - 1) + along(x, axis, n - 1), before


def multiply_into(xp: Any, a: Any, b: Any) -> Any:
    """``a * b``, written into ``a``'s memory where the library allows it.

    Only for an ``a`` that the caller has just created and never reads again (an FFT
    spectrum). The standard has no in-place operations (JAX has none at all), but on
    CPU a fresh output buffer of the size of ``a`` costs more in page faults than the
    product itself: for FastRPB at L = 1,024 that was a quarter of the call.
    NumPy and PyTorch multiply in place, PyTorch only outside autograd and outside
    ``torch.func`` transforms (under ``vmap`` over ``b`` alone, ``a`` has fewer
    elements than the batched product: an in-place ``mul_`` is an error there);
    everything else allocates.
    """
    kind = _in_place(xp, a, b)
    if kind == "numpy":
        return np.multiply(a, b, out=a)
    if kind == "torch":
        return a.mul_(b)
    return a * b


def _in_place(xp: Any, target: Any, *operands: Any) -> str | None:
    """``"numpy"``/``"torch"`` where ``target`` (an array just created) may be
    overwritten by an operation with ``operands``, ``None`` where the caller must
    allocate: the operands broadcast to ``target``'s shape, and ``target`` is a NumPy
    array, or a PyTorch tensor outside ``torch.func``/``torch.compile`` with no
    gradient recorded through any of the arrays."""
    shape = tuple(target.shape)
    for x in operands:
        if len(x.shape) > len(shape) or any(
            dx not in (1, dt) for dt, dx in zip(reversed(shape), reversed(tuple(x.shape)), strict=False)
        ):
            return None
    if _is(xp, "numpy") and isinstance(target, np.ndarray) and target.ndim > 0:
        return "numpy"
    if _is(xp, "torch") and _torch_eager_tensors():
        import torch  # already imported: the arrays are torch tensors

        if not (torch.is_grad_enabled() and any(x.requires_grad for x in (target, *operands))):
            return "torch"
    return None


def add_into(xp: Any, acc: Any, b: Any) -> Any:
    """``acc + b`` (``b`` broadcast to ``acc``), written into ``acc``'s memory where the library allows
    it: for an ``acc`` the caller has just created and never reads again. Causal linear
    attention adds the cross-chunk product to the in-chunk one; allocating a third
    array of the output's size cost PyTorch 8 ms of a 305 ms call (one thread, L =
    16,384, 8 x 64, float32, 2026-11-30)."""
    kind = _in_place(xp, acc, b)
    if kind == "numpy":
        return np.add(acc, b, out=acc)
    if kind == "torch":
        return acc.add_(b)
    return acc + b


def tril_into(xp: Any, x: Any) -> Any:
    """``xp.tril(x)``, written into ``x``'s memory where the library allows it (as
    ``add_into``): the chunk scores of causal attention, PyTorch 22 ms of 305 copying
    (same call as ``add_into``)."""
    kind = _in_place(xp, x)
    if kind == "torch":
        return x.tril_()
    if kind == "numpy":  # a select, as np.tril: NaN above the diagonal becomes 0 too
        np.copyto(x, 0, where=np.triu(np.ones(x.shape[-2:], dtype=bool), 1))
        return x
    return xp.tril(x)


def multiply_add(xp: Any, acc: Any, a: Any, b: Any) -> Any:
    """``acc + a * b`` as a new array (``acc`` is not changed).

    PyTorch: ``torch.addcmul``, one kernel without the temporary product. Measured
    for the streaming FastRPB push (torch CPU, one thread, ``(8, 32, 64) + (8, 32, 1) *
    (8, 1, 64)``, once per decoded token): 18 us as two operations, 13 us fused.
    """
    if _is(xp, "torch"):
        import torch  # already imported: xp is PyTorch's namespace

        return torch.addcmul(acc, a, b)
    return acc + a * b


def multiply_add_into(xp: Any, acc: Any, a: Any, b: Any) -> Any:
    """``acc + a * b``, written into ``acc``'s memory where the library allows it.

    Only for an ``acc`` that the caller has just created and never reads again (a sum of
    spectra being accumulated). Measured (torch CPU, one thread, complex64 ``(8, 64,
    8193)`` times ``(8, 1, 8193)``): ``acc + a * b`` 197 ms, ``acc.addcmul_(a, b)`` 24 ms,
    the two temporaries' page faults and passes over memory being most of the cost;
    chunked FastRPB prefill sums one such product per earlier chunk. NumPy adds in
    place (the product still allocates); everything else allocates.
    """
    kind = _in_place(xp, acc, a, b)
    if kind == "numpy":
        return np.add(acc, a * b, out=acc)
    if kind == "torch":
        return acc.addcmul_(a, b)
    return acc + a * b


def _torch_eager_tensors() -> bool:
    """Whether PyTorch runs plain tensors now: no ``torch.func`` transform (``vmap``,
    ``grad``, ``jacrev``...) is active, whose wrapped tensors forbid some in-place
    operations and data-dependent Python control flow, and no ``torch.compile`` trace.
    A PyTorch without these private hooks gets the safe answer, False."""
    import torch  # only called with torch tensors: already imported

    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if active is None or compiling is None:
        return False
    return not (active() or compiling())


def known_finite(xp: Any, x: Any, *, negative_infinity: bool = False) -> bool:
    """True when ``x`` is known to hold no NaN and no infinity (``-inf`` allowed with
    ``negative_infinity=True``); False when it may, or when that cannot be told cheaply.

    The standard has no way to ask this without a data-dependent branch, which a
    traced program (``jax.jit``, ``torch.compile``, ``torch.func``) cannot take and a
    GPU pays for with a synchronisation. So only eager CPU arrays are asked (NumPy,
    PyTorch and JAX on the CPU: one reduction, about 0.1 ms for two million float32,
    where the work it lets the caller skip costs several passes); everywhere else the
    answer is False and the caller takes its path for non-finite values, which must
    give the same result for finite ones (``on_finite`` also branches inside traced
    JAX programs).
    """
    if _is(xp, "numpy") and type(x) is np.ndarray:
        with np.errstate(all="ignore"):
            if negative_infinity:
                return bool(x.size == 0 or np.max(x) < np.inf)  # NaN < inf is False
            return bool(np.isfinite(np.sum(x)))  # a NaN or inf makes the sum non-finite
    if _is(xp, "torch") and x.device.type == "cpu" and _torch_eager_tensors():
        import torch  # already imported: x is a torch.Tensor

        with torch.no_grad():
            if negative_infinity:
                return bool(x.numel() == 0 or x.amax() < math.inf)
            return bool(torch.isfinite(x.sum()))
    if _is(xp, "jax") and not is_traced(xp, x) and all(d.platform == "cpu" for d in x.devices()):
        if negative_infinity:
            return bool(x.size == 0 or xp.max(x) < math.inf)
        return bool(xp.isfinite(xp.sum(x)))
    return False


def on_finite(xp: Any, x: Any, fn: Callable[[bool], Any]) -> Any:
    """``fn(True)`` when ``x`` holds no NaN and no infinity, else ``fn(False)``: ``fn``
    takes a cheaper path for finite input and must give the same result on it both ways.

    Eager CPU arrays are asked directly (``known_finite``). Traced JAX on the CPU
    branches inside the program, ``lax.cond`` on one reduction of ``x``:
    a traced program cannot ask, and without the branch every ``jit`` call paid for
    the non-finite path, a third of causal attention (ELU, (1, 8, L, 64), one core,
    L = 4,096: 16.2 ms against 10.9 with the finite path, 2026-12-01). On a GPU the
    branch would read its predicate back to the host, a synchronisation, so there
    (and in ``torch.compile``) ``x`` is taken as possibly non-finite. Under ``vmap``
    the branch becomes a select that runs both paths: slower, the same numbers.
    """
    if known_finite(xp, x):
        return fn(True)
    if is_traced(xp, x):
        import jax  # already imported: x is a JAX tracer

        if jax.default_backend() == "cpu":
            return jax.lax.cond(xp.all(xp.isfinite(x)), lambda: fn(True), lambda: fn(False))
    return fn(False)


def split_nonfinite(xp: Any, x: Any) -> tuple[Any, Any]:
    """``(finite, rest)`` with ``finite + rest == x``: ``finite`` holds the finite
    entries (0 elsewhere), ``rest`` the NaN and infinite ones (0 elsewhere).

    A product with a masked (zero) weight multiplies 0 by every value, and ``0 * NaN``
    is NaN: causal attention computes its masked in-chunk product on ``finite`` and
    adds ``rest`` back only where the mask lets it through. The standard has no
    ``nan_to_num``; ``where(isfinite(x), x, 0)`` is its portable form, and NumPy,
    PyTorch and JAX have a fused one (PyTorch's is 15 times faster on the CPU).

    ``rest`` is a select, not ``x - finite``: the difference is the same number but its
    gradient is not. Through ``x - finite`` the gradient of a finite entry is
    ``g_rest + (g_finite - g_rest)``, and ``g_rest`` (a reverse prefix sum of the
    output's cotangent, about ``1 / den``) can be 1e20 times ``g_finite`` when a
    causal normaliser is small: the sum rounds to nothing. The select passes exactly
    ``g_finite`` (it put a 1e-3 error into a sequence-parallel sikf gradient).
    """
    zero = xp.zeros((), dtype=x.dtype, device=device_of(x))
    if _is(xp, "numpy") and type(x) is np.ndarray:
        finite = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    elif _is(xp, "torch") or _is(xp, "jax"):
        finite = xp.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    else:
        finite = xp.where(xp.isfinite(x), x, zero)
    return finite, xp.where(xp.isfinite(x), zero, x)


def elu_plus_one(xp: Any, x: Any) -> Any:
    """``elu(x) + 1`` = ``x + 1`` for ``x > 0``, ``exp(x)`` otherwise (Katharopoulos et al.).

    The standard has no ELU. Portable form: ``exp(min(x, 0)) + max(x, 0)``, four
    passes and exact in every dtype (``exp(x) - 1 + 1`` would lose the small values in
    bfloat16). Linear attention is bound by these elementwise passes, not by its
    matmuls, so where a library has a faster way it is used:

    - PyTorch: its fused ``elu`` kernel plus one add, two passes (float32/float64
      only: in half precision ``elu(x) + 1`` rounds ``exp(x) - 1`` first);
    - NumPy: the same four passes, but in place: two allocations instead of four.
    """
    if _is(xp, "torch") and x.dtype in (xp.float32, xp.float64):
        import torch  # already imported: x is a torch.Tensor

        # in place on elu's fresh output (its backward reads the input, not the
        # output): a second tensor of the size of x costs page faults
        return torch.nn.functional.elu(x).add_(1.0)
    if _is(xp, "numpy") and isinstance(x, np.ndarray) and x.ndim > 0:
        out = np.minimum(x, 0)
        np.exp(out, out=out)
        out += np.maximum(x, 0)
        return out
    zero = xp.zeros((), dtype=x.dtype, device=device_of(x))
    return xp.exp(xp.minimum(x, zero)) + xp.maximum(x, zero)


def softmax(xp: Any, x: Any, axis: int = -1) -> Any:
    """``exp(x) / sum(exp(x))`` along ``axis``, stabilised by the maximum (the standard
    has no softmax). Portable code; exact for any finite input (the largest term is 1)."""
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


# --------------------------------------------------------------------------- shifting and padding
def pad_axis(xp: Any, x: Any, before: int, after: int, *, axis: int = -2, value: float = 0.0) -> Any:
    """``x`` with ``before``/``after`` entries of ``value`` added along a negative ``axis``.

    The standard has no ``pad``. Portable version: one ``concat`` with filled blocks.
    Native path on JAX: array-api-extra's ``pad`` (``jax.numpy.pad``), 234 against
    269 us under ``jit`` and 0.46 against 2.8 ms eagerly for the causal chunk padding
    at L = 1,000 (float32, (2, 4, L, 64)). On NumPy and PyTorch ``xpx.pad`` (``np.pad``,
    ``torch.nn.functional.pad``) was slower than the concat, 78 against 56 us and 80
    against 59 us, so they keep the portable version (measured 2026-11-30).
    (Default: zero rows on the sequence axis, the output of skipped tokens.)
    """
    if before == 0 and after == 0:
        return x
    if _is(xp, "jax"):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (before, after)
        return xpx.pad(x, tuple(widths), constant_values=value, xp=xp)
    parts = []
    for count in (before, after):
        shape = list(x.shape)
        shape[axis] = count
        parts.append(xp.full(tuple(shape), value, dtype=x.dtype, device=device_of(x)) if count else None)
    return xp.concat([p for p in (parts[0], x, parts[1]) if p is not None], axis=axis)


def shift(xp: Any, x: Any, s: int, axis: int, fill: float) -> Any:
    """Shift ``x`` by ``s`` positions towards the end of a negative ``axis``, filling the start."""
    n = x.shape[axis]
    s = min(s, n)
    kept = along(x, axis, slice(0, n - s))
    return pad_axis(xp, kept, s, 0, axis=axis, value=fill)


def pad_chunks(xp: Any, x: Any, length: int, C: int, fill: float) -> Any:
    """Pad the sequence axis (-2) of ``x`` to ``length`` with ``fill``; reshape to ``(..., N, C, .)``."""
    x = pad_axis(xp, x, 0, length - x.shape[-2], axis=-2, value=fill)
    return xp.reshape(x, (*x.shape[:-2], length // C, C, x.shape[-1]))


def associative_scan(xp: Any, combine: Callable[[tuple, tuple], tuple], elems: tuple, axis: int) -> tuple:
    """Inclusive scan of an associative ``combine`` along a negative ``axis``.

    ``elems`` is a tuple of arrays with the scanned axis at the same position;
    ``combine(a, b)`` takes two such tuples (``a`` the earlier) and returns one. The
    standard has ``cumulative_sum`` only; running maxima and the rescaled sums of
    causal attention need other operators (as ``jax.lax.associative_scan`` takes).
    Two portable schedules, chosen by where the arrays run:

    - eager arrays on a CPU (NumPy, PyTorch outside ``torch.compile``): one pass in
      order, ``n - 1`` combines of single slices, each of which stays in the cache;
    - anything traced or on an accelerator (JAX, ``torch.compile``, CUDA): the
      odd-even (Ladner-Fischer) scan, ``O(n)`` work in ``2 log2 n`` array steps.

    Both replace a doubling scan (``log2 n`` full passes, ``O(n log n)`` work).
    Measured 2026-11-30 on 2 CPU cores, float32, (1, 8, 256, 64, 65) rescaled chunk
    states along the chunk axis: PyTorch (one thread) doubling 230 ms, odd-even 84,
    in order 13; JAX ``jit`` doubling 100, odd-even 27 (``lax.associative_scan`` 30,
    ``lax.scan`` 18, but the order of a ``lax.scan`` is native to JAX only). Running
    maximum along the 64 tokens of (1, 8, 256, 64, 64): PyTorch doubling 151 ms,
    odd-even 38, in order 9.5 (``torch.cummax`` 228); JAX doubling 64, odd-even 16
    (``lax.cummax`` 46).
    """
    n = elems[0].shape[axis]
    if n < 2:
        return elems
    ax = axis % elems[0].ndim

    def take(x: Any, start: int | None, stop: int | None = None, step: int | None = None) -> Any:
        return along(x, axis, slice(start, stop, step))

    if _in_order(xp, elems[0], n):
        out = [tuple(take(x, 0, 1) for x in elems)]
        for i in range(1, n):
            out.append(combine(out[-1], tuple(take(x, i, i + 1) for x in elems)))
        return tuple(xp.concat([o[j] for o in out], axis=axis) for j in range(len(elems)))
    # odd-even: pair (2k, 2k + 1), scan the pairs, then fix up the even positions
    m = n // 2
    evens = tuple(take(x, 0, None, 2) for x in elems)
    odds = tuple(take(x, 1, None, 2) for x in elems)
    at_odds = associative_scan(xp, combine, combine(tuple(take(e, 0, m) for e in evens), odds), axis)
    at_evens = combine(tuple(take(o, 0, (n - 1) // 2) for o in at_odds), tuple(take(e, 1) for e in evens))
    result = []
    for first, even, odd in zip(evens, at_evens, at_odds, strict=True):
        even = xp.concat([take(first, 0, 1), even], axis=axis)
        pairs = xp.stack([take(even, 0, m), odd], axis=ax + 1)  # (..., m, 2, ...)
        shape = list(odd.shape)
        shape[ax] = 2 * m
        joined = xp.reshape(pairs, tuple(shape))
        result.append(xp.concat([joined, take(even, m)], axis=axis) if n % 2 else joined)
    return tuple(result)


def scan(xp: Any, step: Callable[[Any, tuple], tuple[Any, Any]], carry: Any, xs: tuple, axis: int) -> tuple[Any, Any]:
    """``carry, y = step(carry, x)`` for the slices ``x`` of ``xs`` along a negative
    ``axis``, in order; returns the last carry and the ``y`` (a tuple of arrays)
    stacked along ``axis``.

    The standard has no loop construct. A Python loop is right for eager arrays (each
    step runs as it comes) but a traced one is unrolled: under ``jax.jit`` a loop of
    ``n`` steps compiles ``n`` copies of the body. JAX gets one body in a
    ``lax.fori_loop`` that reads its slice of ``xs`` where it lies
    (``dynamic_index_in_dim``) and writes its ``y`` into the stacked outputs
    (``dynamic_update_index_in_dim``). ``lax.scan`` over ``xs`` would want ``axis``
    in front: a transposed copy of every input and output, which cost a quarter of
    causal attention (ELU, (1, 8, 4,096, 64), one thread: 31 -> 20 ms without it,
    2026-12-01). With static bounds ``fori_loop`` is a ``scan`` itself, so it stays
    reverse-differentiable. ``axis`` counts from the end in ``xs`` and in the stacked
    ``y`` alike.
    """
    n = xs[0].shape[axis]
    if _is(xp, "jax"):
        import jax  # already imported: xp is jax.numpy
        from jax import lax

        def at(i: Any) -> tuple:
            return tuple(lax.dynamic_index_in_dim(x, i, axis=x.ndim + axis, keepdims=False) for x in xs)

        ys0 = tuple(xp.zeros((*y.shape[:y.ndim + axis + 1], n, *y.shape[y.ndim + axis + 1:]), dtype=y.dtype)
                    for y in jax.eval_shape(step, carry, at(0))[1])

        def body(i: Any, state: tuple) -> tuple:
            carry, y = step(state[0], at(i))
            return carry, tuple(lax.dynamic_update_index_in_dim(s, t, i, axis=s.ndim + axis)
                                for s, t in zip(state[1], y, strict=True))

        return lax.fori_loop(0, n, body, (carry, ys0))
    outs = []
    for i in range(n):
        carry, y = step(carry, tuple(along(x, axis, i) for x in xs))
        outs.append(y)
    return carry, tuple(xp.stack(list(y), axis=axis) for y in zip(*outs, strict=True))


def _in_order(xp: Any, x: Any, n: int) -> bool:
    """Whether ``associative_scan`` should combine in order: eager arrays on a CPU,
    with slices large enough (or few enough) that a Python step per position costs
    less than the odd-even scan's passes over the whole array."""
    if not (n <= 32 or math.prod(x.shape) // n >= 1024):
        return False
    if _is(xp, "numpy"):
        return True
    if _is(xp, "torch"):
        return bool(x.device.type == "cpu") and not _compiling()
    return False


def cumulative_max(xp: Any, x: Any, axis: int) -> Any:
    """Inclusive running maximum along a negative ``axis`` (``associative_scan``).

    The standard has ``cumulative_sum`` but no cumulative maximum, and the native
    scans were measured slower (see ``associative_scan``; ``numpy.maximum.accumulate``
    5.6 against 1.8-3.4 ms for the doubling scan on (2, 4, 16, 64, 64), 2026-11-30).
    """
    if _is(xp, "dask"):
        # Dask: the scan's slices and concats split the axis into ever more chunks
        # (L = 1,024 gave one task per token, 26,213 in all); one running maximum per
        # block, on the axis held whole, keeps one task per block.
        whole = _dask_whole(xp, x, axis)
        return whole.map_blocks(_running_max_block, axis=axis % x.ndim, dtype=x.dtype)
    return associative_scan(xp, lambda a, b: (xp.maximum(a[0], b[0]),), (x,), axis)[0]


def rescaled_scan(xp: Any, X: Any, R: Any, R_safe: Any) -> Any:
    """``X_n <- sum_{m <= n} exp(R_m - R_n) X_m`` along the chunk axis (-3 of ``X``, -2 of ``R``).

    The rescaled prefix sum of causal linear attention with an exponential feature map
    (``attention._causal_exp``): ``X (..., N, F, Dv + 1)`` holds chunk states, chunk
    ``n`` in the frame of ``R (..., N, F)``, the running maximum of the key
    log-features (``R_safe``: ``R`` with ``-inf`` as 0). An ``associative_scan`` of
    ``(X, R)`` pairs: joining a block that ends at ``m`` to a later one that ends at
    ``n`` scales the first by ``exp(R_m - R_n) <= 1`` (one ``exp`` of a difference,
    never a product of factors), so no sum overflows.

    Dask: the scan's slices split the chunk axis into ever more chunks and its steps
    make the graph grow with ``L``; the same scan runs instead once per block (the
    chunk, feature and value axes held whole, the leading axes keep their chunks), on
    the block's own arrays: one task per leading chunk.
    """
    if _is(xp, "dask"):
        X = _dask_whole(xp, X, (-3, -2, -1))
        R3 = _dask_whole(xp, R[..., None], (-3, -2, -1))
        S3 = _dask_whole(xp, R_safe[..., None], (-3, -2, -1))

        def block(x: Any, r: Any, r_safe: Any) -> Any:
            bxp = array_api_compat.array_namespace(x)
            return rescaled_scan(bxp, x, r[..., 0], r_safe[..., 0])

        return _dask_map(block, X, R3, S3)

    def join(a: tuple, b: tuple) -> tuple:
        return (xp.exp(a[1] - b[2]) * a[0] + b[0], b[1], b[2])

    return associative_scan(xp, join, (X, R[..., None], R_safe[..., None]), -3)[0]


def _dask_map(fn: Any, *arrays: Any) -> Any:
    import dask.array as da  # already imported: the arrays are Dask arrays

    return da.map_blocks(fn, *arrays, dtype=arrays[0].dtype)


def _running_max_block(block: Any, axis: int) -> Any:
    """The running maximum of one Dask block (a NumPy array, or any array API array)."""
    if isinstance(block, np.ndarray):
        return np.maximum.accumulate(block, axis=axis)
    bxp = array_api_compat.array_namespace(block)
    return cumulative_max(bxp, block, axis - block.ndim)


def wider_float(xp: Any, x: Any) -> Any:
    """``float64`` where ``x`` is ``float32`` (or narrower) and its library computes in
    ``float64`` on ``x``'s device, else ``None`` (``x`` already ``float64``, JAX without
    ``jax_enable_x64``, PyTorch on MPS).

    The standard has no way to ask whether a dtype works on a device; JAX silently
    gives ``float32`` for ``float64`` without x64 and MPS has no ``float64``, so those
    two are asked here (the callers then use a compensated ``float32`` sum instead).
    """
    if x.dtype == xp.float64:
        return None
    if array_api_compat.is_jax_namespace(xp):
        import jax  # already imported: xp is jax.numpy

        return xp.float64 if jax.config.read("jax_enable_x64") else None
    if array_api_compat.is_torch_namespace(xp) and getattr(x.device, "type", None) == "mps":
        return None
    return xp.float64


# --------------------------------------------------------------------------- JAX pytrees
def jax_pytree(*, static: tuple[str, ...]) -> Callable[[type], type]:
    """Class decorator: make a NamedTuple a JAX pytree whose ``static`` fields are aux data.

    A NamedTuple is a JAX pytree by default, but then every field is a leaf and a
    string field (the decoding state's feature-map signature) cannot cross
    ``jax.jit``. JAX is never imported for this (``import fastrpb`` stays free of
    frameworks); the class is registered, once and under a lock (8 threads may build
    their first state together), as soon as JAX is there: at decoration if JAX is
    already imported, when a JAX namespace is first resolved, and when an instance is
    built while JAX is imported (so ``jax.jit(f)(State(...))`` works in a fresh
    process before fastrpb ever computed anything). After registration the class's
    own ``__new__`` is restored: no cost per instance.
    """

    def decorate(cls: type) -> type:
        original = cls.__dict__["__new__"]

        def __new__(klass: type, *args: Any, **kwargs: Any) -> Any:
            if "jax" in sys.modules:
                register_pytrees()
            return original.__func__(klass, *args, **kwargs)

        with _PYTREE_LOCK:
            _PYTREE_PENDING[cls] = (static, original)
            cls.__new__ = staticmethod(__new__)  # type: ignore[assignment]
        if "jax" in sys.modules:
            register_pytrees()
        return cls

    return decorate


_PYTREE_LOCK = threading.Lock()
# class -> (static fields, its own __new__), until registered with JAX
_PYTREE_PENDING: dict[type, tuple[tuple[str, ...], Any]] = {}


def register_pytrees() -> None:
    """Register every class made by ``jax_pytree`` with JAX (JAX must be imported)."""
    if not _PYTREE_PENDING:
        return
    with _PYTREE_LOCK:
        if not _PYTREE_PENDING:
            return
        import jax.tree_util

        for cls, (static, original) in list(_PYTREE_PENDING.items()):
            _register_pytree(jax.tree_util, cls, static)
            cls.__new__ = original  # type: ignore[method-assign]
            del _PYTREE_PENDING[cls]


def _register_pytree(tree_util: Any, cls: type, static: tuple[str, ...]) -> None:
    fields = cls._fields  # type: ignore[attr-defined]
    dynamic = tuple(f for f in fields if f not in static)

    def flatten(obj: Any) -> tuple[tuple, tuple]:
        return tuple(getattr(obj, f) for f in dynamic), tuple(getattr(obj, f) for f in static)

    def unflatten(aux: tuple, children: tuple) -> Any:
        return cls(**dict(zip(dynamic, children, strict=True)), **dict(zip(static, aux, strict=True)))

    tree_util.register_pytree_node(cls, flatten, unflatten)


def is_traced(xp: Any, *arrays: Any) -> bool:
    """Whether any of ``arrays`` (``None`` ignored) is a JAX tracer (inside ``jit``, ``grad``, ``scan``...).

    The standard cannot tell an abstract array from a concrete one, but streaming
    FastRPB must: its online state changes shape as a sequence grows, which a traced
    function (a ``lax.scan`` carry above all) cannot follow, so traced code takes the
    fixed-shape layout instead (``_online``).
    """
    if not _is(xp, "jax"):
        return False
    import jax  # already imported: xp is jax.numpy

    return any(isinstance(x, jax.core.Tracer) for x in arrays if x is not None)


def is_lazy(xp: Any, *arrays: Any) -> bool:
    """Whether the values of ``arrays`` (``None`` ignored) are unknown until computed:
    a JAX tracer (``is_traced``) or any Dask array.

    Reading such a value into Python (``int(x)``, ``bool(x)``) fails under ``jax.jit``
    and, with Dask, silently computes the whole graph behind it, which a lazy call
    must never do. So where fastrpb would read one it takes the path that does not:
    streaming FastRPB steps in the fixed layout (``_online.step``, a graph of the same
    size whatever ``M``, instead of the online levels whose number grows with
    ``log M``), and array ``cu_seqlens`` offsets, which set shapes, are refused with
    the advice to pass them as Python ints.
    """
    return _is(xp, "dask") or is_traced(xp, *arrays)


def count_array(xp: Any, n: Any, *, like: Any) -> Any:
    """The 0-d ``int32`` count of a streaming state (``_online``), beside ``like``.

    Portable version: an array of ``like``'s library and device (under ``jax.jit`` the
    count is a traced value, a leaf of the state's pytree). Dask: a NumPy 0-d array,
    because the count is known when the state is made, and every later check of it
    (``_online.tokens_seen``: the stream must fit the table) reads it with ``int()``,
    which on a Dask array would run the scheduler (the whole graph behind it, where
    the count came from one). The Dask arrays of a state and this NumPy count combine
    lazily (``count - skip == positions`` is a Dask array).
    """
    if _is(xp, "dask"):
        return np.asarray(n, dtype=np.int32)
    return xp.asarray(n, dtype=xp.int32, device=device_of(like))
