"""The backends of the shared test matrix, also the benchmarks' registry.

Each test body is written once and receives a ``Backend``: it builds its inputs in
NumPy (float64, the oracle's precision) and moves them with ``backend.asarray``;
results come back with ``backend.to_numpy`` and are judged by ``assert_close``, which
checks library, dtype, device, shape and values in one call. ``FASTRPB_BACKENDS``
(comma separated) chooses backends; a backend asked for by name but not importable
is an error, not a skip, so CI can never lose one silently. GPU backends are
left out of the matrix, with the reason in the report header, on machines without a GPU
unless named explicitly.

What a backend can do (``jit``, ``grad``, ``fft``, ``gpu``, a second device, its
dtypes) is declared here once; ``conftest.py`` turns the markers of the same names
into skips with the reason. ``benchmarks/`` loads its backends from here too
(``make``), with the hooks timing needs (``sync``, ``compile``, ``random``, the GPU
allocator's peak).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    gpu: bool = False  # the device is a GPU
    other_device: Any = None  # a second device of the same library, where there is one
    _jitted: dict = field(default_factory=dict, repr=False)  # Backend.call's compiled functions

    def dtype(self, name: str) -> Any:
        return getattr(self.xp, name)

    @property
    def fft(self) -> bool:
        """Whether the namespace has the (optional) FFT extension of the standard."""
        return hasattr(self.xp, "fft")

    @property
    def compile(self) -> Callable[[Callable], Callable]:
        """``jit`` where the library has one, the identity elsewhere (benchmarks)."""
        return self.jit if self.jit is not None else (lambda f: f)

    def call(self, fn: Callable[..., Any], *arrays: Any, **options: Any) -> Any:
        """``fn(*arrays, **options)``, as one compiled program where the library has a
        jit (JAX): ``arrays`` traced, ``options`` fixed.

        Eager JAX compiles each operation for every new shape and dtype (about 60 ms
        each on 2 cores; a causal call has about 140): one jitted call compiles once,
        4-5x faster for a test whose shapes are new. For tests of what is laid out from
        the shapes alone (chunks, blocks, states), the same eagerly and traced; the
        eager path keeps its own tests.
        """
        if self.jit is None:
            return fn(*arrays, **options)
        try:  # one jitted function per (fn, options): later calls of its shapes reuse it
            key = (fn, tuple(sorted(options.items())))
            jitted = self._jitted.get(key)
        except TypeError:  # an unhashable option (an array): compiled for this call
            key, jitted = None, None
        if jitted is None:
            jitted = self.jit(functools.partial(fn, **options))
            if key is not None:
                self._jitted[key] = jitted
        return jitted(*arrays)

    def foreign(self, x: Any) -> Any:
        """``x`` (NumPy) as an array of another library than this backend's."""
        xn = np.asarray(x)
        if self.name == "numpy":
            import array_api_strict

            return array_api_strict.asarray(xn)
        return xn

    def gradient(self, f: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
        """Gradients of the scalar ``f(*args)`` with respect to every argument."""
        if self.grad == "torch":
            xs = [a.detach().clone().requires_grad_(True) for a in args]
            grads = self.native.autograd.grad(f(*xs), xs, allow_unused=True)
            return tuple(self.native.zeros_like(x) if g is None else g for x, g in zip(xs, grads, strict=True))
        if self.grad == "jax":
            return tuple(self.native.grad(f, argnums=tuple(range(len(args))))(*args))
        raise RuntimeError(f"{self.name} has no automatic differentiation (mark the test @pytest.mark.grad)")

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

    def device_of(self, x: Any) -> Any:
        import array_api_compat

        return array_api_compat.device(x)

    # ------------------------------------------------------------- benchmark hooks
    def random(self, shape: tuple[int, ...], *, seed: int, dtype: str, scale: float = 1.0) -> Any:
        """Standard normal samples on this backend, generated in ``dtype`` directly.

        No float64 detour that would inflate a benchmark's peak memory.
        """
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
        else:
            out = self.xp.asarray(host, device=self.device)
        if dtype in ("float16", "bfloat16"):
            out = self.xp.astype(out, getattr(self.xp, dtype))
        return out

    def sync(self, out: Any) -> None:
        """Wait for the queued work that produces ``out`` (CUDA streams, JAX dispatch)."""
        if self.name.startswith("jax"):
            self.native.block_until_ready(out)
        elif self.name == "torch_cuda":
            self.native.cuda.synchronize()
        elif self.name == "cupy":
            self.native.cuda.get_current_stream().synchronize()

    def gpu_memory_reset(self) -> int:
        """Reset the allocator's peak; return the bytes in use now (0 off GPU)."""
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
        """Peak bytes held by the allocator since ``gpu_memory_reset`` (0 off GPU)."""
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


def make(name: str, *, x64: bool = True) -> Backend:
    """Backend ``name``; raises ``Unavailable`` (no GPU) or ``ImportError`` (no library).

    ``x64=False`` leaves JAX in its default 32-bit mode (the benchmarks in float32).
    """
    if name == "numpy":
        import array_api_compat.numpy as xp

        return Backend(name, xp, "cpu", DTYPES[:3], native=np)
    if name == "array_api_strict":
        import array_api_strict as xp

        # the standard has no float16; array-api-strict simulates a second device
        return Backend(name, xp, xp.Device("CPU_DEVICE"), DTYPES[:2], native=xp, other_device=xp.Device("device1"))
    if name in ("torch", "torch_cuda"):
        import array_api_compat.torch as xp
        import torch

        if name == "torch_cuda":
            if not torch.cuda.is_available():
                raise _NoGPU("PyTorch sees no CUDA device")
            # with its index: results report cuda:0, and cuda != cuda:0 for torch
            device = torch.device("cuda", torch.cuda.current_device())
            return Backend(
                name, xp, device, DTYPES, grad="torch", native=torch, gpu=True, other_device=torch.device("cpu")
            )
        return Backend(name, xp, torch.device("cpu"), DTYPES, grad="torch", native=torch)
    if name in ("jax", "jax_gpu"):
        import jax

        if x64:
            jax.config.update("jax_enable_x64", True)
        import jax.numpy as xp

        if name == "jax_gpu":
            gpus = [d for d in jax.devices() if d.platform == "gpu"] if _jax_has_gpu(jax) else []
            if not gpus:
                raise _NoGPU("JAX sees no GPU")
            device = gpus[0]
        else:
            device = jax.devices("cpu")[0]
        return Backend(name, xp, device, DTYPES, jit=jax.jit, grad="jax", native=jax, gpu=name == "jax_gpu")
    if name == "cupy":
        try:
            import cupy
        except ImportError as exc:
            raise _NoGPU(f"CuPy is not installed ({exc})") from exc
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:
            raise _NoGPU(f"CuPy finds no CUDA device ({exc})") from exc
        import array_api_compat.cupy as xp

        return Backend(name, xp, cupy.cuda.Device(0), DTYPES[:3], native=cupy, gpu=True)
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(ALL_BACKENDS)}")


