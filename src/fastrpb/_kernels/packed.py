"""Packed sequences (``cu_seqlens``): unpack by length class, attend, repack."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import _packing
from .. import bias as _bias
from .common import zero_padding

__all__ = ["packed_lengths", "packed_bias", "packed_linear_attention"]


def packed_lengths(xp: Any, cu_seqlens: Any, Lq: int, Lk: int, rpb_tables: Any, like: Any, *, align: int = 1) -> Any:
    """The packing of ``cu_seqlens`` for attention over ``Lq = Lk`` packed tokens."""
    if Lq != Lk:
        raise ValueError(f"cu_seqlens packs queries and keys alike: it needs Lq == Lk, got Lq = {Lq} and Lk = {Lk}")
    if rpb_tables is not None:
        raise ValueError(
            "cu_seqlens does not combine with the N-d bias (rpb_tables/rpb_grid): a grid spans one sequence"
        )
    return _packing.packing(xp, _packing.offsets_of(xp, cu_seqlens, Lq), like, align=align)


def packed_bias(
    xp: Any, out: Any, v: Any, key_mask: Any, rpb: Any, rpb_skip: Any, causal: bool, cu_seqlens: Any
) -> Any:
    """``out`` plus the FastRPB term of every packed sequence on its own."""
    if rpb is None:
        return out
    if key_mask is not None:
        v = zero_padding(xp, v, key_mask)
    try:
        term = _bias.rpb(v, rpb, causal=causal, skip=rpb_skip, cu_seqlens=cu_seqlens)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"in the FastRPB term (rpb=, rpb_skip=): {exc}") from exc
    return out + xp.astype(term, out.dtype, copy=False)


def packed_linear_attention(
    xp: Any,
    attend: Callable[..., Any],
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens: Any,
    *,
    key_mask: Any,
    rpb: Any,
    rpb_tables: Any,
    rpb_skip: Any,
    causal: bool,
    return_state: bool,
    chunk_size: int,
) -> Any:
    """Linear attention of packed sequences: unpack, attend with the padding masked, repack.

    ``attend(q, k, v, key_mask=, return_state=)`` is the attention of unpacked
    sequences (``fastrpb.linear_attention`` with the caller's other options). Returns
    the output, and with ``return_state`` also the state of every sequence, stacked
    along a new leading axis ``N`` (``cu_seqlens`` order).
    """
    # causal: groups padded to whole chunks; their padding is masked by key_mask below
    align = chunk_size if causal else 1
    pk = packed_lengths(xp, cu_seqlens, q.shape[-2], k.shape[-2], rpb_tables, q, align=align)
    outs: list[Any] = []
    states: list[Any] = []
    for g in pk.groups:
        mask = g.valid if key_mask is None else _packing.unpack_mask(xp, g, key_mask)
        qu, ku, vu = (_packing.unpack(xp, g, x, fill=None) for x in (q, k, v))
        res = attend(qu, ku, vu, key_mask=mask, return_state=return_state)
        outs.append(res[0] if return_state else res)
        states.append(res[1] if return_state else None)
    out = packed_bias(xp, _packing.repack(xp, pk, outs), v, key_mask, rpb, rpb_skip, causal, cu_seqlens)
    if not return_state:
        return out
    # one state per sequence, stacked along a new leading axis N (cu_seqlens order)
    S = _packing.per_sequence(xp, pk, [st.S for st in states], -3)
    z = _packing.per_sequence(xp, pk, [st.z for st in states], -2)
    offset = None if states[0].offset is None else _packing.per_sequence(xp, pk, [st.offset for st in states], -2)
    S, z = xp.moveaxis(S, -3, 0), xp.moveaxis(z, -2, 0)
    offset = None if offset is None else xp.moveaxis(offset, -2, 0)
    return out, states[0]._replace(S=S, z=z, offset=offset)  # the sequences' states carry no bias history
