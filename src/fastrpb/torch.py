"""PyTorch layers: ``torch.nn.Module`` wrappers that own parameters and call the core.

Import it explicitly (``import fastrpb.torch``); ``import fastrpb`` alone never
imports PyTorch. Every computation goes through the functional core
(``fastrpb.linear_attention``, ``fastrpb.linear_attention_step``, ``fastrpb.rpb``,
``fastrpb.rpb_nd``, ``fastrpb.rpb_matrix``): these modules only hold parameters,
project and split heads.

Examples
--------
>>> import torch, fastrpb.torch as frt
>>> layer = frt.LinearAttention(64, heads=4, feature_map="sikf", rpb=128)
>>> y = layer(torch.randn(2, 100, 64))          # (batch, L, d_model)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Absolute imports only: this module is itself called ``torch`` inside the package.
import torch
import torch.nn.functional as F
from torch import nn

import fastrpb
from fastrpb._compat import namespace
from fastrpb._layers import (
    AttentionLayer,
    BiasLayer,
    BiasNdLayer,
    LayerCache,
)
from fastrpb._validate import finite, flag, int_arg
from fastrpb.feature_maps import FeatureMapLike

__all__ = ["FastRPB", "FastRPBnd", "LayerCache", "MultiheadAttention", "LinearAttention"]


def _seed(seed: int | None) -> int:
    """An explicit seed, or one drawn from PyTorch's global generator (``torch.manual_seed``)."""
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    return int_arg("seed", seed, minimum=0)


def _like(device: Any, dtype: Any) -> torch.Tensor:
    return torch.empty((0,), device=device, dtype=dtype if dtype is not None else torch.get_default_dtype())


def _init_table(
    heads: int | None, max_len: int, symmetric: bool, seed: int, like: torch.Tensor, scale: float
) -> torch.Tensor:
    table = fastrpb.rpb_init(heads, max_len, seed=seed, like=like, scale=scale)
    # A symmetric table stores offsets 0 .. M-1 only: the non-negative half of the draw.
    return table[..., max_len - 1 :].clone() if symmetric else table


