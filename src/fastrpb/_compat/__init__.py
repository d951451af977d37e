"""Where fastrpb meets array libraries: namespace dispatch, gaps of the standard, fast paths.

Every public function resolves its array namespace here, once (``namespace``), and
passes ``xp`` down to private helpers. The namespace must implement the array API
standard **2023.12 or newer** (``moveaxis``, ``cumulative_sum``, ``isdtype`` with
``include_initial``/keyword forms that 2022.12 lacks): a library reporting an older
``__array_api_version__`` is a ``TypeError`` when its namespace is first resolved.

This package is also the single home of what the standard does not give us, written
as array-api-extra's ``_delegation`` does: each helper holds the portable version
(pure standard) and, beside it, the native fast path of a library where one was
measured faster, with the measurement in a comment. Where array-api-extra does the
job (``xpx.pad``) it is used. No argument checks live here (``fastrpb._validate``),
and no random numbers (``fastrpb._random``). No other module imports a framework or
branches on one. One module per concern:

- ``dispatch``: the namespace of a call, devices, dtypes, traced and lazy values;
- ``fft``: real FFTs (SciPy for NumPy, JAX's partitioned over leading axes);
- ``fused``: in-place and fused arithmetic on arrays just created;
- ``finite``: non-finite values (the finite fast path, the finite/non-finite split);
- ``scan``: cumulative sums, scans, the running maximum, the rescaled prefix sum;
- ``pad``: padding, shifting, indexing along one axis;
- ``activations``: ELU + 1 and softmax;
- ``pytree``: JAX pytrees registered without importing JAX;
- ``control``: conditionals and dynamic positions that compile (``cond``, ``is_compiled``),
  eager JAX kernels as cached jitted computations (``eager_jit``), eager updates that
  write a donated state's buffers in place in a compiled PyTorch graph (``write_in_place``).

This module re-exports their names: ``from fastrpb._compat import x`` is the import.
"""

from __future__ import annotations

from .activations import elu_plus_one, softmax
from .control import (
    cond,
    conditionals_nest,
    eager_jit,
    in_place_update,
    is_compiled,
    owned,
    slices_compile,
    write_in_place,
    writes_in_place,
)
from .dispatch import (
    MIN_API_VERSION,
    compute_dtype,
    count_array,
    device_of,
    is_lazy,
    is_traced,
    namespace,
    wider_float,
)
from .fft import blocks_allowed, fft_namespace, irfft, irfftn, next_fast_len, rfft, rfftn
from .finite import known_finite, on_finite, split_nonfinite
from .fused import add_into, concat_rows, multiply_add, multiply_add_into, multiply_into, tril_into
from .pad import along, pad_axis, pad_chunks, shift
from .pytree import jax_pytree, register_pytrees
from .scan import associative_scan, cumulative_max, cumulative_sum, exclusive_sum, rescaled_scan, scan

__all__ = [
    "concat_rows",
    "cond",
    "conditionals_nest",
    "eager_jit",
    "in_place_update",
    "is_compiled",
    "owned",
    "slices_compile",
    "write_in_place",
    "writes_in_place",
    "MIN_API_VERSION",
    "namespace",
    "device_of",
    "compute_dtype",
    "fft_namespace",
    "next_fast_len",
    "rfft",
    "irfft",
    "rfftn",
    "irfftn",
    "elu_plus_one",
    "softmax",
    "multiply_into",
    "add_into",
    "tril_into",
    "multiply_add_into",
    "multiply_add",
    "known_finite",
    "on_finite",
    "split_nonfinite",
    "cumulative_sum",
    "cumulative_max",
    "exclusive_sum",
    "associative_scan",
    "scan",
    "rescaled_scan",
    "wider_float",
    "along",
    "shift",
    "pad_axis",
    "pad_chunks",
    "jax_pytree",
    "register_pytrees",
    "is_traced",
    "is_lazy",
    "count_array",
    "blocks_allowed",
]