def _jax_has_gpu(jax: Any) -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


class Unavailable(Exception):
    """A backend cannot run on this machine (its library is missing, no GPU)."""


class _NoGPU(Unavailable):
    """A GPU backend cannot run on this machine."""


_make = make  # the name before the benchmarks shared this registry


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
        return make(name), None
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


def assert_array(backend: Backend, actual: Any, dtype: str, *, shape: tuple[int, ...] | None = None) -> None:
    """``actual`` is an array of ``backend``'s library, on its device, of ``dtype``.

    The checks of ``assert_close`` without the values: for results that have no
    oracle (a decoding state, random draws).
    """
    try:
        xp = backend.namespace_of(actual)
    except TypeError as exc:
        raise AssertionError(f"expected an array of {backend.name}, got {type(actual).__name__}") from exc
    assert xp is backend.xp, f"result is an array of {xp.__name__}, expected {backend.xp.__name__} ({backend.name})"
    assert actual.dtype == backend.dtype(dtype), f"dtype {actual.dtype} != expected {dtype}"
    device = backend.device_of(actual)
    assert device == backend.device, f"result on device {device}, expected {backend.device}"
    if shape is not None:
        assert tuple(actual.shape) == tuple(shape), f"shape {tuple(actual.shape)} != expected {tuple(shape)}"


