"""The FastRPB term added to an attention output: one call, streamed, or one token."""

from __future__ import annotations

from typing import Any

from .. import bias as _bias
from .common import as_dtype

__all__ = ["add_bias", "add_bias_streaming", "add_bias_streaming_nd", "step_bias", "step_bias_nd"]


def add_bias(
    xp: Any,
    out: Any,
    v: Any,
    *,
    rpb: Any,
    rpb_tables: Any,
    rpb_grid: Any,
    rpb_skip: Any,
    causal: bool,
) -> Any:
    """``out + B v`` (the FastRPB term), in ``out``'s dtype.

    ``v`` comes from ``mask_values(..., bias=True)``: padding keys' values are zero,
    so they give no bias, whatever they held (NaN included).
    """
    if rpb is None and rpb_tables is None:
        return out
    Lq, Lk = out.shape[-2], v.shape[-2]
    if Lq != Lk:
        raise ValueError(
            f"the FastRPB term (rpb=/rpb_tables=) needs as many queries as keys (B is L x L), "
            f"got Lq = {Lq} and Lk = {Lk}"
        )
    try:
        if rpb is not None:
            term = _bias.rpb(v, rpb, causal=causal, skip=rpb_skip)
        else:
            term = _bias.rpb_nd(v, rpb_tables, rpb_grid, causal=causal, skip=rpb_skip)
    except (TypeError, ValueError) as exc:
        # fastrpb.bias names its own arguments (w, tables, grid, skip); say where they came from
        given = "rpb" if rpb is not None else "rpb_tables/rpb_grid"
        raise type(exc)(f"in the FastRPB term ({given}=, rpb_skip=): {exc}") from exc
    return out + xp.astype(term, out.dtype, copy=False)


def add_bias_streaming(xp: Any, out: Any, v: Any, w: Any, skip: Any, state: Any) -> tuple[Any, Any]:
    """``out + B v`` continued from (and returning) the bias history of the state.

    ``v`` comes from ``mask_values(..., bias=True)``: padding keys' values are zero,
    so they give no bias, now or later.
    """
    try:
        term, history = _bias.rpb(
            v, w, causal=True, skip=skip, initial_state=None if state is None else state.rpb, return_state=True
        )
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"in the FastRPB term (rpb=, rpb_skip=, initial_state): {exc}") from exc
    return out + xp.astype(term, out.dtype, copy=False), history


def step_bias(xp: Any, out: Any, state: Any, v_t: Any, w: Any, skip: Any, donate: bool = False) -> tuple[Any, Any]:
    """``out + sum_{j <= t} w[M - 1 + t - j] v_j`` through ``rpb_step`` and the state's history."""
    if w is None:
        raise ValueError("state carries a FastRPB history (it was made with rpb=) but rpb is None; pass the same table")
    if state is not None and state.rpb is None:
        raise ValueError(
            "state was made without rpb=, so it holds no bias history for the rpb= given; "
            "pass rpb= from the start of the sequence (or start from state=None)"
        )
    try:
        # not the public rpb_step: the namespace (w and the history included) and v_t are
        # already checked, and those checks were a third of the bias term's cost per token
        term, history = _bias._step(xp, None if state is None else state.rpb, v_t, w, skip, donate)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"in the FastRPB term (rpb=, rpb_skip=): {exc}") from exc
    return out + as_dtype(xp, term, out.dtype), history


def add_bias_streaming_nd(xp: Any, out: Any, v: Any, tables: Any, grid: Any, skip: Any, state: Any) -> tuple[Any, Any]:
    """``out`` plus the causal N-d bias, continued from (and returning) the state's N-d history."""
    try:
        term, history = _bias.rpb_nd(
            v,
            tables,
            grid,
            causal=True,
            skip=skip,
            initial_state=None if state is None else state.rpb,
            return_state=True,
        )
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"in the FastRPB term (rpb_tables=/rpb_grid=, rpb_skip=, initial_state): {exc}") from exc
    return out + xp.astype(term, out.dtype, copy=False), history


def step_bias_nd(xp: Any, out: Any, state: Any, v_t: Any, tables: Any, grid: Any, skip: Any) -> tuple[Any, Any]:
    """``out`` plus one raster position of the causal N-d bias (``rpb_nd_step``) from the state's history."""
    if tables is None or grid is None:
        raise ValueError(
            "state carries an N-d FastRPB history (it was made with rpb_tables=/rpb_grid=) but rpb_tables or "
            "rpb_grid is None; pass the same tables and grid"
        )
    if state is not None and not isinstance(state.rpb, _bias.RPBndState):
        raise ValueError(
            "state was made without rpb_tables=, so it holds no N-d bias history for the rpb_tables= given; "
            "pass rpb_tables= and rpb_grid= from the start of the sequence (or start from state=None)"
        )
    try:
        term, history = _bias.rpb_nd_step(None if state is None else state.rpb, v_t, tables, grid=grid, skip=skip)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"in the FastRPB term (rpb_tables=/rpb_grid=, rpb_skip=): {exc}") from exc
    return out + as_dtype(xp, term, out.dtype), history
