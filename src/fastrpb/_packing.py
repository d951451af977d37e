r"""Packed variable-length sequences (``cu_seqlens``), shared by the public functions.

LM training packs documents into one row of ``T`` tokens; ``cu_seqlens``, an integer
array ``0 = c_0 <= c_1 <= ... <= c_N = T`` (the flash-attention / fla convention), says
where each begins. Sequence ``n`` holds tokens ``c_n .. c_{n+1} - 1`` of the length
axis (-2), and attends and is biased only within itself. A zero-length sequence
(``c_n = c_{n+1}``) is a group member of length 0: all its slots are padding, it
gives no output rows, and its state (``return_state=True``) is the empty one.

Here the sequences are grouped by length (``_grouping``: runs of the sorted lengths
that minimise the padded work, or length classes ``ceil(log2 length)``); each group
is *unpacked* from the packed array ``(..., T, D)`` to ``(..., n, longest, D)`` (one row
per sequence, padded at the end to the group's longest, less than twice its
shortest) by one ``take``, the batched code runs on it with the padding masked, and
the groups' results are *repacked* by one ``take``: equal to ``N`` separate calls, in
less than ``2 T`` tokens of work (``O(T)``).
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

from . import _validate
from ._compat import device_of, is_lazy
from ._validate import broadcast_shapes


class Group(NamedTuple):
    """Sequences of similar length, unpacked together to ``(..., n, longest, .)``."""

    members: tuple[int, ...]  # their indices in cu_seqlens order
    longest: int
    unpack_index: Any  # (n * longest,) packed position of each padded slot (clipped)
    valid: Any  # (n, longest) bool: a real token, not padding


class Packing(NamedTuple):
    """The layout of ``N`` packed sequences: offsets, lengths, the groups, the ``take``
    index back to the packed row, and the order of the sequences over the groups."""

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    groups: tuple[Group, ...]
    repack_index: Any  # (T,) slot of each packed token in the groups' slots, end to end
    order: Any  # (N,) position of sequence n in the groups' order (for per-sequence states)


def packing(xp: Any, offsets: tuple[int, ...], like: Any, *, align: int = 1) -> Packing:
    """The groups and index arrays for ``offsets`` (validated Python ints), on ``like``'s device.

    Sequences are grouped by ``_grouping`` (padded work below ``2 T`` in all).
    ``align``: each group's padded length is
    rounded up to a multiple of it (causal attention passes its chunk size, so the
    unpacked rows need no second padding to whole chunks: one copy of ``q``, ``k``,
    ``v`` fewer), capped at the group's longest rounded to a power of two.
    """
    lengths = tuple(b - a for a, b in itertools.pairwise(offsets))
    T = offsets[-1]
    index_dtype = xp.int32 if 2 * T + len(lengths) < 2**31 else xp.int64
    dev = device_of(like)
    groups: list[Any] = []
    base = [0] * len(lengths)
    sequence_order: list[int] = []
    slot = 0
    for members in _grouping(lengths, align):
        longest = max(lengths[n] for n in members)
        if align > 1:
            longest = min(-(-longest // align) * align, max(longest, 1 << (longest - 1).bit_length()))
        t = xp.arange(longest, dtype=index_dtype, device=dev)
        start = xp.asarray([offsets[n] for n in members], dtype=index_dtype, device=dev)
        length = xp.asarray([lengths[n] for n in members], dtype=index_dtype, device=dev)
        last = xp.asarray(T - 1, dtype=index_dtype, device=dev)
        unpack_index = xp.reshape(xp.minimum(start[:, None] + t[None, :], last), (-1,))
        groups.append(Group(members, longest, unpack_index, t[None, :] < length[:, None]))
        for i, n in enumerate(members):
            base[n] = slot + i * longest - offsets[n]
        slot += len(members) * longest
        sequence_order.extend(members)
    # packed token p of sequence n sits in slot base[n] + p
    rows = [base[n] for n in range(len(lengths)) for _ in range(lengths[n])]
    repack_index = xp.asarray(rows, dtype=index_dtype, device=dev) + xp.arange(T, dtype=index_dtype, device=dev)
    position = [0] * len(lengths)
    for i, n in enumerate(sequence_order):
        position[n] = i
    order = xp.asarray(position, dtype=index_dtype, device=dev)
    return Packing(offsets, lengths, tuple(groups), repack_index, order)


# A batched call costs about this many padded token slots of work on its own (eager
# dispatch of some 40 operations); _grouping trades it against padding.
GROUP_COST = 1024
# Above this many sequences the O(N^2) partition search is skipped (length classes).
OPTIMAL_GROUPING_MAX = 256


def _grouping(lengths: tuple[int, ...], align: int) -> list[tuple[int, ...]]:
    r"""The sequences' partition into groups, each a tuple of indices.

    Up to ``OPTIMAL_GROUPING_MAX`` sequences: sorted by length, cut into runs that
    minimise the padded work ``sum_g n_g ceil(longest_g / align) align`` plus
    ``GROUP_COST`` per group (dynamic programming over the cut points, O(N^2)); its
    optimum is at most that of the length classes below, which are one such cut.
    (Padded work is what the packed call pays against a batch padded to the longest:
    the classes left 1.37 T slots at T = 32,768 for lengths drawn from 64..4,096, the
    runs 1.1 T.) More sequences: length classes ``ceil(log2 length)``, each longest
    less than twice its shortest: below ``2 T`` slots, at most ``log2 T + 1`` groups.
    """
    n_seq = len(lengths)
    if n_seq > OPTIMAL_GROUPING_MAX:
        classes: dict[int, list[int]] = {}
        for n, length in enumerate(lengths):
            classes.setdefault((length - 1).bit_length(), []).append(n)
        return [tuple(classes[key]) for key in sorted(classes)]
    order = sorted(range(n_seq), key=lambda n: lengths[n])
    padded = [-(-lengths[n] // align) * align for n in order]
    best = [0] + [0] * n_seq  # best[j]: cheapest cut of the j shortest
    cut = [0] * (n_seq + 1)
    for j in range(1, n_seq + 1):
        best[j], cut[j] = min((best[i] + (j - i) * padded[j - 1] + GROUP_COST, i) for i in range(j))
    groups: list[tuple[int, ...]] = []
    j = n_seq
    while j > 0:
        groups.append(tuple(order[cut[j] : j]))
        j = cut[j]
    return groups[::-1]


def unpack(xp: Any, g: Group, x: Any, *, fill: Any = 0) -> Any:
    """``(..., T, D)`` -> ``(..., n, longest, D)`` for group ``g``, padding set to ``fill``.

    ``fill=None`` leaves the padding slots holding copies of other packed tokens (one
    pass fewer), for a caller that masks them itself (attention with ``key_mask``:
    padding keys get no weight, and padding queries are dropped by ``repack``).
    """
    y = xp.take(x, g.unpack_index, axis=x.ndim - 2)
    y = xp.reshape(y, (*x.shape[:-2], len(g.members), g.longest, x.shape[-1]))
    if fill is None:
        return y
    return xp.where(g.valid[..., None], y, xp.asarray(fill, dtype=y.dtype, device=device_of(y)))


def unpack_mask(xp: Any, g: Group, mask: Any) -> Any:
    """A key mask ``(..., T)`` -> ``(..., n, longest)``, padding slots False."""
    y = xp.take(mask, g.unpack_index, axis=mask.ndim - 1)
    y = xp.reshape(y, (*mask.shape[:-1], len(g.members), g.longest))
    return xp.logical_and(y, g.valid)


def repack(xp: Any, pk: Packing, ys: list[Any]) -> Any:
    """The groups' outputs ``(..., n, longest, D)`` -> the packed row ``(..., T, D)``."""
    flat = [xp.reshape(y, (*y.shape[:-3], y.shape[-3] * y.shape[-2], y.shape[-1])) for y in ys]
    lead = _broadcast_lead([f.shape[:-2] for f in flat])
    flat = [xp.broadcast_to(f, (*lead, *f.shape[-2:])) for f in flat]
    joined = flat[0] if len(flat) == 1 else xp.concat(flat, axis=-2)
    return xp.take(joined, pk.repack_index, axis=joined.ndim - 2)


