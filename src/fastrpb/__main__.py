"""python -m fastrpb [demo]: FastRPB against the dense O(L^2) product, on any backend.

Checks the FFT result against the dense Toeplitz product at a small length (float64),
then times FastRPB on a long sequence (default L = 65,536, 8 heads, 64 features,
float32) and prints time and peak extra memory side by side with the dense
alternative: measured where the dense matrix fits, extrapolated (O(L^2)) where it
does not. --backend picks the array library (numpy, torch, jax, cupy) and --device
one of its devices; sizes that cannot fit in memory are refused before anything is
allocated.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from .bias import rpb, rpb_init, rpb_matrix

DENSE_LIMIT_BYTES = 1 << 30  # measure the dense product only while B fits in 1 GiB
BACKENDS = ("numpy", "torch", "jax", "cupy")
CHECK_HEADS, CHECK_FEATURES = 2, 8  # the correctness check's shape (float64)


# --------------------------------------------------------------------------- backends
@dataclass
class Backend:
    """One array library on one device, as the demo uses it."""

    name: str
    version: str
    device: str  # as printed
    asarray: Callable[[np.ndarray], Any]  # a NumPy array onto the device
    to_numpy: Callable[[Any], np.ndarray]
    sync: Callable[[Any], None]  # wait for the result (GPU and JAX are asynchronous)
    free_bytes: Callable[[], int | None]  # memory free on the device, None if unknown
    peak: Callable[[Callable[[], object]], int | None] | None = None  # peak extra bytes of a call


class CLIError(Exception):
    """A one-line error for the user (exit code 2)."""


def _host_free() -> int | None:
    """Available host memory (Linux ``MemAvailable``; else free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _tracemalloc_peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise CLIError(f"--backend {name}: {name} is not installed here ({exc})") from exc


def _numpy(device: str | None) -> Backend:
    if device not in (None, "cpu"):
        raise CLIError(f"--device {device}: NumPy runs on the CPU only (its one device is 'cpu')")
    return Backend(
        "numpy", np.__version__, "cpu", np.asarray, np.asarray, lambda out: None, _host_free, _tracemalloc_peak
    )


def _torch(device: str | None) -> Backend:
    torch = _import("torch")
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, ValueError) as exc:
        raise CLIError(f"--device {device}: not a PyTorch device (cpu, cuda, cuda:N): {exc}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {device}: PyTorch {torch.__version__} sees no CUDA GPU here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: PyTorch sees {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type != "cpu":
        raise CLIError(f"--device {device}: the demo runs PyTorch on cpu or cuda[:N]")

    def sync(out: Any) -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def free() -> int | None:
        return int(torch.cuda.mem_get_info(dev)[0]) if dev.type == "cuda" else _host_free()

    def peak(fn: Callable[[], object]) -> int:
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev) - base)

    return Backend(
        "torch",
        torch.__version__,
        str(dev),
        lambda x: torch.asarray(x, device=dev),
        lambda x: x.cpu().numpy(),
        sync,
        free,
        peak if dev.type == "cuda" else None,  # PyTorch's CPU allocations are invisible to tracemalloc
    )


def _jax(device: str | None) -> Backend:
    jax = _import("jax")
    jax.config.update("jax_enable_x64", True)  # the float64 check
    kind = (device or jax.default_backend()).split(":")[0]
    kind = {"cuda": "gpu"}.get(kind, kind)
    try:
        devices = jax.devices(kind)
    except RuntimeError as exc:
        known = sorted({d.platform for d in jax.devices()})
        raise CLIError(f"--device {device}: JAX has no {kind} device here (it has: {', '.join(known)})") from exc
    index = int(device.split(":")[1]) if device and ":" in device and device.split(":")[1].isdigit() else 0
    if index >= len(devices):
        raise CLIError(f"--device {device}: JAX has {len(devices)} {kind} device(s)")
    dev = devices[index]

    def free() -> int | None:
        if dev.platform == "cpu":
            return _host_free()
        stats = dev.memory_stats() or {}
        limit = stats.get("bytes_limit")
        return None if limit is None else int(limit - stats.get("bytes_in_use", 0))

    return Backend(
        "jax",
        jax.__version__,
        f"{dev.platform}:{dev.id}",
        lambda x: jax.device_put(x, dev),
        np.asarray,
        lambda out: out.block_until_ready(),
        free,
    )


