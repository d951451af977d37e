r"""Sequence parallelism: linear attention and FastRPB on a sequence split over devices.

The sequence axis (-2) of every array is split into ``P`` contiguous blocks of equal
length, one per rank in rank order: rank ``r`` holds tokens ``r Lb .. (r + 1) Lb - 1``
of a sequence of ``L = P Lb`` tokens. Each function here returns rank ``r``'s block of
the single-device result on the gathered arrays, and its gradients are those of the
single-device call (see "Gradients" below).

``comm`` says which devices take part:

- ``jax_axis(name)``: inside ``jax.shard_map`` over the mesh axis ``name``;
- ``torch_group(group=None)``: the ranks of a ``torch.distributed`` process group (any
  backend), with autograd-aware collectives so that gradients flow back across ranks.

Both only wrap three collectives of their framework (``all_gather``, ``all_to_all``,
the rank and the group size); the maths of what is exchanged is written once, on the
array API, below.

What is exchanged (``B`` = product of the leading dimensions):

- ``linear_attention``: only states, as in LASP-2 (Sun et al. 2025, "LASP-2:
  Rethinking Sequence Parallelism for Linear Attention and Its Hybrid",
  arXiv:2502.07563). Each rank sums its block's state ``S_r = sum_j phi(k_j) [v_j, 1]``
  (``B F (Dv + 1)`` numbers; the exponential maps add a per-feature offset, ``B F``
  more), one ``all_gather`` of the states (``P B F (Dv + 2)`` numbers received per
  device, independent of ``L``), then a local computation: non-causal against the sum
  of all states, causal against the exclusive prefix of the earlier ranks' states.
- ``rpb``: two ``all_to_all`` transposes, ``B L D / P`` numbers sent and received per
  device each way; per-device memory O(B L D / P) (plus the table): no device ever
  holds all values (see ``rpb``).

Gradients: under ``jax.grad`` of a loss through ``shard_map`` every gradient equals the
single-device one (JAX sums the cotangents of replicated inputs itself). With
``torch.distributed`` each rank calls ``backward`` on its part of the loss; the
gradients of the sharded inputs (``q``, ``k``, ``v``) are the single-device gradient's
blocks, while a replicated parameter (the bias table, a feature map's projection)
gets on each rank the part of its gradient that rank's tokens produce: their sum over
ranks (``all_reduce``, as DDP or FSDP over the sequence-parallel group does) is the
single-device gradient.
"""

from __future__ import annotations

import math
from typing import Any

from . import _validate
from . import bias as _bias
from ._compat import compute_dtype, device_of, namespace

# The local block is computed with fastrpb's own single-device kernels (the chunked causal
# algorithm, the exponential maps' offsets and relative eps).
from ._kernels.causal import causal_attention
from ._kernels.common import features, finite_or_zero, normalise, prepend, with_ones
from ._kernels.exponential import causal_exp_attention, log_features, noncausal_exp_attention, state_keys
from ._typing import Array
from ._validate import broadcast_shapes as _broadcast_lead
from .feature_maps import FeatureMapLike, resolve

__all__ = ["Communicator", "jax_axis", "linear_attention", "rpb", "torch_group"]


# --------------------------------------------------------------------------- adapters
class Communicator:
    """The collectives of a group of ``P`` ranks, each holding one sequence block.

    Made by ``jax_axis`` or ``torch_group``; a subclass implements four methods on
    arrays of its framework:

    - ``size()``: ``P`` (a Python int);
    - ``rank()``: this rank's index (a Python int or a 0-d integer array);
    - ``all_gather(x)``: shape ``(P, *x.shape)``, entry ``p`` is rank ``p``'s ``x``;
    - ``all_to_all(x)``: ``x`` of shape ``(P, ...)``; entry ``p`` is sent to rank ``p``,
      and entry ``p`` of the result is what rank ``p`` sent here.

    Both collectives must be differentiable (their transposes are a reduce-scatter and
    the reverse all-to-all).
    """

    def size(self) -> int:
        raise NotImplementedError

    def rank(self) -> Any:
        raise NotImplementedError

    def all_gather(self, x: Array) -> Array:
        raise NotImplementedError

    def all_to_all(self, x: Array) -> Array:
        raise NotImplementedError


