"""The namespace of the inputs, resolved once per call; devices, dtypes, library state.

``namespace`` resolves the array namespace of a call's named inputs (one library, one
device, the standard 2023.12 or newer) and remembers it per array type; beside it the
questions every other part of ``_compat`` asks about a namespace or an array: which
library it is (``_is``), where to create arrays (``device_of``), the compute dtype,
whether values are traced or lazy, whether PyTorch runs eager tensors.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import array_api_compat
import numpy as np

from .pytree import register_pytrees

__all__ = [
    "MIN_API_VERSION",
    "namespace",
    "device_of",
    "compute_dtype",
    "wider_float",
    "is_traced",
    "is_lazy",
    "count_array",
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
                f"{name} must be an array (NumPy, CuPy, PyTorch, JAX or any array API library), got {type(x).__name__}"
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
                    f"all arrays must be on one device: {first[0]} is on {first[1]!r} but {name} is on {d!r}"
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
    if _is(xp, "torch") and _compiling():
        # Dynamo cannot put ``torch.result_type`` (it returns a dtype) in a graph:
        # promote the dtypes, which is the same rule for tensors of one or more dims.
        # The memo is not read here: Dynamo would guard on the dict's contents, and a
        # first trace that fills it would compile a second time.
        torch = sys.modules["torch"]
        result = functools.reduce(torch.promote_types, (x.dtype for x in arrays))
        return result, torch.float64 if result == torch.float64 else torch.float32
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


def _compiling() -> bool:
    """Whether PyTorch's Dynamo is tracing this call (``torch.compile``)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


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
    array ``cu_seqlens`` offsets, which set shapes, are refused with the advice to
    pass them as Python ints. (A streaming FastRPB state's count is a NumPy array
    beside Dask arrays, ``count_array``, so it is read without computing anything.)
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
