"""Benchmark backends: one (library, device) pair each, with the hooks timing needs.

A backend knows how to make random inputs directly in the compute dtype (no
float64 detour that would inflate peak memory), how to wait for queued work
(``sync``: CUDA streams, JAX's asynchronous dispatch), how to compile a function
(``jax.jit`` on JAX, identity elsewhere) and, on GPUs, how to read the framework
allocator's peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

CPU = ("numpy", "torch", "jax")
GPU = ("torch_cuda", "jax_gpu", "cupy")
ALL = CPU + GPU


class Unavailable(Exception):
    """The backend cannot run here (library missing, no GPU)."""


@dataclass
class Bench:
    name: str
    xp: Any  # the array API namespace (array-api-compat wrapped where needed)
    native: Any  # the framework module (numpy, torch, jax)
    device: Any
    gpu: bool
    sync: Callable[[Any], None]
    compile: Callable[[Callable], Callable] = lambda f: f
    extra: dict = field(default_factory=dict)

    def random(self, shape: tuple[int, ...], *, seed: int, dtype: str, scale: float = 1.0) -> Any:
        """Standard normal samples on this backend, generated in ``dtype`` directly."""
        np_dtype = np.float64 if dtype == "float64" else np.float32
        host = np.random.default_rng(seed).standard_normal(shape, dtype=np_dtype)
        if scale != 1.0:
            host *= np_dtype(scale)
        if self.name == "numpy":
            out = host
        elif self.name.startswith("torch"):
            out = self.native.from_numpy(host).to(self.device)
        elif self.name.startswith("jax"):
            out = self.native.device_put(host, self.device)
        else:  # cupy
            out = self.native.asarray(host)
        if dtype in ("float16", "bfloat16"):
            out = self.xp.astype(out, getattr(self.xp, dtype))
        return out

    def to_numpy(self, x: Any) -> np.ndarray:
        if self.name.startswith("torch"):
            return x.detach().float().cpu().numpy() if x.dtype != self.native.float64 else x.detach().cpu().numpy()
        if self.name == "cupy":
            return x.get()
        return np.asarray(x, dtype=np.float64 if x.dtype == np.float64 else np.float32)

    # ------------------------------------------------------------- GPU allocator
    def gpu_memory_reset(self) -> int:
        """Reset the allocator's peak; return the bytes in use now."""
        if self.name == "torch_cuda":
            self.native.cuda.synchronize()
            self.native.cuda.reset_peak_memory_stats(self.device)
            return int(self.native.cuda.memory_allocated(self.device))
        if self.name == "jax_gpu":
            stats = self.device.memory_stats() or {}
            return int(stats.get("bytes_in_use", 0))
        if self.name == "cupy":
            pool = self.native.get_default_memory_pool()
            pool.free_all_blocks()
            return int(pool.used_bytes())
        return 0

    def gpu_memory_peak(self) -> int:
        """Peak bytes held by the allocator since ``gpu_memory_reset``."""
        if self.name == "torch_cuda":
            self.native.cuda.synchronize()
            return int(self.native.cuda.max_memory_allocated(self.device))
        if self.name == "jax_gpu":
            # XLA cannot reset its peak: this is the process peak, which the
            # separate process per case keeps meaningful.
            stats = self.device.memory_stats() or {}
            return int(stats.get("peak_bytes_in_use", 0))
        if self.name == "cupy":
            # the pool keeps every block it allocated until free_all_blocks()
            return int(self.native.get_default_memory_pool().total_bytes())
        return 0


def _jax_sync(out: Any) -> None:
    import jax

    jax.block_until_ready(out)


def load(name: str, dtype: str = "float32") -> Bench:
    """Make backend ``name`` or raise ``Unavailable`` with the reason."""
    if name == "numpy":
        import array_api_compat.numpy as xp

        return Bench(name, xp, np, "cpu", False, sync=lambda out: None)
    if name in ("torch", "torch_cuda"):
        try:
            import array_api_compat.torch as xp
            import torch
        except ImportError as exc:
            raise Unavailable(f"PyTorch is not installed ({exc})") from exc
        if name == "torch_cuda":
            if not torch.cuda.is_available():
                raise Unavailable("PyTorch sees no CUDA device")
            device = torch.device("cuda")

            def sync(out: Any) -> None:
                torch.cuda.synchronize()

            return Bench(name, xp, torch, device, True, sync=sync)
        return Bench(name, xp, torch, torch.device("cpu"), False, sync=lambda out: None)
    if name in ("jax", "jax_gpu"):
        try:
            import jax
        except ImportError as exc:
            raise Unavailable(f"JAX is not installed ({exc})") from exc
        if dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        import jax.numpy as xp

        if name == "jax_gpu":
            try:
                gpus = jax.devices("gpu")
            except RuntimeError:
                gpus = []
            if not gpus:
                raise Unavailable("JAX sees no GPU")
            device = gpus[0]
        else:
            device = jax.devices("cpu")[0]
        return Bench(name, xp, jax, device, name == "jax_gpu", sync=_jax_sync, compile=jax.jit)
    if name == "cupy":
        try:
            import cupy
        except ImportError as exc:
            raise Unavailable(f"CuPy is not installed ({exc})") from exc
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001 - any CUDA failure means no GPU
            raise Unavailable(f"CuPy finds no CUDA device ({exc})") from exc
        import array_api_compat.cupy as xp

        def sync(out: Any) -> None:
            cupy.cuda.get_current_stream().synchronize()

        return Bench(name, xp, cupy, cupy.cuda.Device(0), True, sync=sync)
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(ALL)}")


def available(names: tuple[str, ...], dtype: str) -> tuple[dict[str, Bench], dict[str, str]]:
    """Load the named backends; return (loaded, {name: reason skipped})."""
    loaded, skipped = {}, {}
    for name in names:
        try:
            loaded[name] = load(name, dtype)
        except Unavailable as exc:
            skipped[name] = str(exc)
    return loaded, skipped
