"""A small Transformer classifier whose attention and positional bias are fastrpb's.

The experiment must exercise the library, so this module contains no attention maths
of its own: every attention output comes from ``fastrpb.softmax_attention`` or
``fastrpb.linear_attention``, every FastRPB term from those functions' ``rpb=`` (1-d, ListOps) or
``rpb_tables=``/``rpb_grid=`` (2-d, images) arguments, which call ``fastrpb.rpb`` and
``fastrpb.rpb_nd``, and the softmax logits bias from ``fastrpb.rpb_matrix``, all on
torch tensors through the array API.

Variants (same width, depth, optimiser and steps):

========================  ==========================================================
``softmax``               exact softmax attention
``softmax+rpb``           softmax attention + FastRPB on the values (``B @ V``)
``softmax+logits``        softmax attention with the same kind of table as an additive
                          logits bias (``rpb_matrix``), the classical relative bias
``elu`` / ``elu+rpb``     linear attention, ``elu(x) + 1`` features, without / with FastRPB
``sikf`` / ``sikf+rpb``   linear attention, the paper's SIKF features, without / with FastRPB
========================  ==========================================================

Every model has the same fixed sinusoidal absolute position encoding on its inputs,
so FastRPB is judged as an *addition* to a standard Transformer, as in the paper.
The first token is a class token; it neither gives nor receives bias (``skip=(1, 0)``)
and its final state is classified.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import fastrpb

VARIANTS = ("softmax", "softmax+rpb", "softmax+logits", "elu", "elu+rpb", "sikf", "sikf+rpb")


@dataclass(frozen=True)
class Variant:
    name: str
    attention: str  # "softmax" | "elu" | "sikf"
    bias: str | None  # None | "rpb" (FastRPB on values) | "logits" (softmax logits bias)

    @classmethod
    def parse(cls, name: str) -> Variant:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        attention, _, bias = name.partition("+")
        return cls(name, attention, bias or None)


@dataclass(frozen=True)
class Geometry:
    """Where the tokens sit: a 1-d sequence of at most ``max_len`` tokens, or a 2-d grid.

    Both have one class token in front (``skip=(1, 0)``).
    """

    kind: str  # "seq" | "grid"
    max_len: int  # tokens after the class token (for "grid": prod(grid))
    grid: tuple[int, ...] = ()

    @property
    def skip(self) -> tuple[int, int]:
        return (1, 0)


def sinusoidal(L: int, d: int) -> torch.Tensor:
    pos = torch.arange(L, dtype=torch.float32)[:, None]
    i = torch.arange(0, d, 2, dtype=torch.float32)[None, :]
    angle = pos / torch.pow(10000.0, i / d)
    pe = torch.zeros(L, d)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d // 2])
    return pe


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, variant: Variant, geom: Geometry, seed: int):
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model {d} is not a multiple of heads {heads}")
        self.h, self.dh = heads, d // heads
        self.variant, self.geom = variant, geom
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        like = torch.empty(0)
        if variant.bias is not None:
            if geom.kind == "grid":
                # one table per grid axis and head; tables for the rows and the columns
                self.tables = nn.ParameterList(
                    [
                        nn.Parameter(fastrpb.rpb_init(heads, g, seed=seed + 7919 * a, like=like))
                        for a, g in enumerate(geom.grid)
                    ]
                )
            else:
                self.tables = nn.ParameterList(
                    [nn.Parameter(fastrpb.rpb_init(heads, geom.max_len, seed=seed, like=like))]
                )

    def _logits_bias(self, L: int) -> torch.Tensor:
        """(H, L, L) dense bias from the same tables (class token row/column zero)."""
        n = L - 1
        if self.geom.kind == "grid":
            mats = [fastrpb.rpb_matrix(t, g) for t, g in zip(self.tables, self.geom.grid, strict=True)]
            # B[(r, c), (r', c')] = w_row(r - r') + w_col(c - c')
            rows, cols = mats
            G1, G2 = self.geom.grid
            dense = rows[:, :, None, :, None] + cols[:, None, :, None, :]
            dense = dense.reshape(self.h, G1 * G2, G1 * G2)
        else:
            dense = fastrpb.rpb_matrix(self.tables[0], n)
        return nn.functional.pad(dense, (1, 0, 1, 0))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        # (B, 1, L) broadcasts over heads; the library also keeps padding out of the FastRPB term
        km = key_mask[:, None, :] if key_mask is not None else None
        var = self.variant
        bias: dict = {}
        if var.bias == "rpb":  # FastRPB: the library adds B @ v to the attention output
            if self.geom.kind == "grid":
                bias = dict(rpb_tables=list(self.tables), rpb_grid=self.geom.grid, rpb_skip=self.geom.skip)
            else:
                bias = dict(rpb=self.tables[0], rpb_skip=self.geom.skip)
        if var.attention == "softmax":
            logits = self._logits_bias(L) if var.bias == "logits" else None
            o = fastrpb.softmax_attention(q, k, v, key_mask=km, logits_bias=logits, **bias)
        else:
            o = fastrpb.linear_attention(q, k, v, feature_map=var.attention, key_mask=km, **bias)
        return self.out(o.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int, variant: Variant, geom: Geometry, seed: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads, variant, geom, seed)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), key_mask)
        return x + self.mlp(self.ln2(x))


class Classifier(nn.Module):
    """Tokens -> embedding + sinusoidal positions -> pre-LN blocks -> class-token head.

    ``vocab=None`` means real-valued inputs (pixels, one scalar per token).
    """

    def __init__(
        self,
        *,
        vocab: int | None,
        n_classes: int,
        d: int,
        heads: int,
        layers: int,
        d_ff: int,
        variant: str,
        geom: Geometry,
        seed: int,
    ):
        super().__init__()
        var = Variant.parse(variant)
        self.embed = nn.Embedding(vocab, d) if vocab is not None else nn.Linear(1, d)
        self.cls = nn.Parameter(torch.zeros(d)) if vocab is None else None
        self.register_buffer("pos", sinusoidal(geom.max_len + 1, d), persistent=False)
        self.blocks = nn.ModuleList(
            [Block(d, heads, d_ff, var, geom, seed=seed * 1000 + 17 * i) for i in range(layers)]
        )
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, tokens: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.cls is None:
            x = self.embed(tokens)  # ids, class token included
        else:
            x = self.embed(tokens[..., None])  # pixels (B, L) -> (B, L, d)
            x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self.pos[: x.shape[1]]
        for blk in self.blocks:
            x = blk(x, key_mask)
        return self.head(self.ln(x[:, 0]))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["VARIANTS", "Variant", "Geometry", "Classifier", "n_params", "sinusoidal"]