def _cupy(device: str | None) -> Backend:
    cupy = _import("cupy")
    index = 0
    if device is not None:
        text = device.removeprefix("cuda:").removeprefix("gpu:")
        if not text.isdigit():
            raise CLIError(f"--device {device}: a CuPy device is a GPU index (0, 1, ... or cuda:N)")
        index = int(text)
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA runtime errors have no common base class
        raise CLIError(f"--backend cupy: CuPy {cupy.__version__} sees no CUDA GPU here ({exc})") from exc
    if index >= count:
        raise CLIError(f"--device {device}: CuPy sees {count} GPU(s)")
    dev = cupy.cuda.Device(index)

    def asarray(x: np.ndarray) -> Any:
        with dev:
            return cupy.asarray(x)

    def free() -> int | None:
        with dev:
            return int(cupy.cuda.runtime.memGetInfo()[0])

    return Backend(
        "cupy",
        cupy.__version__,
        f"cuda:{index}",
        asarray,
        cupy.asnumpy,
        lambda out: dev.synchronize(),
        free,
    )


def backend(name: str, device: str | None) -> Backend:
    """The backend ``name`` on ``device`` (its default when ``None``); ``CLIError`` if absent."""
    make = {"numpy": _numpy, "torch": _torch, "jax": _jax, "cupy": _cupy}[name]
    return make(device)


# --------------------------------------------------------------------------- measuring
def _measure(be: Backend, fn: Callable[[], Any], repeats: int) -> tuple[float, int | None]:
    """(best wall time in seconds, peak extra bytes of one call or None) of ``fn``."""
    be.sync(fn())  # warm-up: FFT plans, caches, compilation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        be.sync(fn())
        best = min(best, time.perf_counter() - start)
    return best, None if be.peak is None else be.peak(fn)


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 3600:
        return f"{seconds:.2f} s"
    return f"{seconds / 3600:.1f} h"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def _fmt_ratio(r: float | None) -> str:
    """``1,234x`` from 10 up, ``3.5x`` from 1, ``0.48x`` below 1 (a slow-down)."""
    if r is None:
        return "n/a"
    if r >= 10:
        return f"{r:,.0f}x"
    if r >= 1:
        return f"{r:.1f}x"
    return f"{r:.2g}x" if r >= 0.01 else f"{r:.1e}x"


def check_bytes(L: int) -> int:
    """Peak bytes of the dense float64 check: the matrix B (heads, L, L) and its product."""
    return CHECK_HEADS * L * L * 8 + 3 * CHECK_HEADS * L * CHECK_FEATURES * 8


def _lengths(length: int) -> list[int]:
    """The lengths timed: 1,024, 4,096 and 16,384 up to ``length``, and ``length``."""
    return sorted({min(length, n) for n in (1024, 4096, 16384)} | {length})


def demo_bytes(length: int, heads: int, features: int) -> int:
    """Peak bytes of the timings (float32): v and the output plus about 3x v of FFT
    work space, and B and its product where the dense product is measured."""

    def at(L: int) -> int:
        dense = heads * L * L * 4
        return 5 * heads * L * features * 4 + (dense + heads * L * features * 4 if dense <= DENSE_LIMIT_BYTES else 0)

    return max(at(L) for L in _lengths(length))


def _fits(what: str, need: int, be: Backend) -> None:
    free = be.free_bytes()
    if free is not None and need > free:
        raise CLIError(
            f"{what} needs about {_fmt_bytes(need)} but only {_fmt_bytes(free)} is available on {be.device}; "
            "choose a smaller size"
        )


def check(be: Backend, L: int, seed: int) -> float:
    """Largest relative error of FastRPB against the dense product, causal and not (float64)."""
    rng = np.random.default_rng(seed)
    v = be.asarray(rng.standard_normal((CHECK_HEADS, L, CHECK_FEATURES)))
    w = rpb_init(CHECK_HEADS, L, seed=seed, like=v, scale=1.0)
    worst = 0.0
    for causal in (False, True):
        dense = be.to_numpy(rpb_matrix(w, L, causal=causal) @ v)
        fast = be.to_numpy(rpb(v, w, causal=causal))
        worst = max(worst, float(np.max(np.abs(fast - dense)) / np.max(np.abs(dense))))
    return worst