def assert_close(
    backend: Backend,
    actual: Any,
    expected: Any,
    dtype: str,
    *,
    scale: float | None = None,
    expected_dtype: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Compare a backend result with a float64 oracle, in the spirit of ``xp_assert_close``.

    Checks, in one call, that ``actual`` is an array of the backend's library
    (namespace), on the backend's device, of dtype ``expected_dtype`` (default:
    ``dtype``, the input dtype the test says), of the oracle's shape, and that its
    values are within the tolerance of ``dtype`` (``tolerance``; ``rtol``/``atol``
    override it). The absolute tolerance is relative to ``scale`` (default: the
    oracle's largest magnitude), so long sums are judged by the precision of the
    dtype, not by luck. ``expected`` is a NumPy array (the oracle) or, for a
    comparison of two code paths, an array of the backend.
    """
    if not isinstance(expected, np.ndarray) and not np.isscalar(expected) and hasattr(expected, "shape"):
        expected = backend.to_numpy(expected)
    expected = np.asarray(expected, dtype=np.float64)
    assert_array(backend, actual, expected_dtype or dtype, shape=expected.shape)
    got = backend.to_numpy(actual)
    tol = tolerance(dtype)
    rtol = tol["rtol"] if rtol is None else rtol
    atol = tol["atol"] if atol is None else atol
    if scale is None:
        scale = float(np.max(np.abs(expected))) if expected.size else 1.0
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol * max(scale, 1e-30))


def check_gradients(
    backend: Backend,
    fn: Callable[..., Any],
    *inputs: np.ndarray,
    h: float = 1e-6,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    seed: int = 0,
) -> None:
    """Gradients of ``fn`` on ``backend`` against float64 central differences.

    ``fn`` takes backend arrays (built from the NumPy ``inputs`` in float64) and
    returns an array; the checked function is the scalar ``sum(fn(*x) * r)`` with a
    fixed random ``r``, so every output element counts with its own weight. The
    analytic gradient comes from the framework (``backend.gradient``: torch
    autograd, ``jax.grad``); the numeric one from ``oracles.finite_differences``.
    """
    import oracles

    args = [np.asarray(a, dtype=np.float64) for a in inputs]
    xs = [backend.asarray(a) for a in args]
    if backend.grad == "jax":  # only the shape is needed: traced, never compiled or run
        import jax

        shape = tuple(jax.eval_shape(fn, *xs).shape)
    else:
        shape = tuple(fn(*xs).shape)
    r = backend.asarray(np.random.default_rng(seed).standard_normal(shape))
    xp = backend.xp

    def loss(*xs: Any) -> Any:
        return xp.sum(fn(*xs) * r)

    compiled = backend.compile(loss)  # on JAX: one compilation, not one per operation and call
    grads = backend.gradient(compiled, *xs)
    numeric = oracles.finite_differences(lambda *a: float(compiled(*(backend.asarray(x) for x in a))), *args, h=h)
    for k, (g, n) in enumerate(zip(grads, numeric, strict=True)):
        scale = max(1.0, float(np.max(np.abs(n))) if n.size else 1.0)
        np.testing.assert_allclose(
            backend.to_numpy(g), n, rtol=rtol, atol=atol * scale, err_msg=f"gradient with respect to argument {k}"
        )


#: Hypothesis examples of a property test on the backends whose eager calls compile each
#: operation for every new shape and dtype (JAX), where each example draws new ones and
#: costs about 2.5 s; the library's code is one for all backends, so a few examples reach
#: these backends' own paths, and the cheap backends run the full count.
COMPILED_EXAMPLES = 5


def property_test(examples: int, **strategies: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: a Hypothesis test body ``body(backend, **drawn)`` becomes the pytest
    test ``test(backend)``, run as ``@given(**strategies)`` with ``examples`` examples
    (at most ``COMPILED_EXAMPLES`` on JAX), no deadline.

    Each backend's run gets its own settings, which ``@settings`` above ``@given``
    cannot give: it is fixed at import, before the ``backend`` fixture is known.
    """
    from hypothesis import HealthCheck, given, settings

    def make(body: Callable[..., None]) -> Callable[..., None]:
        def test(backend: Backend) -> None:
            n = min(examples, COMPILED_EXAMPLES) if backend.name.startswith("jax") else examples
            checks = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
            settings(max_examples=n, deadline=None, suppress_health_check=checks)(given(**strategies)(body))(backend)

        test.__name__, test.__qualname__, test.__doc__ = body.__name__, body.__qualname__, body.__doc__
        return test

    return make


def compile_counter(backend: str = "aot_eager") -> tuple[Callable[..., Any], list[int]]:
    """A ``torch.compile`` backend (``backend`` by name) that counts the graphs it
    compiles, and the count (a one-item list). Dynamo's caches are reset first, so the
    count starts from nothing compiled in this process."""
    import torch
    from torch._dynamo.backends.registry import lookup_backend

    torch._dynamo.reset()

    inner, count = lookup_backend(backend), [0]

    def counted(gm: Any, example_inputs: Any) -> Any:
        count[0] += 1
        return inner(gm, example_inputs)

    return counted, count
