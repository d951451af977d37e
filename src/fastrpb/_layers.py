"""What the PyTorch and Flax layers share: argument checks and the decoding cache.

No maths lives here (that is the functional core) and no framework is imported: the
layers in ``fastrpb.torch`` and ``fastrpb.flax`` own parameters, reshape heads and
call ``fastrpb.linear_attention``, ``fastrpb.rpb`` and ``fastrpb.rpb_nd``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._compat import device_of, int_arg, namespace
from .attention import linear_attention, linear_attention_step

__all__ = ["LayerCache", "AttentionLayer", "check_axes", "check_heads"]


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


class AttentionLayer:
    """The forward pass and decoding step of ``MultiheadLinearAttention``, written once.

    ``fastrpb.torch`` and ``fastrpb.flax`` subclass this next to their framework's
    module class: they own the parameters (``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``, the ``rpb`` module) and call ``_attend`` / ``_decode``. Everything
    here goes through the array API (``xp`` of the input), so one body serves both.
    """

    _bias_nd: type  # the framework's FastRPBnd class

    def _configure(
        self, d_model: Any, heads: Any, head_dim: Any, feature_map: Any, causal: Any, eps: Any, chunk_size: Any
    ) -> int:
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
        self.feature_map = feature_map
        self.causal = bool(causal)
        self.eps = float(eps)
        self.chunk_size = int_arg("chunk_size", chunk_size, minimum=1)
        return self.heads * self.head_dim

    def _bias_arguments(self) -> dict:
        """The FastRPB term as ``linear_attention`` takes it: the core adds it (padding
        keys' values excluded), in its compute dtype."""
        if self.rpb is None:
            return {}
        if isinstance(self.rpb, self._bias_nd):
            return dict(rpb_tables=self.rpb.weights(), rpb_grid=self.rpb.grid, rpb_skip=self.rpb.skip)
        return dict(rpb=self.rpb.weights(), rpb_skip=self.rpb.skip)

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

    def _project(self, xp: Any, x: Any) -> tuple[Any, Any, Any]:
        return self._split(xp, self.q_proj(x)), self._split(xp, self.k_proj(x)), self._split(xp, self.v_proj(x))

    def _attend(self, x: Any, key_mask: Any, return_cache: bool) -> Any:
        xp = self._check_input(x, "x", 2)
        if return_cache and not self.causal:
            raise ValueError("return_cache=True needs a causal layer (MultiheadLinearAttention(..., causal=True))")
        q, k, v = self._project(xp, x)
        mask = None if key_mask is None else key_mask[..., None, :]  # broadcast over heads
        result = linear_attention(
            q, k, v, feature_map=self.feature_map, causal=self.causal, key_mask=mask,
            eps=self.eps, chunk_size=self.chunk_size, return_state=return_cache, **self._bias_arguments(),
        )
        out, state = result if return_cache else (result, None)
        y = self.out_proj(self._merge(xp, out))
        if not return_cache:
            return y
        values = None
        if self.rpb is not None:  # decoding needs the values for the bias
            zero = xp.zeros((), dtype=v.dtype, device=device_of(v))
            values = v if mask is None else xp.where(mask[..., None], v, zero)
        return y, LayerCache(state, values)

    def _decode(self, x_t: Any, cache: LayerCache | None) -> tuple[Any, LayerCache]:
        if not self.causal:
            raise ValueError("step() decodes causally: build the layer with causal=True")
        if self.rpb is not None and self.rpb.skip[1]:
            raise ValueError(
                f"step() cannot honour skip = {self.rpb.skip}: while decoding it is unknown which tokens "
                "are the last ones; use skip=(a, 0)"
            )
        xp = self._check_input(x_t, "x_t", 1)
        q, k, v = self._project(xp, x_t[..., None, :])
        state = None if cache is None else cache.state
        out, state = linear_attention_step(
            state, q[..., 0, :], k[..., 0, :], v[..., 0, :], feature_map=self.feature_map, eps=self.eps
        )
        out = out[..., None, :]
        values = None
        if self.rpb is not None:
            values = v if cache is None or cache.values is None else xp.concat([cache.values, v], axis=-2)
            if values.shape[-2] > self.rpb.skip[0]:  # the newest token is not a skipped one
                out = out + self.rpb(values)[..., -1:, :]
        y = self.out_proj(self._merge(xp, out))[..., 0, :]
        return y, LayerCache(state, values)


def _swap_last_but_one(xp: Any, x: Any) -> Any:
    """Swap axes -3 and -2 (the standard has ``permute_dims`` but no ``swapaxes``)."""
    axes = list(range(x.ndim))
    axes[-3], axes[-2] = axes[-2], axes[-3]
    return xp.permute_dims(x, tuple(axes))
