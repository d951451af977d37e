"""Make the figures of the documentation with the library itself.

Run from the repository root (needs matplotlib, in the ``docs`` extra):

    PYTHONPATH=src python docs/figures/make_figures.py

and commit the PNGs it writes next to this file (``--out DIR`` writes elsewhere;
the test suite does that, so the script cannot rot).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import fastrpb

HERE = Path(__file__).resolve().parent


def example_table(M: int, decay: float, period: float, tilt: float) -> np.ndarray:
    """A smooth, asymmetric table of the kind training produces: w[M - 1 + t] for offsets t."""
    t = np.arange(-(M - 1), M, dtype=np.float64)
    return np.exp(-np.abs(t) / decay) * np.cos(2 * np.pi * t / period) + tilt * np.tanh(t / decay)


def main() -> None:
    parser = argparse.ArgumentParser(description="Make the documentation's figures.")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the PNGs (default: next to this script)")
    out_dir = parser.parse_args().out
    M, L = 16, 16
    w = example_table(M, decay=4.0, period=9.0, tilt=0.25)
    # B = B @ I: the library's FFT product applied to the identity gives the matrix itself.
    toeplitz = fastrpb.rpb(np.eye(L), w)
    assert np.allclose(toeplitz, fastrpb.rpb_matrix(w, L))

    H = W = 6
    w_rows = example_table(H, decay=1.5, period=7.0, tilt=0.0)
    w_cols = example_table(W, decay=2.5, period=11.0, tilt=0.3)
    grid_matrix = fastrpb.rpb_nd(np.eye(H * W), [w_rows, w_cols], (H, W))  # (HW, HW)
    centre = (H // 2) * W + W // 2

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.9), gridspec_kw=dict(width_ratios=[1.3, 1, 1, 1]))
    ax = axes[0]
    offsets = np.arange(-(M - 1), M)
    ax.axhline(0, color="0.8", lw=0.8)
    ax.stem(offsets, w, basefmt=" ")
    ax.set(title="(a) bias table $w(t)$, $2M-1$ entries", xlabel="offset $t = i - j$", ylabel="weight")

    kw = dict(cmap="RdBu_r", vmin=-np.abs(toeplitz).max(), vmax=np.abs(toeplitz).max())
    axes[1].imshow(toeplitz, **kw)
    axes[1].set(title=f"(b) Toeplitz $B_{{ij}} = w(i-j)$, L = {L}", xlabel="key $j$", ylabel="query $i$")

    lim = np.abs(grid_matrix).max()
    axes[2].imshow(grid_matrix, cmap="RdBu_r", vmin=-lim, vmax=lim)
    axes[2].set(title=f"(c) 2-d bias on a {H}x{W} grid: $B$", xlabel="key pixel (row-major)", ylabel="query pixel")

    im = axes[3].imshow(grid_matrix[centre].reshape(H, W), cmap="RdBu_r", vmin=-lim, vmax=lim)
    axes[3].plot(W // 2, H // 2, "k+", ms=12, mew=2)
    axes[3].set(title="(d) row of (c) for the + pixel", xlabel="column", ylabel="row")
    fig.colorbar(im, ax=axes[3], fraction=0.046)
    fig.tight_layout()
    out = out_dir / "fastrpb_bias.png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