# The two adapters are the framework boundary of this module (as fastrpb.torch and
# fastrpb.flax are for the layers): each imports its framework only when called, so
# importing fastrpb.parallel imports neither.
class _JaxAxis(Communicator):
    def __init__(self, name: Any) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"jax_axis({self.name!r})"

    def size(self) -> int:
        import jax

        return int(jax.lax.axis_size(self.name))

    def rank(self) -> Any:
        import jax

        return jax.lax.axis_index(self.name)

    def all_gather(self, x: Any) -> Any:
        import jax

        return jax.lax.all_gather(x, self.name, axis=0, tiled=False)

    def all_to_all(self, x: Any) -> Any:
        import jax

        return jax.lax.all_to_all(x, self.name, 0, 0, tiled=True)


class _TorchGroup(Communicator):
    def __init__(self, group: Any) -> None:
        self.group = group

    def __repr__(self) -> str:
        return f"torch_group({self.group!r})"

    def _group(self) -> Any:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "comm=torch_group(...) needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group), but none is initialised"
            )
        return dist.group.WORLD if self.group is None else self.group

    def size(self) -> int:
        import torch.distributed as dist

        return int(dist.get_world_size(group=self._group()))

    def rank(self) -> Any:
        import torch.distributed as dist

        return int(dist.get_rank(group=self._group()))

    def all_gather(self, x: Any) -> Any:
        import torch

        # An all-to-all of P views of x (every rank sends x to every rank): the same
        # bytes as an all-gather, and its backward is again an all-to-all, summed by
        # broadcast_to's backward. torch.distributed.nn.functional.all_gather is
        # deprecated (torch 2.13 points to a private module) and gave wrong gradients
        # with several gathers in one graph (see STYLE.md).
        return self.all_to_all(torch.broadcast_to(x, (self.size(), *x.shape)))

    def all_to_all(self, x: Any) -> Any:
        import torch
        from torch.distributed.nn import functional as dnn

        self._group()  # the check only: see below for why the object is not passed
        # The autograd-aware collective: its backward sends the gradients back. It
        # keeps its group argument in the autograd graph (ctx.group) until the graph
        # is freed, so it gets self.group as given: None (the default group) is looked
        # up again by the backward. Passing the default ProcessGroup object would pin
        # it: destroy_process_group would then leave gloo's worker threads running
        # until the graph is collected, possibly during interpreter shutdown, when a
        # worker thread that frees a finished collective's Python-owned tensors
        # needs the GIL, is made to exit by Python and aborts the process
        # ("terminate called without an active exception", SIGABRT).
        parts = [p.contiguous() for p in torch.unbind(x, 0)]
        out = [torch.empty_like(p) for p in parts]
        return torch.stack(dnn.all_to_all(out, parts, group=self.group))


def jax_axis(name: Any) -> Communicator:
    """The ranks of the ``jax.shard_map`` mesh axis ``name`` (call inside the mapped function).

    Wraps ``jax.lax.all_gather``, ``jax.lax.all_to_all``, ``jax.lax.axis_index`` and
    ``jax.lax.axis_size``; all are differentiable, so ``jax.grad`` of a loss through
    the ``shard_map`` equals the single-device gradient.

    Parameters
    ----------
    name : str or tuple of str
        The mesh axis (or axes) that the sequence is split over.

    Returns
    -------
    Communicator

    Raises
    ------
    TypeError
        If ``name`` is neither a str nor a tuple.

    Examples
    --------
    >>> from fastrpb import parallel
    >>> comm = parallel.jax_axis("seq")
    >>> isinstance(comm, parallel.Communicator), comm.name
    (True, 'seq')
    """
    if not isinstance(name, (str, tuple)):
        raise TypeError(f"name must be a mesh axis name (a str, or a tuple of them), got {type(name).__name__}")
    return _JaxAxis(name)


