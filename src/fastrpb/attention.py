r"""Linear attention (non-causal, chunked causal, decoding) and exact softmax attention.

Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs: Fast
Autoregressive Transformers with Linear Attention", ICML) replaces ``exp(q . k)`` by a
kernel ``phi(q) . phi(k)`` that factorises, so

$$
\mathrm{out}_i = \frac{\sum_j \phi(q_i) \cdot \phi(k_j)\, v_j}
{\sum_j \phi(q_i) \cdot \phi(k_j) + \varepsilon}
= \frac{\phi(q_i)^\top (\sum_j \phi(k_j) v_j^\top)}
{\phi(q_i)^\top \sum_j \phi(k_j) + \varepsilon}
$$

costs O(L F Dv) instead of O(L^2). In the causal (chunked) algorithm the normaliser
rides along as a ones column of the values, ``[V, 1]``, so every product serves both;
non-causal it is one extra matrix-vector product (cheaper there than the column).

The FastRPB term ``B V`` (Zubkov & Gavrilov 2022, arXiv:2202.11364) is added by
``fastrpb.bias``; nothing here repeats its maths.

Exponential maps (``sikf``, ``favor``)
--------------------------------------
Their features are ``exp`` of a log-feature, ``phi(x)_f = exp(l(x)_f)``, and
``exp`` of raw logits overflows. We never form them: with per-feature key offsets
``c_f`` folded into the queries, ``sum_f exp(a_f) exp(b_f) = sum_f exp(a_f + c_f)
exp(b_f - c_f)``, every key feature is <= 1 and every query row is scaled so that its
largest feature is 1. Non-causal, ``c_f`` is the maximum of ``l(k)_f`` over all keys.
Causal, the offsets only look back: chunk ``n`` uses the running maximum up to its
own end, and the carried state of earlier chunks is rescaled as that maximum grows,
so a large late key cannot underflow earlier ones (decoding does the same per
token). One limit remains: inside a chunk the keys share the chunk's frame, so a key
feature more than ~80 units (float32; ~700 in float64) above an earlier key's in
the same chunk underflows the earlier key for the queries between them. For these maps ``eps`` is *relative*: it is added in the frame where the
largest single kernel term a query sees, ``max_{j, f} exp(l(q_i)_f + l(k_j)_f)``, is 1,

$$
\mathrm{out}_i = \frac{\sum_j K_{ij} v_j}{\sum_j K_{ij} + \varepsilon\, s_i},
\qquad s_i = \max_{j \text{ visible}, f} e^{l(q_i)_f + l(k_j)_f},
$$

which is invariant to shifting a query row or all keys (as the kernel is), never
swamps a denominator (it is at least ``s_i``), and does not depend on the chunk size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from . import _packing, _validate
from ._compat import compute_dtype, device_of, jax_pytree, namespace, owned
from ._kernels.causal import causal_attention
from ._kernels.common import (
    as_dtype,
    features,
    finite_or_zero,
    mask_keys,
    mask_values,
    neg_inf,
    normalise,
    prepend,
    tril_product,
    with_ones,
)
from ._kernels.exponential import causal_exp_attention, log_features, noncausal_exp_attention, state_keys
from ._kernels.noncausal import noncausal_attention
from ._kernels.packed import packed_bias, packed_lengths, packed_linear_attention
from ._kernels.recurrent import decode_token, recurrent_step, token_features
from ._kernels.rpb import add_bias, add_bias_streaming, add_bias_streaming_nd, step_bias, step_bias_nd
from ._online import held as held_1d
from ._online_nd import RPBndState
from ._online_nd import held as held_nd
from ._typing import Array
from ._validate import broadcast_shapes as _lead
from .feature_maps import FeatureMap, FeatureMapLike, resolve

__all__ = ["LinearAttentionState", "linear_attention", "linear_attention_step", "softmax_attention"]


@jax_pytree(static=("feature_map",))
class LinearAttentionState(NamedTuple):
    """What causal linear attention carries from one token to the next.

    ``S[..., f, :] = sum_j phi(k_j)_f v_j`` and ``z[..., f] = sum_j phi(k_j)_f`` over the
    keys seen so far, in the compute dtype (float32 for half-precision inputs). For the
    exponential maps both are stored relative to ``offset``: the running maximum of the
    log-features of the keys, per feature, so ``S`` and ``z`` hold
    ``exp(l(k_j)_f - offset_f)``-weighted sums, every weight <= 1 (``offset`` is
    ``-inf`` before any key); it is ``None`` for the other maps. ``feature_map`` is the
    signature of the map that made the state (static under ``jax.jit``: the state is
    a JAX pytree of ``S``, ``z``, ``offset`` and ``rpb``).

    ``rpb`` is the history of the FastRPB term (a ``fastrpb.RPBState``) when the state
    was made with ``rpb=w``, else ``None``: the bias of a new token is a weighted sum
    of all earlier values, which ``S`` and ``z`` do not summarise.

    Memory per leading index: ``F (Dv + 2)`` numbers (``F (Dv + 1)`` without an
    offset), independent of the tokens seen; with ``rpb`` add the ``RPBState``'s,
    about ``4 M Dv`` numbers (``M`` the table's maximum length), preallocated: the
    state's structure and shapes do not change with the tokens seen.

    Examples
    --------
    >>> import numpy as np
    >>> from fastrpb import linear_attention
    >>> x = np.ones((3, 4))
    >>> _, state = linear_attention(x, x, x, causal=True, return_state=True)
    >>> state.S.shape, state.z.shape, state.offset, state.feature_map
    ((4, 4), (4,), None, 'elu')
    """

    S: Array  # (..., F, Dv)
    z: Array  # (..., F)
    offset: Array | None  # (..., F) or None
    feature_map: str
    rpb: Any = None  # RPBState, RPBndState or None


def _state(xp: Any, fmap: FeatureMap, final: Any, offset: Any) -> LinearAttentionState:
    """The state from ``(S, z)`` or from a ``(..., F, Dv + 1)`` array ``[S, z]``."""
    S, z = final if isinstance(final, tuple) else (final[..., :-1], final[..., -1])
    # z comes from the keys alone, S from keys and values: one lead for both (broadcast
    # keys, as k (1, H) with v (B, H), gave a z that initial_state= then refused)
    lead = _lead(tuple(S.shape[:-2]), tuple(z.shape[:-1]))
    # copies, so the state holds plain arrays of its own: a broadcast is a read-only
    # view on NumPy, a slice of [S, z] keeps the whole of it; O(F Dv) once per call
    S = owned(xp, xp.broadcast_to(S, (*lead, *S.shape[-2:])))
    z = owned(xp, xp.broadcast_to(z, (*lead, z.shape[-1])))
    if offset is not None:
        offset = owned(xp, xp.broadcast_to(offset, z.shape))
    return LinearAttentionState(S=S, z=z, offset=offset, feature_map=fmap.signature)


def _initial_arguments(fmap: FeatureMap, state: Any, causal: bool, rpb: Any, rpb_tables: Any) -> dict[str, Any]:
    """Checks of ``initial_state`` that need no array; returns its arrays by name (for
    the namespace: a state of another library or device is an error naming it)."""
    if state is None:
        return {}
    if not isinstance(state, LinearAttentionState):
        raise TypeError(
            "initial_state must be a LinearAttentionState (from linear_attention(..., return_state=True) "
            f"or linear_attention_step) or None, got {type(state).__name__}"
        )
    if not causal:
        raise ValueError("initial_state needs causal=True: only a causal sequence can be continued, got causal=False")
    if state.feature_map != fmap.signature:
        raise ValueError(
            f"initial_state was made by feature map {state.feature_map!r} but feature_map is {fmap.signature!r}; "
            "continue a sequence with the map that started it"
        )
    nd = isinstance(state.rpb, RPBndState)
    if state.rpb is not None and rpb is None and not nd:
        raise ValueError(
            "initial_state carries a FastRPB history (it was made with rpb=) but rpb is None; pass the same table"
        )
    if nd and rpb_tables is None:
        raise ValueError(
            "initial_state carries an N-d FastRPB history (it was made with rpb_tables=/rpb_grid=) but rpb_tables "
            "is None; pass the same tables and grid"
        )
    if (rpb is not None or rpb_tables is not None) and (state.rpb is None or nd != (rpb_tables is not None)):
        given = "rpb_tables=" if rpb_tables is not None else "rpb="
        raise ValueError(
            f"initial_state was made without {given}, so it holds no bias history for the {given} given; "
            f"pass {given} from the start of the sequence (or start from initial_state=None)"
        )
    return {
        "initial_state": state.S,
        "initial_state.z": state.z,
        "initial_state.offset": state.offset,
        "initial_state.rpb": _held_bias(state.rpb),
    }


def _held_bias(history: Any) -> Any:
    """One array of a bias history (1-d or N-d), or None."""
    return held_nd(history) if isinstance(history, RPBndState) else held_1d(history)


def _carried(
    xp: Any, fmap: FeatureMap, state: LinearAttentionState, F: int, Dv: int, lead: tuple, work: Any
) -> tuple[Any, Any]:
    """``[S, z]`` of a checked initial state as one ``(..., F, Dv + 1)`` array, and its offset."""
    S, z, offset = _check_state(xp, fmap, state, F, Dv, lead, name="initial_state", inputs="q, k, v")
    total = xp.concat([as_dtype(xp, S, work), as_dtype(xp, z, work)[..., None]], axis=-1)
    return total, None if offset is None else as_dtype(xp, offset, work)


def linear_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    feature_map: FeatureMapLike = "elu",
    causal: bool = False,
    key_mask: Array | None = None,
    eps: float = 1e-6,
    chunk_size: int = 64,
    rpb: Array | None = None,
    rpb_tables: Sequence[Array | None] | None = None,
    rpb_grid: Sequence[int] | None = None,
    rpb_skip: tuple[int, int] = (0, 0),
    initial_state: LinearAttentionState | None = None,
    return_state: bool = False,
    normalize: bool = True,
    scale: float | None = None,
    cu_seqlens: Array | Sequence[int] | None = None,
) -> Array:
    r"""Kernelised linear attention, optionally with the FastRPB term.

    $$
    \mathrm{out}_i = \frac{\sum_j \phi(q_i) \cdot \phi(k_j)\, v_j}
    {\sum_j \phi(q_i) \cdot \phi(k_j) + \varepsilon}
    \;+\; \sum_j w_{i - j}\, v_j
    $$

    over all keys ``j`` (non-causal) or ``j <= i`` (causal); the second term is
    present only with ``rpb=`` (or ``rpb_tables=``/``rpb_grid=``).

    Non-causal: ``phi(Q) (phi(K)^T V)`` over ``phi(Q) sum_j phi(k_j)``, O(L F Dv) time.
    Causal: chunks of ``C``
    tokens, a masked ``tril(Qc Kc^T) [Vc, 1]`` inside each chunk and an exclusive prefix
    sum of the chunk states ``Kc^T [Vc, 1]`` across chunks, O(L C F + L F Dv) time and
    O(L (F + Dv) + (L / C) F Dv) memory. For ``sikf``/``favor`` the exponentials are
    formed with offsets that cancel (see the module docstring): outputs are finite
    for any finite logits, and ``eps`` is relative to the largest kernel term.
    Non-causal results and decoding are accurate at any logit scale; causal results
    while no key feature rises more than ~80 (float32) above an earlier key's inside
    one chunk (else the queries between lose the earlier key: finite, possibly zero
    output; a smaller ``chunk_size`` helps, 1 is exact).

    Parameters
    ----------
    q : array, shape (..., Lq, Dk)
        Queries, one row per query token.
    k : array, shape (..., Lk, Dk)
        Keys, one row per key token, as wide as the queries.
    v : array, shape (..., Lk, Dv)
        Values, one row per key. All three real floating; leading dimensions broadcast. float16/bfloat16 are computed in
        float32 and returned in their dtype.
    feature_map : str, FeatureMap or callable
        ``"elu"``, ``"relu"``, ``"sikf"``, ``"dpfp"``, ``"taylor"``, a map from
        ``fastrpb.feature_maps`` (e.g. ``favor(projection)``) or a callable applied to
        both queries and keys.
    causal : bool
        Query ``i`` sees keys ``j <= i``; needs ``Lq == Lk``.
    key_mask : bool array, shape (..., Lk), optional
        False marks a padding key: excluded from numerator and normaliser (and from
        the FastRPB term). A query that sees no key gets zeros.
    eps : float
        Added to the normaliser (relative to the largest kernel term for the
        exponential maps).
    chunk_size : int
        Chunk length ``C`` of the causal algorithm.
    rpb : array, shape (..., 2M - 1), optional
        FastRPB table: adds ``fastrpb.rpb(v, rpb, causal=causal, skip=rpb_skip)``.
    rpb_tables, rpb_grid : optional
        N-d FastRPB instead: adds ``fastrpb.rpb_nd(v, rpb_tables, rpb_grid, causal=causal, skip=rpb_skip)``
        (causal: raster order over the grid).
    rpb_skip : (int, int)
        Tokens at the start and end that neither give nor receive the bias.
    initial_state : LinearAttentionState, optional
        Causal only: continue the sequence this state ends (from ``return_state=True``
        or ``linear_attention_step``, made with the same feature map, the same
        ``rpb=`` table or none, and leading dimensions that broadcast with the
        inputs'). Calls that pass the state along equal one call on the whole
        sequence, the FastRPB term included: a prompt can be prefilled in pieces.
        Costs one matrix product ``phi(Q) [S, z]`` more (``F`` pseudo-keys before the
        chunk for ``sikf``/``favor``, so their offsets and relative ``eps`` are those
        of one call); the FastRPB term continues from the state's ``RPBState`` (or,
        N-d, its ``RPBndState``: a prompt may stop anywhere on the grid).
        ``None`` starts a sequence.
    return_state : bool
        Causal only: also return the ``LinearAttentionState`` after the last token, so
        ``linear_attention_step`` or another call continues the sequence. With
        ``rpb=`` it carries the bias history (``rpb_skip`` must then be ``(a, 0)``);
        with ``rpb_tables=``/``rpb_grid=`` (``causal=True``) the raster-order N-d
        history (``fastrpb.rpb_nd_step``), the values may then stop before the end
        of the grid.
    normalize : bool
        ``False``: return the unnormalised ``sum_j K_ij v_j`` with
        ``K_ij = phi(q_i) . phi(k_j)`` (fla's ``normalize=False``, the Performer's
        ``renormalize_attention=False``), ``eps`` unused. The exponential maps
        (``sikf``, ``favor``) are then in their true scale, ``K_ij = sum_f
        exp(l(q_i)_f + l(k_j)_f)``: finite while every log-kernel stays below ~88
        (float32; ~709 in float64), ``inf`` beyond; the normalised output has no such
        limit. The FastRPB term is added either way.
    scale : float, optional
        Multiplies the queries before the feature map, ``phi(s q_i)`` (``None``: 1),
        e.g. ``1 / sqrt(Dk)`` to match softmax attention's temperature.
    cu_seqlens : int array, shape (N + 1,), or tuple of ints, optional
        Packed sequences, the flash-attention / fla convention: offsets ``0 = c_0 <=
        c_1 <= ... <= c_N = L`` along the length axis of ``q``, ``k``, ``v`` (``Lq = Lk
        = L``; leading dimensions allowed, batch 1 typical). Sequence ``n`` is tokens
        ``c_n .. c_{n+1} - 1``; it attends (causal or not) and is biased only within
        itself, ``rpb_skip`` applied to each sequence: equal to ``N`` separate calls.
        A zero-length sequence (``c_n = c_{n+1}``) gives no rows and the empty state.
        With ``return_state=True`` the state holds one state per sequence, stacked
        along a new *leading* axis ``N`` (``state.S`` of shape ``(N, ..., F, Dv)``);
        these states carry no FastRPB history (``state.rpb`` is None), and
        ``initial_state`` cannot be combined with ``cu_seqlens`` (a ``ValueError``).
        Also a tuple/list of Python ints (static offsets, usable under ``jax.jit``); a
        traced array is a ``ValueError`` (the packing sets shapes). Cost: sequences
        of one length class (``ceil(log2 length)``) are unpacked together to
        ``(..., n, longest, .)`` and the results repacked (``fastrpb._packing``):
        less than ``2 L`` tokens of work, ``O(L)``, in at most ``log2 L + 1`` batched
        calls. The N-d bias is not available with packing.

    Returns
    -------
    array, shape (..., Lq, Dv)
        Or ``(out, state)`` with ``return_state=True``.

    Raises
    ------
    TypeError
        If ``q``, ``k``, ``v`` (or ``rpb``) are not real floating, ``key_mask`` is not
        boolean, ``feature_map`` is neither a name, a map nor a callable, or the arrays
        come from two libraries or devices.
    ValueError
        If the shapes do not agree (widths, lengths, leading dimensions), ``feature_map``
        is an unknown name, ``chunk_size`` or ``eps`` is out of range,
        ``return_state=True`` without ``causal=True``, or a bias table is shorter than
        the sequence.

    Examples
    --------
    >>> import numpy as np
    >>> from fastrpb import linear_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 5, 4))  # batch 2, L = 5, D = 4 each
    >>> linear_attention(q, k, v).shape
    (2, 5, 4)

    Causal, the first query sees only the first key, so its output is that key's value:

    >>> out, state = linear_attention(q, k, v, causal=True, return_state=True)
    >>> bool(np.allclose(out[:, 0], v[:, 0], atol=1e-5))
    True
    >>> state.S.shape, state.z.shape
    ((2, 4, 4), (2, 4))

    References
    ----------
    Katharopoulos et al. (2020), "Transformers are RNNs: Fast Autoregressive
    Transformers with Linear Attention", ICML. Zubkov & Gavrilov (2022), "FastRPB: a
    Scalable Relative Positional Encoding for Long Sequence Tasks", arXiv:2202.11364.
    """
    call = _checked_call(
        q,
        k,
        v,
        feature_map=feature_map,
        causal=causal,
        key_mask=key_mask,
        eps=eps,
        chunk_size=chunk_size,
        rpb=rpb,
        rpb_tables=rpb_tables,
        rpb_grid=rpb_grid,
        rpb_skip=rpb_skip,
        initial_state=initial_state,
        return_state=return_state,
        normalize=normalize,
        scale=scale,
        cu_seqlens=cu_seqlens,
    )
    xp = call.xp
    if cu_seqlens is not None:
        attend = functools.partial(
            linear_attention,
            feature_map=call.fmap,
            causal=call.causal,
            eps=call.eps,
            chunk_size=call.C,
            normalize=call.normalize,
            scale=call.scale,
        )
        return packed_linear_attention(
            xp,
            attend,
            q,
            k,
            v,
            cu_seqlens,
            key_mask=key_mask,
            rpb=rpb,
            rpb_tables=rpb_tables,
            rpb_skip=rpb_skip,
            causal=call.causal,
            return_state=call.return_state,
            chunk_size=call.C,
        )
    # -- compute, in the compute dtype
    result, work = compute_dtype(xp, q, k, v, *call.tables.values())
    qw, kw, vw = (xp.astype(x, work, copy=False) for x in (q, k, v))
    if call.scale is not None:
        qw = qw * call.scale
    kw = mask_keys(xp, kw, key_mask)
    vw = mask_values(xp, vw, key_mask, bias=rpb is not None or rpb_tables is not None)
    Lq, Lk = q.shape[-2], k.shape[-2]
    fmap = call.fmap
    if Lq == 0 or Lk == 0 or math.prod(call.out_lead) == 0 or (fmap.exponential and fmap.features(q.shape[-1]) == 0):
        out, final, offset = _attend_nothing(call, kw, v, Lq, initial_state, work)
    elif fmap.exponential:
        out, final, offset = _attend_exponential(call, qw, kw, vw, key_mask, initial_state, work)
    else:
        out, final, offset = _attend_features(call, qw, kw, vw, key_mask, initial_state, work)
    rpb_state = None
    if rpb is not None and (initial_state is not None or call.return_state):  # the bias continues too
        out, rpb_state = add_bias_streaming(xp, out, vw, rpb, rpb_skip, initial_state)
    elif rpb_tables is not None and (initial_state is not None or call.return_state):  # the N-d bias too
        out, rpb_state = add_bias_streaming_nd(xp, out, vw, rpb_tables, rpb_grid, rpb_skip, initial_state)
    else:
        out = add_bias(
            xp, out, vw, rpb=rpb, rpb_tables=rpb_tables, rpb_grid=rpb_grid, rpb_skip=rpb_skip, causal=call.causal
        )
    out = xp.astype(out, result, copy=False)
    if call.return_state:
        return out, _state(xp, fmap, final, offset)._replace(rpb=rpb_state)
    return out


class _Call(NamedTuple):
    """A checked ``linear_attention`` call: its namespace and its normalised options."""

    xp: Any
    fmap: FeatureMap
    causal: bool
    return_state: bool
    normalize: bool
    scale: float | None
    eps: float
    C: int  # chunk_size
    tables: dict[str, Any]  # the bias arrays, by argument name
    out_lead: tuple  # the output's leading dimensions


def _checked_call(
    q: Any,
    k: Any,
    v: Any,
    *,
    feature_map: Any,
    causal: Any,
    key_mask: Any,
    eps: Any,
    chunk_size: Any,
    rpb: Any,
    rpb_tables: Any,
    rpb_grid: Any,
    rpb_skip: Any,
    initial_state: Any,
    return_state: Any,
    normalize: Any,
    scale: Any,
    cu_seqlens: Any,
) -> _Call:
    """Every check of ``linear_attention``'s arguments; resolves the namespace once."""
    fmap = resolve(feature_map)
    causal = _validate.flag("causal", causal)
    return_state = _validate.flag("return_state", return_state)
    normalize = _validate.flag("normalize", normalize)
    scale = None if scale is None else _validate.finite("scale", scale)
    eps = _validate.non_negative("eps", eps)
    C = _validate.integer("chunk_size", chunk_size, minimum=1)
    tables = _validate.bias_arguments(rpb, rpb_tables, rpb_grid, rpb_skip)
    _validate.required(q=q, k=k, v=v)
    if cu_seqlens is not None and initial_state is not None:
        raise ValueError(
            "initial_state cannot be combined with cu_seqlens (packed sequences): continue each sequence "
            "with its own call, got both"
        )
    carried = _initial_arguments(fmap, initial_state, causal, rpb, rpb_tables)  # initial_state
    xp = namespace(
        q=q,
        k=k,
        v=v,
        key_mask=key_mask,
        cu_seqlens=_packing.array_argument(cu_seqlens),
        **tables,
        **fmap._arrays(),
        **carried,
    )
    lead = _validate.attention_inputs(xp, q, k, v)
    out_lead = _validate.key_mask(xp, key_mask, k.shape[-2], lead)
    fmap._check_width(q.shape[-1], "q")
    _validate.causal_lengths(causal, q.shape[-2], k.shape[-2])
    if return_state and not causal:
        raise ValueError("return_state=True needs causal=True: a decoding state continues a causal sequence")
    return _Call(xp, fmap, causal, return_state, normalize, scale, eps, C, tables, out_lead)


