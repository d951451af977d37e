r"""Streaming the causal N-d FastRPB in raster order: per-axis running terms in a fixed-shape state.

Tokens fill the grid ``(G_0, ..., G_{k-1})`` row-major. The causal bias of the token
at ``p`` is ``y_p = sum_{p' <= p} K(p - p') v_{p'}`` (raster order) with the
separable kernel ``K(t) = sum_a w_a(t_a)``. Split the earlier tokens ``p'`` by the
first axis ``l`` where they differ from ``p`` (``p'_l < p_l``, the axes before ``l``
equal): they lie in the finished *sub-slabs* ``p'_l < p_l`` of the current *slab*
at level ``l`` (the tokens sharing ``p_0 .. p_{l-1}``), and for them

$$
K(p - p') = e_l(p_l - p'_l) + \sum_{a > l} w_a(p_a - p'_a),
\qquad e_l = w_l + \sum_{a < l} w_a(0).
$$

So their contribution is

- ``A_l = sum_{i < p_l} e_l(p_l - i) R_l[i]``, ``R_l[i]`` the sum of sub-slab ``i``:
  one number per feature, the same for the whole sub-slab ``p_l`` (computed once when
  sub-slab ``p_l - 1`` finishes);
- ``U_{l,a}[p_a] = sum_x w_a(p_a - x) C_{l,a}[x]`` for each later axis ``a``,
  ``C_{l,a}`` the marginal along axis ``a`` of the finished sub-slabs (summed over
  every other axis): one non-causal Toeplitz product of length ``G_a`` (an FFT),
  also once per finished sub-slab, read at ``p_a`` by each token.

The tokens of ``p``'s own row (``l = k - 1``) are a 1-d causal stream with the
table ``e_{k-1}``: the 1-d online convolution of ``fastrpb._online`` (``RPBState``),
restarted at each row. When a row finishes, its values (which that state holds)
give the row's sum and marginal; the level above records them, and when that
finishes a slab of its own the slab's sum and marginals (``R_l`` and ``C_{l,a}``)
go one level up, and the level starts again from zeros.

Per token: one 1-d step plus ``k (k - 1) / 2`` row reads. Per finished row: one
Toeplitz FFT per later axis and level and a weighted sum over ``G_l`` rows, about
``O(D (G_l + G_a log G_a))`` over the ``G_{k-1}`` tokens of the row, so the
amortised cost is flat in the number of tokens and, for a square grid, about
``O(D log G)`` per token on top of the 1-d step.

The state has the same structure and leaf shapes after any number of tokens (the
1-d state's rules: preallocated, values never aliased, a step never changes the
state it is given). Eagerly Python reads the count and decides which levels finish;
under ``jax.jit`` / ``torch.compile`` the row's end is a compiled conditional and the
levels are updated with ``where``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from . import _online
from ._compat import cond, count_array, device_of, is_compiled, jax_pytree, next_fast_len, slices_compile
from ._online import RPBState, as_dtype
from ._typing import Array, Namespace

__all__ = ["RPBndState", "check_state", "extend", "held", "start", "step", "tokens_seen"]


@jax_pytree(static=("grid", "skip", "table_lengths"))
class RPBndState(NamedTuple):
    """What causal N-d FastRPB carries from one raster position (or piece) to the next.

    Made by ``rpb_nd(..., causal=True, return_state=True)`` and ``rpb_nd_step``; pass
    it back as ``initial_state=`` / ``state``. ``lead`` is the leading shape of the
    output, ``D`` the values' width; arrays are in the compute dtype.

    - ``row``: the ``RPBState`` of the current row (the last grid axis) under the
      table ``e_{k-1}`` (table length ``G_{k-1}``);
    - ``sums``: per level ``l = 0 .. k-2``, ``(..., G_l, D)``: the sums of the finished
      sub-slabs of the current level-``l`` slab (zeros ahead);
    - ``carry``: per level, ``(..., D)``: ``A_l`` for the current sub-slab;
    - ``marginals`` / ``across``: per level, one ``(..., G_a, D)`` array per later
      axis ``a``: the marginal ``C_{l,a}`` of the finished sub-slabs and its
      Toeplitz product ``U_{l,a}`` with ``w_a``;
    - ``count``: 0-d int32, the tokens seen (skipped ones included).

    Static fields: ``grid``, ``skip`` ``(a, b)`` and ``table_lengths`` (``M_a``, or
    ``None`` for an axis without a table). Memory: the 1-d state of one row (about
    ``4 G_{k-1} D``) plus ``O(k^2 max G D)`` per leading index, whatever the number
    of tokens.
    """

    row: RPBState
    sums: tuple
    carry: tuple
    marginals: tuple
    across: tuple
    count: Array
    grid: tuple
    skip: tuple
    table_lengths: tuple


def held(state: Any) -> Array | None:
    """One array of the state (its library and device stand for all), or None."""
    return state.count if isinstance(state, RPBndState) else None


def tokens_seen(xp: Namespace, state: RPBndState) -> int | None:
    """Tokens a state has seen, or None when only a compiled count knows it."""
    return None if is_compiled(xp, state.count) else int(state.count)


def check_state(state: Any, grid: tuple, skip: tuple, lengths: tuple, D: int, lead: tuple, name: str) -> None:
    """The state fits these inputs: type, grid, skip, tables, feature width, leading shape."""
    if not isinstance(state, RPBndState):
        raise TypeError(
            f"{name} must be an RPBndState (from rpb_nd(..., return_state=True) or rpb_nd_step) or None, got {type(state).__name__}"
        )
    if state.grid != grid:
        raise ValueError(
            f"{name} was made for grid {state.grid} but grid is {grid}; continue a sequence with the grid that started it"
        )
    if state.skip != skip:
        raise ValueError(
            f"{name} was started with skip = {state.skip} but skip is {skip}; pass the skip of the sequence's start"
        )
    if state.table_lengths != lengths:
        raise ValueError(
            f"{name} was made for tables of lengths M = {state.table_lengths} but tables has M = {lengths} "
            "(None: no table); continue a sequence with the tables that started it"
        )
    width = int(state.row.window.shape[-1])
    if width != D:
        raise ValueError(f"{name} holds values of width D = {width} but the new values have width D = {D}")
    have = tuple(state.row.window.shape[:-3])
    if have != tuple(lead):
        raise ValueError(
            f"{name} has leading shape {have} but the tables and the new values broadcast to {tuple(lead)}; "
            "continue a sequence with the same batch and head shapes"
        )


# --------------------------------------------------------------------------- tables
def central(xp: Namespace, tables: tuple, grid: tuple, work: Any, like: Array) -> list:
    """Per axis the offsets ``-(G_a - 1) .. G_a - 1`` of its table ``(..., 2 G_a - 1)``
    in the compute dtype; ``None`` for an axis without a table."""
    out: list[Any] = []
    for G, w in zip(grid, tables, strict=True):
        if w is None:
            out.append(None)
            continue
        M = (w.shape[-1] + 1) // 2
        out.append(as_dtype(xp, w[..., M - G : M - 1 + G], work))
    return out


def effective(xp: Namespace, cut: list, grid: tuple, level: int, like: Array) -> Array:
    """``e_l = w_l + sum_{a < l} w_a(0)``, ``(..., 2 G_l - 1)`` (zeros for missing tables)."""
    G = grid[level]
    e = cut[level]
    if e is None:
        e = xp.zeros((2 * G - 1,), dtype=like.dtype, device=device_of(like))
    for a in range(level):
        if cut[a] is not None:
            e = e + cut[a][..., grid[a] - 1 : grid[a]]
    return e


# --------------------------------------------------------------------------- state
def _zeros(xp: Any, shape: tuple, like: Any) -> Any:
    return xp.zeros(shape, dtype=like.dtype, device=device_of(like))


def _row_start(xp: Any, lead: tuple, D: int, grid: tuple, e_last: Any, like: Any) -> RPBState:
    return _online.start(xp, lead, D, grid[-1], 0, e_last, like)


def start(
    xp: Namespace, lead: tuple, D: int, grid: tuple, skip: tuple, lengths: tuple, e_last: Array, like: Array
) -> RPBndState:
    """The state of an empty sequence (``like`` gives dtype and device)."""
    k = len(grid)
    levels = range(k - 1)
    return RPBndState(
        row=_row_start(xp, lead, D, grid, e_last, like),
        sums=tuple(_zeros(xp, (*lead, grid[lv], D), like) for lv in levels),
        carry=tuple(_zeros(xp, (*lead, D), like) for _ in levels),
        marginals=tuple(tuple(_zeros(xp, (*lead, grid[a], D), like) for a in range(lv + 1, k)) for lv in levels),
        across=tuple(tuple(_zeros(xp, (*lead, grid[a], D), like) for a in range(lv + 1, k)) for lv in levels),
        count=count_array(xp, 0, like=like),
        grid=grid,
        skip=skip,
        table_lengths=lengths,
    )


def _coordinates(n: Any, grid: tuple) -> list:
    """Row-major coordinates of the raster index ``n`` (an int or a 0-d array)."""
    out, stride = [], math.prod(grid)
    for G in grid:
        stride //= G
        out.append((n // stride) % G)
    return out


def _at(xp: Any, x: Any, i: Any) -> Any:
    """Row ``i`` of ``x (..., G, D)``: ``(..., D)``."""
    if isinstance(i, int):
        return x[..., i, :]
    return _online._rows(xp, x, i, 1)[..., 0, :]


def _pick(xp: Any, c: Any, x: Any, y: Any) -> Any:
    """``x`` where ``c`` else ``y`` (``c`` a Python bool eagerly, an array compiled)."""
    if isinstance(c, bool):
        return x if c else y
    return xp.where(c, x, y)


def _cross(xp: Any, state: RPBndState, p: list) -> Any:
    """What the finished sub-slabs of every level give the position ``p``."""
    total = None
    k = len(state.grid)
    for lv in range(k - 1):
        term = state.carry[lv]
        for j, a in enumerate(range(lv + 1, k - 1)):  # the last axis is read by the caller, per token
            term = term + _at(xp, state.across[lv][j], p[a])
        total = term if total is None else total + term
    return total


def _finish_row(
    xp: Any, state: RPBndState, p: list, cut: list, e_last: Any, work: Any, toeplitz: Callable, lead: tuple
) -> RPBndState:
    """The row at ``p`` (its last token just streamed) is finished: record it in the
    level above, cascade finished slabs upwards, restart the row."""
    grid, k = state.grid, len(state.grid)
    D = state.row.window.shape[-1]
    # the row's tokens, (..., G_{k-1}, D); compiled, the row's last token came by a step,
    # which builds the 1-d levels, so its blocks are where their bits put them
    if is_compiled(xp, state.row.count):
        values = _online._history_buffer(xp, state.row, grid[-1], grid[-1], work)
    else:
        values = _online._history(xp, state.row, grid[-1], work)
    margins: dict[int, Any] = {k - 1: values}
    total = xp.sum(values, axis=-2)
    sums, carry = list(state.sums), list(state.carry)
    marginals = [list(m) for m in state.marginals]
    across = [list(u) for u in state.across]
    touched: Any = True  # whether level lv receives a finished sub-slab
    for lv in reversed(range(k - 1)):
        if touched is False:
            break
        G, i = grid[lv], p[lv]
        index = xp.arange(G, device=device_of(total))
        R = xp.where((index == i)[:, None], total[..., None, :], sums[lv])
        Ms, Us = [], []
        for j, a in enumerate(range(lv + 1, k)):
            m = marginals[lv][j] + margins[a]
            Ms.append(m)
            Us.append(across[lv][j] if cut[a] is None else toeplitz(xp, m, cut[a], causal=False))
        e = effective(xp, cut, grid, lv, total)
        # A for sub-slab i + 1: sum_{i'} e(i + 1 - i') R[i'], i.e. flip(e)[G - 2 - i + i'] (zeros past the end)
        weights = _online._rows(xp, xp.flip(e, axis=-1), G - 2 - i, G, axis=-1)
        A = (weights[..., None, :] @ R)[..., 0, :]
        done = (touched and i == G - 1) if isinstance(i, int) else touched & (i == G - 1)
        # a finished slab goes up: its sum, and its marginals along this axis and the later ones
        margins = {lv: R, **{a: Ms[j] for j, a in enumerate(range(lv + 1, k))}}
        total = xp.sum(R, axis=-2)
        # this level: its new sub-slab, or zeros when its slab finished (kept when untouched)
        sums[lv] = _update(xp, touched, done, R, sums[lv])
        carry[lv] = _update(xp, touched, done, A, carry[lv])
        marginals[lv] = [_update(xp, touched, done, m, old) for m, old in zip(Ms, marginals[lv], strict=True)]
        across[lv] = [_update(xp, touched, done, u, old) for u, old in zip(Us, across[lv], strict=True)]
        touched = done
    return state._replace(
        row=_row_start(xp, lead, D, grid, e_last, total),
        sums=tuple(sums),
        carry=tuple(carry),
        marginals=tuple(tuple(ms) for ms in marginals),
        across=tuple(tuple(us) for us in across),
    )


def _update(xp: Any, touched: Any, done: Any, new: Any, old: Any) -> Any:
    """``old`` where the level is untouched, zeros where its slab is done, else ``new``."""
    new = xp.broadcast_to(new, tuple(old.shape))
    return _pick(xp, touched, _pick(xp, done, _zeros(xp, tuple(old.shape), old), new), old)


# flattening for the compiled conditional (``cond`` takes and returns tuples of arrays)
_ROW_STATIC = ("skip", "table_length")  # the row state's static fields (JAX aux data)


def _leaves(state: RPBndState) -> tuple:
    """Every array of the state, in a fixed order (the row state's fields first)."""
    out: list = []
    for name in RPBState._fields:
        if name not in _ROW_STATIC:
            x = getattr(state.row, name)
            out.extend(x if isinstance(x, tuple) else (x,))
    out.extend((*state.sums, *state.carry))
    out.extend(x for group in (*state.marginals, *state.across) for x in group)
    return tuple(out)


def _unleaves(state: RPBndState, leaves: tuple) -> RPBndState:
    """``state`` with the arrays ``leaves`` (from ``_leaves``) in place of its own."""
    it = iter(leaves)
    fields: dict[str, Any] = {}
    for name in RPBState._fields:
        if name not in _ROW_STATIC:
            x = getattr(state.row, name)
            fields[name] = tuple(next(it) for _ in x) if isinstance(x, tuple) else next(it)
    sums = tuple(next(it) for _ in state.sums)
    carry = tuple(next(it) for _ in state.carry)
    marginals = tuple(tuple(next(it) for _ in ms) for ms in state.marginals)
    across = tuple(tuple(next(it) for _ in us) for us in state.across)
    return state._replace(row=state.row._replace(**fields), sums=sums, carry=carry, marginals=marginals, across=across)


# --------------------------------------------------------------------------- one token
def _grid_step(
    xp: Any,
    state: RPBndState,
    v: Any,
    n: Any,
    cut: list,
    e_last: Any,
    *,
    lead: tuple,
    work: Any,
    toeplitz: Callable,
    known: int | None = None,
) -> tuple[Any, RPBndState]:
    """The token at raster index ``n`` of the grid (an int eagerly, a 0-d array compiled;
    eager JAX passes an array for the reads and the int as ``known``)."""
    grid, k = state.grid, len(state.grid)
    if known is None and isinstance(n, int):
        known = n
    p = _coordinates(n, grid)
    out, row = _online.step(xp, state.row, v, e_last, lead=lead, M=grid[-1], a=0, work=work)
    if k > 1:
        out = out + _cross(xp, state, p)
        for lv in range(k - 1):
            out = out + _at(xp, state.across[lv][-1], p[-1])
    state = state._replace(row=row)
    if k == 1:  # one axis: the 1-d stream is the whole bias
        return out, state
    if known is not None:
        finished = known % grid[-1] == grid[-1] - 1
        at = (
            p if slices_compile(xp) else _coordinates(known, grid)
        )  # eager JAX: array positions, one kernel for every row
        return out, (_finish_row(xp, state, at, cut, e_last, work, toeplitz, lead) if finished else state)
    last = p[-1] == grid[-1] - 1
    leaves = cond(
        xp, last, lambda *ls: _leaves(_finish_row(xp, _unleaves(state, ls), p, cut, e_last, work, toeplitz, lead)),
        lambda *ls: ls, _leaves(state),
    )  # fmt: skip
    return out, _unleaves(state, leaves)


def step(
    xp: Namespace, state: RPBndState, v: Array, tables: tuple, *, lead: tuple, work: Any, toeplitz: Callable
) -> tuple[Array, RPBndState]:
    """One token ``v (..., D)`` (validated, compute dtype) after ``state``; ``(out, state)``.

    Tokens outside the grid (the skipped ``a`` before it and ``b`` after it) give zeros
    and only advance the count. Compiled, a position past the sequence gives NaN.
    """
    grid, (a, b) = state.grid, state.skip
    N = math.prod(grid)
    D = v.shape[-1]
    v = xp.broadcast_to(v, (*lead, D)) if tuple(v.shape[:-1]) != lead else v
    cut = central(xp, tables, grid, work, v)
    e_last = effective(xp, cut, grid, len(grid) - 1, v)
    if not is_compiled(xp, state.count, v, *(t for t in tables if t is not None)):
        seen = int(state.count)
        count = state.count + 1 if slices_compile(xp) else count_array(xp, seen + 1, like=v)
        n = seen - a
        if not 0 <= n < N:  # outside the grid: no bias given or received
            return _zeros(xp, (*lead, D), v), state._replace(count=count)
        position = state.count - a if slices_compile(xp) else n  # eager JAX: reads at array positions
        out, new = _grid_step(xp, state, v, position, cut, e_last, lead=lead, work=work, toeplitz=toeplitz, known=n)
        return out, new._replace(count=count)
    for G in grid:  # the FFT lengths of the row-end Toeplitz products, memoised out here: a
        next_fast_len(2 * G - 1)  # first use inside torch.cond would write a global dict there
    n = state.count - a
    inside = (n >= 0) & (n < N)
    if a or b:  # a skipped token must not advance the grid

        def take(*ls: Any) -> tuple:
            o, s = _grid_step(xp, _unleaves(state, ls), v, n, cut, e_last, lead=lead, work=work, toeplitz=toeplitz)
            return (o, *_leaves(s))

        out, *leaves = cond(xp, inside, take, lambda *ls: (_zeros(xp, (*lead, D), v), *ls), _leaves(state))
        new = _unleaves(state, tuple(leaves))
    else:
        out, new = _grid_step(xp, state, v, n, cut, e_last, lead=lead, work=work, toeplitz=toeplitz)
    nan = xp.asarray(float("nan"), dtype=out.dtype, device=device_of(out))
    out = xp.where(n < N + b, out, nan)
    return out, new._replace(count=state.count + 1)


# --------------------------------------------------------------------------- pieces
def extend(
    xp: Namespace, state: RPBndState, v: Array, tables: tuple, *, lead: tuple, work: Any, toeplitz: Callable
) -> tuple[Array, RPBndState]:
    """A piece ``v (..., L, D)`` (validated, compute dtype) of consecutive raster positions.

    Eagerly the piece is cut at row ends (and at the skipped tokens): each part within
    one row is one 1-d chunk of the row's stream (``_online.extend``: FFTs, no loop over
    tokens) plus the finished sub-slabs' terms, then the row's end as in a step. Under
    a compiler, where the count is not known, the piece is a loop of steps.
    """
    D, L = v.shape[-1], v.shape[-2]
    v = xp.broadcast_to(v, (*lead, L, D))
    if is_compiled(xp, state.count, v, *(t for t in tables if t is not None)):
        outs = []
        for j in range(L):
            o, state = step(xp, state, v[..., j, :], tables, lead=lead, work=work, toeplitz=toeplitz)
            outs.append(o)
        return (xp.stack(outs, axis=-2) if outs else v[..., :0, :]), state
    grid, (a, _) = state.grid, state.skip
    N, G = math.prod(grid), grid[-1]
    cut = central(xp, tables, grid, work, v)
    e_last = effective(xp, cut, grid, len(grid) - 1, v)
    seen = int(state.count)
    outs, j = [], 0
    while j < L:
        n = seen + j - a
        if not 0 <= n < N:  # skipped tokens up to the grid's start, or after its end
            size = min(L - j, -n) if n < 0 else L - j
            outs.append(_zeros(xp, (*lead, size, D), v))
            j += size
            continue
        col = n % G
        size = min(L - j, G - col)
        part = v[..., j : j + size, :]
        out, row = _online.extend(xp, state.row, part, e_last, lead=lead, M=G, a=0, work=work, toeplitz=toeplitz)
        if len(grid) > 1:
            p = _coordinates(n, grid)
            out = out + _cross(xp, state, p)[..., None, :]
            for lv in range(len(grid) - 1):
                out = out + state.across[lv][-1][..., col : col + size, :]
        state = state._replace(row=row)
        if col + size == G and len(grid) > 1:
            state = _finish_row(xp, state, _coordinates(n + size - 1, grid), cut, e_last, work, toeplitz, lead)
        outs.append(out)
        j += size
    out = v[..., :0, :] if not outs else outs[0] if len(outs) == 1 else xp.concat(outs, axis=-2)
    return out, state._replace(count=count_array(xp, seen + L, like=v))
