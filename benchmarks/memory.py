"""Peak memory of one case on one backend, in a process of its own.

Run by the harness as ``python -m benchmarks.memory SPEC_JSON``; prints one JSON line
per (L, variant). A fresh process per case keeps one case's caches and freed-but-kept
memory out of another's numbers.

- CPU: the extra resident memory of the call, ``VmHWM - VmRSS`` where the
  high-water mark is reset just before the call (``/proc/self/clear_refs``), inputs
  already allocated; the output, which the call allocates, is included. The process
  starts with ``MALLOC_MMAP_THRESHOLD_`` fixed so large buffers are mapped and
  unmapped, not recycled invisibly by the C heap. Without /proc (macOS) the fallback
  is ``ru_maxrss`` growth, which only sees new highs.
- GPU: the framework allocator's own peak (``torch.cuda.max_memory_allocated``,
  JAX ``memory_stats()['peak_bytes_in_use']``, CuPy's pool size) minus what was in
  use before the call.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys


def status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or ``None`` off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); ``False`` where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure_call(bench, fn, warm_up: bool = True) -> dict:
    if warm_up:  # compile (jax.jit), plan, load code, on the same inputs
        out = fn()
        bench.sync(out)
        del out
    gc.collect()
    if bench.gpu:
        before = bench.gpu_memory_reset()
        out = fn()
        bench.sync(out)
        peak = bench.gpu_memory_peak()
        del out
        return {"extra_bytes": max(0, peak - before), "method": f"{bench.name} allocator peak"}
    if reset_peak_rss() and status_kb("VmRSS") is not None:
        before = status_kb("VmRSS") * 1024
        out = fn()
        bench.sync(out)
        peak = status_kb("VmHWM") * 1024
        del out
        return {"extra_bytes": max(0, peak - before), "method": "RSS high-water mark (clear_refs)"}
    before = _maxrss_bytes()
    out = fn()
    bench.sync(out)
    peak = _maxrss_bytes()
    del out
    return {"extra_bytes": max(0, peak - before), "method": "ru_maxrss growth (a lower bound)"}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    from backends_tests.backends import make

    from .cases import CASES

    bench = make(spec["backend"], x64=spec["dtype"] == "float64")
    if os.environ.get("FASTRPB_BENCH_THREADS") and bench.name.startswith("torch"):
        bench.native.set_num_threads(int(os.environ["FASTRPB_BENCH_THREADS"]))
    case = CASES[spec["case"]]
    for i, L in enumerate(sorted(spec["sizes"])):
        built = case.build(bench, L, spec["dtype"], cap_bytes=spec["cap_bytes"], quick=spec["quick"])
        for variant in built.variants:
            if not variant.memory or variant.name not in spec["variants"]:
                continue
            # JAX compiles per shape: always warm up. Eager libraries have loaded their
            # code at the first (smallest) size; a warm-up of a long case doubles its cost.
            warm_up = i == 0 or bench.name.startswith("jax") or L <= 4096
            result = measure_call(bench, variant.fn, warm_up)
            result.update(L=L, variant=variant.name, values_bytes=built.values_bytes)
            print(json.dumps(result), flush=True)
        del built
        gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