def _attend_nothing(call: _Call, kw: Any, v: Any, Lq: int, initial_state: Any, work: Any) -> tuple[Any, Any, Any]:
    """Nothing to attend to (an empty batch or sequence, or no features: the kernel is 0):
    zeros, without reductions over empty axes. Returns ``(out, final state, offset)``."""
    xp, fmap = call.xp, call.fmap
    fk = fmap._keys(xp, kw)
    shape = (*call.out_lead, Lq, v.shape[-1])
    out = xp.zeros(shape, dtype=work, device=device_of(v))
    final = xp.zeros((*shape[:-2], fk.shape[-1], v.shape[-1] + 1), dtype=work, device=device_of(v))
    offset = neg_inf(xp, final[..., 0]) if fmap.exponential else None
    if initial_state is not None:  # nothing new: the state passes through
        S0, offset0 = _carried(xp, fmap, initial_state, fk.shape[-1], v.shape[-1], call.out_lead, work)
        final = final + S0
        offset = None if offset0 is None else xp.maximum(offset, offset0)
    return out, final, offset


def _attend_exponential(
    call: _Call, qw: Any, kw: Any, vw: Any, key_mask: Any, initial_state: Any, work: Any
) -> tuple[Any, Any, Any]:
    """An exponential map (``sikf``, ``favor``) in its frame of offsets, causal or not;
    returns ``(out, final state, offset)`` (the state ``None`` non-causal)."""
    xp, fmap, eps = call.xp, call.fmap, call.eps
    lq, lk, mq = log_features(xp, fmap, qw, kw, key_mask)
    final = offset = None
    if call.causal:
        v1, skipped = with_ones(xp, vw), 0
        if initial_state is not None:  # the state enters as F pseudo-keys before the chunk
            S0, offset0 = _carried(xp, fmap, initial_state, lk.shape[-1], vw.shape[-1], call.out_lead, work)
            skipped = lk.shape[-1]
            lq = prepend(xp, xp.zeros((skipped, skipped), dtype=work, device=device_of(lq)), lq)
            lk, v1 = prepend(xp, state_keys(xp, offset0), lk), prepend(xp, S0, v1)
        Lq = qw.shape[-2]
        total, eps_rows, final, offset, log_scale = causal_exp_attention(xp, lq, lk, v1, min(call.C, skipped + Lq), eps)
        if skipped:
            total, log_scale = total[..., skipped:, :], log_scale[..., skipped:, :]
            eps_rows = eps_rows if isinstance(eps_rows, float) else eps_rows[..., skipped:, :]
        num, den = total[..., :-1], total[..., -1:]
    else:
        num, den, eps_rows, log_scale = noncausal_exp_attention(xp, lq, lk, vw, eps)
    # unnormalised: back to the true scale exp(l(q_i) . + l(k_j) .), which may overflow
    out = normalise(xp, num, den, eps_rows) if call.normalize else num * xp.exp(log_scale + mq)
    return out, final, offset


