"""Control flow that compiles: conditionals and positions under ``jax.jit`` and
``torch.compile``, eagerly plain Python (the streaming FastRPB state, ``_online``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .dispatch import _is


def is_compiled(xp: Any, *arrays: Any) -> bool:
    """Whether values cannot be read into Python here: any JAX tracer among ``arrays``,
    or PyTorch's Dynamo tracing (``torch.compile``)."""
    if _is(xp, "jax"):
        import jax

        return any(isinstance(x, jax.core.Tracer) for x in arrays if x is not None)
    if _is(xp, "torch"):
        import torch

        return bool(torch.compiler.is_compiling())
    return False


def cond(xp: Any, pred: Any, true_fn: Callable[..., tuple], false_fn: Callable[..., tuple], operands: tuple) -> tuple:
    """``true_fn(*operands)`` if ``pred`` else ``false_fn(*operands)``: a tuple of arrays.

    Eagerly a Python ``if`` on ``bool(pred)``; a JAX tracer ``pred`` (``jax.jit``,
    ``lax.scan``...): ``jax.lax.cond``; under ``torch.compile``: ``torch.cond``, whose
    branches may not return an operand or a view of one, so every output is copied
    there (a branch that leaves an array unchanged costs one copy of it).
    """
    if _is(xp, "jax") and is_compiled(xp, pred):
        import jax

        return tuple(jax.lax.cond(pred, true_fn, false_fn, *operands))
    if _is(xp, "torch") and is_compiled(xp):
        import torch

        def fresh(fn: Callable[..., tuple]) -> Callable[..., tuple]:
            def run(*ops: Any) -> tuple:
                return tuple(x.clone(memory_format=torch.contiguous_format) for x in fn(*ops))

            return run

        return tuple(torch.cond(pred, fresh(true_fn), fresh(false_fn), tuple(operands)))
    return tuple(true_fn(*operands) if bool(pred) else false_fn(*operands))


def slices_compile(xp: Any) -> bool:
    """Whether eager operations compile a kernel per shape and per static slice (JAX:
    one XLA executable each, tens of milliseconds on a CPU): positions that change per
    call are better passed as arrays (a gather, compiled once per shape), and work
    with many shapes better done where its compilations cost least."""
    return bool(_is(xp, "jax"))


def owned(xp: Any, x: Any) -> Any:
    """A row-major array of its own with ``x``'s values: what a streaming state keeps
    never shares memory with an array it was cut from (a larger buffer it would keep
    alive, or a caller's array), and a state made by a rebuild (views, transposes)
    stores the layout a compiled step does (a compiled function guards on strides).
    JAX arrays are immutable and have no views: returned as they are. On PyTorch a
    ``clone`` (not ``torch.asarray(x, copy=True)``, which warns once per process for a
    tensor that requires grad under 2.13) copies within the autograd graph."""
    if _is(xp, "torch"):
        import torch

        return x.clone(memory_format=torch.contiguous_format)
    if _is(xp, "numpy"):
        return np.array(x, order="C", copy=True)
    if _is(xp, "jax") or _is(xp, "dask"):
        return x
    return xp.asarray(x, copy=True)
