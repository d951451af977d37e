"""Train a small linear-attention classifier with JAX, Flax NNX and optax (SIKF + FastRPB).

The same task as the PyTorch example: a sequence of random tokens is positive when
it contains the bigram "A B", negative when A and B occur but never in that order
and distance. FastRPB gives the attention the relative positions it needs; padded
sequences exercise the key padding mask.

Run:  python docs/examples/flax_classifier.py          (a minute or two on a laptop CPU)
      python docs/examples/flax_classifier.py --tiny   (seconds; what the tests run)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fastrpb.flax as frf

PAD, A, B = 0, 1, 2


def make_data(n: int, max_len: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens (n, max_len), mask (n, max_len) with True for real tokens, labels (n,)."""
    rng = np.random.default_rng(seed)
    tokens = np.full((n, max_len), PAD, dtype=np.int32)
    mask = np.zeros((n, max_len), dtype=bool)
    labels = rng.integers(0, 2, size=n).astype(np.int32)
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


class Classifier(nnx.Module):
    def __init__(self, vocab: int, d_model: int, heads: int, max_len: int, *, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(vocab, d_model, rngs=rngs)
        # SIKF feature map + a FastRPB table per head covering max_len tokens
        self.attn = frf.LinearAttention(d_model, heads, feature_map="sikf", rpb=max_len, rngs=rngs)
        self.norm1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.up = nnx.Linear(d_model, 2 * d_model, rngs=rngs)
        self.down = nnx.Linear(2 * d_model, d_model, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, 2, rngs=rngs)

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        h = self.norm1(h + self.attn(h, key_mask=mask))
        h = self.norm2(h + self.down(nnx.gelu(self.up(h))))
        weights = mask[..., None].astype(h.dtype)
        pooled = (h * weights).sum(1) / weights.sum(1)  # mean over real tokens
        return self.head(pooled)


@nnx.jit
def train_step(model: Classifier, optimizer: nnx.Optimizer, tokens, mask, labels):
    def loss_fn(model):
        logits = model(tokens, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, (logits.argmax(-1) == labels).sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds: the size the tests run")
    args = parser.parse_args()
    n, max_len, d_model, heads, epochs = (256, 16, 16, 2, 4) if args.tiny else (2048, 48, 32, 4, 10)
    vocab, batch = 12, 64

    tokens, mask, labels = (jnp.asarray(a) for a in make_data(n, max_len, vocab, seed=0))
    model = Classifier(vocab, d_model, heads, max_len, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"{count} parameters, {n} sequences of up to {max_len} tokens")

    key = jax.random.key(0)
    for epoch in range(1, epochs + 1):
        key, sub = jax.random.split(key)
        order = jax.random.permutation(sub, n)
        total, correct = 0.0, 0
        for start in range(0, n - batch + 1, batch):  # full batches: one compiled shape
            idx = order[start : start + batch]
            loss, right = train_step(model, optimizer, tokens[idx], mask[idx], labels[idx])
            total += float(loss) * batch
            correct += int(right)
        seen = (n // batch) * batch
        print(f"epoch {epoch:2d}  loss {total / seen:.4f}  accuracy {correct / seen:.3f}")


if __name__ == "__main__":
    main()