def _attend_features(
    call: _Call, qw: Any, kw: Any, vw: Any, key_mask: Any, initial_state: Any, work: Any
) -> tuple[Any, Any, Any]:
    """A map with explicit features, non-causal or chunked causal; returns ``(out, final
    state, None)`` (the state ``(S, z)``, ``None`` non-causal)."""
    xp, fmap = call.xp, call.fmap
    fq, fk = features(xp, fmap, qw, kw, key_mask)
    final = None
    if call.causal:
        Lq = qw.shape[-2]
        num, den, S_end, z_end = causal_attention(xp, fq, fk, vw, min(call.C, Lq), signed=not fmap.nonnegative)
        if initial_state is not None:  # y += phi(Q) S0, den += phi(Q) . z0; the state += [S0, z0]
            S0, _ = _carried(xp, fmap, initial_state, fk.shape[-1], vw.shape[-1], call.out_lead, work)
            carried_out = xp.matmul(fq, S0)
            num, den = num + carried_out[..., :-1], den + carried_out[..., -1:]
            S_end, z_end = S_end + S0[..., :-1], z_end + S0[..., -1]
        final = (S_end, z_end)
    else:
        num, den = noncausal_attention(xp, fq, fk, vw)
    out = normalise(xp, num, den, call.eps) if call.normalize else num
    return out, final, None


