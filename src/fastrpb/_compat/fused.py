"""Fused and in-place arithmetic: ``a * b``, ``acc + b``, ``tril(x)``, ``acc + a * b``.

The standard has no in-place operations (JAX has none at all), but on a CPU a fresh
output buffer costs more in page faults than the arithmetic itself: where the caller
has just created the target and never reads it again, NumPy and eager PyTorch write
into it; everything else allocates.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .dispatch import _is, _torch_eager_tensors, device_of

__all__ = ["concat_rows", "multiply_into", "add_into", "tril_into", "multiply_add", "multiply_add_into"]


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


def concat_rows(xp: Any, parts: list, rows: int) -> Any:
    """``parts`` joined along axis -2, then rows up to ``rows`` whose values are
    unspecified: the caller masks them or never reads them.

    NumPy and eager PyTorch write the parts into an uninitialised array (the rows
    after them cost nothing: a fixed-size buffer that grows by chunks pays for what
    it holds, not for its capacity); everything else appends zeros.
    """
    first = parts[0]
    shape = (*first.shape[:-2], rows, first.shape[-1])
    filled = sum(int(x.shape[-2]) for x in parts)
    if rows == filled or not all(_in_place(xp, x) for x in parts):
        zeros = xp.zeros((*shape[:-2], rows - filled, shape[-1]), dtype=first.dtype, device=device_of(first))
        return xp.concat([*parts, zeros], axis=-2)
    out = xp.empty(shape, dtype=first.dtype, device=device_of(first))
    row = 0
    for x in parts:
        out[..., row : row + x.shape[-2], :] = x
        row += x.shape[-2]
    return out