def torch_group(group: Any = None) -> Communicator:
    """The ranks of a ``torch.distributed`` process group (``None``: the default group).

    Any backend (gloo, NCCL, ...). The collective is
    ``torch.distributed.nn.functional.all_to_all`` (an all-gather is an all-to-all of
    ``P`` views of the same array), which carries gradients back to the ranks that
    sent the data; every rank must call the same
    functions with arrays of the same shapes, in the same order (forward and backward).
    The autograd graph keeps a ``group`` given here (not the default group, which it
    looks up when needed): drop the graphs (the outputs) before destroying that group.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        The ranks that hold the sequence blocks; ``None`` is the default group. It is
        looked up when a collective runs, so the communicator can be made before
        ``torch.distributed.init_process_group``.

    Returns
    -------
    Communicator

    Examples
    --------
    >>> from fastrpb import parallel
    >>> isinstance(parallel.torch_group(), parallel.Communicator)
    True
    """
    return _TorchGroup(group)


def _comm_arg(comm: Any) -> Communicator:
    if not isinstance(comm, Communicator):
        raise TypeError(
            "comm must come from fastrpb.parallel.jax_axis(name) or fastrpb.parallel.torch_group(group), "
            f"got {type(comm).__name__}"
        )
    return comm


# --------------------------------------------------------------------------- states
def _block_state(xp: Any, fk: Any, v1: Any) -> Any:
    """``phi(K)^T [V, 1]``: the block's state, shape ``(..., F, Dv + 1)``."""
    return xp.matmul(xp.matrix_transpose(fk), v1)


def _merge(xp: Any, gathered: Any, visible: Any, exponential: bool) -> tuple[Any, Any]:
    r"""Sum the gathered states of the ranks marked ``visible`` (all if ``None``).

    ``gathered`` has shape ``(P, ..., F, W)``. For the exponential maps its last column
    is the offset ``c_p`` of rank ``p``'s state (``S_p`` holds ``exp(l(k) - c_p)``
    weighted sums) and the merge is exact in the frame of the common maximum:

    $$
    c = \max_p c_p, \qquad S = \sum_p e^{c_p - c} S_p
    $$

    (every factor <= 1). Returns ``(S, c)`` (``c`` is ``None`` for the other maps). A
    rank that is not visible contributes nothing, not even a NaN.
    """
    zero = xp.zeros((), dtype=gathered.dtype, device=device_of(gathered))
    if visible is not None:
        visible = xp.reshape(visible, (visible.shape[0],) + (1,) * (gathered.ndim - 1))
    if not exponential:
        if visible is not None:
            gathered = xp.where(visible, gathered, zero)
        return xp.sum(gathered, axis=0), None
    S, c = gathered[..., :-1], gathered[..., -1]
    if visible is not None:
        S = xp.where(visible, S, zero)
        c = xp.where(visible[..., 0], c, xp.asarray(-math.inf, dtype=c.dtype, device=device_of(c)))
    top = xp.max(c, axis=0)
    weight = xp.exp(c - finite_or_zero(xp, top))  # 0 for a rank without keys
    return xp.sum(weight[..., None] * S, axis=0), top