class FastRPB(BiasLayer, nn.Module):
    r"""FastRPB on the values: ``out = B @ v`` with Toeplitz ``B[i, j] = w(i - j)``.

    The table ``w`` is an ``nn.Parameter`` initialised as in the paper (small random
    values, ``fastrpb.rpb_init``). Applied with ``fastrpb.rpb`` by FFT in
    O(L log L).

    Parameters
    ----------
    heads : int or None
        One table per head, shape ``(heads, 2 max_len - 1)``; ``None`` for a single
        table shared by all leading dimensions.
    max_len : int
        ``M``, the longest sequence the table serves.
    causal : bool
        Only earlier tokens bias later ones (offsets ``t >= 0``).
    symmetric : bool
        Learn ``h`` of shape ``(heads, max_len)`` and use ``w(t) = h[|t|]``.
    skip : (int, int)
        Tokens at the start and end (BOS/EOS, a class token) that neither give nor
        receive bias.
    seed : int, optional
        Seed of the initial draw; by default drawn from PyTorch's global generator.
    scale : float
        Standard deviation of the initial draw.
    device, dtype :
        Where and in which dtype the table is created.

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
    >>> bias = FastRPB(heads=4, max_len=128, causal=True)
    >>> v = torch.randn(2, 4, 100, 16)               # (batch, heads, L, D)
    >>> bias(v).shape
    torch.Size([2, 4, 100, 16])
    """

    def __init__(
        self,
        heads: int | None,
        max_len: int,
        causal: bool = False,
        symmetric: bool = False,
        skip: tuple[int, int] = (0, 0),
        *,
        seed: int | None = None,
        scale: float = 1e-2,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self._configure(heads, max_len, causal, symmetric, skip)
        table = _init_table(self.heads, self.max_len, self.symmetric, _seed(seed), _like(device, dtype), scale)
        self.table = nn.Parameter(table)

    def _table(self) -> torch.Tensor:
        return self.table

    def forward(
        self, v: torch.Tensor, initial_state: Any = None, return_state: bool = False, step: bool = False
    ) -> Any:
        """``B @ v`` for values ``(..., heads, L, D)`` with ``L <= max_len``.

        Causal tables stream: ``initial_state`` (a ``fastrpb.RPBState``) continues a
        sequence and ``return_state=True`` returns ``(out, state)``, as
        ``fastrpb.rpb``; ``step=True`` takes one token ``v: (..., heads, D)`` and
        returns ``(out, state)`` by ``fastrpb.rpb_step`` (amortised O(D log^2 t)).
        """
        return self._bias_of(v, initial_state, return_state, step)


class FastRPBnd(BiasNdLayer, nn.Module):
    r"""Separable N-d FastRPB for tokens laid out row-major on a grid (images, video).

    ``B[p, p'] = sum_a w_a(p_a - p'_a)`` over the biased axes, applied with
    ``fastrpb.rpb_nd``. For RGB images with one token per pixel and channel use
    ``grid=(H, W, 3)`` and ``axes=(0, 1)``.

    Parameters
    ----------
    heads : int or None
        Tables per head ``(heads, 2 G_a - 1)``, or ``None`` for shared tables.
    grid : sequence of int
        ``(G_1, ..., G_k)``; the sequence has ``prod(grid)`` tokens plus ``skip``.
    axes : sequence of int, optional
        The grid axes with a table (default: all); the others get no bias.
    share : bool
        One table for all biased axes (as the paper's 2-d bias ``tables=(w, w)``),
        sized for the longest of them.
    symmetric : bool
        Learn ``h`` and use ``w(t) = h[|t|]``.
    skip : (int, int)
        Tokens before and after the grid (a class token) without bias.
    causal : bool
        Raster order: a token receives bias only from the positions no later
        row-major (``fastrpb.rpb_nd(..., causal=True)``); needed in a causal
        attention layer, and it streams (``initial_state=``, ``step=True``).
    seed, scale, device, dtype :
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
    >>> bias = FastRPBnd(heads=4, grid=(8, 8), seed=0)  # 8 x 8 image patches
    >>> v = torch.randn(2, 4, 64, 16)                   # (batch, heads, 64 tokens, D)
    >>> bias(v).shape
    torch.Size([2, 4, 64, 16])
    >>> [tuple(w.shape) for w in bias.weights()]        # one table per axis
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
        seed: int | None = None,
        scale: float = 1e-2,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self._configure(heads, grid, axes, share, symmetric, skip, causal)
        seed = _seed(seed)
        like = _like(device, dtype)
        self.tables = nn.ParameterList(
            nn.Parameter(_init_table(self.heads, m, self.symmetric, seed + n, like, scale))
            for n, m in enumerate(self.lengths)
        )

    def _tables(self) -> list[torch.Tensor]:
        return list(self.tables)

    def forward(
        self, v: torch.Tensor, initial_state: Any = None, return_state: bool = False, step: bool = False
    ) -> Any:
        """The N-d bias for values ``(..., heads, L, D)``, ``L = prod(grid) + sum(skip)``.

        Causal tables stream in raster order: ``initial_state`` (a
        ``fastrpb.RPBndState``) continues a sequence and ``return_state=True`` returns
        ``(out, state)``, as ``fastrpb.rpb_nd`` (a piece may stop anywhere on the
        grid); ``step=True`` takes one position ``v: (..., heads, D)`` and returns
        ``(out, state)`` by ``fastrpb.rpb_nd_step``.
        """
        return self._bias_of(v, initial_state, return_state, step)


def _own_feature_map(layer: AttentionLayer, feature_map: Any, device: Any, dtype: Any) -> None:
    """The arrays of the feature map become module state (a copy: the caller's array is
    never written to): a learned one (hedgehog's ``W``) an ``nn.Parameter``, a fixed one
    (favor's / rff's random projection) a buffer; both saved in the ``state_dict``,
    loaded, moved and cast with the module."""
    assert isinstance(layer, nn.Module)

    def own(name: str, array: Any, learned: bool) -> None:
        if not isinstance(array, torch.Tensor):
            raise TypeError(
                f"the {name} of feature_map must be a torch.Tensor for a PyTorch layer, got {type(array).__name__}"
            )
        copy = array.detach().to(device=device, dtype=dtype).clone()
        if learned:
            layer.register_parameter(f"feature_map_{name}", nn.Parameter(copy))
        else:
            layer.register_buffer(f"feature_map_{name}", copy)

    layer._own_feature_map(feature_map, _like(device, dtype), own)


def _rpb_module(layer: AttentionLayer, rpb: Any, device: Any, dtype: Any) -> Any:
    """``rpb`` as the layer's FastRPB module (an int: a new one with that ``max_len``)."""
    return layer._bias_module(
        rpb, lambda max_len: FastRPB(layer.heads, max_len, causal=layer.causal, device=device, dtype=dtype)
    )


class LinearAttention(AttentionLayer, nn.Module):
    r"""Multi-head linear attention with an optional FastRPB term on the values.

    ``y = W_o [ linear_attention(x W_q, k W_k, v W_v) + B (v W_v) ]`` per head, the
    paper's "Attn(Q, K, V) + B V" (self-attention: ``k = v = x``). Attention is
    ``fastrpb.linear_attention``; the bias is a `FastRPB` or `FastRPBnd` module, called
    on the values (so FSDP2's per-module ``fully_shard(layer.rpb)`` works). For a
    drop-in replacement of ``torch.nn.MultiheadAttention`` (its arguments, its
    sequence-first layout, its mask polarity) use `MultiheadAttention`.

    Parameters
    ----------
    d_model : int
        Width of the input and output.
    heads : int
        Number of heads.
    feature_map : str or feature map
        ``"sikf"`` (default), ``"elu"``, ``"relu"``, ``"dpfp"``, ``"taylor"``,
        ``"hedgehog"`` or any object from ``fastrpb.feature_maps``. The arrays of a
        map become state of the layer named ``feature_map_<name>``, saved, loaded,
        moved and cast with it: a fixed one (``favor``/``rff``'s random projection) a
        buffer, a learned one an ``nn.Parameter``. ``"hedgehog"`` is Hedgehog
        attention (Zhang et al. 2024) with a trained ``W`` (``feature_map_projection``,
        ``(head_dim, head_dim)``, shared by the heads as in flash-linear-attention's
        ``HedgehogFeatureMap``) that starts at the identity; ``hedgehog(W0)`` starts
        it at a copy of ``W0``, shape ``(m, head_dim)``.
    rpb : None, int, FastRPB or FastRPBnd
        ``None``: no positional bias. An int: a new ``FastRPB(heads, rpb,
        causal=causal)`` with that ``max_len``. A module: used as is (its heads must
        be ``heads`` or ``None``; a causal layer needs a causal `FastRPB`).
    causal : bool
        Each token attends to itself and earlier tokens only (the chunked causal
        algorithm); enables `step` for decoding.
    head_dim : int, optional
        Width of each head (default ``d_model // heads``).
    bias : bool
        Biases in the four projections.
    eps, chunk_size :
        Passed to ``fastrpb.linear_attention``.
    device, dtype :
        Where and in which dtype the parameters are created.

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
    >>> layer = LinearAttention(64, 4, rpb=256, causal=True)
    >>> x = torch.randn(2, 10, 64)
    >>> y, cache = layer(x, return_cache=True)        # prefill
    >>> y_t, cache = layer.step(torch.randn(2, 64), cache)  # decode one token
    """

    def __init__(
        self,
        d_model: int,
        heads: int,
        feature_map: FeatureMapLike = "sikf",
        rpb: Any = None,
        causal: bool = False,
        *,
        head_dim: int | None = None,
        bias: bool = True,
        eps: float = 1e-6,
        chunk_size: int = 64,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        inner = self._configure(d_model, heads, head_dim, causal, eps, chunk_size)
        _own_feature_map(self, feature_map, device, dtype)
        kw: dict[str, Any] = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(self.d_model, inner, **kw)
        self.k_proj = nn.Linear(self.d_model, inner, **kw)
        self.v_proj = nn.Linear(self.d_model, inner, **kw)
        self.out_proj = nn.Linear(inner, self.d_model, **kw)
        self.rpb = _rpb_module(self, rpb, device, dtype)

    def _owned(self, name: str) -> torch.Tensor:
        return getattr(self, f"feature_map_{name}")

    def _check_input(self, x: Any, name: str, ndim: int) -> Any:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        return super()._check_input(x, name, ndim)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        *,
        inputs_k: torch.Tensor | None = None,
        inputs_v: torch.Tensor | None = None,
        return_cache: bool = False,
        cache: LayerCache | None = None,
        cu_seqlens: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, LayerCache]:
        """Attend from ``x: (..., Lq, d_model)`` over ``x`` or over ``inputs_k``/``inputs_v``.

        Parameters
        ----------
        x : Tensor, shape (..., Lq, d_model)
            The token embeddings (batch first): the queries' input, and the keys' and
            values' for self-attention.
        key_mask : bool Tensor, shape (..., Lk), optional
            ``True`` for real tokens, ``False`` for padding: the opposite polarity of
            ``torch.nn.MultiheadAttention``'s ``key_padding_mask`` (True = pad), and
            indistinguishable from it by type, so passing one for the other silently
            inverts the mask. Padding keys are excluded exactly from attention and
            their values from the bias.
        inputs_k, inputs_v : Tensor, shape (..., Lk, d_model), optional
            Cross-attention: the keys' and values' input (``inputs_v`` defaults to
            ``inputs_k``). With a FastRPB, ``Lk`` must equal ``Lq``.
        return_cache : bool
            Causal layers only: also return the `LayerCache` to continue with `step`.
        cache : LayerCache, optional
            Causal self-attention only: continue the sequence this cache ends (from
            ``return_cache=True`` or `step`), so a prompt is prefilled in chunks of
            several tokens; with ``return_cache=True`` the new cache comes back.
            Chunks that pass the cache along equal one causal pass, the FastRPB
            term included (its history lives in the cache).
        cu_seqlens : int Tensor, shape (N + 1,), or tuple of ints, optional
            Packed sequences along the length axis (flash-attention / fla offsets
            ``0 = c_0 <= ... <= c_N = L``, zero-length sequences allowed): each sequence attends and is biased only
            within itself, as ``fastrpb.linear_attention(..., cu_seqlens=)``.
            Self-attention only, without ``return_cache`` or ``cache``, and without an N-d bias.

        Returns
        -------
        Tensor, shape (..., Lq, d_model)
            Or ``(y, cache)`` with ``return_cache=True``.
        """
        return self._attend(x, key_mask, return_cache, inputs_k, inputs_v, cache, cu_seqlens)

    def step(self, x_t: torch.Tensor, cache: LayerCache | None = None) -> tuple[torch.Tensor, LayerCache]:
        """Decode one token ``x_t: (..., d_model)``; ``cache=None`` starts a sequence.

        Returns ``(y_t, cache)``. Stepping token by token reproduces the causal
        forward pass. Without FastRPB the cache has a fixed size; with it the cache's
        state also holds the bias history, an ``RPBState`` of at most O(max_len Dh)
        numbers per head, and a step costs amortised O(Dh log^2 t) for the bias.
        """
        return self._decode(x_t, cache)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, heads={self.heads}, head_dim={self.head_dim}, "
            f"feature_map={self.feature_map.signature}, causal={self.causal}"
        )


def _causal_mask_check(attn_mask: torch.Tensor, L: int, S: int) -> None:
    """Accept ``attn_mask`` only if it is the causal mask: linear attention can honour
    no other (it never forms the ``L x S`` weights a general mask would act on)."""
    if attn_mask.dim() != 2:
        raise ValueError(
            f"attn_mask must be a 2-d causal mask of shape (L, S) = ({L}, {S}) for linear attention, "
            f"got shape {tuple(attn_mask.shape)} (per-head or per-batch masks cannot be honoured)"
        )
    if tuple(attn_mask.shape) != (L, S) or L != S:
        raise ValueError(
            f"attn_mask must be the causal mask of shape (L, L) with L = Lq = Lk, got shape "
            f"{tuple(attn_mask.shape)} for Lq = {L}, Lk = {S}"
        )
    above = torch.ones((L, L), dtype=torch.bool, device=attn_mask.device).triu(1)
    if attn_mask.dtype == torch.bool:
        causal = bool(torch.equal(attn_mask, above))
    elif attn_mask.is_floating_point():
        causal = bool(torch.equal(torch.isneginf(attn_mask), above)) and bool((attn_mask[~above] == 0).all())
    else:
        raise TypeError(f"attn_mask must be a bool or floating tensor, got dtype {attn_mask.dtype}")
    if not causal:
        raise ValueError(
            "attn_mask can only be the causal mask (bool: True above the diagonal; float: -inf above the "
            "diagonal and 0 elsewhere), or None with is_causal=True: linear attention never forms the "
            "attention weights, so it cannot honour any other mask"
        )


def _keep_mask(key_padding_mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """torch's ``key_padding_mask`` (bool True = pad, or float with -inf = pad) as the core's
    ``key_mask`` (True = keep)."""
    if tuple(key_padding_mask.shape) != shape:
        raise ValueError(
            f"key_padding_mask must have shape (N, S) = {shape} (or (S,) for unbatched input), "
            f"got {tuple(key_padding_mask.shape)}"
        )
    if key_padding_mask.dtype == torch.bool:
        return ~key_padding_mask
    if key_padding_mask.is_floating_point():
        pad = torch.isneginf(key_padding_mask)
        if not bool((key_padding_mask[~pad] == 0).all()):
            raise ValueError(
                "a float key_padding_mask can only hold 0 (keep) and -inf (pad): linear attention never "
                "forms the logits, so it cannot add other values to them"
            )
        return ~pad
    raise TypeError(f"key_padding_mask must be a bool or floating tensor, got dtype {key_padding_mask.dtype}")


class MultiheadAttention(AttentionLayer, nn.Module):
    r"""A drop-in for ``torch.nn.MultiheadAttention`` computing linear attention (+ FastRPB).

    Same constructor and ``forward`` as ``torch.nn.MultiheadAttention`` (sequence-first
    ``(L, N, E)`` unless ``batch_first``, unbatched ``(L, E)``, ``key_padding_mask``
    with True = pad, ``kdim``/``vdim``, cross-attention, the ``(output, weights)``
    tuple), so it replaces ``self_attn`` / ``multihead_attn`` in
    ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer``. Per head:

    $$
    \mathrm{out}_i = \frac{\sum_j \phi(q_i) \cdot \phi(k_j)\, v_j}{\sum_j \phi(q_i) \cdot \phi(k_j) + \varepsilon}
    \;+\; \sum_j w_{i - j}\, v_j
    $$

    (Katharopoulos et al. 2020; the FastRPB term of Zubkov & Gavrilov 2022,
    arXiv:2202.11364, with ``rpb``). The parameters have the names and shapes of
    ``nn.MultiheadAttention``'s separate-projection layout (``q_proj_weight``,
    ``k_proj_weight``, ``v_proj_weight``, ``in_proj_bias``, ``out_proj``); a state dict
    of an ``nn.MultiheadAttention`` with a packed ``in_proj_weight`` loads too (it is
    split into the three).

    What differs, because linear attention never forms the ``L x S`` attention weights:

    - ``need_weights=True`` returns ``None`` as the weights (never an error).
    - ``attn_mask`` can only be the causal mask (or ``None``); ``is_causal=True`` needs
      no mask. Any other mask is a ``ValueError``.
    - ``dropout`` acts on the attention output (before ``out_proj``), not on weights.
    - ``add_bias_kv`` and ``add_zero_attn`` are not supported (``ValueError``).
    - Nested (jagged) tensors are a ``TypeError``: packed sequences (``cu_seqlens``)
      are the way to batch sequences of different lengths.

    What it adds: a causal sequence continues through a `LayerCache` instead of a
    key/value cache (its size does not grow with the tokens seen):
    ``forward(..., return_cache=True)`` returns ``(output, None, cache)``,
    ``forward(..., cache=cache)`` continues it with a chunk of several tokens (chunked
    prefill) and `step` decodes one token; with FastRPB the cache carries the bias
    history and a step costs amortised O(Dh log^2 t) for it. Both equal one causal
    pass, as `LinearAttention`'s cache (the same code).

    Parameters
    ----------
    embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device, dtype :
        As ``torch.nn.MultiheadAttention``.
    feature_map : str or feature map
        ``"sikf"`` (default: the paper's kernel, invariant to shifts like softmax),
        ``"elu"``, ``"relu"``, ``"dpfp"``, ``"taylor"``, ``"hedgehog"`` or a map from
        ``fastrpb.feature_maps``; a map's fixed arrays become buffers, a learned one
        (Hedgehog's ``W``, ``feature_map_projection``, from the identity) a
        parameter, as in `LinearAttention`.
    rpb : None, int or FastRPB
        The FastRPB term: an int makes a ``FastRPB(num_heads, rpb, causal=causal)``
        with that ``max_len``. Needs ``Lq == Lk`` (self-attention).
    causal : bool
        Always causal. Otherwise a call is causal when ``is_causal=True`` or
        ``attn_mask`` is the causal mask; a layer with a non-causal bias then raises
        (the bias would see later tokens): build it with ``causal=True``.
    eps, chunk_size :
        Passed to ``fastrpb.linear_attention``.

    Examples
    --------
    >>> layer = torch.nn.TransformerEncoderLayer(64, 4, batch_first=True)
    >>> layer.self_attn = MultiheadAttention(64, 4, batch_first=True, rpb=128)
    >>> layer(torch.randn(2, 100, 64)).shape
    torch.Size([2, 100, 64])

    Prefill a prompt in two chunks, then decode, sequence first ``(L, N, E)``:

    >>> attn = MultiheadAttention(64, 4, rpb=128, causal=True)
    >>> x = torch.randn(10, 2, 64)
    >>> y, _, cache = attn(x[:6], x[:6], x[:6], return_cache=True)
    >>> y, _, cache = attn(x[6:], x[6:], x[6:], cache=cache, return_cache=True)
    >>> x_t = torch.randn(2, 64)                       # one token (N, E)
    >>> y_t, cache = attn.step(x_t, x_t, x_t, cache)
    >>> y_t.shape
    torch.Size([2, 64])
    """

    # False keeps nn.TransformerEncoderLayer off its fused native fast path (which would
    # run softmax attention on these weights, in eval mode without gradients): that
    # path is taken only when this flag is True.
    _qkv_same_embed_dim = False
    out_proj: nn.Linear

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        feature_map: FeatureMapLike = "sikf",
        rpb: Any = None,
        causal: bool = False,
        eps: float = 1e-6,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        bias = flag("bias", bias)
        if flag("add_bias_kv", add_bias_kv):
            raise ValueError("add_bias_kv=True is not supported by MultiheadAttention (no learned extra key/value)")
        if flag("add_zero_attn", add_zero_attn):
            raise ValueError("add_zero_attn=True is not supported by MultiheadAttention (no zero key/value)")
        self.embed_dim = int_arg("embed_dim", embed_dim, minimum=1)
        self.num_heads = int_arg("num_heads", num_heads, minimum=1)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim = {self.embed_dim} must be divisible by num_heads = {self.num_heads}")
        self._configure(self.embed_dim, self.num_heads, None, causal, eps, chunk_size)
        self.kdim = self.embed_dim if kdim is None else int_arg("kdim", kdim, minimum=1)
        self.vdim = self.embed_dim if vdim is None else int_arg("vdim", vdim, minimum=1)
        dropout = finite("dropout", dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout
        self.batch_first = flag("batch_first", batch_first)
        _own_feature_map(self, feature_map, device, dtype)
        E = self.embed_dim
        kw: dict[str, Any] = dict(device=device, dtype=dtype)
        self.q_proj_weight = nn.Parameter(torch.empty((E, E), **kw))
        self.k_proj_weight = nn.Parameter(torch.empty((E, self.kdim), **kw))
        self.v_proj_weight = nn.Parameter(torch.empty((E, self.vdim), **kw))
        self.register_parameter("in_proj_weight", None)
        self.in_proj_bias = nn.Parameter(torch.empty(3 * E, **kw)) if bias else None
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.out_proj = nn.Linear(E, E, bias=bias, **kw)
        self.rpb = _rpb_module(self, rpb, device, dtype)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialisation
        for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def _owned(self, name: str) -> torch.Tensor:
        return getattr(self, f"feature_map_{name}")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # nn.MultiheadAttention with kdim == vdim == embed_dim packs the three input
        # projections into one in_proj_weight: split it into ours.
        packed = state_dict.pop(prefix + "in_proj_weight", None)
        if packed is not None:
            q, k, v = packed.chunk(3, dim=0)
            for name, w in zip(("q", "k", "v"), (q, k, v), strict=True):
                state_dict.setdefault(f"{prefix}{name}_proj_weight", w)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        cache: LayerCache | None = None,
        return_cache: bool = False,
    ) -> tuple[torch.Tensor, None] | tuple[torch.Tensor, None, LayerCache]:
        """Attend from ``query`` over ``key``/``value``, as ``nn.MultiheadAttention.forward``.

        Parameters
        ----------
        query : Tensor, shape (L, N, E), (N, L, E) with ``batch_first``, or (L, E)
        key : Tensor, shape (S, N, kdim), (N, S, kdim) or (S, kdim)
        value : Tensor, shape (S, N, vdim), (N, S, vdim) or (S, vdim)
        key_padding_mask : Tensor, shape (N, S) or (S,), optional
            ``True`` (bool) or ``-inf`` (float) marks a padding key, as in torch; the
            opposite of `LinearAttention`'s ``key_mask`` (True = keep).
            Padding keys are excluded exactly.
        need_weights : bool
            Accepted; the weights returned are always ``None`` (never formed).
        attn_mask : Tensor, shape (L, L), optional
            Only the causal mask (bool True above the diagonal, or float ``-inf``
            above and 0 elsewhere); anything else is a ``ValueError``.
        average_attn_weights : bool
            Accepted and ignored (no weights).
        is_causal : bool
            Attend causally (``attn_mask`` may then be omitted).
        cache : LayerCache, optional
            Continue the causal sequence this cache ends (from ``return_cache=True``
            or `step`): the call attends to the chunk and to every earlier token, so
            a prompt is prefilled in chunks of several tokens. The call must be causal
            (a causal layer, ``is_causal=True`` or the chunk's ``(L, L)`` causal
            ``attn_mask``). Chunks that pass the cache along equal one causal pass,
            the FastRPB term included (its history lives in the cache, never the
            values).
        return_cache : bool
            A causal call only: also return the `LayerCache` that continues the
            sequence (with ``cache=`` or `step`).

        Returns
        -------
        (Tensor, None)
            The output in the layout of ``query`` (width ``embed_dim``) and ``None``;
            ``(output, None, cache)`` with ``return_cache=True``.
        """
        batched, query, key, value = self._batch_first(query, key, value, token=False)
        N, L, S = query.shape[0], query.shape[1], key.shape[1]
        keep = None
        if key_padding_mask is not None:
            kpm = key_padding_mask if batched else key_padding_mask[None]
            keep = _keep_mask(kpm, (N, S))
        causal = self.causal or bool(is_causal)
        if attn_mask is not None:
            if not is_causal:  # with is_causal=True the mask is torch's hint: trusted, as torch does
                _causal_mask_check(attn_mask, L, S)
            causal = True
        if causal and L != S:
            raise ValueError(f"a causal call needs as many queries as keys, got L = {L} and S = {S}")
        if causal:
            self._check_causal_bias("this call is causal (is_causal=True or a causal attn_mask)")
        self._check_cache(cache, return_cache, causal, "build the layer with causal=True or pass is_causal=True")
        xp = namespace(query=query, key=key, value=value)
        q, k, v = self._project_heads(xp, query, key, value)
        mask = None if keep is None else keep[:, None, :]  # broadcast over heads
        out, state = self._heads(xp, q, k, v, mask, causal, return_cache, cache)
        y = self._output(xp, out, batched, token=False)
        return (y, None, LayerCache(state)) if return_cache else (y, None)

    def step(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerCache | None = None
    ) -> tuple[torch.Tensor, LayerCache]:
        """Decode one token: ``query: (N, E)`` or ``(E,)`` (``key``, ``value``: ``(N,
        kdim)``, ``(N, vdim)``), usually the same tensor; ``cache=None`` starts a sequence.

        Returns ``(output, cache)``, the output ``(N, embed_dim)`` (or ``(embed_dim,)``).
        Stepping token by token, after a prefill with ``return_cache=True`` or from
        nothing, reproduces the causal forward pass. The cache has a fixed size
        without FastRPB; with it, the cache's state also holds the bias history (an
        ``RPBState`` of at most O(max_len Dh) numbers per head) and a step costs
        amortised O(Dh log^2 t) for the bias (``fastrpb.rpb_step``), never a pass over
        all earlier values. The layer's FastRPB must be causal.
        """
        batched, query, key, value = self._batch_first(query, key, value, token=True)
        self._check_causal_bias("step() decodes causally")
        xp = namespace(query=query, key=key, value=value)
        q, k, v = self._project_heads(xp, query, key, value)
        out, cache = self._step_heads(q[..., 0, :], k[..., 0, :], v[..., 0, :], cache)
        return self._output(xp, out[..., None, :], batched, token=True), cache

    # -- the pieces of forward and step
    def _batch_first(
        self, query: Any, key: Any, value: Any, *, token: bool
    ) -> tuple[bool, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Check the inputs and bring them to ``(N, L, E)`` (one token: ``L = 1``);
        returns whether they were batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.is_nested:
                raise TypeError(
                    f"{name} is a nested (jagged) tensor, which MultiheadAttention does not take: "
                    "pad the batch and pass key_padding_mask, or use packed sequences (cu_seqlens, coming "
                    "to fastrpb's attention functions and layers). nn.TransformerEncoder makes nested "
                    "tensors in eval mode when it was built around an nn.MultiheadAttention: build it with "
                    "enable_nested_tensor=False, or from a layer whose self_attn is already this one"
                )
        ndim = 2 if token else 3
        batched = query.dim() == ndim
        if query.dim() not in (ndim - 1, ndim) or key.dim() != query.dim() or value.dim() != query.dim():
            what = (
                "one token each, all batched 2-d ((N, E)) or all unbatched 1-d ((E,))"
                if token
                else "all batched 3-d ((L, N, E), or (N, L, E) with batch_first) or all unbatched 2-d ((L, E))"
            )
            raise ValueError(
                f"query, key and value must be {what}, got shapes {tuple(query.shape)}, {tuple(key.shape)}, "
                f"{tuple(value.shape)}"
            )
        if token:  # one token: a sequence of length 1, batch first
            query, key, value = query[..., None, :], key[..., None, :], value[..., None, :]
        if not batched:
            query, key, value = query[None], key[None], value[None]
        elif not self.batch_first and not token:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != width:
                raise ValueError(f"{name} must have width {width}, got shape {tuple(t.shape)}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(
                "key and value must have the same batch and length, and the batch of query: got shapes "
                f"{tuple(key.shape)} and {tuple(value.shape)} for query {tuple(query.shape)} (as (N, L, E))"
            )
        return batched, query, key, value

    def _check_causal_bias(self, what: str) -> None:
        if self.rpb is not None and not self.rpb.causal:
            raise ValueError(
                f"{what} but the layer's FastRPB is not causal (it would let a token see later values): "
                "build the layer with causal=True"
            )

    def _project_heads(self, xp: Any, query: Any, key: Any, value: Any) -> tuple[Any, Any, Any]:
        """The input projections of ``(N, L, .)`` inputs, split into heads ``(N, H, L, Dh)``."""
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.chunk(3)
        q = self._split(xp, F.linear(query, self.q_proj_weight, bq))
        k = self._split(xp, F.linear(key, self.k_proj_weight, bk))
        v = self._split(xp, F.linear(value, self.v_proj_weight, bv))
        return q, k, v

    def _output(self, xp: Any, out: Any, batched: bool, *, token: bool) -> torch.Tensor:
        """Heads ``(N, H, L, Dh)`` merged, dropout, ``out_proj``, back in the caller's layout."""
        y = self.out_proj(F.dropout(self._merge(xp, out), p=self.dropout, training=self.training))
        if token:
            y = y[:, 0]
        if not batched:
            return y[0]
        return y if self.batch_first or token else y.transpose(0, 1)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}, "
            f"feature_map={self.feature_map.signature}, causal={self.causal}"
        )
