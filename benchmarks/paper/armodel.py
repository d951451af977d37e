"""A small causal Transformer for next-pixel prediction, with fastrpb attention.

As in ``model.py``, no attention maths lives here: every attention output comes from
``fastrpb`` on torch tensors.

* ``elu``, ``sikf`` (``+rpb``): the public layer ``fastrpb.torch.LinearAttention``
  with ``causal=True`` (and a causal ``fastrpb.torch.FastRPB``); training calls its
  ``forward``, sampling its ``step`` (O(1) state per token for the attention; the
  FastRPB term is whatever the layer's ``step`` does, so a streaming bias is picked up
  when the layer gets one).
* ``softmax`` (``+rpb``): ``fastrpb.softmax_attention(causal=True)`` for training; for
  sampling a key/value cache (preallocated, written in place) and
  ``fastrpb.softmax_attention`` of the new query over the cached keys: O(t) per token;
  the FastRPB term streams by the bias module's ``step`` (``fastrpb.rpb_step``).
* ``*+rpb2d``: the causal 2-d bias in raster order, ``rpb_tables=``/``rpb_grid=`` with
  ``causal=True`` (``fastrpb.rpb_nd(..., causal=True)``). Available only when the
  installed fastrpb's ``rpb_nd`` takes ``causal`` (`causal_2d_available`); decoding
  streams it with ``fastrpb.rpb_nd_step`` (per-axis running terms: amortised cost per
  token flat in t, as the 1-d ``rpb_step``).

The sequence is ``[BOS, p_0, ..., p_783]`` (785 tokens): the output at token ``t``
predicts pixel ``p_t``; the last output is unused. The 1-d FastRPB covers all 785
tokens; the 2-d bias skips the BOS token (``skip=(1, 0)``) and sees the 784 pixels on
their 28 x 28 grid.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import fastrpb
from fastrpb.torch import FastRPB, LinearAttention

from .model import sinusoidal

AR_VARIANTS_1D = ("softmax", "softmax+rpb", "elu", "elu+rpb", "sikf", "sikf+rpb")
AR_VARIANTS_2D = ("softmax+rpb2d", "elu+rpb2d", "sikf+rpb2d")
AR_VARIANTS = AR_VARIANTS_1D + AR_VARIANTS_2D


def causal_2d_available() -> bool:
    """Whether this fastrpb has the causal (raster-order) N-d bias, ``rpb_nd(..., causal=True)``."""
    return "causal" in inspect.signature(fastrpb.rpb_nd).parameters


def default_variants() -> tuple[str, ...]:
    return AR_VARIANTS if causal_2d_available() else AR_VARIANTS_1D


@dataclass(frozen=True)
class ARVariant:
    name: str
    attention: str  # "softmax" | "elu" | "sikf"
    bias: str | None  # None | "rpb" (1-d causal) | "rpb2d" (2-d causal, raster order)

    @classmethod
    def parse(cls, name: str) -> ARVariant:
        if name not in AR_VARIANTS:
            raise ValueError(f"unknown autoregressive variant {name!r}; known: {', '.join(AR_VARIANTS)}")
        if name in AR_VARIANTS_2D and not causal_2d_available():
            raise ValueError(
                f"variant {name!r} needs the causal 2-d FastRPB, fastrpb.rpb_nd(..., causal=True), "
                "which this version of fastrpb does not have"
            )
        attention, _, bias = name.partition("+")
        return cls(name, attention, bias or None)


class FunctionalCausalAttention(nn.Module):
    """Causal multi-head attention through fastrpb's functions, with a KV-cache ``step``.

    Used for softmax (with or without FastRPB) and for the 2-d causal bias (any
    attention), which the layer ``LinearAttention`` does not take.
    Same projections and call signature as ``LinearAttention``:
    ``forward(x)`` on ``(B, L, d)`` and ``step(x_t, cache) -> (y_t, cache)``.
    """

    def __init__(
        self, d: int, heads: int, variant: ARVariant, *, length: int, grid: tuple[int, int], chunk_size: int, seed: int
    ):
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model {d} is not a multiple of heads {heads}")
        self.h, self.dh, self.length, self.grid = heads, d // heads, length, grid
        self.variant, self.chunk_size = variant, chunk_size
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        like = torch.empty(0)
        self.rpb = None
        self.tables = None
        if variant.bias == "rpb":
            self.rpb = FastRPB(heads, length, causal=True, seed=seed)
        elif variant.bias == "rpb2d":
            self.tables = nn.ParameterList(
                [nn.Parameter(fastrpb.rpb_init(heads, g, seed=seed + 7919 * a, like=like)) for a, g in enumerate(grid)]
            )

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (..., L, d) -> (..., H, L, dh)
        return x.unflatten(-1, (self.h, self.dh)).transpose(-3, -2)

    def _bias(self) -> dict:
        if self.rpb is not None:
            return dict(rpb=self.rpb.weights())
        if self.tables is not None:
            return dict(rpb_tables=list(self.tables), rpb_grid=self.grid, rpb_skip=(1, 0))
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._split(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.variant.attention == "softmax":
            o = fastrpb.softmax_attention(q, k, v, causal=True, **self._bias())
        else:
            o = fastrpb.linear_attention(
                q, k, v, feature_map=self.variant.attention, causal=True, chunk_size=self.chunk_size, **self._bias()
            )
        return self.out_proj(o.transpose(-3, -2).flatten(-2))

    def step(self, x_t: torch.Tensor, cache: dict | None = None) -> tuple[torch.Tensor, dict]:
        """One token ``x_t: (B, d)``; the cache holds preallocated keys/values and the count."""
        q, k, v = (p(x_t).unflatten(-1, (self.h, self.dh)) for p in (self.q_proj, self.k_proj, self.v_proj))
        if cache is None:
            B = x_t.shape[0]
            cache = {
                "t": 0,
                "state": None,
                "k": x_t.new_zeros(B, self.h, self.length, self.dh),
                "v": x_t.new_zeros(B, self.h, self.length, self.dh),
            }
        t = cache["t"]
        if t >= self.length:
            raise ValueError(f"the cache holds {self.length} tokens; cannot decode token {t + 1}")
        cache["v"][:, :, t] = v
        if self.variant.attention == "softmax":
            cache["k"][:, :, t] = k
            o = fastrpb.softmax_attention(q[..., None, :], cache["k"][:, :, : t + 1], cache["v"][:, :, : t + 1])[
                ..., 0, :
            ]
        else:
            o, cache["state"] = fastrpb.linear_attention_step(
                cache["state"], q, k, v, feature_map=self.variant.attention
            )
        if self.rpb is not None:  # the streaming bias, as the linear layer's step: amortised O(D log^2 t)
            b, cache["rpb"] = self.rpb(v, initial_state=cache.get("rpb"), step=True)
            o = o + b
        elif self.tables is not None:  # the streaming 2-d bias in raster order (token 0, BOS, is skipped)
            b, cache["rpb2d"] = fastrpb.rpb_nd_step(
                cache.get("rpb2d"), v, list(self.tables), grid=self.grid, skip=(1, 0)
            )
            o = o + b
        cache["t"] = t + 1
        return self.out_proj(o.flatten(-2)), cache


def attention_layer(
    d: int, heads: int, variant: ARVariant, *, length: int, grid: tuple[int, int], chunk_size: int, seed: int
) -> nn.Module:
    if variant.attention != "softmax" and variant.bias != "rpb2d":
        rpb = FastRPB(heads, length, causal=True, seed=seed) if variant.bias == "rpb" else None
        return LinearAttention(d, heads, feature_map=variant.attention, rpb=rpb, causal=True, chunk_size=chunk_size)
    return FunctionalCausalAttention(d, heads, variant, length=length, grid=grid, chunk_size=chunk_size, seed=seed)


class Block(nn.Module):
    def __init__(self, d: int, d_ff: int, attn: nn.Module):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), attn, nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def step(self, x_t: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        a, cache = self.attn.step(self.ln1(x_t), cache)
        x_t = x_t + a
        return x_t + self.mlp(self.ln2(x_t)), cache


class PixelTransformer(nn.Module):
    """Tokens ``[BOS, p_0, ..., p_{n-1}]`` -> logits over ``levels`` for ``p_0 .. p_{n-1}``.

    ``grid`` is the image shape; ``n = prod(grid)`` pixels, ``n + 1`` tokens.
    """

    def __init__(
        self,
        *,
        levels: int,
        grid: tuple[int, int],
        d: int,
        heads: int,
        layers: int,
        d_ff: int,
        variant: str,
        chunk_size: int = 64,
        seed: int = 0,
    ):
        super().__init__()
        var = ARVariant.parse(variant)
        self.levels, self.grid = levels, tuple(grid)
        self.n = grid[0] * grid[1]
        self.length = self.n + 1
        self.bos = levels
        self.embed = nn.Embedding(levels + 1, d)
        self.register_buffer("pos", sinusoidal(self.length, d), persistent=False)
        self.blocks = nn.ModuleList(
            [
                Block(
                    d,
                    d_ff,
                    attention_layer(
                        d,
                        heads,
                        var,
                        length=self.length,
                        grid=self.grid,
                        chunk_size=chunk_size,
                        seed=seed * 1000 + 17 * i,
                    ),
                )
                for i in range(layers)
            ]
        )
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, levels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels: (B, n)`` integer levels -> logits ``(B, n, levels)`` (teacher forcing)."""
        bos = pixels.new_full((pixels.shape[0], 1), self.bos)
        x = self.embed(torch.cat([bos, pixels], dim=1)) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x[:, : self.n]))

    def step(self, token: torch.Tensor, t: int, caches: list | None) -> tuple[torch.Tensor, list]:
        """Token ``t`` of the sequence (``t = 0``: BOS) -> logits for pixel ``t``."""
        x = self.embed(token) + self.pos[t]
        caches = caches if caches is not None else [None] * len(self.blocks)
        new = []
        for blk, c in zip(self.blocks, caches, strict=False):
            x, c = blk.step(x, c)
            new.append(c)
        return self.head(self.ln(x)), new

    @torch.no_grad()
    def sample(self, n_images: int, *, generator: torch.Generator) -> torch.Tensor:
        """``n_images`` images ``(n_images, n)`` of levels, drawn pixel by pixel (temperature 1)."""
        out = torch.empty(n_images, self.n, dtype=torch.long)
        tok = torch.full((n_images,), self.bos, dtype=torch.long)
        caches = None
        for t in range(self.n):
            logits, caches = self.step(tok, t, caches)
            tok = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)[:, 0]
            out[:, t] = tok
        return out


__all__ = [
    "AR_VARIANTS",
    "AR_VARIANTS_1D",
    "AR_VARIANTS_2D",
    "ARVariant",
    "PixelTransformer",
    "causal_2d_available",
    "default_variants",
]