def per_sequence(xp: Any, pk: Packing, parts: list[Any], axis: int) -> Any:
    """Per-sequence results of the groups, joined along ``axis`` in ``cu_seqlens`` order."""
    joined = parts[0] if len(parts) == 1 else xp.concat(parts, axis=axis)
    return xp.take(joined, pk.order, axis=axis % joined.ndim)


def _broadcast_lead(shapes: list[tuple]) -> tuple:
    return broadcast_shapes(*shapes)


def per_sequence_table(w: Any) -> Any:
    """A bias table ``(..., 2M - 1)`` broadcasting against unpacked ``(..., N, Lmax, D)``."""
    return w if w.ndim < 2 else w[..., None, :]


def offsets_of(xp: Any, cu_seqlens: Any, T: int) -> tuple[int, ...]:
    """Validated offsets of ``cu_seqlens`` for a packed length ``T``."""
    static = isinstance(cu_seqlens, (tuple, list))
    return _validate.cu_seqlens(xp, cu_seqlens, T, traced=not static and is_lazy(xp, cu_seqlens))


def array_argument(cu_seqlens: Any) -> Any:
    """``cu_seqlens`` as a namespace argument: ``None`` for static (tuple/list) offsets."""
    return None if isinstance(cu_seqlens, (tuple, list)) else cu_seqlens
