"""The machine and the versions a benchmark ran on: one helper for every report.

``python -m benchmarks`` and ``python -m benchmarks.paper`` store both in their JSON
(``machine``, ``versions``) so a number can always be traced to where it came from.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as _dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# distributions reported when installed (CuPy ships under its CUDA version's name)
PACKAGES = (
    "numpy",
    "scipy",
    "torch",
    ("jax",),
    "jaxlib",
    ("cupy", "cupy-cuda12x", "cupy-cuda11x"),
    "flax",
    "optax",
    "array-api-compat",
    "array-api-extra",
    "tqdm",
    "matplotlib",
)


def keep_freed_memory() -> bool:
    """Let glibc's ``malloc`` keep freed memory for reuse in this process (the timing
    one, called before any library starts a thread): one arena, buffers up to 256 MiB
    from the heap, trimmed only past 1 GiB.

    By default glibc adapts its mmap threshold to the sizes freed so far and gives
    each thread an arena of its own, so whether a call's temporaries are reused or
    mapped and page-faulted in afresh on every call depends on the process's history:
    with JAX (which allocates with ``malloc`` on the CPU) the same non-causal call at
    L = 4,096 took 5.6 ms in one process and 16.5 ms in the next, every round (3 of 6
    harness processes). Measured in one process, one core, ms and minor page faults
    per call, non-causal / causal: default 5.7 / 12.0 ms, no faults (16.6 / 24.3 ms
    and 6,145 / 7,118 faults in other histories); thresholds only (no arena limit)
    12.8 / 21.0 ms, 4,097 / 5,070 faults; with the arena limit 5.7-6.1 / 12.0-12.2 ms,
    no faults after a 512 MiB buffer was freed or not (2026-12-01). PyTorch's and
    CuPy's caching allocators keep their memory already. Returns whether the settings
    took (glibc only; the peak-memory processes set their own, opposite, threshold).
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # <malloc.h>
    return all(
        mallopt(option, value) == 1
        for option, value in ((m_arena_max, 1), (m_mmap_threshold, 256 << 20), (m_trim_threshold, 1 << 30))
    )


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _first_line(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """CPU, cores (all and usable), memory, platform, Python, GPU, load average now."""
    info: dict[str, Any] = dict(
        date_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        cpu=_first_line("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        logical_cpus=os.cpu_count(),
        platform=platform.platform(),
        machine=platform.machine(),
        python=platform.python_version(),
        load_average_start=load_average(),
    )
    with contextlib.suppress(AttributeError):  # not on Linux
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    mem_kb = _first_line("/proc/meminfo", "MemTotal")
    if mem_kb:
        info["memory_gib"] = round(int(mem_kb.split()[0]) / 2**20, 1)
    torch = sys.modules.get("torch")  # only if the run uses it: importing it costs seconds
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions(packages: tuple = PACKAGES) -> dict[str, Any]:
    """Python, fastrpb and every installed package of ``packages``; the git commit."""
    import fastrpb

    out: dict[str, Any] = {"python": platform.python_version(), "fastrpb": fastrpb.__version__}
    for names in packages:
        names = (names,) if isinstance(names, str) else names
        for dist in names:
            try:
                out[names[0]] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    root = Path(__file__).resolve().parents[1]
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if commit:
            out["git_commit"] = commit
            out["git_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):  # pragma: no cover
        pass
    return out


def describe_versions(v: dict[str, Any]) -> str:
    """``numpy 2.1, torch 2.13, ...; git commit `abc1234567` (uncommitted changes)``."""
    text = ", ".join(f"{k} {val}" for k, val in v.items() if k not in ("git_commit", "git_dirty") and val)
    if v.get("git_commit"):
        text += f"; git commit `{v['git_commit'][:10]}`" + (" (uncommitted changes)" if v.get("git_dirty") else "")
    return text
