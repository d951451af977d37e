"""Control flow that compiles: conditionals and positions under ``jax.jit`` and
``torch.compile``, eagerly plain Python (the streaming FastRPB state, ``_online``),
eager JAX kernels run as cached ``jax.jit`` computations (``eager_jit``), and eager
updates that write a state's buffers in place inside a compiled PyTorch graph
(``write_in_place``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from .dispatch import _is, device_of


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


def conditionals_nest(xp: Any) -> bool:
    r"""Whether a compiled conditional (``cond``) may hold conditionals: under ``jax.jit``
    it may; under ``torch.compile`` nested ``torch.cond``\ s failed in Dynamo from three
    levels deep ("cond's output stride ... size u1"), so they stay side by side there."""
    return not _is(xp, "torch")


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
    JAX arrays are immutable and have no views: returned as they are, but committed to
    their device (``jax.device_put``, no copy): an array computed from a caller's
    uncommitted ones (``jnp.asarray`` of NumPy data) is uncommitted, a jitted step's
    outputs are committed, and ``jax.jit`` compiles again for each placement, so a
    state keeps one (a prompt's state then continues a jitted step without a second
    compilation). On PyTorch a ``clone`` (not ``torch.asarray(x, copy=True)``, which
    warns once per process for a tensor that requires grad under 2.13) copies within
    the autograd graph."""
    if _is(xp, "torch"):
        import torch

        return x.clone(memory_format=torch.contiguous_format)
    if _is(xp, "numpy"):
        return np.array(x, order="C", copy=True)
    if _is(xp, "jax"):
        import jax  # already imported: xp is JAX's namespace

        return x if isinstance(x, jax.core.Tracer) else jax.device_put(x, device_of(x))
    if _is(xp, "dask"):
        return x
    return xp.asarray(x, copy=True)


_F = TypeVar("_F", bound=Callable[..., Any])
_G = TypeVar("_G", bound=Callable[..., None])


def eager_jit(*, static: tuple[str, ...] = ()) -> Callable[[_F], _F]:
    """Decorator for a private kernel ``fn(xp, *arrays, **static)``: called with eager
    JAX arrays, it runs as one cached ``jax.jit`` computation; everywhere else (other
    libraries, and inside a JAX trace, where it is traced into the caller's
    computation) as it is.

    Why: eager JAX compiles one XLA executable per operation and shape, tens of
    milliseconds each on a CPU, and dispatches each operation on its own. A decoding
    step is a hundred small operations: its first call took seconds and every later
    one milliseconds (NumPy: a tenth of a millisecond). A JAX user expects what
    ``jax.numpy``'s own functions do: they run as cached jitted computations. A
    kernel so decorated compiles once per shape and per value of its ``static``
    arguments (the Python decisions it takes: hashable values, always passed by
    keyword), and then costs one dispatch.

    A static argument compared by identity (its type keeps ``object.__eq__``: a feature
    map holding arrays or a callable) would compile once per object, perhaps a new
    one per call: such a call runs eagerly instead.
    """

    def decorate(fn: _F) -> _F:
        compiled: list[Any] = []  # the jitted kernel, made on first use (JAX is imported then)

        @functools.wraps(fn)
        def run(xp: Any, *args: Any, **kwargs: Any) -> Any:
            if not _is(xp, "jax"):
                return fn(xp, *args, **kwargs)
            import jax  # already imported: xp is JAX's namespace

            if any(_by_identity(kwargs[n]) for n in static if n in kwargs):
                return fn(xp, *args, **kwargs)
            dynamic = (args, [v for n, v in kwargs.items() if n not in static])
            if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(dynamic)):
                return fn(xp, *args, **kwargs)
            if not compiled:
                compiled.append(jax.jit(fn, static_argnums=0, static_argnames=static))
            return compiled[0](xp, *args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate


def _by_identity(value: Any) -> bool:
    """Whether ``value``'s type compares by identity (keeps ``object.__eq__``; not None)."""
    return value is not None and type(value).__eq__ is object.__dict__["__eq__"]


def writes_in_place(xp: Any, *arrays: Any) -> bool:
    """Whether ``write_in_place`` writes buffers in place: PyTorch under ``torch.compile``,
    the one mode where a compiled step would otherwise copy what it leaves unchanged,
    and none of ``arrays`` requires a gradient (autograd does not differentiate an
    update in place: such a step stays functional)."""
    if not (_is(xp, "torch") and is_compiled(xp)):
        return False
    return not any(x.requires_grad for x in arrays)


def in_place_update(fn: _G) -> _G:
    """Decorator: an update ``write_in_place`` may run, named by its module and name
    (``module:name``; a custom op takes no callable). The name is fixed here, where
    ``fn`` is defined: Dynamo traces ``__qualname__`` to another string."""
    setattr(fn, "in_place_name", f"{fn.__module__}:{fn.__qualname__}")  # noqa: B010 (a function's own attribute)
    return fn


def write_in_place(xp: Any, fn: Callable[..., None], buffers: tuple, inputs: tuple, *static: int) -> None:
    """``fn(xp, buffers, inputs, *static)``: eager code that reads ``inputs`` and writes
    into the arrays ``buffers`` in place (it may read their values first; it returns
    nothing). ``fn`` is decorated with ``in_place_update``; ``static`` are Python ints.

    Why: under ``torch.compile`` a conditional (``torch.cond``) may not write its
    operands and may not return them, so a conditional update of a large buffer (a
    streaming state's levels, every 32 tokens) copies the whole buffer at every call.
    Here the update is one opaque operation (``torch_ops.write_in_place``, a custom op
    declaring ``buffers`` mutated): the compiled graph calls it with the buffers
    themselves, it runs ``fn`` eagerly (Python decides what to do from the values),
    and Inductor copies nothing. Elsewhere (eagerly, and for arrays that are not
    tensors) a call.
    """
    if not writes_in_place(xp, *buffers, *inputs):
        fn(xp, buffers, inputs, *static)
        return
    # imported here, where PyTorch is: Dynamo runs an import as Python, so the op is
    # registered even when this is first reached while compiling
    from . import torch_ops

    torch_ops.write_in_place(list(buffers), list(inputs), fn.in_place_name, list(static))  # type: ignore[attr-defined]
