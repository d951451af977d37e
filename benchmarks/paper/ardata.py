"""Autoregressive Fashion-MNIST: the settings and the data (quantised images, sample codes).

Shared by the run (``autoregressive.py``) and its report (``arreport.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

__all__ = ["ARSettings", "FULL", "QUICK", "quantise", "load", "encode_samples", "decode_samples"]


@dataclass(frozen=True)
class ARSettings:
    # --- data
    side: int = 28  # image side after average pooling (28: the full 784 pixels)
    levels: int = 16  # intensity levels per pixel (8-bit would be 256)
    train: int = 10_000
    test: int = 100
    data_seed: int = 1234
    # --- model (identical for every variant)
    d_model: int = 32
    heads: int = 2
    layers: int = 2
    d_ff: int = 64
    chunk_size: int = 64
    # --- optimisation (identical for every variant)
    steps: int = 200
    batch: int = 4
    lr: float = 3e-3
    warmup: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0
    # --- evaluation and sampling
    eval_batch: int = 10
    gen_images: int = 8
    # --- execution (does not change results, so not hashed)
    threads: int = 1

    UNHASHED = ("threads",)

    def hashed(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.UNHASHED}


FULL = ARSettings()
QUICK = ARSettings(
    side=7,
    levels=4,
    train=200,
    test=16,
    d_model=16,
    heads=2,
    layers=1,
    d_ff=32,
    chunk_size=16,
    steps=20,
    batch=8,
    lr=1e-2,
    eval_batch=8,
    gen_images=2,
)


def quantise(images: np.ndarray, side: int, levels: int) -> np.ndarray:
    """``(N, 784)`` uint8 -> ``(N, side * side)`` int64 levels in ``[0, levels)``.

    Average pooling over ``28 / side`` square blocks, then ``level = value * levels // 256``.
    """
    if 28 % side:
        raise ValueError(f"side must divide 28, got {side}")
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be in [2, 256], got {levels}")
    f = 28 // side
    x = images.reshape(-1, side, f, side, f).astype(np.float64).mean(axis=(2, 4))
    q = np.floor(x * levels / 256.0).astype(np.int64)
    return np.clip(q, 0, levels - 1).reshape(len(images), side * side)


def load(s: ARSettings) -> tuple[np.ndarray, np.ndarray]:
    from .data import fashion_mnist_subset

    xtr, _ = fashion_mnist_subset("train", s.train, seed=s.data_seed)
    xte, _ = fashion_mnist_subset("test", s.test, seed=s.data_seed + 1)
    return quantise(xtr, s.side, s.levels), quantise(xte, s.side, s.levels)


def encode_samples(samples: np.ndarray, levels: int) -> list[str]:
    """Images of levels as hex strings, one per image (one digit per pixel up to 16 levels, else two)."""
    w = 1 if levels <= 16 else 2
    return ["".join(f"{int(p):0{w}x}" for p in img) for img in samples]


def decode_samples(hexes: list[str], levels: int) -> np.ndarray:
    w = 1 if levels <= 16 else 2
    return np.array([[int(h[i : i + w], 16) for i in range(0, len(h), w)] for h in hexes], dtype=np.int64)
