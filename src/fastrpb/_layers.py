"""What the PyTorch and Flax layers share: argument checks and the decoding cache.

No maths lives here (that is the functional core) and no framework is imported: the
layers in ``fastrpb.torch`` and ``fastrpb.flax`` own parameters, reshape heads and
call ``fastrpb.linear_attention``, ``fastrpb.rpb`` and ``fastrpb.rpb_nd``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._compat import int_arg

__all__ = ["LayerCache", "check_skip", "check_grid", "check_axes", "check_heads"]


class LayerCache(NamedTuple):
    """Decoding cache of a ``MultiheadLinearAttention`` layer.

    Attributes
    ----------
    state :
        The functional state of ``fastrpb.linear_attention_step`` (opaque; for
        ``"sikf"`` it carries the running key offset).
    values : array or None
        The value projections seen so far, ``(..., H, t, Dh)``, kept only when the
        layer has a FastRPB: the bias of a new token is a weighted sum of all earlier
        values, which no fixed-size state summarises. ``None`` without FastRPB.
    """

    state: Any
    values: Any = None


def check_heads(heads: Any, *, allow_none: bool = True) -> int | None:
    if heads is None and allow_none:
        return None
    return int_arg("heads", heads, minimum=1)


def check_skip(skip: Any) -> tuple[int, int]:
    if not isinstance(skip, (tuple, list)) or len(skip) != 2:
        raise TypeError(f"skip must be a pair (a, b) of token counts, got {skip!r}")
    return (int_arg("skip[0]", skip[0], minimum=0), int_arg("skip[1]", skip[1], minimum=0))


def check_grid(grid: Any) -> tuple[int, ...]:
    if not isinstance(grid, (tuple, list)) or len(grid) == 0:
        raise TypeError(f"grid must be a non-empty sequence of ints, got {grid!r}")
    return tuple(int_arg(f"grid[{k}]", g, minimum=1) for k, g in enumerate(grid))


def check_axes(axes: Any, grid: tuple[int, ...]) -> tuple[int, ...]:
    """Which grid axes get a bias table (default: all)."""
    if axes is None:
        return tuple(range(len(grid)))
    if not isinstance(axes, (tuple, list)) or len(axes) == 0:
        raise TypeError(f"axes must be a non-empty sequence of grid axes, got {axes!r}")
    out = []
    for a in axes:
        a = int_arg("axes entry", a, minimum=0)
        if a >= len(grid):
            raise ValueError(f"axes names axis {a} but grid {grid} has only {len(grid)} axes")
        if a in out:
            raise ValueError(f"axes names axis {a} twice: {tuple(axes)}")
        out.append(a)
    return tuple(sorted(out))


def check_layer_rpb(rpb: Any, heads: int, causal: bool, *, kind: type, kind_nd: type) -> None:
    """A FastRPB module given to an attention layer must fit its heads and causality."""
    if not isinstance(rpb, (kind, kind_nd)):
        raise TypeError(
            f"rpb must be None, an int (the table's max_len) or a FastRPB / FastRPBnd module, "
            f"got {type(rpb).__name__}"
        )
    if rpb.heads not in (None, heads):
        raise ValueError(f"rpb has {rpb.heads} heads but the attention layer has heads = {heads}")
    if causal and isinstance(rpb, kind_nd):
        raise ValueError("a causal attention layer cannot use FastRPBnd: the N-d bias looks in every direction")
    if causal and not rpb.causal:
        raise ValueError(
            "a causal attention layer needs a causal FastRPB (FastRPB(..., causal=True)); "
            "a non-causal bias would let every token see the values of later tokens"
        )
