"""The backends of the shared test matrix.

Each test body is written once and receives a ``Backend``: it builds its inputs in
NumPy (float64, the oracle's precision) and moves them with ``backend.asarray``;
results come back with ``backend.to_numpy``. ``FASTRPB_BACKENDS`` (comma separated)
chooses backends; a backend asked for by name but not importable is an error, not a
skip, so CI can never lose one silently. GPU backends are skipped, with the reason,
on machines without a GPU unless named explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

CPU_BACKENDS = ("numpy", "array_api_strict", "torch", "jax")
GPU_BACKENDS = ("torch_cuda", "jax_gpu", "cupy")
ALL_BACKENDS = CPU_BACKENDS + GPU_BACKENDS

DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclass
class Backend:
    """One (library, device) pair of the matrix."""

    name: str
    xp: Any
    device: Any
    dtypes: tuple[str, ...]
    jit: Callable | None = None  # jax.jit-like transformation, where the library has one
    grad: str | None = None  # "torch" or "jax": how to differentiate on this backend
    native: Any = field(default=None, repr=False)  # the framework module itself

    def dtype(self, name: str) -> Any:
        return getattr(self.xp, name)

    def asarray(self, x: Any, dtype: str | None = "float64") -> Any:
        """Move a NumPy array (or nested sequence) to this backend and device."""
        arr = np.asarray(x)
        if dtype is None:
            return self.xp.asarray(arr, device=self.device)
        if dtype == "bfloat16":
            # NumPy has no bfloat16: go through float32 on the backend.
            return self.xp.astype(self.xp.asarray(arr.astype(np.float32), device=self.device), self.xp.bfloat16)
        return self.xp.asarray(arr.astype(dtype), device=self.device)

    def to_numpy(self, x: Any) -> np.ndarray:
        """Bring an array back to NumPy (half precision widened to float32)."""
        xp = self.xp
        if xp.isdtype(x.dtype, "real floating") and x.dtype not in (xp.float32, xp.float64):
            x = xp.astype(x, xp.float32)
        if self.name.startswith("torch"):
            return x.detach().cpu().numpy()
        if self.name == "cupy":
            return x.get()
        if self.name == "array_api_strict":
            return np.from_dlpack(x)
        return np.asarray(x)

    def namespace_of(self, x: Any) -> Any:
        import array_api_compat

        return array_api_compat.array_namespace(x)


def _make(name: str) -> Backend:
    if name == "numpy":
        import array_api_compat.numpy as xp

        return Backend(name, xp, "cpu", DTYPES[:3], native=np)
    if name == "array_api_strict":
        import array_api_strict as xp

        return Backend(name, xp, xp.Device("CPU_DEVICE"), DTYPES[:2], native=xp)  # the standard has no float16
    if name in ("torch", "torch_cuda"):
        import array_api_compat.torch as xp
        import torch

        device = torch.device("cuda" if name == "torch_cuda" else "cpu")
        if name == "torch_cuda" and not torch.cuda.is_available():
            raise _NoGPU("PyTorch sees no CUDA device")
        return Backend(name, xp, device, DTYPES, grad="torch", native=torch)
    if name in ("jax", "jax_gpu"):
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as xp

        if name == "jax_gpu":
            gpus = [d for d in jax.devices() if d.platform == "gpu"] if _jax_has_gpu(jax) else []
            if not gpus:
                raise _NoGPU("JAX sees no GPU")
            device = gpus[0]
        else:
            device = jax.devices("cpu")[0]
        return Backend(name, xp, device, DTYPES, jit=jax.jit, grad="jax", native=jax)
    if name == "cupy":
        try:
            import cupy
        except ImportError as exc:
            raise _NoGPU(f"CuPy is not installed ({exc})") from exc
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001 - any CUDA failure means no usable GPU
            raise _NoGPU(f"CuPy finds no CUDA device ({exc})") from exc
        import array_api_compat.cupy as xp

        return Backend(name, xp, cupy.cuda.Device(0), DTYPES[:3], native=cupy)
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(ALL_BACKENDS)}")


def _jax_has_gpu(jax: Any) -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


class _NoGPU(Exception):
    """A GPU backend cannot run on this machine."""


def requested() -> tuple[tuple[str, ...], bool]:
    """(backend names, whether they were named explicitly by FASTRPB_BACKENDS)."""
    raw = os.environ.get("FASTRPB_BACKENDS", "").strip()
    if not raw or raw == "all":
        return ALL_BACKENDS, False
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    unknown = [n for n in names if n not in ALL_BACKENDS]
    if unknown:
        raise ValueError(f"FASTRPB_BACKENDS names unknown backends {unknown}; known: {', '.join(ALL_BACKENDS)}")
    return names, True


def load(name: str, explicit: bool) -> tuple[Backend | None, str | None]:
    """Return (backend, None) or (None, reason to skip). Missing CPU libraries raise."""
    try:
        return _make(name), None
    except _NoGPU as exc:
        if explicit:
            raise RuntimeError(f"backend {name!r} was requested by FASTRPB_BACKENDS but cannot run: {exc}") from exc
        return None, f"{name}: {exc}"
    except ImportError as exc:
        raise RuntimeError(
            f"backend {name!r} is part of the test matrix but its library is not installed ({exc}); "
            "install the test dependencies (see README) or narrow FASTRPB_BACKENDS"
        ) from exc


def tolerance(dtype: str) -> dict[str, float]:
    """Tolerances against a float64 oracle, from the dtype's precision."""
    return {
        "float64": dict(rtol=1e-10, atol=1e-10),
        "float32": dict(rtol=1e-4, atol=1e-4),
        "float16": dict(rtol=2e-2, atol=2e-2),
        "bfloat16": dict(rtol=5e-2, atol=5e-2),
    }[dtype]


def assert_close(backend: Backend, actual: Any, expected: np.ndarray, dtype: str, *, scale: float | None = None) -> None:
    """Compare a backend result with a float64 NumPy oracle, tolerance from ``dtype``.

    The absolute tolerance is relative to ``scale`` (default: the oracle's largest
    magnitude), so long sums are judged by the precision of the dtype, not by luck.
    """
    got = backend.to_numpy(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, f"shape {got.shape} != expected {expected.shape}"
    tol = tolerance(dtype)
    if scale is None:
        scale = float(np.max(np.abs(expected))) if expected.size else 1.0
    np.testing.assert_allclose(got, expected, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-30))