def demo(be: Backend, length: int, heads: int, features: int, repeats: int, seed: int) -> list[dict]:
    """Run the comparison and return one row per sequence length."""
    rows = []
    for L in _lengths(length):
        rng = np.random.default_rng(seed)
        v = be.asarray(rng.standard_normal((heads, L, features), dtype=np.float32))
        w = rpb_init(heads, L, seed=seed, like=v)
        fast_t, fast_m = _measure(be, lambda: rpb(v, w), repeats)  # noqa: B023 - called in this iteration
        dense_bytes = heads * L * L * 4
        row: dict[str, Any] = {
            "L": L,
            "fast_time": fast_t,
            "fast_mem": fast_m,
            "dense_mem": dense_bytes,
            "measured": False,
        }
        if dense_bytes <= DENSE_LIMIT_BYTES:
            row["dense_time"], measured_mem = _measure(be, lambda: rpb_matrix(w, L) @ v, max(1, repeats // 2))  # noqa: B023 - called in this iteration
            row["dense_mem"] = dense_bytes if measured_mem is None else measured_mem
            row["measured"] = True
        rows.append(row)
    # Extrapolate the dense time from the longest measured length: O(L^2) work per head.
    measured = [r for r in rows if r["measured"]]
    for r in rows:
        if not r["measured"]:
            r["dense_time"] = measured[-1]["dense_time"] * (r["L"] / measured[-1]["L"]) ** 2 if measured else None
    return rows


def _table(rows: list[dict]) -> str:
    header = ("L", "FastRPB time", "FastRPB memory", "dense time", "dense memory", "speed-up", "memory saved")
    lines = [header]
    for r in rows:
        mark = "" if r["measured"] else " *"
        dense_t = r["dense_time"]
        lines.append(
            (
                f"{r['L']:,}",
                _fmt_time(r["fast_time"]),
                _fmt_bytes(r["fast_mem"]),
                ("n/a" if dense_t is None else _fmt_time(dense_t)) + mark,
                _fmt_bytes(r["dense_mem"]) + mark,
                _fmt_ratio(None if dense_t is None else dense_t / r["fast_time"]),
                _fmt_ratio(None if r["fast_mem"] is None else r["dense_mem"] / max(r["fast_mem"], 1)),
            )
        )
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# --------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    """Errors on one line (argparse prints the whole usage first), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (python -m fastrpb --help lists the options)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every option's default after its help."""


def _parser() -> _Parser:
    parser = _Parser(prog="python -m fastrpb", description=__doc__, formatter_class=_Formatter)
    parser.add_argument("command", nargs="?", default="demo", help="what to run (the only command is demo)")
    parser.add_argument("--backend", default="numpy", metavar="{" + ",".join(BACKENDS) + "}", help="array library")
    parser.add_argument(
        "--device",
        default=None,
        help="device of the backend: cpu (numpy); cpu, cuda or cuda:N (torch); cpu, gpu or tpu, "
        "optionally :N (jax); a GPU index N or cuda:N (cupy); None: the library's default device",
    )
    parser.add_argument("--length", type=int, default=65536, help="longest sequence length L timed")
    parser.add_argument("--heads", type=int, default=8, help="number of heads timed")
    parser.add_argument("--features", type=int, default=64, help="features per head D timed")
    parser.add_argument(
        "--check-length",
        type=int,
        default=512,
        help="length of the float64 correctness check against the dense matrix (its memory grows as L^2)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per case (the best is reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random values and bias tables")
    return parser


def _options(parser: _Parser, argv: Sequence[str] | None) -> argparse.Namespace:
    args, unknown = parser.parse_known_args(argv)
    options = [o for a in parser._actions for o in a.option_strings]
    for word in unknown:
        if word.startswith("-"):
            guess = difflib.get_close_matches(word.split("=")[0], options, n=1)
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            parser.error(f"unknown option {word}{hint}")
        parser.error(f"unexpected argument {word!r}")
    if args.command != "demo":
        parser.error(f"unknown command {args.command!r}: the only command is demo")
    if args.backend not in BACKENDS:
        parser.error(f"--backend {args.backend}: unknown backend; choose one of {', '.join(BACKENDS)}")
    for name in ("length", "heads", "features", "check_length", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = _options(parser, argv)
    try:
        be = backend(args.backend, args.device)
        _fits(f"--check-length {args.check_length} (the dense float64 check)", check_bytes(args.check_length), be)
        _fits(
            f"--length {args.length} with {args.heads} heads x {args.features} features",
            demo_bytes(args.length, args.heads, args.features),
            be,
        )
    except CLIError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(f"fastrpb demo on {be.name} {be.version} ({be.device}): B @ V with Toeplitz B[i, j] = w(i - j)")
    err = check(be, args.check_length, args.seed)
    status = "OK" if err < 1e-10 else "FAILED"
    print(f"check at L = {args.check_length} (float64, causal and not): max relative error {err:.1e}  [{status}]")
    if status != "OK":
        return 1
    print(f"timing {args.heads} heads x {args.features} features, float32, best of {args.repeats}:\n")
    rows = demo(be, args.length, args.heads, args.features, args.repeats, args.seed)
    print(_table(rows))
    if any(not r["measured"] for r in rows):
        print("\n* dense matrix too large to build here: memory is the size of B, time extrapolated as O(L^2)")
    if be.peak is _tracemalloc_peak:
        print("memory: peak extra bytes allocated during the call (tracemalloc), inputs excluded")
    elif be.peak is not None:
        print("memory: peak extra device bytes allocated during the call, inputs excluded")
    else:
        print(f"memory: not measured on {be.name} ({be.device}); the dense column is the size of B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
