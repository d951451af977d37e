"""The one place where fastrpb meets array libraries.

Every public function resolves its array namespace here, once, and passes ``xp``
down to private helpers. This module is also the single home of what the array API
standard does not give us; each helper says why it exists. No other module imports
a framework or branches on one.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "namespace",
    "device_of",
    "check_floating",
    "compute_dtype",
    "fft_namespace",
    "next_fast_len",
    "rfft",
    "irfft",
    "elu_plus_one",
    "multiply_into",
    "known_finite",
    "split_nonfinite",
    "cumulative_sum",
    "seeded_normal",
    "seeded_projection",
    "int_arg",
    "skip_arg",
    "grid_arg",
    "register_pytree",
]


def namespace(**arrays: Any) -> Any:
    """Resolve the array namespace of named inputs (``None`` values are ignored).

    Every value must be an array of a library the array API knows; all must come
    from one library and live on one device. Errors name the offending argument.
    """
    given = {name: x for name, x in arrays.items() if x is not None}
    kinds = {type(x) for x in given.values()}
    if len(kinds) == 1:
        # Fast path, called once per public call (a decoding step is a few microseconds
        # of arithmetic): the namespace of one array type is always the same, and
        # NumPy arrays all live on the CPU.
        kind = kinds.pop()
        xp = _NAMESPACES.get(kind)
        if xp is not None:
            if kind is np.ndarray:
                return xp
            if array_api_compat.is_torch_namespace(xp):
                # a tensor's device is an attribute; array_api_compat.device() runs a
                # chain of type checks first
                first = next(iter(given.values())).device
                if any(x.device != first for x in given.values()):
                    _check_devices(given)  # raises, naming the arguments
                return xp
            _check_devices(given)
            return xp
    for name, x in given.items():
        if not array_api_compat.is_array_api_obj(x) or isinstance(x, (bool, int, float, complex)):
            raise TypeError(
                f"{name} must be an array (NumPy, CuPy, PyTorch, JAX or any array API "
                f"library), got {type(x).__name__}"
            )
    try:
        xp = array_api_compat.array_namespace(*given.values())
    except TypeError as exc:
        kinds_text = ", ".join(f"{n}: {type(x).__module__}.{type(x).__name__}" for n, x in given.items())
        raise TypeError(f"all arrays must come from one array library, got {kinds_text}") from exc
    _check_devices(given)
    if len({type(x) for x in given.values()}) == 1:
        _NAMESPACES[type(next(iter(given.values())))] = xp
    return xp


# array type -> namespace, filled by ``namespace`` once a type has been resolved
_NAMESPACES: dict[type, Any] = {}


def _check_devices(given: dict[str, Any]) -> None:
    devices = {name: device_of(x) for name, x in given.items()}
    # Under jax.jit the device of a tracer is unknown (None); there is nothing to compare.
    known = {name: d for name, d in devices.items() if d is not None}
    first = next(iter(known.items()), None)
    if first is not None:
        for name, d in known.items():
            if d != first[1]:
                raise ValueError(
                    f"all arrays must be on one device: {first[0]} is on {first[1]!r} "
                    f"but {name} is on {d!r}"
                )


def device_of(x: Any) -> Any:
    """The device of ``x`` (``None`` for a JAX tracer inside ``jit``)."""
    return array_api_compat.device(x)


def check_floating(xp: Any, name: str, x: Any) -> None:
    """Reject integer, bool and complex arrays with a message naming ``name``."""
    if not _real_floating(xp, x.dtype):
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32 or "
            f"float64), got {x.dtype}"
        )


def _real_floating(xp: Any, dtype: Any) -> bool:
    # ``xp.isdtype`` costs microseconds (NumPy parses its arguments each time) and is
    # asked several times per decoding step: remember the answer per (library, dtype).
    try:
        key = (xp.__name__, dtype)
        known = _FLOATING.get(key)
    except TypeError:  # an unhashable dtype: ask every time
        return bool(xp.isdtype(dtype, "real floating"))
    if known is None:
        known = _FLOATING[key] = bool(xp.isdtype(dtype, "real floating"))
    return known


_FLOATING: dict[tuple[str, Any], bool] = {}


def compute_dtype(xp: Any, *arrays: Any) -> tuple[Any, Any]:
    """Return ``(result_dtype, compute_dtype)`` for floating inputs.

    The result dtype follows the library's promotion (``xp.result_type``). Half
    precision (float16, bfloat16) is computed in float32: CPU backends lack
    half-precision FFTs, CUDA ones need power-of-two sizes for them, and reductions
    over long sequences lose too much in 8 bits of mantissa.
    """
    # ``result_type`` costs microseconds per call, several times per decoding step, so
    # the answer is remembered -- under a key that determines it. Promotion is not a
    # function of the dtypes alone: a JAX array created from a Python scalar is *weakly
    # typed* (``bfloat16`` with a weak ``float32`` gives ``bfloat16``, with a strong one
    # ``float32``), so the weak flag is part of the key; and NumPy < 2 (value-based
    # casting) or a library with its own rules may look at 0-d values, so calls with a
    # 0-d input are not cached at all.
    key: tuple | None = None
    known = None
    try:
        if all(x.ndim > 0 for x in arrays):
            key = (xp.__name__, *((x.dtype, getattr(x, "weak_type", False)) for x in arrays))
            known = _PROMOTED.get(key)
    except (TypeError, AttributeError):
        key, known = None, None
    if known is not None:
        return known
    result = xp.result_type(*arrays)
    pair = (result, xp.float64 if result == xp.float64 else xp.float32)
    if key is not None:
        _PROMOTED[key] = pair
    return pair


_PROMOTED: dict[tuple, tuple[Any, Any]] = {}


def fft_namespace(xp: Any) -> Any:
    """The FFT extension of ``xp``; it is optional in the standard, so say so if missing."""
    fft = getattr(xp, "fft", None)
    if fft is None:
        raise TypeError(
            f"the array library {getattr(xp, '__name__', xp)!r} does not provide the array "
            "API FFT extension, which FastRPB needs (for array-api-strict, enable the "
            "'fft' extension)"
        )
    return fft


def next_fast_len(n: int) -> int:
    """The smallest 5-smooth integer (2^a 3^b 5^c) that is ``>= n``.

    The standard has no ``next_fast_len``; every FFT library is fastest on
    5-smooth sizes and slow on sizes with large prime factors (2L - 1 = 1567 is
    prime for L = 784). Pure Python: the candidates are few (O(log^3 n)).
    """
    if n <= 1:
        return 1
    best = 2 ** math.ceil(math.log2(n))
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            # smallest power of two lifting p35 to >= n
            quotient = -(-n // p35)
            candidate = p35 * (1 << max(0, (quotient - 1).bit_length()))
            best = min(best, candidate)
            p35 *= 3
        p5 *= 5
    return best


# NumPy's own FFT (numpy.fft, pocketfft behind a thin wrapper) runs single-threaded
# and, on the sizes FastRPB uses, 1.5-4x slower than SciPy's pocketfft build with
# ``workers``. SciPy is optional (imported on first use, not at import time):
# without it NumPy arrays use ``xp.fft``.
_SCIPY_FFT: list[Any] = []


def _scipy_fft_for(xp: Any, x: Any) -> Any:
    """``scipy.fft`` when ``x`` is a NumPy array and SciPy is installed, else ``None``."""
    if not (array_api_compat.is_numpy_namespace(xp) and isinstance(x, np.ndarray)):
        return None
    if not _SCIPY_FFT:
        try:
            import scipy.fft as scipy_fft
        except ImportError:  # pragma: no cover - depends on the environment
            scipy_fft = None
        _SCIPY_FFT.append(scipy_fft)
    return _SCIPY_FFT[0]


def rfft(xp: Any, x: Any, *, n: int, axis: int = -1) -> Any:
    """Real FFT of length ``n`` along ``axis`` (zero-padded), in ``x``'s namespace.

    Native fast path: NumPy arrays go to ``scipy.fft`` with all CPU workers (see
    above); every other library uses its array API FFT extension.
    """
    scipy_fft = _scipy_fft_for(xp, x)
    if scipy_fft is not None:
        return scipy_fft.rfft(x, n=n, axis=axis, workers=-1)
    return fft_namespace(xp).rfft(x, n=n, axis=axis)


def irfft(xp: Any, x: Any, *, n: int, axis: int = -1, consume: bool = False) -> Any:
    """Inverse real FFT of length ``n`` along ``axis``.

    ``consume=True`` says the caller owns ``x`` and never reads it again, so the
    native path may overwrite it (SciPy's ``overwrite_x``: one copy fewer, which
    matters for the O(L) memory bound of FastRPB).
    """
    scipy_fft = _scipy_fft_for(xp, x)
    if scipy_fft is not None:
        return scipy_fft.irfft(x, n=n, axis=axis, workers=-1, overwrite_x=consume)
    return fft_namespace(xp).irfft(x, n=n, axis=axis)


def cumulative_sum(xp: Any, x: Any, *, axis: int, include_initial: bool = False) -> Any:
    """``xp.cumulative_sum``, with a faster native path on JAX.

    XLA lowers ``jnp.cumsum`` on CPU to a windowed reduction that runs at a fraction of
    memory speed: for the chunk states of causal linear attention (L = 16,384) it took
    a third of the whole call. ``jax.lax.associative_scan`` computes the same sums
    (in a different order of additions) 1.7x faster there, under ``jit`` and ``grad``.
    """
    if array_api_compat.is_jax_namespace(xp):
        from jax import lax  # already imported: xp is jax.numpy

        axis = axis % x.ndim
        out = lax.associative_scan(xp.add, x, axis=axis)
        if include_initial:
            shape = list(x.shape)
            shape[axis] = 1
            out = xp.concat([xp.zeros(shape, dtype=out.dtype, device=device_of(x)), out], axis=axis)
        return out
    return xp.cumulative_sum(x, axis=axis, include_initial=include_initial)


def multiply_into(xp: Any, a: Any, b: Any) -> Any:
    """``a * b``, written into ``a``'s memory where the library allows it.

    Only for an ``a`` that the caller has just created and never reads again (an FFT
    spectrum). The standard has no in-place operations (JAX has none at all), but on
    CPU a fresh output buffer of the size of ``a`` costs more in page faults than the
    product itself: for FastRPB at L = 1,024 that was a quarter of the call.
    NumPy and PyTorch multiply in place, PyTorch only outside autograd and outside
    ``torch.func`` transforms (under ``vmap`` over ``b`` alone, ``a`` has fewer
    elements than the batched product: an in-place ``mul_`` is an error there);
    everything else allocates.
    """
    shape = tuple(a.shape)
    if len(b.shape) <= len(shape) and all(
        db in (1, da) for da, db in zip(reversed(shape), reversed(tuple(b.shape)))
    ):
        if array_api_compat.is_numpy_namespace(xp) and isinstance(a, np.ndarray) and a.ndim > 0:
            return np.multiply(a, b, out=a)
        if array_api_compat.is_torch_namespace(xp) and _torch_eager_tensors():
            import torch  # already imported: a is a torch.Tensor

            if not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
                return a.mul_(b)
    return a * b


def _torch_eager_tensors() -> bool:
    """Whether PyTorch runs plain tensors now: no ``torch.func`` transform (``vmap``,
    ``grad``, ``jacrev``...) is active, whose wrapped tensors forbid some in-place
    operations and data-dependent Python control flow, and no ``torch.compile`` trace.
    A PyTorch without these private hooks gets the safe answer, False."""
    import torch  # only called with torch tensors: already imported

    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if active is None or compiling is None:
        return False
    return not (active() or compiling())


def known_finite(xp: Any, x: Any, *, negative_infinity: bool = False) -> bool:
    """True when ``x`` is known to hold no NaN and no infinity (``-inf`` allowed with
    ``negative_infinity=True``); False when it may, or when that cannot be told cheaply.

    The standard has no way to ask this without a data-dependent branch, which a
    traced program (``jax.jit``, ``torch.compile``, ``torch.func``) cannot take and a
    GPU pays for with a synchronisation. So only eager CPU arrays are asked (NumPy and
    PyTorch on the CPU: one reduction, about 0.1 ms for two million float32, where the
    work it lets the caller skip costs several passes); everywhere else the answer is
    False and the caller takes its path for non-finite values, which must give the
    same result for finite ones.
    """
    if array_api_compat.is_numpy_namespace(xp) and type(x) is np.ndarray:
        with np.errstate(all="ignore"):
            if negative_infinity:
                return bool(x.size == 0 or np.max(x) < np.inf)  # NaN < inf is False
            return bool(np.isfinite(np.sum(x)))  # a NaN or inf makes the sum non-finite
    if array_api_compat.is_torch_namespace(xp) and x.device.type == "cpu" and _torch_eager_tensors():
        import torch  # already imported: x is a torch.Tensor

        with torch.no_grad():
            if negative_infinity:
                return bool(x.numel() == 0 or x.amax() < math.inf)
            return bool(torch.isfinite(x.sum()))
    return False


def split_nonfinite(xp: Any, x: Any) -> tuple[Any, Any]:
    """``(finite, rest)`` with ``finite + rest == x``: ``finite`` holds the finite
    entries (0 elsewhere), ``rest`` the NaN and infinite ones (0 elsewhere).

    A product with a masked (zero) weight multiplies 0 by every value, and ``0 * NaN``
    is NaN: causal attention computes its masked in-chunk product on ``finite`` and
    adds ``rest`` back only where the mask lets it through. The standard has no
    ``nan_to_num``; ``where(isfinite(x), x, 0)`` is its portable form, and NumPy,
    PyTorch and JAX have a fused one (PyTorch's is 15 times faster on the CPU).
    """
    if array_api_compat.is_numpy_namespace(xp) and type(x) is np.ndarray:
        finite = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    elif array_api_compat.is_torch_namespace(xp) or array_api_compat.is_jax_namespace(xp):
        finite = xp.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    else:
        finite = xp.where(xp.isfinite(x), x, xp.zeros((), dtype=x.dtype, device=device_of(x)))
    return finite, x - finite


def elu_plus_one(xp: Any, x: Any) -> Any:
    """``elu(x) + 1`` = ``x + 1`` for ``x > 0``, ``exp(x)`` otherwise (Katharopoulos et al.).

    The standard has no ELU. Portable form: ``exp(min(x, 0)) + max(x, 0)``, four
    passes and exact in every dtype (``exp(x) - 1 + 1`` would lose the small values in
    bfloat16). Linear attention is bound by these elementwise passes, not by its
    matmuls, so where a library has a faster way it is used:

    - PyTorch: its fused ``elu`` kernel plus one add, two passes (float32/float64
      only: in half precision ``elu(x) + 1`` rounds ``exp(x) - 1`` first);
    - NumPy: the same four passes, but in place: two allocations instead of four.
    """
    if array_api_compat.is_torch_namespace(xp) and x.dtype in (xp.float32, xp.float64):
        import torch  # already imported: x is a torch.Tensor

        # in place on elu's fresh output (its backward reads the input, not the
        # output): a second tensor of the size of x costs page faults
        return torch.nn.functional.elu(x).add_(1.0)
    if array_api_compat.is_numpy_namespace(xp) and isinstance(x, np.ndarray) and x.ndim > 0:
        out = np.minimum(x, 0)
        np.exp(out, out=out)
        out += np.maximum(x, 0)
        return out
    zero = xp.zeros((), dtype=x.dtype, device=device_of(x))
    return xp.exp(xp.minimum(x, zero)) + xp.maximum(x, zero)


def seeded_normal(xp: Any, shape: tuple[int, ...], *, seed: int, dtype: Any, device: Any) -> Any:
    """Standard normal samples from an explicit seed, created on ``device``.

    The standard has no random number generation. We draw with NumPy's
    ``default_rng(seed)`` (so a seed gives the same numbers on every backend) and
    move the small result to the requested namespace and device once. Only used
    for parameters (tables, projections), never inside a forward pass.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    sample = np.random.default_rng(int(seed)).standard_normal(shape)
    return xp.asarray(sample, dtype=dtype, device=device)


def seeded_projection(
    xp: Any, m: int, d: int, *, seed: int, orthogonal: bool, dtype: Any, device: Any
) -> Any:
    """An ``(m, d)`` Gaussian random projection from an explicit seed, on ``device``.

    ``orthogonal=True`` stacks ``ceil(m / d)`` independent Haar-random orthogonal
    ``d x d`` blocks (QR of a Gaussian block, signs fixed by ``diag(R)``) and gives
    each row the norm of an independent Gaussian ``d``-vector (chi-distributed), so
    every row is marginally ``N(0, I_d)`` but rows inside a block are exactly
    orthogonal (Choromanski et al. 2021, "orthogonal random features"). The standard
    has no random numbers and its ``linalg`` extension is optional, so the draw and
    the QR are done once in NumPy (float64) and the small result is moved, as in
    ``seeded_normal``. Only used for parameters, never inside a forward pass.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    rng = np.random.default_rng(int(seed))
    if orthogonal:
        blocks = []
        for _ in range(-(-m // d)):
            q, r = np.linalg.qr(rng.standard_normal((d, d)))
            signs = np.where(np.diag(r) < 0, -1.0, 1.0)
            blocks.append((q * signs).T)  # rows orthonormal, Haar distributed
        norms = np.linalg.norm(rng.standard_normal((m, d)), axis=1)
        sample = np.concatenate(blocks, axis=0)[:m] * norms[:, None]
    else:
        sample = rng.standard_normal((m, d))
    return xp.asarray(sample, dtype=dtype, device=device)


_PYTREES: set[type] = set()


def register_pytree(xp: Any, cls: type, static: tuple[str, ...]) -> None:
    """Make the NamedTuple ``cls`` a JAX pytree whose ``static`` fields are aux data.

    A NamedTuple is a JAX pytree by default, but then every field is a leaf and a
    string field (the decoding state's feature-map signature) cannot cross
    ``jax.jit``. Registering it keeps such fields static. Done lazily, the first time
    a ``cls`` is built with JAX arrays, so importing fastrpb never imports JAX.
    """
    if cls in _PYTREES or not array_api_compat.is_jax_namespace(xp):
        return
    import jax  # already imported: xp is jax.numpy

    fields = cls._fields  # type: ignore[attr-defined]
    dynamic = tuple(f for f in fields if f not in static)

    def flatten(obj: Any) -> tuple[tuple, tuple]:
        return tuple(getattr(obj, f) for f in dynamic), tuple(getattr(obj, f) for f in static)

    def unflatten(aux: tuple, children: tuple) -> Any:
        return cls(**dict(zip(dynamic, children)), **dict(zip(static, aux)))

    jax.tree_util.register_pytree_node(cls, flatten, unflatten)
    _PYTREES.add(cls)


def int_arg(name: str, value: Any, *, minimum: int) -> int:
    """Validate a Python integer argument (shapes, lengths, counts)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def skip_arg(skip: Any) -> tuple[int, int]:
    """Validate ``skip = (a, b)``: token counts before and after the biased tokens."""
    if not isinstance(skip, (tuple, list)) or len(skip) != 2:
        raise TypeError(f"skip must be a pair (a, b) of token counts, got {skip!r}")
    return (int_arg("skip[0]", skip[0], minimum=0), int_arg("skip[1]", skip[1], minimum=0))


def grid_arg(grid: Any) -> tuple[int, ...]:
    """Validate a token grid ``(G_1, ..., G_k)``: a non-empty sequence of positive ints."""
    if not isinstance(grid, (tuple, list)) or len(grid) == 0:
        raise TypeError(f"grid must be a non-empty sequence of ints, got {grid!r}")
    return tuple(int_arg(f"grid[{k}]", g, minimum=1) for k, g in enumerate(grid))
