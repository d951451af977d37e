"""Flax NNX layers: ``nnx.Module`` wrappers that own ``nnx.Param`` and call the core.

Import it explicitly (``import fastrpb.flax``); ``import fastrpb`` alone never imports
JAX or Flax. Every computation goes through the functional core
(``fastrpb.linear_attention``, ``fastrpb.linear_attention_step``, ``fastrpb.rpb``,
``fastrpb.rpb_nd``, ``fastrpb.rpb_matrix``). The modules work under ``nnx.jit`` /
``jax.jit`` and train with ``optax`` through ``nnx.Optimizer``.

Examples
--------
>>> from flax import nnx
>>> import jax.numpy as jnp, fastrpb.flax as frf
>>> layer = frf.LinearAttention(64, heads=4, rpb=128, rngs=nnx.Rngs(0))
>>> y = layer(jnp.ones((2, 100, 64)))
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

# Absolute imports only: this module is itself called ``flax`` inside the package.
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import fastrpb
from fastrpb._layers import (
    AttentionLayer,
    BiasLayer,
    BiasNdLayer,
    LayerCache,
)
from fastrpb._validate import flag, int_arg, non_negative
from fastrpb.feature_maps import FeatureMapLike

__all__ = ["FastRPB", "FastRPBnd", "FeatureMapArray", "LayerCache", "LinearAttention"]


class FeatureMapArray(nnx.Variable[Any]):
    """A fixed array of a layer's feature map (``favor``/``rff``'s random projection).

    Part of the module's state (split, saved, restored, sharded with it) but not an
    ``nnx.Param``: optimisers built with ``wrt=nnx.Param`` leave it as drawn.
    """


def _array(variable: nnx.Variable[Any]) -> jax.Array:
    """A variable's value as a JAX array. A state restored with
    ``flax.serialization.from_bytes`` holds NumPy arrays; ``nnx.Linear`` accepts them,
    and so do these layers (the functional core would reject NumPy beside JAX)."""
    return jnp.asarray(variable[...])


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key: jax.Array, shape: tuple[int, ...], scale: float) -> jax.Array:
    # Compiled as one unit, eagerly or inlined in an outer nnx.jit: bitwise the same
    # table both ways (unjitted, XLA fuses the product differently: 1-ulp differences).
    return scale * jax.random.normal(key, shape, dtype=jnp.float32)


def _init_table(
    heads: int | None,
    max_len: int,
    symmetric: bool,
    *,
    seed: int | None,
    rngs: nnx.Rngs | None,
    offset: int,
    param_dtype: Any,
    scale: float,
) -> jax.Array:
    """The paper's initialisation: normal values of standard deviation ``scale``.

    With an explicit ``seed``, exactly ``fastrpb.rpb_init(seed=seed + offset)``. With
    ``rngs``, the same distribution drawn with ``jax.random`` from ``rngs.params()``:
    one computation, so the same ``nnx.Rngs`` gives the same table eagerly and inside
    ``nnx.jit`` (a model built under jit for sharded initialisation).
    """
    shape = (2 * max_len - 1,) if heads is None else (heads, 2 * max_len - 1)
    if seed is not None:
        seed = int_arg("seed", seed, minimum=0) + offset
        table = fastrpb.rpb_init(heads, max_len, seed=seed, like=jnp.empty((0,), dtype=param_dtype), scale=scale)
    elif rngs is None:
        raise TypeError("pass rngs=nnx.Rngs(...) (or an explicit seed=) to initialise the bias table")
    else:
        table = _normal(rngs.params(), shape, non_negative("scale", scale)).astype(param_dtype)
    # A symmetric table stores offsets 0 .. M-1 only: the non-negative half of the draw.
    return table[..., max_len - 1 :] if symmetric else table


class FastRPB(BiasLayer, nnx.Module):
    r"""FastRPB on the values: ``out = B @ v`` with Toeplitz ``B[i, j] = w(i - j)``.

    The table is an ``nnx.Param`` initialised as in the paper (small normal values,
    ``fastrpb.rpb_init`` with an explicit ``seed``) and applied with ``fastrpb.rpb`` by FFT in O(L log L).

    Parameters
    ----------
    heads : int or None
        One table per head ``(heads, 2 max_len - 1)``, or ``None`` for one table.
    max_len : int
        ``M``, the longest sequence the table serves.
    causal : bool
        Only earlier tokens bias later ones.
    symmetric : bool
        Learn ``h`` of shape ``(heads, max_len)`` and use ``w(t) = h[|t|]``.
    skip : (int, int)
        Tokens at the start and end (BOS/EOS) without bias.
    rngs : nnx.Rngs
        The initial draw's seed comes from ``rngs.params()`` unless ``seed`` is given.
    seed : int, optional
        Explicit seed of the initial draw.
    scale : float
        Standard deviation of the initial draw.
    param_dtype :
        Dtype of the table.

    Raises
    ------
    TypeError
        If ``heads``, ``max_len`` or ``seed`` is not an int, or ``causal`` or
        ``symmetric`` is not a bool (``True`` or ``False``: not ``1`` or ``"no"``).
    ValueError
        If ``heads`` or ``max_len`` is below 1, or ``skip`` is not two non-negative
        ints. Calls raise as ``fastrpb.rpb`` does (e.g. a sequence longer than
        ``max_len``).

    Examples
    --------
    >>> bias = FastRPB(heads=4, max_len=128, causal=True, rngs=nnx.Rngs(0))
    >>> v = jnp.ones((2, 4, 100, 16))  # (batch, heads, L, D)
    >>> bias(v).shape
    (2, 4, 100, 16)
    >>> bias.weights().shape  # (heads, 2 max_len - 1)
    (4, 255)
    """

    def __init__(
        self,
        heads: int | None,
        max_len: int,
        causal: bool = False,
        symmetric: bool = False,
        skip: tuple[int, int] = (0, 0),
        *,
        rngs: nnx.Rngs | None = None,
        seed: int | None = None,
        scale: float = 1e-2,
        param_dtype: Any = jnp.float32,
    ) -> None:
        self._configure(heads, max_len, causal, symmetric, skip)
        self.table = nnx.Param(
            _init_table(
                self.heads,
                self.max_len,
                self.symmetric,
                seed=seed,
                rngs=rngs,
                offset=0,
                param_dtype=param_dtype,
                scale=scale,
            )
        )

    def _table(self) -> jax.Array:
        return _array(self.table)

    def __call__(self, v: jax.Array, initial_state: Any = None, return_state: bool = False, step: bool = False) -> Any:
        """``B @ v`` for values ``(..., heads, L, D)`` with ``L <= max_len``.

        Causal tables stream: ``initial_state`` (a ``fastrpb.RPBState``) continues a
        sequence and ``return_state=True`` returns ``(out, state)``, as
        ``fastrpb.rpb``; ``step=True`` takes one token ``v: (..., heads, D)`` and
        returns ``(out, state)`` by ``fastrpb.rpb_step`` (amortised O(D log^2 t)).
        """
        return self._bias_of(v, initial_state, return_state, step)


class FastRPBnd(BiasNdLayer, nnx.Module):
    r"""Separable N-d FastRPB for tokens laid out row-major on a grid.

    ``B[p, p'] = sum_a w_a(p_a - p'_a)`` over the biased axes, applied with
    ``fastrpb.rpb_nd``. For RGB images with one token per pixel and channel use
    ``grid=(H, W, 3)`` and ``axes=(0, 1)``.

    Parameters
    ----------
    heads : int or None
        Tables per head, or ``None`` for shared tables.
    grid : sequence of int
        ``(G_1, ..., G_k)``; the sequence has ``prod(grid)`` tokens plus ``skip``.
    axes : sequence of int, optional
        The grid axes with a table (default: all).
    share : bool
        One table for all biased axes, sized for the longest of them.
    symmetric : bool
        Learn ``h`` and use ``w(t) = h[|t|]``.
    skip : (int, int)
        Tokens before and after the grid without bias.
    causal : bool
        Raster order: a token receives bias only from the positions no later
        row-major (``fastrpb.rpb_nd(..., causal=True)``); needed in a causal
        attention layer, and it streams (``initial_state=``, ``step=True``).
    rngs, seed, scale, param_dtype :
        As in `FastRPB`.

    Raises
    ------
    TypeError
        If ``grid`` is not a non-empty sequence of ints, ``heads`` or ``axes`` holds
        something other than ints, or ``share`` or ``symmetric`` is not a bool.
    ValueError
        If an axis of ``grid`` is below 1, ``axes`` names an axis outside the grid (or
        twice), or ``skip`` is not two non-negative ints. Calls raise as
        ``fastrpb.rpb_nd`` does.

    Examples
    --------
    >>> bias = FastRPBnd(heads=4, grid=(8, 8), rngs=nnx.Rngs(0))  # 8 x 8 image patches
    >>> v = jnp.ones((2, 4, 64, 16))  # (batch, heads, 64 tokens, D)
    >>> bias(v).shape
    (2, 4, 64, 16)
    >>> [w.shape for w in bias.weights()]  # one table per axis
    [(4, 15), (4, 15)]
    """

    def __init__(
        self,
        heads: int | None,
        grid: Sequence[int],
        *,
        axes: Sequence[int] | None = None,
        share: bool = False,
        symmetric: bool = False,
        skip: tuple[int, int] = (0, 0),
        causal: bool = False,
        rngs: nnx.Rngs | None = None,
        seed: int | None = None,
        scale: float = 1e-2,
        param_dtype: Any = jnp.float32,
    ) -> None:
        self._configure(heads, grid, axes, share, symmetric, skip, causal)
        self.tables = nnx.List(
            [
                nnx.Param(
                    _init_table(
                        self.heads,
                        m,
                        self.symmetric,
                        seed=seed,
                        rngs=rngs,
                        offset=n,
                        param_dtype=param_dtype,
                        scale=scale,
                    )
                )
                for n, m in enumerate(self.lengths)
            ]
        )

    def _tables(self) -> list[jax.Array]:
        return [_array(t) for t in self.tables]

    def __call__(self, v: jax.Array, initial_state: Any = None, return_state: bool = False, step: bool = False) -> Any:
        """The N-d bias for values ``(..., heads, L, D)``, ``L = prod(grid) + sum(skip)``.

        Causal tables stream in raster order: ``initial_state`` (a
        ``fastrpb.RPBndState``) continues a sequence and ``return_state=True`` returns
        ``(out, state)``, as ``fastrpb.rpb_nd`` (a piece may stop anywhere on the
        grid); ``step=True`` takes one position ``v: (..., heads, D)`` and returns
        ``(out, state)`` by ``fastrpb.rpb_nd_step``.
        """
        return self._bias_of(v, initial_state, return_state, step)


class LinearAttention(AttentionLayer, nnx.Module):
    r"""Multi-head linear attention with an optional FastRPB term on the values.

    ``y = W_o [ linear_attention(x W_q, k W_k, v W_v) + B (v W_v) ]`` per head, the
    paper's "Attn(Q, K, V) + B V" (self-attention: ``k = v = x``), through
    ``fastrpb.linear_attention`` and a call of the `FastRPB` / `FastRPBnd` module.

    Parameters
    ----------
    d_model : int
        Width of the input and output.
    heads : int
        Number of heads.
    feature_map : str or feature map
        ``"sikf"`` (default), ``"elu"``, ``"relu"``, ``"dpfp"``, ``"taylor"``,
        ``"hedgehog"`` or an object from ``fastrpb.feature_maps``. The arrays of a map
        become variables of the layer named ``feature_map_<name>``, part of its
        state: a fixed one (``favor``/``rff``'s random projection) a
        `FeatureMapArray`, a learned one an ``nnx.Param``. ``"hedgehog"`` is Hedgehog
        attention (Zhang et al. 2024) with a trained ``W`` (``feature_map_projection``,
        ``(head_dim, head_dim)``, shared by the heads as in flash-linear-attention's
        ``HedgehogFeatureMap``) that starts at the identity; ``hedgehog(W0)`` starts
        it at ``W0``, shape ``(m, head_dim)``.
    rpb : None, int, FastRPB or FastRPBnd
        ``None``: no bias. An int: a new ``FastRPB(heads, rpb, causal=causal)``. A
        module: used as is (heads ``heads`` or ``None``; causal if the layer is).
    causal : bool
        Causal attention; enables `step`.
    rngs : nnx.Rngs
        Initialises the projections (and the bias table).
    head_dim : int, optional
        Width of each head (default ``d_model // heads``).
    use_bias : bool
        Biases in the four projections.
    eps, chunk_size :
        Passed to ``fastrpb.linear_attention``.
    dtype, param_dtype :
        Computation and parameter dtypes of the projections (as ``nnx.Linear``).

    Raises
    ------
    TypeError
        If ``d_model``, ``heads`` or ``head_dim`` is not an int, ``causal`` is not a
        bool (``True`` or ``False``: not ``1`` or ``"no"``), or ``feature_map`` or
        ``rpb`` is of an unsupported kind.
    ValueError
        If ``d_model`` is not divisible by ``heads`` (without ``head_dim``), a size is
        below 1, or ``feature_map`` is an unknown name. Calls raise as
        ``fastrpb.linear_attention`` does.

    Examples
    --------
    >>> layer = LinearAttention(32, 4, rpb=128, causal=True, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 10, 32))  # (batch, L, d_model)
    >>> layer(x).shape
    (2, 10, 32)
    """

    def __init__(
        self,
        d_model: int,
        heads: int,
        feature_map: FeatureMapLike = "sikf",
        rpb: Any = None,
        causal: bool = False,
        *,
        rngs: nnx.Rngs,
        head_dim: int | None = None,
        use_bias: bool = True,
        eps: float = 1e-6,
        chunk_size: int = 64,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ) -> None:
        inner = self._configure(d_model, heads, head_dim, causal, eps, chunk_size)

        def own(name: str, array: Any, learned: bool) -> None:
            # a learned array (hedgehog's W) is trained; a fixed one (favor's projection) is not
            if not isinstance(array, (jax.Array, np.ndarray)):
                raise TypeError(
                    f"the {name} of feature_map must be a JAX or NumPy array for a Flax layer, got {type(array).__name__}"
                )
            kind = nnx.Param if learned else FeatureMapArray
            setattr(self, f"feature_map_{name}", kind(jnp.asarray(array, dtype=param_dtype)))

        self._own_feature_map(feature_map, jnp.empty((0,), dtype=param_dtype), own)
        kw: dict[str, Any] = dict(use_bias=flag("use_bias", use_bias), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(self.d_model, inner, **kw)
        self.k_proj = nnx.Linear(self.d_model, inner, **kw)
        self.v_proj = nnx.Linear(self.d_model, inner, **kw)
        self.out_proj = nnx.Linear(inner, self.d_model, **kw)
        self.rpb = self._bias_module(
            rpb, lambda max_len: FastRPB(self.heads, max_len, causal=self.causal, rngs=rngs, param_dtype=param_dtype)
        )

    def _owned(self, name: str) -> jax.Array:
        return _array(getattr(self, f"feature_map_{name}"))

    def _check_input(self, x: Any, name: str, ndim: int) -> Any:
        # NumPy inputs are welcome (nnx.Linear takes them); the layer then works in JAX.
        if not isinstance(x, (jax.Array, np.ndarray)):
            raise TypeError(f"{name} must be a JAX or NumPy array, got {type(x).__name__}")
        super()._check_input(jnp.asarray(x), name, ndim)
        return jnp

    def __call__(
        self,
        x: jax.Array,
        key_mask: jax.Array | None = None,
        *,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        return_cache: bool = False,
        cache: LayerCache | None = None,
        cu_seqlens: Any = None,
    ) -> jax.Array | tuple[jax.Array, LayerCache]:
        """Attend from ``x: (..., Lq, d_model)`` over ``x`` or over ``inputs_k``/``inputs_v``.

        Parameters
        ----------
        x : array, shape (..., Lq, d_model)
            The queries' input (and the keys' and values' for self-attention).
        key_mask : bool array, shape (..., Lk), optional
            ``True`` for real tokens, ``False`` for padding (excluded exactly from
            attention and from the bias). This is the polarity of ``nnx.MultiHeadAttention``'s
            masks and the opposite of PyTorch's ``key_padding_mask`` (True = pad).
        inputs_k, inputs_v : array, shape (..., Lk, d_model), optional
            Cross-attention, as ``nnx.MultiHeadAttention``'s: the keys' and values'
            input (``inputs_v`` defaults to ``inputs_k``). With a FastRPB, ``Lk`` must
            equal ``Lq``.
        return_cache : bool
            Causal layers only: also return the `LayerCache` for `step`.
        cache : LayerCache, optional
            Causal self-attention only: continue the sequence this cache ends (from
            ``return_cache=True`` or `step`), so a prompt is prefilled in chunks of
            several tokens; with ``return_cache=True`` the new cache comes back.
            Chunks that pass the cache along equal one causal pass, the FastRPB
            term included (its history lives in the cache).
        cu_seqlens : int array, shape (N + 1,), or tuple of ints, optional
            Packed sequences along the length axis (flash-attention / fla offsets
            ``0 = c_0 <= ... <= c_N = L``, zero-length sequences allowed): each sequence attends and is biased only
            within itself, as ``fastrpb.linear_attention(..., cu_seqlens=)``.
            Self-attention only, without ``return_cache`` or ``cache``, and without an N-d bias.

        Returns
        -------
        array, shape (..., Lq, d_model)
            Or ``(y, cache)`` with ``return_cache=True``.
        """
        key_mask, inputs_k, inputs_v = (None if a is None else jnp.asarray(a) for a in (key_mask, inputs_k, inputs_v))
        return self._attend(x, key_mask, return_cache, inputs_k, inputs_v, cache, cu_seqlens)

    def step(self, x_t: jax.Array, cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache]:
        """Decode one token ``x_t: (..., d_model)``; ``cache=None`` starts a sequence.

        Returns ``(y_t, cache)``; stepping reproduces the causal forward pass. With
        FastRPB the cache's state also holds the bias history (an ``RPBState``):
        eagerly an online FFT convolution, amortised O(Dh log^2 t) per token; under
        ``nnx.jit`` a fixed ``(..., max_len, Dh)`` buffer (O(max_len Dh) per token,
        one compilation).
        """
        return self._decode(x_t, cache)
