"""PyTorch layers: ``torch.nn.Module`` wrappers that own parameters and call the core.

Import it explicitly (``import fastrpb.torch``); ``import fastrpb`` alone never
imports PyTorch. Every computation goes through the functional core
(``fastrpb.linear_attention``, ``fastrpb.linear_attention_step``, ``fastrpb.rpb``,
``fastrpb.rpb_nd``, ``fastrpb.rpb_matrix``): these modules only hold parameters,
project and split heads.

Examples
--------
>>> import torch, fastrpb.torch as frt
>>> layer = frt.MultiheadLinearAttention(64, heads=4, feature_map="sikf", rpb=128)
>>> y = layer(torch.randn(2, 100, 64))          # (batch, L, d_model)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Absolute imports only: this module is itself called ``torch`` inside the package.
import torch
from torch import nn

import fastrpb
from fastrpb._compat import grid_arg, int_arg, skip_arg
from fastrpb._layers import AttentionLayer, LayerCache, check_axes, check_heads, check_layer_rpb

__all__ = ["FastRPB", "FastRPBnd", "MultiheadLinearAttention", "LayerCache"]


def _seed(seed: int | None) -> int:
    """An explicit seed, or one drawn from PyTorch's global generator (``torch.manual_seed``)."""
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    return int_arg("seed", seed, minimum=0)


def _like(device: Any, dtype: Any) -> torch.Tensor:
    return torch.empty((0,), device=device, dtype=dtype if dtype is not None else torch.get_default_dtype())


def _init_table(heads: int | None, max_len: int, symmetric: bool, seed: int, like: torch.Tensor, scale: float) -> torch.Tensor:
    table = fastrpb.rpb_init(heads, max_len, seed=seed, like=like, scale=scale)
    # A symmetric table stores offsets 0 .. M-1 only: the non-negative half of the draw.
    return table[..., max_len - 1 :].clone() if symmetric else table


class FastRPB(nn.Module):
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
        self.heads = check_heads(heads)
        self.max_len = int_arg("max_len", max_len, minimum=1)
        self.causal = bool(causal)
        self.symmetric = bool(symmetric)
        self.skip = skip_arg(skip)
        table = _init_table(self.heads, self.max_len, self.symmetric, _seed(seed), _like(device, dtype), scale)
        self.table = nn.Parameter(table)

    def weights(self) -> torch.Tensor:
        """The full table ``(heads, 2 max_len - 1)`` (expanded from ``h`` when symmetric)."""
        return fastrpb.symmetric_table(self.table) if self.symmetric else self.table

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """``B @ v`` for values ``(..., heads, L, D)`` with ``L <= max_len``."""
        return fastrpb.rpb(v, self.weights(), causal=self.causal, skip=self.skip)

    def matrix(self, L: int) -> torch.Tensor:
        """The dense ``(heads, L, L)`` matrix ``B``, e.g. as a softmax logits bias."""
        return fastrpb.rpb_matrix(self.weights(), L, causal=self.causal)

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, max_len={self.max_len}, causal={self.causal}, "
            f"symmetric={self.symmetric}, skip={self.skip}"
        )


class FastRPBnd(nn.Module):
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
    seed, scale, device, dtype :
        As in `FastRPB`.
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
        seed: int | None = None,
        scale: float = 1e-2,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.heads = check_heads(heads)
        self.grid = grid_arg(grid)
        self.axes = check_axes(axes, self.grid)
        self.share = bool(share)
        self.symmetric = bool(symmetric)
        self.skip = skip_arg(skip)
        self.causal = False
        seed = _seed(seed)
        like = _like(device, dtype)
        lengths = [max(self.grid[a] for a in self.axes)] if self.share else [self.grid[a] for a in self.axes]
        self.tables = nn.ParameterList(
            nn.Parameter(_init_table(self.heads, m, self.symmetric, seed + n, like, scale)) for n, m in enumerate(lengths)
        )

    def weights(self) -> list[torch.Tensor | None]:
        """One full table (or ``None``) per grid axis, as ``fastrpb.rpb_nd`` takes them."""
        full = [fastrpb.symmetric_table(t) if self.symmetric else t for t in self.tables]
        out: list[torch.Tensor | None] = [None] * len(self.grid)
        for n, a in enumerate(self.axes):
            out[a] = full[0] if self.share else full[n]
        return out

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """The N-d bias for values ``(..., heads, L, D)``, ``L = prod(grid) + sum(skip)``."""
        return fastrpb.rpb_nd(v, self.weights(), self.grid, skip=self.skip)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, grid={self.grid}, axes={self.axes}, share={self.share}, symmetric={self.symmetric}, skip={self.skip}"


