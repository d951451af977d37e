"""Type aliases for the public signatures.

The Python array API standard has no static array type yet (the Consortium's
``array-api-typing`` is a draft), and NumPy arrays, PyTorch tensors, JAX arrays and CuPy
arrays share no base class a type checker could use. So ``Array`` and ``Namespace`` are
aliases of ``Any``: they say what an argument is to a reader and in the API docs, and a
type checker accepts any library's arrays, as the functions do at run time (they
dispatch with ``array_api_compat.array_namespace``). When a standard array protocol
exists, these two lines are the only ones to change.
"""

from __future__ import annotations

from typing import Any, TypeAlias

__all__ = ["Array", "Namespace"]

Array: TypeAlias = Any
"""An array of any library that follows the array API standard (NumPy, PyTorch, JAX,
CuPy, array-api-strict, ...)."""

Namespace: TypeAlias = Any
"""An array API namespace (``array_api_compat.array_namespace(x)``, e.g. the module
``array_api_compat.numpy``)."""