def linear_attention_step(
    state: LinearAttentionState | None,
    q_t: Array,
    k_t: Array,
    v_t: Array,
    *,
    feature_map: FeatureMapLike = "elu",
    eps: float = 1e-6,
    normalize: bool = True,
    scale: float | None = None,
    rpb: Array | None = None,
    rpb_tables: Sequence[Array | None] | None = None,
    rpb_grid: Sequence[int] | None = None,
    rpb_skip: tuple[int, int] | None = None,
    donate: bool = False,
) -> tuple[Array, LinearAttentionState]:
    r"""One decoding step of causal linear attention: O(F Dv) per token.

    $$
    S \leftarrow S + \phi(k_t) v_t^\top, \quad z \leftarrow z + \phi(k_t), \quad
    \mathrm{out}_t = \frac{\phi(q_t)^\top S}{\phi(q_t)^\top z + \varepsilon}
    $$

    Stepping token by token reproduces ``linear_attention(..., causal=True)``; start
    from ``state=None`` or from the state that ``linear_attention(...,
    return_state=True)`` returns after a prompt. For ``sikf``/``favor`` the state keeps
    a running key offset per feature and rescales ``S`` and ``z`` when it grows, so
    no step overflows whatever the key magnitudes.

    Parameters
    ----------
    state : LinearAttentionState or None
        The state after the previous tokens (made with the same feature map).
    q_t : array, shape (..., Dk)
        The new token's query.
    k_t : array, shape (..., Dk)
        The new token's key.
    v_t : array, shape (..., Dv)
        The new token's value. Half precision is computed in float32; the state stays in the
        compute dtype.
    feature_map, eps, normalize, scale
        As in ``linear_attention``: ``normalize=False`` returns ``phi(q_t)^T S`` (true
        scale for the exponential maps), ``scale`` multiplies ``q_t`` first.
    rpb : array, shape (..., 2M - 1), optional
        FastRPB table: adds ``sum_{j <= t} w[M - 1 + t - j] v_j`` from the bias history
        the state carries (``fastrpb.rpb_step``: amortised O(Dv log^2 t) per token,
        O(M Dv) under ``jax.jit``), so stepping equals ``linear_attention(...,
        causal=True, rpb=w)``. Pass it at every step of a sequence, or at none.
    rpb_tables, rpb_grid : optional
        The N-d FastRPB term instead (``fastrpb.rpb_nd_step``: raster order on the
        grid), from the N-d history the state carries, so stepping equals
        ``linear_attention(..., causal=True, rpb_tables=, rpb_grid=)``. Pass them at
        every step of a sequence, or at none.
    rpb_skip : (int, 0), optional
        When the bias history starts (``state`` is None): the first ``a`` tokens
        neither give nor receive the bias. Later steps take it from the state (a
        value given must match it); ``b > 0`` is a ValueError while streaming the
        1-d bias; with ``rpb_grid`` it counts the tokens after the grid.
    donate : bool, default False
        Hand ``state`` over, as in ``fastrpb.rpb_step``: under ``torch.compile`` the
        1-d bias history is updated in place instead of copied at every token, and
        neither ``state`` nor an earlier state of the sequence may be used again.
        Elsewhere the step is the same as without it.

    Returns
    -------
    (array of shape (..., Dv), LinearAttentionState)

    Raises
    ------
    TypeError
        If the tokens are not real floating or come from two libraries or devices,
        or ``donate`` is not a bool.
    ValueError
        If the token widths disagree with each other or with ``state``, or
        ``feature_map`` is an unknown name or not the map that made ``state``.

    Examples
    --------
    Decoding token by token gives causal ``linear_attention`` over the whole sequence:

    >>> import numpy as np
    >>> from fastrpb import linear_attention, linear_attention_step
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 6, 4))  # L = 6 tokens of width 4
    >>> state = None
    >>> for t in range(6):
    ...     out_t, state = linear_attention_step(state, q[t], k[t], v[t])
    >>> out_t.shape
    (4,)
    >>> bool(np.allclose(out_t, linear_attention(q, k, v, causal=True)[-1]))
    True
    """
    # -- validate, resolve the namespace once
    fmap = resolve(feature_map)
    eps = _validate.non_negative("eps", eps)
    normalize = _validate.flag("normalize", normalize)
    donate = _validate.flag("donate", donate)
    scale = None if scale is None else _validate.finite("scale", scale)
    if state is not None and not isinstance(state, LinearAttentionState):
        raise TypeError(f"state must be a LinearAttentionState or None, got {type(state).__name__}")
    _validate.required(q_t=q_t, k_t=k_t, v_t=v_t)
    held = {} if state is None else {"state.S": state.S, "state.z": state.z, "state.offset": state.offset}
    if rpb_tables is not None or rpb_grid is not None:
        held = {**held, **_validate.bias_arguments(rpb, rpb_tables, rpb_grid, (0, 0) if rpb_skip is None else rpb_skip)}
    if rpb is not None or (state is not None and state.rpb is not None):  # the bias term's arrays too
        held = {**held, "rpb": rpb, "state.rpb": None if state is None else _held_bias(state.rpb)}
    xp = namespace(q_t=q_t, k_t=k_t, v_t=v_t, **held, **fmap._arrays())
    lead = _validate.attention_inputs(xp, q_t, k_t, v_t, token=True)
    fmap._check_width(q_t.shape[-1], "q_t")
    if fmap.exponential and fmap.features(q_t.shape[-1]) == 0:
        return _featureless_step(xp, fmap, state, q_t, k_t, v_t, lead)
    # -- compute
    result, work = compute_dtype(xp, q_t, k_t, v_t)
    qw, kw, vw = (as_dtype(xp, x, work) for x in (q_t, k_t, v_t))
    Dv = v_t.shape[-1]
    F = fmap.features(q_t.shape[-1])
    token = None
    if F is None:  # a plain callable declares no width: its features give it
        token = token_features(xp, qw, kw, fmap=fmap, scale=scale)
        F = token[1].shape[-1]
    if state is None:  # the shapes of every later state: a jitted step compiles once
        S = xp.zeros((*lead, F, Dv), dtype=work, device=device_of(v_t))
        z = xp.zeros((*lead, F), dtype=work, device=device_of(v_t))
        offset = xp.full((*lead, F), -math.inf, dtype=work, device=device_of(v_t)) if fmap.exponential else None
    elif _fits(state, fmap, F, Dv, lead, work):  # a state this function made for these shapes
        S, z, offset = state.S, state.z, state.offset
    else:
        S, z, offset = _check_state(xp, fmap, state, F, Dv, lead)
        S, z = as_dtype(xp, S, work), as_dtype(xp, z, work)
        offset = None if offset is None else as_dtype(xp, offset, work)
    if token is None:  # one computation (eager JAX: ``eager_jit``)
        out, S, z, offset = decode_token(
            xp, qw, kw, vw, S, z, offset, fmap=fmap, scale=scale, eps=eps, normalize=normalize
        )
    else:
        out, S, z, offset = recurrent_step(xp, token, S, z, offset, vw, eps=eps, normalize=normalize)
    history = None
    if rpb_tables is not None or isinstance(None if state is None else state.rpb, RPBndState):
        out, history = step_bias_nd(xp, out, state, vw, rpb_tables, rpb_grid, rpb_skip)
    elif rpb is not None or (state is not None and state.rpb is not None):
        out, history = step_bias(xp, out, state, vw, rpb, rpb_skip, donate)
    out = as_dtype(xp, out, result)
    if offset is not None:
        offset = xp.broadcast_to(offset, z.shape)
    return out, LinearAttentionState(S=S, z=z, offset=offset, feature_map=fmap.signature, rpb=history)


