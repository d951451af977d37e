"""Attention with FastRPB as one step of a plain NumPy pipeline (no deep-learning framework).

A batch of noisy multichannel signals is standardised with NumPy, passed through
causal linear attention (SIKF feature map) plus a FastRPB term whose table is a
Gaussian smoothing kernel, and the result is fed to a NumPy least-squares readout
that recovers the clean signal. fastrpb takes NumPy arrays and returns NumPy arrays.

The same script runs on a GPU with CuPy by changing the one import marked below
(see cupy_pipeline.py).

Run:  python docs/examples/numpy_pipeline.py           (L = 4096 tokens)
      python docs/examples/numpy_pipeline.py --tiny    (what the tests run)
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as xp  # the only line the CuPy example changes: import cupy as xp

import fastrpb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes: what the tests run")
    args = parser.parse_args()
    batch, L, D, heads = (2, 64, 8, 2) if args.tiny else (8, 4096, 32, 4)
    rng = xp.random.default_rng(0)

    # 1. Data (NumPy): sines of random frequencies plus noise, shape (batch, L, D).
    t = xp.arange(L, dtype=xp.float32)
    freq = 0.002 + 0.02 * rng.random((batch, 1, D), dtype=xp.float32)
    clean = xp.sin(2 * math.pi * freq * t[None, :, None])
    noisy = clean + 0.5 * rng.standard_normal((batch, L, D), dtype=xp.float32)

    # 2. Preprocessing (NumPy): standardise every channel.
    x = (noisy - noisy.mean(axis=1, keepdims=True)) / noisy.std(axis=1, keepdims=True)

    # 3. Attention + FastRPB (fastrpb): heads are just a leading dimension.
    dh = D // heads
    w_qk = rng.standard_normal((2, heads, D, dh), dtype=xp.float32) / math.sqrt(D)
    q, k = x[:, None] @ w_qk[0], x[:, None] @ w_qk[1]  # (batch, heads, L, dh)
    v = xp.reshape(x, (batch, L, heads, dh)).transpose(0, 2, 1, 3)  # channels split over heads
    # A table per head: w[M - 1 + t] weighs offset t = i - j; here a causal Gaussian
    # window of a different width per head (a learned table in a real model).
    offsets = xp.arange(-(L - 1), L, dtype=xp.float32)
    widths = xp.asarray([4.0 * 2**h for h in range(heads)], dtype=xp.float32)[:, None]
    table = xp.exp(-0.5 * (offsets / widths) ** 2) / (widths * math.sqrt(2 * math.pi))  # (heads, 2L - 1)

    start = time.perf_counter()
    attn = fastrpb.linear_attention(q, k, v, feature_map="sikf", causal=True)
    bias = fastrpb.rpb(v, table, causal=True)  # B @ v by FFT: O(L log L)
    features = attn + bias
    elapsed = time.perf_counter() - start
    print(
        f"{type(features).__module__}.{type(features).__name__} {features.shape} {features.dtype}: "
        f"attention + FastRPB on L = {L} tokens in {elapsed * 1e3:.1f} ms"
    )

    # The FFT product equals the dense Toeplitz matrix product (checked on a prefix).
    n = min(L, 512)
    dense = fastrpb.rpb_matrix(table[:, L - n : L + n - 1], n, causal=True) @ v[..., :n, :]
    error = float(xp.max(xp.abs(fastrpb.rpb(v[..., :n, :], table, causal=True) - dense)))
    print(f"max |FFT bias - dense Toeplitz bias| on {n} tokens: {error:.2e}")

    # 4. Readout (NumPy): least squares from [x, attention features] to the clean signal.
    merged = features.transpose(0, 2, 1, 3).reshape(batch, L, D)
    design = xp.concatenate([x, merged, xp.ones((batch, L, 1), dtype=xp.float32)], axis=-1).reshape(batch * L, -1)
    target = clean.reshape(batch * L, D)
    coef, *_ = xp.linalg.lstsq(design, target, rcond=None)
    denoised = design @ coef
    mse_noisy = float(xp.mean((noisy.reshape(batch * L, D) - target) ** 2))
    mse_out = float(xp.mean((denoised - target) ** 2))
    print(f"mean squared error to the clean signal: input {mse_noisy:.4f} -> pipeline {mse_out:.4f}")


if __name__ == "__main__":
    main()
