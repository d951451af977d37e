"""JAX pytrees for fastrpb's NamedTuples, registered without importing JAX.

``import fastrpb`` stays free of frameworks: a class decorated with ``jax_pytree`` is
registered with JAX only once JAX is imported.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["jax_pytree", "register_pytrees"]


def jax_pytree(*, static: tuple[str, ...]) -> Callable[[type], type]:
    """Class decorator: make a NamedTuple a JAX pytree whose ``static`` fields are aux data.

    A NamedTuple is a JAX pytree by default, but then every field is a leaf and a
    string field (the decoding state's feature-map signature) cannot cross
    ``jax.jit``. JAX is never imported for this (``import fastrpb`` stays free of
    frameworks); the class is registered, once and under a lock (8 threads may build
    their first state together), as soon as JAX is there: at decoration if JAX is
    already imported, when a JAX namespace is first resolved, and when an instance is
    built while JAX is imported (so ``jax.jit(f)(State(...))`` works in a fresh
    process before fastrpb ever computed anything). After registration the class's
    own ``__new__`` is restored: no cost per instance.
    """

    def decorate(cls: type) -> type:
        original = cls.__dict__["__new__"]

        def __new__(klass: type, *args: Any, **kwargs: Any) -> Any:
            if "jax" in sys.modules:
                register_pytrees()
            return original.__func__(klass, *args, **kwargs)

        with _PYTREE_LOCK:
            _PYTREE_PENDING[cls] = (static, original)
            cls.__new__ = staticmethod(__new__)  # type: ignore[assignment]
        if "jax" in sys.modules:
            register_pytrees()
        return cls

    return decorate


_PYTREE_LOCK = threading.Lock()
# class -> (static fields, its own __new__), until registered with JAX
_PYTREE_PENDING: dict[type, tuple[tuple[str, ...], Any]] = {}


def register_pytrees() -> None:
    """Register every class made by ``jax_pytree`` with JAX (JAX must be imported)."""
    if not _PYTREE_PENDING:
        return
    with _PYTREE_LOCK:
        if not _PYTREE_PENDING:
            return
        import jax.tree_util

        for cls, (static, original) in list(_PYTREE_PENDING.items()):
            _register_pytree(jax.tree_util, cls, static)
            cls.__new__ = original  # type: ignore[method-assign]
            del _PYTREE_PENDING[cls]


def _register_pytree(tree_util: Any, cls: type, static: tuple[str, ...]) -> None:
    fields = cls._fields  # type: ignore[attr-defined]
    dynamic = tuple(f for f in fields if f not in static)

    def flatten(obj: Any) -> tuple[tuple, tuple]:
        return tuple(getattr(obj, f) for f in dynamic), tuple(getattr(obj, f) for f in static)

    def unflatten(aux: tuple, children: tuple) -> Any:
        return cls(**dict(zip(dynamic, children, strict=True)), **dict(zip(static, aux, strict=True)))

    tree_util.register_pytree_node(cls, flatten, unflatten)