# --------------------------------------------------------------------------- public
def linear_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    comm: Communicator,
    feature_map: FeatureMapLike = "elu",
    causal: bool = False,
    key_mask: Array | None = None,
    eps: float = 1e-6,
    chunk_size: int = 64,
    rpb: Array | None = None,
    rpb_skip: tuple[int, int] = (0, 0),
) -> Array:
    r"""Linear attention on a sequence split over ranks; exchanges only states (LASP-2).

    Rank ``r`` holds blocks ``q_r, k_r, v_r`` of the sequence (contiguous, equal
    lengths, in rank order) and gets its block of
    ``fastrpb.linear_attention(q, k, v, ...)`` on the whole sequence:

    $$
    \mathrm{out}_i = \frac{\phi(q_i)^\top \big(S_{\mathrm{before}} + \sum_{j \le i,\, j \in r}
    \phi(k_j) v_j^\top\big)}{\phi(q_i)^\top \big(z_{\mathrm{before}} + \sum_{j \le i,\, j \in r}
    \phi(k_j)\big) + \varepsilon}, \qquad
    [S_p, z_p] = \sum_{j \in p} \phi(k_j)\, [v_j, 1]^\top
    $$

    with ``S_before = sum_{p < r} S_p`` (causal) or the numerator and denominator
    against ``sum_p S_p`` (non-causal). Each rank computes its block state ``[S_r, z_r]``,
    one ``all_gather`` exchanges them and the sum is formed locally (Sun et al. 2025,
    "LASP-2", arXiv:2502.07563). For ``sikf``/``favor`` each state is kept relative to
    its block's per-feature key maximum ``c_r`` and the states are merged exactly in
    the frame of the common maximum (``e^{c_p - c} S_p``); the merged state enters the
    local chunked algorithm as ``F`` pseudo-keys before the block, so offsets and the
    relative ``eps`` are those of the single-device call.

    Cost per rank: the single-device cost on ``Lb = L / P`` tokens (plus ``F`` pseudo-keys
    for the exponential maps), one ``all_gather`` receiving ``P B F (Dv + 1)`` numbers
    (``P B F (Dv + 2)`` for ``sikf``/``favor``; ``B`` the product of the leading
    dimensions), independent of ``L``; memory O(B (Lb (F + Dv) + P F Dv)). With
    ``rpb=`` add the cost of ``fastrpb.parallel.rpb``.

    Parameters
    ----------
    q : array, shape (..., Lqb, Dk)
    k : array, shape (..., Lkb, Dk)
    v : array, shape (..., Lkb, Dv)
        This rank's blocks (``Lqb == Lkb`` when causal). The same shapes on every rank.
    comm : Communicator
        ``jax_axis(name)`` inside ``jax.shard_map``, or ``torch_group(group)``.
    feature_map, causal, eps, chunk_size
        As in ``fastrpb.linear_attention``.
    key_mask : bool array, shape (..., Lkb), optional
        This rank's block of the key mask.
    rpb : array, shape (..., 2M - 1), optional
        FastRPB table (the whole table on every rank, ``M >= L``): adds
        ``fastrpb.parallel.rpb(v, rpb, comm=comm, causal=causal, skip=rpb_skip)``.
    rpb_skip : (int, int)
        Tokens at the start and end of the *whole* sequence without bias.

    Returns
    -------
    array, shape (..., Lqb, Dv)
        This rank's block of the output.

    Raises
    ------
    TypeError
        If ``comm`` does not come from ``jax_axis`` or ``torch_group``, or the inputs are
        rejected as by ``fastrpb.linear_attention``.
    ValueError
        As ``fastrpb.linear_attention``, or (``torch_group``) without an initialised
        process group.

    Examples
    --------
    Under ``jax.shard_map`` with the sequence split over the mesh axis ``"seq"``, the
    result equals the single-device one:

    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> from fastrpb import parallel
    >>> mesh = Mesh(np.array(jax.devices()), ("seq",))  # every device holds one block
    >>> import fastrpb
    >>> x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), dtype=jnp.float32)
    >>> body = lambda q, k, v: parallel.linear_attention(q, k, v, comm=parallel.jax_axis("seq"), causal=True)
    >>> f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("seq"),) * 3, out_specs=P("seq")))
    >>> bool(jnp.allclose(f(x, x, x), fastrpb.linear_attention(x, x, x, causal=True), atol=1e-5))
    True
    """
    comm = _comm_arg(comm)
    fmap = resolve(feature_map)
    named = {} if rpb is None else {"rpb": rpb}
    causal = _validate.flag("causal", causal)
    eps = _validate.non_negative("eps", eps)
    C = _validate.integer("chunk_size", chunk_size, minimum=1)
    _validate.skip(rpb_skip, "rpb_skip")
    _validate.required(q=q, k=k, v=v)
    xp = namespace(q=q, k=k, v=v, key_mask=key_mask, **named, **fmap._arrays())
    lead = _validate.attention_inputs(xp, q, k, v)
    _validate.key_mask(xp, key_mask, k.shape[-2], lead)
    fmap._check_width(q.shape[-1], "q")
    Lq, Lk = q.shape[-2], k.shape[-2]
    if Lq == 0 or Lk == 0:
        raise ValueError(f"each rank's block needs at least one token, got q with {Lq} and k with {Lk} rows")
    if causal and Lq != Lk:
        raise ValueError(
            f"causal=True needs blocks of as many queries as keys, got q with Lqb = {Lq} and k with Lkb = {Lk}"
        )
    if rpb is not None and Lq != Lk:
        raise ValueError(f"the FastRPB term (rpb=) needs as many queries as keys, got Lqb = {Lq} and Lkb = {Lk}")
    P = comm.size()
    if rpb is not None:
        try:
            rpb_skip = _check_rpb(xp, v, rpb, P, rpb_skip, "rpb")
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"in the FastRPB term (rpb=, rpb_skip=): {exc}") from exc
    result, work = compute_dtype(xp, q, k, v, *named.values())
    qw, kw, vw = (xp.astype(x, work, copy=False) for x in (q, k, v))
    v1 = with_ones(xp, vw)
    visible = None
    if causal:  # the ranks before this one
        visible = xp.arange(P, dtype=xp.int32, device=device_of(v)) < comm.rank()
    if fmap.exponential:
        lq, lk, _ = log_features(xp, fmap, qw, kw, key_mask)
        c = xp.max(lk, axis=-2)  # (..., F): this block's key maximum per feature
        state = _block_state(xp, xp.exp(lk - finite_or_zero(xp, c)[..., None, :]), v1)
        c = xp.broadcast_to(c, state.shape[:-1])
        gathered = comm.all_gather(xp.concat([state, c[..., None]], axis=-1))  # one collective
        merged, offset = _merge(xp, gathered, visible, True)
        keys = state_keys(xp, offset)
        if causal:
            F = keys.shape[-1]
            queries = prepend(xp, xp.zeros((F, F), dtype=work, device=device_of(lq)), lq)
            total, eps_rows, _, _, _ = causal_exp_attention(
                xp, queries, prepend(xp, keys, lk), prepend(xp, merged, v1), min(C, F + Lq), eps
            )
            total = total[..., F:, :]
            if not isinstance(eps_rows, float):
                eps_rows = eps_rows[..., F:, :]
            num, den = total[..., :-1], total[..., -1:]
        else:
            # the merged state is every key: its den column rides in the numerator
            total, _, eps_rows, _ = noncausal_exp_attention(xp, lq, keys, merged, eps)
            num, den = total[..., :-1], total[..., -1:]
        out = normalise(xp, num, den, eps_rows)
    else:
        fq, fk = features(xp, fmap, qw, kw, key_mask)
        gathered = comm.all_gather(_block_state(xp, fk, v1))  # one collective
        merged, _ = _merge(xp, gathered, visible, False)
        total = xp.matmul(fq, merged)  # the earlier ranks' keys (all keys when not causal)
        num, den = total[..., :-1], total[..., -1:]
        if causal:  # plus this block's own keys, causally (exact normaliser)
            num_b, den_b, _, _ = causal_attention(xp, fq, fk, vw, min(C, Lq), signed=not fmap.nonnegative)
            num, den = num + num_b, den + den_b
        out = normalise(xp, num, den, eps)
    if rpb is not None:
        if key_mask is not None:  # a padding key gives no bias either
            vw = xp.where(key_mask[..., None], vw, xp.zeros((), dtype=vw.dtype, device=device_of(vw)))
        term = _rpb(xp, vw, xp.astype(rpb, work, copy=False), comm, causal=causal, skip=rpb_skip)
        out = out + xp.astype(term, out.dtype, copy=False)
    return xp.astype(out, result, copy=False)