def _featureless_step(
    xp: Any, fmap: FeatureMap, state: LinearAttentionState | None, q_t: Any, k_t: Any, v_t: Any, lead: tuple
) -> tuple[Any, LinearAttentionState]:
    """A step of an exponential map with no features (``Dk = 0``): the kernel is 0, so the
    output is zeros and the state keeps its (empty) sums; no maximum over an empty axis."""
    result, work = compute_dtype(xp, q_t, k_t, v_t)
    Dv = v_t.shape[-1]
    if state is not None:
        _check_state(xp, fmap, state, 0, Dv, lead)
        lead = _lead(lead, tuple(state.z.shape[:-1]))
    dev = device_of(v_t)
    S = xp.zeros((*lead, 0, Dv), dtype=work, device=dev)
    z = xp.zeros((*lead, 0), dtype=work, device=dev)
    out = xp.zeros((*lead, Dv), dtype=result, device=dev)
    return out, LinearAttentionState(S=S, z=z, offset=neg_inf(xp, z) + z, feature_map=fmap.signature)


def _fits(state: LinearAttentionState, fmap: FeatureMap, F: int, Dv: int, lead: tuple, work: Any) -> bool:
    """The cheap test a decoding step runs per token: the state has the map, the compute
    dtype and exactly the shapes that this step would give it (as every state a step or
    a call made for the same inputs has). Only a state that fails it goes through the
    full check (``_check_state``), whose messages name what is wrong; library and
    device are checked by the namespace either way."""
    S, z, offset = state.S, state.z, state.offset
    if state.feature_map != fmap.signature or S.dtype != work or z.dtype != work:
        return False
    shape = (*lead, F)
    if tuple(z.shape) != shape or tuple(S.shape) != (*shape, Dv):
        return False
    if offset is None:
        return not fmap.exponential
    return fmap.exponential and offset.dtype == work and tuple(offset.shape) == shape


