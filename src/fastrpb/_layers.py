"""What the PyTorch and Flax layers share, written once against the array API.

No maths lives here (that is the functional core) and no framework is imported. The
mixins below hold every check, every attribute and every forward computation of the
layers; ``fastrpb.torch`` and ``fastrpb.flax`` add only what differs between the
frameworks: how a parameter or buffer is created and read (``_table``, ``_tables``,
``_owned``) and the module protocol (``forward`` / ``__call__``, docstrings).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple, cast

from ._compat import device_of, namespace
from ._typing import Array
from ._validate import flag, grid_arg, int_arg, non_negative, skip_arg
from .attention import linear_attention, linear_attention_step
from .bias import rpb, rpb_matrix, rpb_nd, rpb_nd_step, rpb_step, symmetric_table
from .feature_maps import FeatureMap, hedgehog, resolve

__all__ = ["AttentionLayer", "BiasLayer", "BiasNdLayer", "LayerCache", "check_axes", "check_heads"]


class LayerCache(NamedTuple):
    """Decoding cache of a ``LinearAttention`` layer.

    A ``NamedTuple`` (a pytree in JAX): new fields get defaults, so code that builds
    or unpacks the first two keeps working.

    Attributes
    ----------
    state :
        The functional ``fastrpb.LinearAttentionState`` (for ``"sikf"`` it carries the
        running key offset); with a FastRPB its ``rpb`` field holds the bias history
        (a ``fastrpb.RPBState``: the online FFT convolution's blocks, O(M Dh) per head),
        so a step costs amortised O(Dh log^2 t) for the bias, never a pass over all
        earlier values.
    values : None
        Kept for code that unpacks two fields; always ``None`` now (the layer used to
        keep every value projection here and re-run the bias over them each step).
    """

    state: Any
    values: Any = None


def check_heads(heads: Any, *, allow_none: bool = True) -> int | None:
    if heads is None and allow_none:
        return None
    return int_arg("heads", heads, minimum=1)


def check_axes(axes: Any, grid: tuple[int, ...]) -> tuple[int, ...]:
    """Which grid axes get a bias table (default: all)."""
    if axes is None:
        return tuple(range(len(grid)))
    if not isinstance(axes, (tuple, list)) or len(axes) == 0:
        raise TypeError(f"axes must be a non-empty sequence of grid axes, got {axes!r}")
    out: list[int] = []
    for a in axes:
        a = int_arg("axes entry", a, minimum=0)
        if a >= len(grid):
            raise ValueError(f"axes names axis {a} but grid {grid} has only {len(grid)} axes")
        if a in out:
            raise ValueError(f"axes names axis {a} twice: {tuple(axes)}")
        out.append(a)
    return tuple(sorted(out))


# --------------------------------------------------------------------------- bias
class BiasLayer:
    """``FastRPB``: one Toeplitz table, applied by ``fastrpb.rpb``.

    The framework class creates the parameter (``table``: the full ``(heads, 2M - 1)``
    table, or ``h: (heads, M)`` when symmetric) and reads it back with ``_table``.
    """

    heads: int | None
    max_len: int
    causal: bool
    symmetric: bool
    skip: tuple[int, int]

    def _configure(self, heads: Any, max_len: Any, causal: Any, symmetric: Any, skip: Any) -> None:
        self.heads = check_heads(heads)
        self.max_len = int_arg("max_len", max_len, minimum=1)
        self.causal = flag("causal", causal)
        self.symmetric = flag("symmetric", symmetric)
        self.skip = skip_arg(skip)

    def _table(self) -> Any:
        """The stored parameter as an array of the framework."""
        raise NotImplementedError

    def weights(self) -> Array:
        """The full table ``(heads, 2 max_len - 1)`` (expanded from ``h`` when symmetric)."""
        table = self._table()
        return symmetric_table(table) if self.symmetric else table

    def _bias_of(self, v: Any, initial_state: Any = None, return_state: bool = False, step: bool = False) -> Any:
        """``B @ v``; streaming (causal): continue ``initial_state`` and return ``(out,
        state)``, for a chunk ``v: (..., L, D)`` or, with ``step=True``, one token
        ``v: (..., D)`` (``fastrpb.rpb_step``)."""
        w = self.weights()
        if step:
            if initial_state is None:
                return rpb_step(None, v, w, skip=self.skip)
            return rpb_step(initial_state, v, w)
        if initial_state is None and not return_state:
            return rpb(v, w, causal=self.causal, skip=self.skip)
        return rpb(v, w, causal=self.causal, skip=self.skip, initial_state=initial_state, return_state=return_state)

    def matrix(self, L: int) -> Array:
        """The dense ``(heads, L, L)`` matrix ``B``, e.g. as a softmax logits bias."""
        return rpb_matrix(self.weights(), L, causal=self.causal)

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, max_len={self.max_len}, causal={self.causal}, "
            f"symmetric={self.symmetric}, skip={self.skip}"
        )


class BiasNdLayer:
    """``FastRPBnd``: one table per biased grid axis (or one shared), applied by ``fastrpb.rpb_nd``.

    The framework class creates one parameter per entry of ``lengths`` and reads them
    back with ``_tables``.
    """

    heads: int | None
    grid: tuple[int, ...]
    axes: tuple[int, ...]
    share: bool
    symmetric: bool
    skip: tuple[int, int]
    causal: bool  # raster order: only positions no later row-major bias a token

    def _configure(
        self, heads: Any, grid: Any, axes: Any, share: Any, symmetric: Any, skip: Any, causal: Any = False
    ) -> None:
        self.causal = bool(causal)
        self.heads = check_heads(heads)
        self.grid = grid_arg(grid)
        self.axes = check_axes(axes, self.grid)
        self.share = flag("share", share)
        self.symmetric = flag("symmetric", symmetric)
        self.skip = skip_arg(skip)

    @property
    def lengths(self) -> list[int]:
        """The ``max_len`` of each stored table: one per biased axis, or one for all (``share``)."""
        if self.share:
            return [max(self.grid[a] for a in self.axes)]
        return [self.grid[a] for a in self.axes]

    def _tables(self) -> list[Any]:
        """The stored parameters as arrays of the framework, in the order of ``lengths``."""
        raise NotImplementedError

    def weights(self) -> list[Array | None]:
        """One full table (or ``None``) per grid axis, as ``fastrpb.rpb_nd`` takes them."""
        full = [symmetric_table(t) if self.symmetric else t for t in self._tables()]
        out: list[Any | None] = [None] * len(self.grid)
        for n, a in enumerate(self.axes):
            out[a] = full[0] if self.share else full[n]
        return out

    def _bias_of(self, v: Any, initial_state: Any = None, return_state: bool = False, step: bool = False) -> Any:
        """``B @ v``; streaming (causal, raster order): continue ``initial_state`` and
        return ``(out, state)``, for a piece ``v: (..., L, D)`` or, with ``step=True``,
        one position ``v: (..., D)`` (``fastrpb.rpb_nd_step``)."""
        tables = self.weights()
        if step:
            return rpb_nd_step(
                initial_state, v, tables, grid=self.grid, skip=self.skip if initial_state is None else None
            )
        if initial_state is None and not return_state:
            return rpb_nd(v, tables, self.grid, causal=self.causal, skip=self.skip)
        return rpb_nd(
            v,
            tables,
            self.grid,
            causal=self.causal,
            skip=self.skip,
            initial_state=initial_state,
            return_state=return_state,
        )

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, grid={self.grid}, axes={self.axes}, share={self.share}, "
            f"symmetric={self.symmetric}, skip={self.skip}, causal={self.causal}"
        )


def check_layer_rpb(rpb: Any, heads: int, causal: bool) -> None:
    """A FastRPB module given to an attention layer must fit its heads and causality."""
    if not isinstance(rpb, (BiasLayer, BiasNdLayer)):
        raise TypeError(
            f"rpb must be None, an int (the table's max_len) or a FastRPB / FastRPBnd module, got {type(rpb).__name__}"
        )
    if rpb.heads not in (None, heads):
        raise ValueError(f"rpb has {rpb.heads} heads but the attention layer has heads = {heads}")
    if causal and not rpb.causal:
        made = "FastRPBnd(..., causal=True)" if isinstance(rpb, BiasNdLayer) else "FastRPB(..., causal=True)"
        raise ValueError(
            f"a causal attention layer needs a causal FastRPB ({made}); "
            "a non-causal bias would let every token see the values of later tokens"
        )


# --------------------------------------------------------------------------- attention
class AttentionLayer:
    """The forward pass and decoding step of the attention layers, written once.

    ``fastrpb.torch`` and ``fastrpb.flax`` subclass this next to their framework's
    module class: they create the parameters (``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``, the ``rpb`` module, the arrays of the feature map) and call
    ``_attend`` / ``_decode``. Everything here goes through the array API (``xp`` of
    the input), so one body serves both.

    The bias is applied by calling the ``rpb`` module on the values (padding keys'
    values zeroed first), never by reading its table here: a module wrapped on its own
    (FSDP2's ``fully_shard(model.rpb)``) gathers its parameters in its own call.
    """

    d_model: int
    heads: int
    head_dim: int
    causal: bool
    eps: float
    chunk_size: int
    rpb: Any  # the framework's FastRPB / FastRPBnd (a BiasLayer / BiasNdLayer), or None
    q_proj: Callable[[Any], Any]
    k_proj: Callable[[Any], Any]
    v_proj: Callable[[Any], Any]
    out_proj: Callable[[Any], Any]
    # The feature map without its arrays: its class, its other fields, and the names of
    # the arrays the layer owns (a buffer / variable each, read back with ``_owned``).
    _map: FeatureMap | None
    _map_class: type
    _map_fields: dict[str, Any]
    _map_arrays: tuple[str, ...]

    def _configure(self, d_model: Any, heads: Any, head_dim: Any, causal: Any, eps: Any, chunk_size: Any) -> int:
        """Validate and store the layer's shape and options; return ``heads * head_dim``."""
        self.d_model = int_arg("d_model", d_model, minimum=1)
        self.heads = int_arg("heads", heads, minimum=1)
        if head_dim is None:
            if self.d_model % self.heads:
                raise ValueError(
                    f"d_model = {self.d_model} is not divisible by heads = {self.heads}; pass head_dim explicitly"
                )
            head_dim = self.d_model // self.heads
        self.head_dim = int_arg("head_dim", head_dim, minimum=1)
        self.causal = flag("causal", causal)
        self.eps = non_negative("eps", eps)
        self.chunk_size = int_arg("chunk_size", chunk_size, minimum=1)
        return self.heads * self.head_dim

    def _own_feature_map(self, feature_map: Any, like: Any, own: Callable[[str, Any, bool], None]) -> None:
        """Resolve ``feature_map`` and hand each of its arrays to ``own(name, array,
        learned)``: the framework makes it a trained parameter (``learned``: the map's
        ``learned`` names, e.g. ``hedgehog``'s ``W``) or a fixed buffer / variable, named
        ``feature_map_<name>``; the rest of the map is kept here.

        ``"hedgehog"`` (a name of the layers only: the functional map needs its ``W``)
        starts ``W`` at the identity ``(head_dim, head_dim)``, as Zhang et al. 2024 and
        flash-linear-attention's ``HedgehogFeatureMap`` do, in the namespace, dtype and
        device of ``like``.
        """
        if isinstance(feature_map, str) and feature_map == "hedgehog":
            xp = namespace(like=like)
            feature_map = hedgehog(xp.eye(self.head_dim, dtype=like.dtype, device=device_of(like)))
        fmap = resolve(feature_map)
        arrays = fmap._arrays()
        if arrays and not dataclasses.is_dataclass(fmap):
            raise TypeError(
                f"feature_map {fmap.signature} holds arrays but is not a dataclass: the layer cannot "
                "own its arrays (save, move and cast them with the module)"
            )
        self._map = None if arrays else fmap
        self._map_class = type(fmap)
        self._map_fields = (
            {
                f.name: getattr(fmap, f.name)
                for f in dataclasses.fields(cast(Any, fmap))
                if f.init and f.name not in arrays
            }
            if arrays
            else {}
        )
        self._map_arrays = tuple(arrays)
        for name, array in arrays.items():
            own(name, array, name in fmap.learned)

    def _bias_module(self, rpb: Any, make: Callable[[int], Any]) -> Any:
        """The layer's FastRPB: ``None``, ``make(max_len)`` for an int, or the module given
        (checked against the layer's heads and causality)."""
        if rpb is None:
            return None
        if isinstance(rpb, numbers.Integral) and not isinstance(rpb, bool):
            rpb = make(int_arg("rpb (max_len)", rpb, minimum=1))
        check_layer_rpb(rpb, self.heads, self.causal)
        return rpb

    def _owned(self, name: str) -> Any:
        """The array ``name`` of the feature map, as the layer holds it now."""
        raise NotImplementedError

    @property
    def feature_map(self) -> FeatureMap:
        """The feature map, built around the arrays the layer holds now (saved, loaded,
        moved and cast with the module)."""
        if self._map is not None:
            return self._map
        arrays = {name: self._owned(name) for name in self._map_arrays}
        return self._map_class(**self._map_fields, **arrays)

    # heads: (..., L, H * Dh) <-> (..., H, L, Dh)
    def _split(self, xp: Any, x: Any) -> Any:
        x = xp.reshape(x, (*x.shape[:-1], self.heads, self.head_dim))
        return _swap_last_but_one(xp, x)

    def _merge(self, xp: Any, x: Any) -> Any:
        x = _swap_last_but_one(xp, x)
        return xp.reshape(x, (*x.shape[:-2], self.heads * self.head_dim))

    def _check_input(self, x: Any, name: str, ndim: int) -> Any:
        xp = namespace(**{name: x})
        if x.ndim < ndim or x.shape[-1] != self.d_model:
            want = "(..., L, d_model)" if ndim == 2 else "(..., d_model)"
            raise ValueError(f"{name} must have shape {want} with d_model = {self.d_model}, got {tuple(x.shape)}")
        return xp

    def _heads(
        self,
        xp: Any,
        q: Any,
        k: Any,
        v: Any,
        key_mask: Any,
        causal: bool,
        return_state: bool,
        cache: Any = None,
        cu_seqlens: Any = None,
    ) -> tuple[Any, Any]:
        """Attention plus bias on split heads ``(..., H, L, Dh)``; ``key_mask: (..., 1, Lk)``
        True = keep; ``cu_seqlens``: packed sequences along L (each attended and biased on
        its own; not with a cache). Returns ``(out, state or None)``; the state carries the
        bias history (``state.rpb``) when the layer has a FastRPB."""
        if self.rpb is not None and q.shape[-2] != k.shape[-2]:
            raise ValueError(
                f"a layer with FastRPB needs as many queries as keys (the bias is B @ V with a square B), "
                f"got Lq = {q.shape[-2]} and Lk = {k.shape[-2]}"
            )
        stream = return_state or cache is not None
        previous = None if cache is None else cache.state
        result = linear_attention(
            q,
            k,
            v,
            feature_map=self.feature_map,
            causal=causal,
            key_mask=key_mask,
            eps=self.eps,
            chunk_size=self.chunk_size,
            return_state=stream,
            initial_state=None if previous is None else previous._replace(rpb=None),
            cu_seqlens=cu_seqlens,
        )
        out, state = result if stream else (result, None)
        if self.rpb is not None:
            values = v
            if key_mask is not None:  # padding keys give no bias (garbage and NaN included)
                values = xp.where(key_mask[..., None], v, xp.zeros((), dtype=v.dtype, device=device_of(v)))
            if stream:  # the bias continues from (and returns) its history
                term, history = self.rpb(
                    values, initial_state=None if previous is None else previous.rpb, return_state=True
                )
                assert state is not None  # stream: linear_attention returned a state
                state = state._replace(rpb=history)
            elif cu_seqlens is None:
                term = self.rpb(values)
            else:  # packed: the bias restarts at every sequence
                term = rpb(
                    values, self.rpb.weights(), causal=self.rpb.causal, skip=self.rpb.skip, cu_seqlens=cu_seqlens
                )
            out = out + term
        return out, state

    def _check_cache(self, cache: Any, return_cache: bool, causal: bool, hint: str) -> None:
        """A cache continues (``cache=``) or ends (``return_cache=True``) a causal call."""
        if return_cache and not causal:
            raise ValueError(f"return_cache=True needs a causal call: {hint}")
        if cache is not None:
            if not causal:
                raise ValueError(f"cache= continues a causal sequence: {hint}")
            _check_cache_type(cache)
        if return_cache or cache is not None:
            self._check_streaming_bias("a cache (return_cache=True, cache=)")

    def _check_streaming_bias(self, what: str) -> None:
        # the N-d bias knows where its trailing tokens are (after the grid); the 1-d does not
        if isinstance(self.rpb, BiasLayer) and self.rpb.skip[1]:
            raise ValueError(
                f"{what} cannot honour skip = {self.rpb.skip}: while decoding it is unknown which tokens "
                "are the last ones; use skip=(a, 0)"
            )

    def _attend(
        self,
        x: Any,
        key_mask: Any,
        return_cache: bool,
        inputs_k: Any = None,
        inputs_v: Any = None,
        cache: Any = None,
        cu_seqlens: Any = None,
    ) -> Any:
        xp = self._check_input(x, "x", 2)
        self._check_cache(cache, return_cache, self.causal, "build the layer with causal=True")
        if cache is not None and inputs_k is not None:
            raise ValueError("cache= continues self-attention: inputs_k/inputs_v cannot be given with it")
        if cu_seqlens is not None and (
            return_cache or cache is not None or inputs_k is not None or isinstance(self.rpb, BiasNdLayer)
        ):
            raise ValueError(
                "cu_seqlens (packed sequences) works with self-attention without return_cache or cache and "
                "without an N-d bias; call the layer per sequence for those"
            )
        if inputs_v is not None and inputs_k is None:
            raise ValueError("inputs_v needs inputs_k: pass the keys' input as well")
        kx = x if inputs_k is None else inputs_k
        vx = kx if inputs_v is None else inputs_v
        if inputs_k is not None:
            self._check_input(kx, "inputs_k", 2)
            self._check_input(vx, "inputs_v", 2)
            if kx.shape[-2] != vx.shape[-2]:
                raise ValueError(
                    f"inputs_k and inputs_v must have the same length, got {kx.shape[-2]} and {vx.shape[-2]}"
                )
        q, k, v = self._split(xp, self.q_proj(x)), self._split(xp, self.k_proj(kx)), self._split(xp, self.v_proj(vx))
        mask = None if key_mask is None else key_mask[..., None, :]  # broadcast over heads
        out, state = self._heads(xp, q, k, v, mask, self.causal, return_cache, cache, cu_seqlens)
        y = self.out_proj(self._merge(xp, out))
        if not return_cache:
            return y
        return y, LayerCache(state)

    def _decode(self, x_t: Any, cache: LayerCache | None) -> tuple[Any, LayerCache]:
        if not self.causal:
            raise ValueError("step() decodes causally: build the layer with causal=True")
        xp = self._check_input(x_t, "x_t", 1)
        x = x_t[..., None, :]
        q, k, v = self._split(xp, self.q_proj(x)), self._split(xp, self.k_proj(x)), self._split(xp, self.v_proj(x))
        out, cache = self._step_heads(q[..., 0, :], k[..., 0, :], v[..., 0, :], cache)
        y = self.out_proj(self._merge(xp, out[..., None, :]))[..., 0, :]
        return y, cache

    def _step_heads(self, q: Any, k: Any, v: Any, cache: LayerCache | None) -> tuple[Any, LayerCache]:
        """One decoding step on split heads ``(..., H, Dh)``: attention by
        ``fastrpb.linear_attention_step`` and the bias by one online step of the ``rpb``
        module from its history in the cache's state. Returns ``(out, cache)``."""
        self._check_streaming_bias("step()")
        if cache is not None:
            _check_cache_type(cache)
        previous = None if cache is None else cache.state
        out, state = linear_attention_step(
            None if previous is None else previous._replace(rpb=None),
            q,
            k,
            v,
            feature_map=self.feature_map,
            eps=self.eps,
        )
        if self.rpb is not None:  # one online step of the bias, from its history in the state
            term, history = self.rpb(
                v, initial_state=None if previous is None else previous.rpb, return_state=True, step=True
            )
            out, state = out + term, state._replace(rpb=history)
        return out, LayerCache(state)


def _check_cache_type(cache: Any) -> None:
    if not isinstance(cache, LayerCache):
        raise TypeError(
            f"cache must be a LayerCache (from return_cache=True or step) or None, got {type(cache).__name__}"
        )


def _swap_last_but_one(xp: Any, x: Any) -> Any:
    """Swap axes -3 and -2 (the standard has ``permute_dims`` but no ``swapaxes``)."""
    axes = list(range(x.ndim))
    axes[-3], axes[-2] = axes[-2], axes[-3]
    return xp.permute_dims(x, tuple(axes))
