"""``python -m fastrpb [demo]``: FastRPB on NumPy against the dense O(L^2) product.

Checks the FFT result against the dense Toeplitz product at a small length, then
times FastRPB on a long sequence (default L = 65,536, 8 heads, 64 features) and
prints time and peak extra memory side by side with the dense alternative: measured
where the dense matrix fits, extrapolated (O(L^2)) where it does not.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence

import numpy as np

from .bias import rpb, rpb_init, rpb_matrix

DENSE_LIMIT_BYTES = 1 << 30  # measure the dense product only while B fits in 1 GiB


def _measure(fn: Callable[[], object], repeats: int) -> tuple[float, int]:
    """(best wall time in seconds, peak extra bytes allocated) of ``fn``."""
    fn()  # warm-up: FFT plans, caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return best, peak


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 3600:
        return f"{seconds:.2f} s"
    return f"{seconds / 3600:.1f} h"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def check(L: int, heads: int, features: int, seed: int) -> float:
    """Largest relative error of FastRPB against the dense product, causal and not."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((heads, L, features))
    w = rpb_init(heads, L, seed=seed, like=v, scale=1.0)
    worst = 0.0
    for causal in (False, True):
        dense = rpb_matrix(w, L, causal=causal) @ v
        fast = rpb(v, w, causal=causal)
        worst = max(worst, float(np.max(np.abs(fast - dense)) / np.max(np.abs(dense))))
    return worst


def demo(length: int, heads: int, features: int, check_length: int, repeats: int, seed: int) -> list[dict]:
    """Run the comparison and return one row per sequence length."""
    rows = []
    lengths = sorted({min(length, n) for n in (1024, 4096, 16384)} | {length})
    for L in lengths:
        rng = np.random.default_rng(seed)
        v = rng.standard_normal((heads, L, features), dtype=np.float32)
        w = rpb_init(heads, L, seed=seed, like=v)
        fast_t, fast_m = _measure(lambda: rpb(v, w), repeats)  # noqa: B023 - called in this iteration
        dense_bytes = heads * L * L * v.itemsize
        row = {"L": L, "fast_time": fast_t, "fast_mem": fast_m, "dense_mem": dense_bytes, "measured": False}
        if dense_bytes <= DENSE_LIMIT_BYTES:
            row["dense_time"], row["dense_mem"] = _measure(lambda: rpb_matrix(w, L) @ v, max(1, repeats // 2))  # noqa: B023 - called in this iteration
            row["measured"] = True
        rows.append(row)
    # Extrapolate the dense time from the longest measured length: O(L^2) work per head.
    measured = [r for r in rows if r["measured"]]
    for r in rows:
        if not r["measured"] and measured:
            ref = measured[-1]
            r["dense_time"] = ref["dense_time"] * (r["L"] / ref["L"]) ** 2
    return rows


def _table(rows: list[dict]) -> str:
    header = ("L", "FastRPB time", "FastRPB memory", "dense time", "dense memory", "speed-up", "memory saved")
    lines = [header]
    for r in rows:
        mark = "" if r["measured"] else " *"
        lines.append(
            (
                f"{r['L']:,}",
                _fmt_time(r["fast_time"]),
                _fmt_bytes(r["fast_mem"]),
                _fmt_time(r["dense_time"]) + mark,
                _fmt_bytes(r["dense_mem"]) + mark,
                f"{r['dense_time'] / r['fast_time']:,.0f}x",
                f"{r['dense_mem'] / max(r['fast_mem'], 1):,.0f}x",
            )
        )
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastrpb", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="demo", choices=["demo"], help="what to run (default: demo)")
    parser.add_argument("--length", type=int, default=65536, help="longest sequence length L (default 65536)")
    parser.add_argument("--heads", type=int, default=8, help="number of heads (default 8)")
    parser.add_argument("--features", type=int, default=64, help="features per head D (default 64)")
    parser.add_argument("--check-length", type=int, default=512, help="length of the dense correctness check")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per case (best is reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("length", "heads", "features", "check_length", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    print(f"fastrpb demo on NumPy {np.__version__}: B @ V with Toeplitz B[i, j] = w(i - j)")
    err = check(args.check_length, 2, 8, args.seed)
    status = "OK" if err < 1e-10 else "FAILED"
    print(f"check at L = {args.check_length} (float64, causal and not): max relative error {err:.1e}  [{status}]")
    if status != "OK":
        return 1
    print(f"timing {args.heads} heads x {args.features} features, float32, best of {args.repeats}:\n")
    rows = demo(args.length, args.heads, args.features, args.check_length, args.repeats, args.seed)
    print(_table(rows))
    if any(not r["measured"] for r in rows):
        print("\n* dense matrix too large to build here: memory is the size of B, time extrapolated as O(L^2)")
    print("memory: peak extra bytes allocated during the call (tracemalloc), inputs excluded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
