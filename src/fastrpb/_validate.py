"""Argument validation: one rule per kind of argument, used by every public function.

Each public function of fastrpb reads: validate its Python arguments here, resolve the
array namespace once (``fastrpb._compat.namespace``), validate the arrays' dtypes and
shapes here, compute. A kind of argument (a flag, an integer, a seed, a pair of skip
counts, a grid, a bias table, a key mask, ...) has exactly one validator, so every
function that takes it applies the same rule and raises the same message.

Errors are ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong
value or shape); every message names the argument, what was expected and what was
given. Nothing here imports a framework or computes anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "required",
    "flag",
    "integer",
    "non_negative",
    "finite",
    "seed",
    "skip",
    "grid",
    "floating",
    "values",
    "table",
    "broadcast_shapes",
    "broadcast",
    "table_length",
    "skip_fits",
    "attention_inputs",
    "key_mask",
    "causal_lengths",
    "logits_bias",
    "bias_arguments",
    "cu_seqlens",
    "int_arg",
    "skip_arg",
    "grid_arg",
    "check_floating",
]


# --------------------------------------------------------------------------- Python values
def required(**arrays: Any) -> None:
    """A required array argument must be given: ``None`` is a ``TypeError`` naming it.

    (Values that are not arrays are rejected, by name, when the namespace is resolved.)
    """
    for name, x in arrays.items():
        if x is None:
            raise TypeError(f"{name} must be an array (NumPy, CuPy, PyTorch, JAX or any array API library), got None")


def flag(name: str, value: Any) -> bool:
    """A boolean option: only ``True`` or ``False`` (not ``1``, ``"no"`` or an array)."""
    if value is True or value is False:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")


def integer(name: str, value: Any, *, minimum: int) -> int:
    """A Python integer (shapes, lengths, counts) that is at least ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def finite(name: str, value: Any) -> float:
    """A finite real number (``scale``): not ``nan`` or ``inf``, not a bool or an array."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value}")
    return value


def non_negative(name: str, value: Any) -> float:
    """A finite real number ``>= 0`` (``eps``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a non-negative float, got {type(value).__name__}")
    value = float(value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite float >= 0, got {value}")
    return value


def seed(value: Any, name: str = "seed") -> int:
    """A seed of NumPy's ``default_rng``: an integer ``>= 0``."""
    return integer(name, value, minimum=0)


def skip(value: Any, name: str = "skip") -> tuple[int, int]:
    """``skip = (a, b)``: token counts before and after the biased tokens, each ``>= 0``."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (a, b) of token counts, got {value!r}")
    return (integer(f"{name}[0]", value[0], minimum=0), integer(f"{name}[1]", value[1], minimum=0))


def grid(value: Any, name: str = "grid") -> tuple[int, ...]:
    """A token grid ``(G_1, ..., G_k)``: a non-empty sequence of positive ints."""
    if not isinstance(value, (tuple, list)) or len(value) == 0:
        raise TypeError(f"{name} must be a non-empty sequence of ints, got {value!r}")
    return tuple(integer(f"{name}[{k}]", g, minimum=1) for k, g in enumerate(value))


# --------------------------------------------------------------------------- arrays
def floating(xp: Any, name: str, x: Any) -> None:
    """Reject integer, bool and complex arrays with a message naming ``name``."""
    if not _real_floating(xp, x.dtype):
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}"
        )


def _real_floating(xp: Any, dtype: Any) -> bool:
    # ``xp.isdtype`` costs microseconds (NumPy parses its arguments each time) and is
    # asked several times per decoding step: remember the answer per (library, dtype).
    try:
        key = (xp.__name__, dtype)
        known = _FLOATING.get(key)
    except TypeError:  # an unhashable dtype: ask every time
        return bool(xp.isdtype(dtype, "real floating"))
    if known is None:
        known = _FLOATING[key] = bool(xp.isdtype(dtype, "real floating"))
    return known


_FLOATING: dict[tuple[str, Any], bool] = {}


def values(xp: Any, name: str, x: Any, *, ndim: int = 2) -> None:
    """A real floating array of shape ``(..., L, D)`` (``ndim=1``: ``(..., D)``)."""
    floating(xp, name, x)
    if x.ndim < ndim:
        want = "(..., L, D) with at least 2 dimensions" if ndim == 2 else "(..., D) with at least 1 dimension"
        got = "a 0-d array" if x.ndim == 0 else f"shape {tuple(x.shape)}"
        raise ValueError(f"{name} must have shape {want}, got {got}")


def table(xp: Any, name: str, w: Any) -> int:
    """A bias table ``(..., 2M - 1)``: real floating, odd last axis. Returns ``M``."""
    floating(xp, name, w)
    if w.ndim < 1:
        raise ValueError(f"{name} must have shape (..., 2M - 1), got a 0-d array")
    n = w.shape[-1]
    if n % 2 == 0:
        raise ValueError(f"{name} must have an odd last dimension 2M - 1 (offsets -(M-1)..M-1), got length {n}")
    return (n + 1) // 2


def table_length(L: int, M: int, name: str) -> None:
    """A table of half length ``M`` serves sequences of at most ``M`` tokens."""
    if L > M:
        raise ValueError(
            f"the sequence is longer than the bias table {name}: L = {L} tokens but the "
            f"table covers at most M = {M} (shape (..., {2 * M - 1}))"
        )


def skip_fits(value: Any, L: int, name: str = "skip") -> tuple[int, int]:
    """A skip pair (see ``skip``) that leaves at least zero of the ``L`` tokens."""
    a, b = skip(value, name)
    if a + b > L:
        raise ValueError(f"{name} = ({a}, {b}) skips {a + b} tokens but the sequence has only L = {L}")
    return a, b


def broadcast_shapes(*shapes: tuple) -> tuple:
    """The broadcast of shapes, by the standard's rule (as ``numpy.broadcast_shapes``).

    Sizes are aligned from the right; along each axis every size is 1 or one common
    size, which is the result, so ``broadcast_shapes((1,), (0,)) == (0,)`` (an empty
    batch stays empty). Shapes that do not broadcast are a ``ValueError``; public
    functions call ``broadcast``, which names the arguments.
    """
    first = tuple(shapes[0]) if shapes else ()
    # the usual case, and a decoding step's hot path. Lengths first: a tuple compares
    # items before lengths, and a symbolic batch compared with a head count that
    # happens to equal it would pin the batch to that value under torch.export.
    if all(len(s) == len(first) and tuple(s) == first for s in shapes):
        return first
    n = max(len(s) for s in shapes)
    out = []
    for axis in range(n, 0, -1):
        # Compared one by one, never put in a set: under torch.export and jax.export a
        # size may be symbolic (a SymInt, a JAX dimension expression), which is not
        # hashable; ``==`` and ``!=`` are what both answer.
        size: Any = 1
        for s in shapes:
            if len(s) >= axis and s[-axis] != 1:
                if size != 1 and s[-axis] != size:
                    raise ValueError(f"shapes {', '.join(str(tuple(s)) for s in shapes)} do not broadcast")
                size = s[-axis]
        out.append(size)
    return tuple(out)


def broadcast(named: Mapping[str, tuple]) -> tuple:
    """``broadcast_shapes`` of named leading shapes; the error names the arguments."""
    try:
        return broadcast_shapes(*named.values())
    except ValueError:
        raise ValueError(_broadcast_message(named)) from None


def _broadcast_message(named: Mapping[str, tuple]) -> str:
    items = [(name, tuple(s)) for name, s in named.items()]
    if len(items) == 2:
        (a, sa), (b, sb) = items
        return f"the leading dimensions of {a} {sa} do not broadcast against the leading dimensions of {b} {sb}"
    names = ", ".join(name for name, _ in items[:-1]) + f" and {items[-1][0]}"
    shown = ", ".join(f"{name} {s}" for name, s in items)
    return f"the leading dimensions of {names} do not broadcast: {shown}"


def attention_inputs(xp: Any, q: Any, k: Any, v: Any, *, token: bool = False) -> tuple:
    """Queries, keys and values of attention; returns their broadcast leading shape.

    ``q (..., Lq, Dk)``, ``k (..., Lk, Dk)``, ``v (..., Lk, Dv)``, real floating, with
    leading dimensions that broadcast. ``token=True``: one decoding token each,
    ``q_t (..., Dk)``, ``k_t (..., Dk)``, ``v_t (..., Dv)``.
    """
    suffix, ndim = ("_t", 1) if token else ("", 2)
    nq, nk, nv = "q" + suffix, "k" + suffix, "v" + suffix
    for name, x in ((nq, q), (nk, k), (nv, v)):
        values(xp, name, x, ndim=ndim)
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"{nk} must have the width Dk of {nq}: {nq} has shape {tuple(q.shape)} (Dk = {q.shape[-1]}) "
            f"but {nk} has shape {tuple(k.shape)} (Dk = {k.shape[-1]})"
        )
    if not token and v.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"v must have one row per key: k has shape {tuple(k.shape)} (Lk = {k.shape[-2]}) "
            f"but v has shape {tuple(v.shape)} ({v.shape[-2]} rows)"
        )
    lq, lk, lv = q.shape[:-ndim], k.shape[:-ndim], v.shape[:-ndim]
    if lq == lk == lv:  # the common case, a tenth of a PyTorch decoding step's checks
        return tuple(lq)
    return broadcast({nq: lq, nk: lk, nv: lv})


def key_mask(xp: Any, mask: Any, Lk: int, lead: tuple) -> tuple:
    """``key_mask (..., Lk)``, bool, leading dimensions broadcasting against ``lead``.

    Returns the broadcast leading shape of the mask and ``lead`` (``lead`` if no mask).
    """
    if mask is None:
        return lead
    if not xp.isdtype(mask.dtype, "bool"):
        raise TypeError(f"key_mask must be a bool array (True = a key to attend to), got dtype {mask.dtype}")
    if mask.ndim < 1 or mask.shape[-1] != Lk:
        raise ValueError(
            f"key_mask must have shape (..., Lk) with Lk = {Lk} (the number of keys), got shape {tuple(mask.shape)}"
        )
    return broadcast({"key_mask": mask.shape[:-1], "q, k, v": lead})


def causal_lengths(causal: bool, Lq: int, Lk: int) -> None:
    """Causal attention needs as many queries as keys."""
    if causal and Lq != Lk:
        raise ValueError(f"causal=True needs as many queries as keys, got q with Lq = {Lq} and k with Lk = {Lk}")


def logits_bias(xp: Any, bias: Any, Lq: int, Lk: int, lead: tuple) -> None:
    """An additive logits bias: real floating, broadcasting to ``(..., Lq, Lk)``."""
    if bias is None:
        return
    floating(xp, "logits_bias", bias)
    shape = tuple(bias.shape)
    if len(shape) < 1 or shape[-1] not in (1, Lk) or (len(shape) >= 2 and shape[-2] not in (1, Lq)):
        raise ValueError(f"logits_bias must broadcast to (..., Lq, Lk) = (..., {Lq}, {Lk}), got shape {shape}")
    broadcast({"logits_bias": shape[:-2], "q, k, v": lead})


def bias_arguments(rpb: Any, rpb_tables: Any, rpb_grid: Any, rpb_skip: Any) -> dict[str, Any]:
    """The FastRPB arguments of the attention functions; returns the named tables.

    ``rpb`` (a 1-d table) or ``rpb_tables`` with ``rpb_grid`` (the N-d bias), not
    both; ``rpb_skip`` is a skip pair whether or not a bias is given.
    """
    skip(rpb_skip, "rpb_skip")
    if rpb is not None and (rpb_tables is not None or rpb_grid is not None):
        raise ValueError("give either rpb (a 1-d bias table) or rpb_tables with rpb_grid (the N-d bias), not both")
    if (rpb_tables is None) != (rpb_grid is None):
        raise ValueError(
            "rpb_tables and rpb_grid go together: the N-d bias needs one table (or None) per grid axis and the grid"
        )
    if rpb is not None:
        return {"rpb": rpb}
    if rpb_tables is not None:
        if not isinstance(rpb_tables, (tuple, list)):
            raise TypeError(
                f"rpb_tables must be a sequence with one table (or None) per grid axis, got {type(rpb_tables).__name__}"
            )
        grid(rpb_grid, "rpb_grid")
        return {f"rpb_tables[{i}]": t for i, t in enumerate(rpb_tables) if t is not None}
    return {}


def cu_seqlens(xp: Any, offsets: Any, T: int, *, traced: bool) -> tuple[int, ...]:
    """Packed-sequence offsets ``0 = c_0 <= c_1 <= ... <= c_N = T`` (flash-attention / fla).

    Non-decreasing: a zero-length sequence (``c_n = c_{n+1}``: an empty document, an
    unused slot of a fixed-size packing) is allowed and gets an empty output and an
    empty (or its initial) state; only decreasing offsets are an error.

    A 1-d integer array of ``N + 1 >= 2`` entries, of the library and device of the
    other inputs (checked when the namespace is resolved), or a tuple/list of Python
    ints (static: usable under ``jax.jit``). Returns the offsets as Python ints: the
    packing is a shape (the longest sequence), so the values must be concrete; a
    traced or lazy array (``traced``: a JAX tracer, a Dask array) is a ``ValueError``
    saying so.
    """
    if isinstance(offsets, (tuple, list)):  # static offsets (usable under jax.jit)
        values = tuple(integer(f"cu_seqlens[{n}]", c, minimum=0) for n, c in enumerate(offsets))
        if len(values) < 2:
            raise ValueError(f"cu_seqlens must have shape (N + 1,) with N >= 1 sequences, got {len(values)} offsets")
        return _non_decreasing_offsets(values, T)
    if not xp.isdtype(offsets.dtype, "integral"):
        raise TypeError(
            f"cu_seqlens must be an integer array of offsets 0 = c_0 <= ... <= c_N = T, got dtype {offsets.dtype}"
        )
    if offsets.ndim != 1 or offsets.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have shape (N + 1,) with N >= 1 sequences, got shape {tuple(offsets.shape)}")
    if traced:
        raise ValueError(
            "cu_seqlens must be concrete: the longest packed sequence sets a shape, so under jax.jit (or with "
            "Dask arrays, whose values exist only after .compute()) pass cu_seqlens as a tuple of Python ints "
            f"(static), not a {'Dask' if 'dask' in type(offsets).__module__ else 'traced'} array"
        )
    return _non_decreasing_offsets(tuple(int(offsets[i]) for i in range(offsets.shape[0])), T)


def _non_decreasing_offsets(values: tuple[int, ...], T: int) -> tuple[int, ...]:
    if values[0] != 0 or values[-1] != T:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at T = {T} (the packed length axis), "
            f"got c_0 = {values[0]} and c_N = {values[-1]}"
        )
    for n in range(1, len(values)):
        if values[n] < values[n - 1]:
            raise ValueError(
                f"cu_seqlens must be non-decreasing (a sequence has zero tokens or more), "
                f"got c_{n - 1} = {values[n - 1]} and c_{n} = {values[n]}"
            )
    return values


# --------------------------------------------------------------------------- old names
# The names ``fastrpb.torch`` and ``fastrpb.flax`` import.
int_arg = integer
check_floating = floating


def skip_arg(value: Any) -> tuple[int, int]:
    return skip(value)


def grid_arg(value: Any) -> tuple[int, ...]:
    return grid(value)
