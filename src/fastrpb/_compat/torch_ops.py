"""PyTorch custom operators (imported only where PyTorch is): ``write_in_place``.

A module of its own because registering an operator must run as plain Python, not
inside ``torch.compile``'s tracing; Dynamo runs an ``import`` as Python, so the first
import registers it whether or not a compilation is under way.

Registered with ``torch.library.Library`` (one Python kernel for every backend, the
autograd and in-place bookkeeping in C++), not ``torch.library.custom_op``, whose
Python layers cost 30-35 us per call against 5-8 us (one call per decoding step:
a compiled step with two calls took 112-122 us against 29-43 us, benchmark of a
no-op over 12 state tensors).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch

_LIBRARY = torch.library.Library("fastrpb", "DEF")
_LIBRARY.define("write_in_place(Tensor(a!)[] buffers, Tensor[] inputs, str name, int[] static) -> ()")


@functools.cache
def _update(name: str) -> Callable[..., None]:
    """The update named ``module:function`` (``control.in_place_update``), resolved once."""
    module, function = name.split(":")
    return getattr(importlib.import_module(module), function)


def _write(buffers: list, inputs: list, name: str, static: list) -> None:
    """Run the update ``name`` on the tensors, eagerly (``control.write_in_place`` says why)."""
    import array_api_compat.torch as xp

    _update(name)(xp, tuple(buffers), tuple(inputs), *static)


def _trace(buffers: list, inputs: list, name: str, static: list) -> None:
    """While compiling: the update returns nothing and reads values, so nothing runs."""


_LIBRARY.impl("write_in_place", _write, "CompositeExplicitAutograd")
torch.library.register_fake("fastrpb::write_in_place", _trace, lib=_LIBRARY)


def write_in_place(buffers: list, inputs: list, name: str, static: list) -> None:
    """Call the operator."""
    torch.ops.fastrpb.write_in_place(buffers, inputs, name, static)