def rpb(v: Array, w: Array, *, comm: Communicator, causal: bool = False, skip: tuple[int, int] = (0, 0)) -> Array:
    r"""FastRPB ``B v`` on a sequence split over ranks, without gathering the values.

    Rank ``r`` holds the block ``v_r`` (contiguous, equal lengths, in rank order) and
    gets its block of ``fastrpb.rpb(v, w, causal=causal, skip=skip)`` on the whole
    sequence, ``out_i = sum_j w_{M-1+i-j} v_j``. A Toeplitz product couples every token
    with every other, so the sequence is transposed instead of gathered (as a
    distributed FFT does): the ``B D`` columns (leading index x feature) of ``v`` are
    cut into ``P`` equal groups (padded with zero columns to a multiple of ``P``), one
    ``all_to_all`` gives each rank the *whole* sequence of its group of columns, the
    single-device ``fastrpb.rpb`` biases them, and a second ``all_to_all`` returns the
    rows. Columns of one leading index stay together where the counts allow, so a
    table's FFT is shared by its columns.

    Cost per rank: two ``all_to_all`` of ``B L D / P`` numbers each (sent and
    received, ``(P - 1) / P`` of it crosses the network), O((B L D / P) log L) time,
    O(B L D / P) memory for the values plus, with per-head tables, the tables of its
    columns' heads; never the whole ``B L D``.

    Parameters
    ----------
    v : array, shape (..., Lb, D)
        This rank's block of the values; ``L = P Lb``.
    w : array, shape (..., 2M - 1)
        The whole table on every rank, ``M >= L - a - b``.
    comm : Communicator
        ``jax_axis(name)`` inside ``jax.shard_map``, or ``torch_group(group)``.
    causal : bool
        Only ``j <= i`` contributes.
    skip : (int, int)
        The first ``a`` and last ``b`` tokens of the *whole* sequence neither give nor
        receive bias.

    Returns
    -------
    array, shape broadcast(w.shape[:-1], v.shape[:-2]) + (Lb, D)
        This rank's block, in the promoted dtype of ``v`` and ``w``.

    Raises
    ------
    TypeError
        If ``comm`` does not come from ``jax_axis`` or ``torch_group``, or the inputs are
        rejected as by ``fastrpb.rpb``.
    ValueError
        As ``fastrpb.rpb``, or (``torch_group``) without an initialised process group.

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> from fastrpb import parallel
    >>> mesh = Mesh(np.array(jax.devices()), ("seq",))  # every device holds one block
    >>> import fastrpb
    >>> rng = np.random.default_rng(0)
    >>> v = jnp.asarray(rng.standard_normal((8, 2)), dtype=jnp.float32)
    >>> w = jnp.asarray(rng.standard_normal(15), dtype=jnp.float32)  # M = 8
    >>> body = lambda v, w: parallel.rpb(v, w, comm=parallel.jax_axis("seq"), causal=True)
    >>> f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("seq"), P()), out_specs=P("seq")))
    >>> bool(jnp.allclose(f(v, w), fastrpb.rpb(v, w, causal=True), atol=1e-5))
    True
    """
    comm = _comm_arg(comm)
    causal = _validate.flag("causal", causal)
    _validate.required(v=v, w=w)
    xp = namespace(v=v, w=w)
    _validate.values(xp, "v", v)
    result, _ = compute_dtype(xp, v, w)
    skip = _check_rpb(xp, v, w, comm.size(), skip, "w")
    out = _rpb(xp, v, w, comm, causal=causal, skip=skip)
    return xp.astype(out, result, copy=False)


