"""The docstrings' Examples sections, run as doctests.

Every public module's examples run with NumPy inputs (the examples of ``fastrpb.torch``
and ``fastrpb.flax`` need their framework and skip, with the reason, without it). They
are documentation: printed shapes and a few rounded numbers, checked here so they stay
true.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect

import numpy as np
import pytest

MODULES = {
    "fastrpb.attention": None,
    "fastrpb.bias": None,
    "fastrpb._online": None,
    "fastrpb.feature_maps": None,
    "fastrpb.parallel": "jax",  # its examples run under jax.shard_map
    "fastrpb.torch": "torch",
    "fastrpb.flax": "flax",
}


@pytest.mark.parametrize("name", list(MODULES))
def test_docstring_examples(name):
    framework = MODULES[name]
    if framework is not None and importlib.util.find_spec(framework) is None:
        pytest.skip(f"{framework} is not installed: the examples of {name} need it")
    module = importlib.import_module(name)
    with np.printoptions(legacy="1.25"):  # scalars print as 0.5, not np.float64(0.5)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see the output above)"
    assert result.attempted > 0, f"{name} has no examples"


# the public classes whose docstrings carry an example; the feature-map classes (ELU,
# FAVOR, ...) are shown through their factories, the small records (LayerCache,
# Communicator) through the functions that return them
EXAMPLE_CLASSES = {
    "LinearAttentionState",
    "RPBState",
    "FeatureMap",
    "FastRPB",
    "FastRPBnd",
    "LinearAttention",
    "MultiheadAttention",
}


@pytest.mark.parametrize("name", [m for m in MODULES if not m.startswith("fastrpb._")])
def test_public_objects_have_examples(name):
    framework = MODULES[name]
    if framework is not None and importlib.util.find_spec(framework) is None:
        pytest.skip(f"{framework} is not installed: {name} imports it")
    module = importlib.import_module(name)
    missing = []
    for public in module.__all__:
        obj = getattr(module, public)
        if inspect.isfunction(obj) or (inspect.isclass(obj) and public in EXAMPLE_CLASSES):
            doc = inspect.getdoc(obj) or ""
            if "Examples\n--------" not in doc or ">>>" not in doc:
                missing.append(public)
    assert not missing, f"{name}: public objects without an Examples section: {missing}"
