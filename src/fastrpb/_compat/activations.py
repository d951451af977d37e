"""Activations the standard lacks: ELU + 1 (with the libraries' fused kernels) and a
stable softmax.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .dispatch import _compiling, _is, device_of

__all__ = ["elu_plus_one", "softmax"]


def elu_plus_one(xp: Any, x: Any) -> Any:
    """``elu(x) + 1`` = ``x + 1`` for ``x > 0``, ``exp(x)`` otherwise (Katharopoulos et al.).

    The standard has no ELU. Portable form: ``exp(min(x, 0)) + max(x, 0)``, four
    passes and exact in every dtype (``exp(x) - 1 + 1`` would lose the small values in
    bfloat16). Linear attention is bound by these elementwise passes, not by its
    matmuls, so where a library has a faster way it is used:

    - PyTorch: its fused ``elu`` kernel plus one add, two passes (float32/float64
      only: in half precision ``elu(x) + 1`` rounds ``exp(x) - 1`` first). Not under
      ``torch.compile``, whose compiler fuses the portable form itself, and whose
      backward of ``elu`` on a permuted tensor fails (``view size is not
      compatible``, PyTorch 2.13);
    - NumPy: the same four passes, but in place: two allocations instead of four.
    """
    if _is(xp, "torch") and x.dtype in (xp.float32, xp.float64) and not _compiling():
        import torch  # already imported: x is a torch.Tensor

        # in place on elu's fresh output (its backward reads the input, not the
        # output): a second tensor of the size of x costs page faults
        return torch.nn.functional.elu(x).add_(1.0)
    if _is(xp, "numpy") and isinstance(x, np.ndarray) and x.ndim > 0:
        out = np.minimum(x, 0)
        np.exp(out, out=out)
        out += np.maximum(x, 0)
        return out
    zero = xp.zeros((), dtype=x.dtype, device=device_of(x))
    return xp.exp(xp.minimum(x, zero)) + xp.maximum(x, zero)


def softmax(xp: Any, x: Any, axis: int = -1) -> Any:
    """``exp(x) / sum(exp(x))`` along ``axis``, stabilised by the maximum (the standard
    has no softmax). Portable code; exact for any finite input (the largest term is 1)."""
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)
