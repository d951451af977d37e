"""Scans along an axis: cumulative sums, exclusive sums, associative and sequential
scans, the running maximum and the rescaled prefix sum of the exponential maps.

The standard has ``cumulative_sum`` only; the rest are written once here, with each
library's native scan where one was measured faster and one block-wise path for Dask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

from .dispatch import _compiling, _dask_whole, _is, device_of
from .pad import along, shift

__all__ = ["cumulative_sum", "exclusive_sum", "associative_scan", "scan", "cumulative_max", "rescaled_scan"]


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

        ys0 = tuple(
            xp.zeros((*y.shape[: y.ndim + axis + 1], n, *y.shape[y.ndim + axis + 1 :]), dtype=y.dtype)
            for y in jax.eval_shape(step, carry, at(0))[1]
        )

        def body(i: Any, state: tuple) -> tuple:
            carry, y = step(state[0], at(i))
            return carry, tuple(
                lax.dynamic_update_index_in_dim(s, t, i, axis=s.ndim + axis) for s, t in zip(state[1], y, strict=True)
            )

        return lax.fori_loop(0, n, body, (carry, ys0))
    outs = []
    for i in range(n):
        carry, y = step(carry, tuple(along(x, axis, i) for x in xs))
        outs.append(y)
    return carry, tuple(xp.stack(list(y), axis=axis) for y in zip(*outs, strict=True))


def _in_order(xp: Any, x: Any, n: int) -> bool:
    """Whether ``associative_scan`` should combine in order: eager arrays on a CPU,
    with slices large enough (or few enough) that a Python step per position costs
    less than the odd-even scan's passes over the whole array. The library first: a
    traced array (JAX, torch.compile/export) may have symbolic sizes, which are never
    compared here."""
    if _is(xp, "numpy"):
        eager = True
    elif _is(xp, "torch"):
        eager = bool(x.device.type == "cpu") and not _compiling()
    else:
        eager = False
    return eager and (n <= 32 or math.prod(x.shape) // n >= 1024)


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
    (``_kernels.exponential.causal_exp_attention``): ``X (..., N, F, Dv + 1)`` holds chunk states, chunk
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