def _units(n_lead: int, D: int, P: int) -> int:
    """Split each leading index's ``D`` columns into ``g`` units (``g`` divides ``D``).

    The smallest ``g`` with ``n_lead g`` a multiple of ``P`` (no padding, and a table's
    FFT shared by as many columns as possible); ``D`` (single columns, padded) if none.
    """
    for g in range(1, D + 1):
        if D % g == 0 and (n_lead * g) % P == 0:
            return g
    return D


def _check_rpb(xp: Any, v: Any, w: Any, P: int, skip: Any, name: str) -> tuple[int, int]:
    """Check the table and ``skip`` against the whole sequence (before any collective)."""
    M = _validate.table(xp, name, w)
    _validate.broadcast({name: w.shape[:-1], "v": v.shape[:-2]})
    Lb = v.shape[-2]
    L = P * Lb
    a, b = _validate.skip(skip)
    if a + b > L:
        raise ValueError(f"skip = ({a}, {b}) skips {a + b} tokens but the sequence has only L = {P} x {Lb} = {L}")
    _validate.table_length(L - a - b, M, name)
    return a, b


def _rpb(xp: Any, v: Any, w: Any, comm: Communicator, *, causal: bool, skip: tuple[int, int]) -> Any:
    """``rpb`` after the checks: the transposes and the local bias."""
    a, b = skip
    P = comm.size()
    Lb, D = v.shape[-2], v.shape[-1]
    L = P * Lb
    lead = _broadcast_lead(w.shape[:-1], v.shape[:-2])
    n_lead = math.prod(lead)
    g = _units(n_lead, D, P)
    u = D // g  # columns per unit
    units = n_lead * g
    per_rank = -(-units // P)
    # (..., Lb, D) -> units of columns (n_lead g, u, Lb), padded to P groups
    x = xp.reshape(xp.broadcast_to(v, (*lead, Lb, D)), (n_lead, Lb, D))
    x = xp.reshape(xp.permute_dims(x, (0, 2, 1)), (units, u, Lb))
    if per_rank * P > units:
        x = xp.concat([x, xp.zeros((per_rank * P - units, u, Lb), dtype=x.dtype, device=device_of(x))], axis=0)
    x = comm.all_to_all(xp.reshape(x, (P, per_rank, u, Lb)))  # x[p]: rank p's block of my units
    x = xp.reshape(xp.permute_dims(x, (1, 0, 3, 2)), (per_rank, L, u))  # my units, whole sequence
    if all(d == 1 for d in w.shape[:-1]):
        table = xp.reshape(w, (w.shape[-1],))
    else:
        tables = xp.reshape(xp.broadcast_to(w, (*lead, w.shape[-1])), (n_lead, w.shape[-1]))
        unit = comm.rank() * per_rank + xp.arange(per_rank, dtype=xp.int32, device=device_of(v))
        index = xp.minimum(unit // g, xp.asarray(n_lead - 1, dtype=xp.int32, device=device_of(v)))  # padding units
        table = xp.take(tables, index, axis=0)
    y = _bias.rpb(x, table, causal=causal, skip=(a, b))  # (per_rank, L, u)
    y = xp.permute_dims(xp.reshape(y, (per_rank, P, Lb, u)), (1, 0, 3, 2))
    y = comm.all_to_all(y)  # y[p]: my block of rank p's units
    y = xp.reshape(y, (P * per_rank, u, Lb))[:units, ...]
    y = xp.reshape(y, (n_lead, D, Lb))
    return xp.reshape(xp.permute_dims(y, (0, 2, 1)), (*lead, Lb, D))