def _check_state(
    xp: Any,
    fmap: FeatureMap,
    state: LinearAttentionState,
    F: int,
    Dv: int,
    lead: tuple,
    *,
    name: str = "state",
    inputs: str = "q_t, k_t, v_t",
) -> tuple:
    if state.feature_map != fmap.signature:
        raise ValueError(
            f"{name} was made by feature map {state.feature_map!r} but feature_map is {fmap.signature!r}; "
            "continue a sequence with the map that started it"
        )
    S, z, offset = state.S, state.z, state.offset
    for label, x in ((f"{name}.S", S), (f"{name}.z", z)):
        _validate.floating(xp, label, x)
    if S.ndim < 2 or tuple(S.shape[-2:]) != (F, Dv):
        raise ValueError(
            f"{name}.S must have shape (..., F, Dv) = (..., {F}, {Dv}) for these inputs, got shape {tuple(S.shape)}"
        )
    if tuple(z.shape) != tuple(S.shape[:-1]):
        raise ValueError(
            f"{name}.z must have shape {tuple(S.shape[:-1])} (that of {name}.S without Dv), got {tuple(z.shape)}"
        )
    if fmap.exponential:
        if offset is None or tuple(offset.shape) != tuple(z.shape):
            got = None if offset is None else tuple(offset.shape)
            raise ValueError(
                f"{name}.offset must have shape {tuple(z.shape)} for feature map {fmap.signature!r}, got {got}"
            )
    elif offset is not None:
        raise ValueError(f"{name}.offset must be None for feature map {fmap.signature!r}, got an array")
    _validate.broadcast({name: tuple(z.shape[:-1]), inputs: lead})
    return S, z, offset