class MultiheadLinearAttention(nn.Module, AttentionLayer):
    r"""Multi-head linear attention with an optional FastRPB term on the values.

    ``y = W_o [ LinearAttention(x W_q, x W_k, x W_v) + B (x W_v) ]`` per head, the
    paper's "Attn(Q, K, V) + B V". Attention is ``fastrpb.linear_attention``; the bias
    is a `FastRPB` or `FastRPBnd` module.

    Parameters
    ----------
    d_model : int
        Width of the input and output.
    heads : int
        Number of heads.
    feature_map : str or feature map
        ``"sikf"`` (default), ``"elu"``, ``"relu"``, ``"dpfp"`` or any object from
        ``fastrpb.feature_maps``.
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

    Examples
    --------
    >>> layer = MultiheadLinearAttention(64, 4, rpb=256, causal=True)
    >>> x = torch.randn(2, 10, 64)
    >>> y, cache = layer(x, return_cache=True)        # prefill
    >>> y_t, cache = layer.step(torch.randn(2, 64), cache)  # decode one token
    """

    def __init__(
        self,
        d_model: int,
        heads: int,
        feature_map: Any = "sikf",
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
        inner = self._configure(d_model, heads, head_dim, feature_map, causal, eps, chunk_size)
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(self.d_model, inner, **kw)
        self.k_proj = nn.Linear(self.d_model, inner, **kw)
        self.v_proj = nn.Linear(self.d_model, inner, **kw)
        self.out_proj = nn.Linear(inner, self.d_model, **kw)
        if rpb is not None and not isinstance(rpb, nn.Module):
            rpb = FastRPB(self.heads, int_arg("rpb (max_len)", rpb, minimum=1), causal=self.causal, device=device, dtype=dtype)
        if rpb is not None:
            check_layer_rpb(rpb, self.heads, self.causal, kind=FastRPB, kind_nd=FastRPBnd)
        self.rpb = rpb

    _bias_nd = FastRPBnd

    def _check_input(self, x: Any, name: str, ndim: int) -> Any:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        return super()._check_input(x, name, ndim)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None = None, *, return_cache: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, LayerCache]:
        """Attend over ``x: (..., L, d_model)``.

        Parameters
        ----------
        x : Tensor, shape (..., L, d_model)
            The token embeddings (batch first); queries, keys and values all come from it.
        key_mask : bool Tensor, shape (..., L), optional
            ``True`` for real tokens, ``False`` for padding (the opposite of
            ``torch.nn.MultiheadAttention``'s ``key_padding_mask``). Padding keys are
            excluded exactly from attention and their values from the bias.
        return_cache : bool
            Causal layers only: also return the `LayerCache` to continue with `step`.
        """
        return self._attend(x, key_mask, return_cache)

    def step(self, x_t: torch.Tensor, cache: LayerCache | None = None) -> tuple[torch.Tensor, LayerCache]:
        """Decode one token ``x_t: (..., d_model)``; ``cache=None`` starts a sequence.

        Returns ``(y_t, cache)``. Stepping token by token reproduces the causal
        forward pass. Without FastRPB the cache has a fixed size; with it the cache
        also keeps the values (the bias of a new token weighs every earlier value).
        """
        return self._decode(x_t, cache)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, heads={self.heads}, head_dim={self.head_dim}, "
            f"feature_map={self.feature_map!r}, causal={self.causal}"
        )
