"""fastrpb: linear attention and FFT relative positional bias for every array library.

One implementation, written against the Python array API standard, that runs on
NumPy, CuPy, PyTorch, JAX (and any compliant library) arrays. The contract (public
names, maths, shapes, errors) is the documentation page ``docs/design.md`` ("The
contract"); the paper is Zubkov & Gavrilov, "FastRPB: a Scalable Relative Positional
Encoding for Long Sequence Tasks" (arXiv:2202.11364).
"""

from types import ModuleType

from . import feature_maps
from .attention import LinearAttentionState, linear_attention, linear_attention_step, softmax_attention
from .bias import RPBndState, RPBState, rpb, rpb_init, rpb_matrix, rpb_nd, rpb_nd_step, rpb_step, symmetric_table
from .feature_maps import random_projection

__all__ = [
    "rpb",
    "rpb_step",
    "RPBState",
    "rpb_nd",
    "rpb_nd_step",
    "RPBndState",
    "rpb_matrix",
    "symmetric_table",
    "rpb_init",
    "feature_maps",
    "linear_attention",
    "linear_attention_step",
    "softmax_attention",
    "LinearAttentionState",
    "random_projection",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> ModuleType:
    # The framework layers load only on request: ``fastrpb.torch`` / ``fastrpb.flax``
    # (or ``import fastrpb.torch``); ``import fastrpb`` never imports a framework.
    # ``fastrpb.torch.MultiheadAttention`` is the drop-in for
    # ``torch.nn.MultiheadAttention``; ``fastrpb.torch/flax.LinearAttention``
    # the layers of fastrpb's own conventions (key_mask True = keep).
    # ``fastrpb.parallel`` (sequence parallelism) loads the same way.
    if name in ("torch", "flax", "parallel"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
