"""Train a small linear-attention classifier in PyTorch, with SIKF and FastRPB.

The task needs word order: a sequence of random tokens is positive when it contains
the bigram "A B" (token A immediately followed by token B), negative when A and B
both occur but never in that order and distance. Without positional information
attention cannot tell the classes apart; FastRPB gives it relative positions.
Sequences have random lengths and are padded, so the key padding mask matters too.

Run:  python docs/examples/torch_classifier.py          (a minute or two on a laptop CPU)
      python docs/examples/torch_classifier.py --tiny   (seconds; what the tests run)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

import fastrpb.torch as frt

PAD, A, B = 0, 1, 2


def make_data(n: int, max_len: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens (n, max_len), mask (n, max_len) with True for real tokens, labels (n,)."""
    rng = np.random.default_rng(seed)
    tokens = np.full((n, max_len), PAD, dtype=np.int64)
    mask = np.zeros((n, max_len), dtype=bool)
    labels = rng.integers(0, 2, size=n)
    for i in range(n):
        length = int(rng.integers(max_len // 2, max_len + 1))
        seq = rng.integers(3, vocab, size=length)  # filler tokens, never A or B
        a = int(rng.integers(0, length - 1))
        b = a + 1  # positive: the bigram "A B"
        while not labels[i] and b in (a, a + 1):  # negative: A and B, never "A B"
            b = int(rng.integers(0, length))
        seq[a], seq[b] = A, B
        tokens[i, :length] = seq
        mask[i, :length] = True
    return tokens, mask, labels


class Classifier(nn.Module):
    def __init__(self, vocab: int, d_model: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        # SIKF feature map + a FastRPB table per head covering max_len tokens
        self.attn = frt.LinearAttention(d_model, heads, feature_map="sikf", rpb=max_len)
        self.norm1 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))
        self.norm2 = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 2)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = self.norm1(h + self.attn(h, key_mask=mask))
        h = self.norm2(h + self.mlp(h))
        weights = mask[..., None].to(h.dtype)
        pooled = (h * weights).sum(1) / weights.sum(1)  # mean over real tokens
        return self.head(pooled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds: the size the tests run")
    args = parser.parse_args()
    n, max_len, d_model, heads, epochs = (256, 16, 16, 2, 4) if args.tiny else (2048, 48, 32, 4, 10)
    vocab, batch = 12, 64

    torch.manual_seed(0)
    tokens, mask, labels = (torch.as_tensor(a) for a in make_data(n, max_len, vocab, seed=0))
    model = Classifier(vocab, d_model, heads, max_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print(f"{sum(p.numel() for p in model.parameters())} parameters, {n} sequences of up to {max_len} tokens")

    for epoch in range(1, epochs + 1):
        order = torch.randperm(n)
        total, correct = 0.0, 0
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            logits = model(tokens[idx], mask[idx])
            loss = nn.functional.cross_entropy(logits, labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            correct += (logits.argmax(-1) == labels[idx]).sum().item()
        print(f"epoch {epoch:2d}  loss {total / n:.4f}  accuracy {correct / n:.3f}")


if __name__ == "__main__":
    main()