def softmax_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = False,
    key_mask: Array | None = None,
    logits_bias: Array | None = None,
    scale: float | None = None,
    rpb: Array | None = None,
    rpb_tables: Sequence[Array | None] | None = None,
    rpb_grid: Sequence[int] | None = None,
    rpb_skip: tuple[int, int] = (0, 0),
    cu_seqlens: Array | Sequence[int] | None = None,
) -> Array:
    r"""Exact (quadratic) softmax attention, the reference for linear attention.

    $$
    \mathrm{out}_i = \sum_j \frac{e^{a_{ij}}}{\sum_{j'} e^{a_{ij'}}}\, v_j
    \;+\; \sum_j w_{i - j}\, v_j, \qquad
    a_{ij} = s\, q_i \cdot k_j + b_{ij}
    $$

    over the visible keys, computed max-subtracted (stable for any finite logits).
    O(Lq Lk) time and memory.

    Parameters
    ----------
    q : array, shape (..., Lq, Dk)
        Queries. Real floating; leading dimensions broadcast.
    k : array, shape (..., Lk, Dk)
        Keys, as wide as the queries.
    v : array, shape (..., Lk, Dv)
        Values, one row per key.
    causal : bool
        Query ``i`` sees keys ``j <= i``; needs ``Lq == Lk``.
    key_mask : bool array, shape (..., Lk), optional
        False marks a padding key. A query that sees no key gets zeros.
    logits_bias : array, broadcastable to (..., Lq, Lk), optional
        Added to the logits, e.g. ``rpb_matrix(w, L)`` (the T5-style use of a table).
    scale : float, optional
        ``s``; default ``1 / sqrt(Dk)``.
    rpb, rpb_tables, rpb_grid, rpb_skip
        Add the FastRPB term, as in ``linear_attention``.
    cu_seqlens : int array, shape (N + 1,), or tuple of ints, optional
        Packed sequences, as in ``linear_attention``: every sequence attends only
        within itself, O(sum of squared lengths) (not ``logits_bias``).

    Returns
    -------
    array, shape (..., Lq, Dv)
        In the dtype of the inputs (half precision is computed in float32).

    Raises
    ------
    TypeError
        If ``q``, ``k``, ``v`` (or ``logits_bias``, ``rpb``) are not real floating,
        ``key_mask`` is not boolean, or the arrays come from two libraries or devices.
    ValueError
        If the shapes do not agree, or ``causal=True`` with ``Lq != Lk``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastrpb import softmax_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 5, 4))
    >>> out = softmax_attention(q, k, v, causal=True)
    >>> out.shape
    (2, 5, 4)
    >>> bool(np.allclose(out[:, 0], v[:, 0]))  # the first query sees only the first key
    True
    """
    # -- validate, resolve the namespace once
    causal = _validate.flag("causal", causal)
    scale = None if scale is None else _validate.finite("scale", scale)
    tables = _validate.bias_arguments(rpb, rpb_tables, rpb_grid, rpb_skip)
    _validate.required(q=q, k=k, v=v)
    xp = namespace(
        q=q,
        k=k,
        v=v,
        key_mask=key_mask,
        logits_bias=logits_bias,
        cu_seqlens=_packing.array_argument(cu_seqlens),
        **tables,
    )
    lead = _validate.attention_inputs(xp, q, k, v)
    _validate.key_mask(xp, key_mask, k.shape[-2], lead)
    Lq, Lk = q.shape[-2], k.shape[-2]
    _validate.causal_lengths(causal, Lq, Lk)
    _validate.logits_bias(xp, logits_bias, Lq, Lk, lead)
    if cu_seqlens is not None:
        if logits_bias is not None:
            raise ValueError("cu_seqlens does not combine with logits_bias (an Lq x Lk matrix over the packed row)")
        pk = packed_lengths(xp, cu_seqlens, Lq, Lk, rpb_tables, q)
        outs = []
        for g in pk.groups:
            mask = g.valid if key_mask is None else _packing.unpack_mask(xp, g, key_mask)
            qu, ku, vu = (_packing.unpack(xp, g, x) for x in (q, k, v))
            outs.append(softmax_attention(qu, ku, vu, causal=causal, key_mask=mask, scale=scale))
        return packed_bias(xp, _packing.repack(xp, pk, outs), v, key_mask, rpb, rpb_skip, causal, cu_seqlens)
    # -- compute
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    named = {"logits_bias": logits_bias} if logits_bias is not None else {}
    result, work = compute_dtype(xp, q, k, v, *tables.values(), *named.values())
    qw, kw, vw = (xp.astype(x, work, copy=False) for x in (q, k, v))
    kw = mask_keys(xp, kw, key_mask)
    vw = mask_values(xp, vw, key_mask, bias=rpb is not None or rpb_tables is not None)
    logits = xp.matmul(qw, xp.matrix_transpose(kw)) * scale
    if logits_bias is not None:
        logits = logits + xp.astype(logits_bias, work, copy=False)
    visible = None
    if causal:
        i = xp.arange(Lq, dtype=xp.int32, device=device_of(q))
        visible = i[:, None] >= i[None, :]
    if key_mask is not None:
        km = key_mask[..., None, :]
        visible = km if visible is None else xp.logical_and(visible, km)
    if visible is not None:
        logits = xp.where(visible, logits, neg_inf(xp, logits))
    if Lk == 0:
        out = xp.zeros((*logits.shape[:-1], v.shape[-1]), dtype=work, device=device_of(v))
    else:
        top = finite_or_zero(xp, xp.max(logits, axis=-1, keepdims=True))
        p = xp.exp(logits - top)
        den = xp.sum(p, axis=-1, keepdims=True)
        den = xp.where(den == 0, xp.ones((), dtype=den.dtype, device=device_of(den)), den)
        # causal: p is tril, and a later NaN value must not reach earlier rows through 0 * NaN
        out = (tril_product(xp, p, vw) if causal else xp.matmul(p, vw)) / den
    out = add_bias(xp, out, vw, rpb=rpb, rpb_tables=rpb_tables, rpb_grid=rpb_grid, rpb_skip=rpb_skip, causal=causal)
    return xp.astype(out, result, copy=False)
