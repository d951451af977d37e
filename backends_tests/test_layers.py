"""The PyTorch and Flax NNX layers: thin wrappers whose outputs are the functional core's.

Framework-specific by nature: the torch tests run on the ``torch`` / ``torch_cuda``
backends, the Flax tests on ``jax`` / ``jax_gpu``, each skipped with its reason when
that backend is not selected by ``FASTRPB_BACKENDS`` (or has no GPU here). A selected
JAX backend without Flax installed is an error, as for any missing library.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastrpb
from backends import assert_close, load, requested

ROOT = Path(__file__).resolve().parents[1]


def _backend(name: str):
    names, explicit = requested()
    if name not in names:
        pytest.skip(f"{name} is not in FASTRPB_BACKENDS")
    backend, reason = load(name, explicit)
    if backend is None:
        pytest.skip(reason)
    return backend


@pytest.fixture(params=["torch", "torch_cuda"])
def tb(request):
    """A PyTorch backend (CPU, or CUDA where there is a GPU)."""
    return _backend(request.param)


@pytest.fixture(params=["jax", "jax_gpu"])
def jb(request):
    """A JAX backend for the Flax layers; Flax must be installed when JAX is selected."""
    backend = _backend(request.param)
    try:
        import flax.nnx  # noqa: F401
        import optax  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"the JAX backend is selected but Flax/optax are not installed ({exc}); "
            "pip install -e '.[flax]' or narrow FASTRPB_BACKENDS"
        ) from exc
    return backend


def _x(rng, *shape):
    return rng.standard_normal(shape)


def _padding_mask(B: int, L: int) -> np.ndarray:
    mask = np.ones((B, L), dtype=bool)
    mask[0, L - 3 :] = False  # first sequence padded at the end
    return mask


# --------------------------------------------------------------------------- import
def test_import_fastrpb_imports_no_framework():
    code = (
        "import sys, fastrpb\n"
        "bad = [m for m in ('torch', 'jax', 'flax', 'cupy') if m in sys.modules]\n"
        "assert not bad, f'import fastrpb imported {bad}'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


def test_layer_modules_load_lazily(tb):
    code = (
        "import sys, fastrpb\n"
        "assert 'torch' not in sys.modules\n"
        "layer = fastrpb.torch.FastRPB(2, 8)\n"  # attribute access imports the submodule
        "import torch\n"
        "assert isinstance(layer, torch.nn.Module) and 'jax' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


# --------------------------------------------------------------------------- torch
def _torch_mha(tb, **kw):
    import torch

    import fastrpb.torch as frt

    torch.manual_seed(0)
    return frt.MultiheadLinearAttention(12, 3, device=tb.device, dtype=torch.float64, **kw)


def _torch_reference(layer, x, key_mask=None):
    """The layer's forward pass written with the functional core by hand."""
    import torch.nn.functional as F

    def split(t):
        return t.unflatten(-1, (layer.heads, layer.head_dim)).transpose(-3, -2)

    q = split(F.linear(x, layer.q_proj.weight, layer.q_proj.bias))
    k = split(F.linear(x, layer.k_proj.weight, layer.k_proj.bias))
    v = split(F.linear(x, layer.v_proj.weight, layer.v_proj.bias))
    mask = None if key_mask is None else key_mask[:, None, :]
    out = fastrpb.linear_attention(q, k, v, feature_map=layer.feature_map, causal=layer.causal, key_mask=mask)
    if layer.rpb is not None:
        vb = v if mask is None else v * mask[..., None]
        if hasattr(layer.rpb, "grid"):
            out = out + fastrpb.rpb_nd(vb, layer.rpb.weights(), layer.rpb.grid, skip=layer.rpb.skip)
        else:
            out = out + fastrpb.rpb(vb, layer.rpb.weights(), causal=layer.causal, skip=layer.rpb.skip)
    return F.linear(out.transpose(-3, -2).flatten(-2), layer.out_proj.weight, layer.out_proj.bias)


def test_torch_fastrpb_table_is_rpb_init(tb):
    import fastrpb.torch as frt

    bias = frt.FastRPB(4, 16, seed=7, device=tb.device)
    assert tuple(bias.table.shape) == (4, 31) and bias.table.requires_grad
    expected = fastrpb.rpb_init(4, 16, seed=7, like=bias.table.detach())
    np.testing.assert_array_equal(tb.to_numpy(bias.table), tb.to_numpy(expected))
    sym = frt.FastRPB(4, 16, symmetric=True, seed=7, device=tb.device)
    assert tuple(sym.table.shape) == (4, 16)
    np.testing.assert_array_equal(tb.to_numpy(sym.weights()), tb.to_numpy(fastrpb.symmetric_table(sym.table)))
    assert tuple(frt.FastRPB(None, 5, device=tb.device).table.shape) == (9,)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_torch_fastrpb_is_core_rpb(tb, rng, causal, symmetric):
    import fastrpb.torch as frt

    bias = frt.FastRPB(3, 10, causal=causal, symmetric=symmetric, skip=(1, 1), seed=1, device=tb.device)
    v = tb.asarray(_x(rng, 2, 3, 9, 4), "float32")
    out = bias(v)
    assert tuple(out.shape) == (2, 3, 9, 4)
    expected = fastrpb.rpb(v, bias.weights(), causal=causal, skip=(1, 1))
    assert_close(tb, out, tb.to_numpy(expected), "float32")
    dense = bias.matrix(9)
    assert tuple(dense.shape) == (3, 9, 9)
    assert_close(tb, dense, tb.to_numpy(fastrpb.rpb_matrix(bias.weights(), 9, causal=causal)), "float32")


def test_torch_fastrpbnd_is_core_rpb_nd(tb, rng):
    import fastrpb.torch as frt

    # an RGB "image": 3 x 4 pixels, 2 channel tokens each, plus a class token
    bias = frt.FastRPBnd(2, (3, 4, 2), axes=(0, 1), skip=(1, 0), seed=3, device=tb.device)
    assert [tuple(p.shape) for p in bias.parameters()] == [(2, 5), (2, 7)]
    tables = bias.weights()
    assert tables[2] is None
    v = tb.asarray(_x(rng, 5, 2, 25, 4), "float32")
    assert_close(tb, bias(v), tb.to_numpy(fastrpb.rpb_nd(v, tables, (3, 4, 2), skip=(1, 0))), "float32")
    shared = frt.FastRPBnd(None, (3, 4), share=True, device=tb.device)
    assert [tuple(p.shape) for p in shared.parameters()] == [(7,)]
    assert shared.weights()[0] is shared.weights()[1]


@pytest.mark.parametrize("causal", [False, True])
def test_torch_mha_is_the_functional_core(tb, rng, causal):
    import torch

    layer = _torch_mha(tb, rpb=16, causal=causal)
    names = {n for n, _ in layer.named_parameters()}
    assert {"q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "rpb.table"} <= names
    x = tb.asarray(_x(rng, 2, 11, 12))
    mask = torch.as_tensor(_padding_mask(2, 11), device=tb.device)
    y = layer(x, mask)
    assert tuple(y.shape) == (2, 11, 12)
    assert_close(tb, y, tb.to_numpy(_torch_reference(layer, x, mask)), "float64")
    assert_close(tb, layer(x), tb.to_numpy(_torch_reference(layer, x)), "float64")
    # any leading dimensions
    assert tuple(layer(tb.asarray(_x(rng, 2, 2, 5, 12))).shape) == (2, 2, 5, 12)


def test_torch_mha_with_nd_bias(tb, rng):
    import torch

    import fastrpb.torch as frt

    # a class token and a 3 x 4 image with 2 channel tokens per pixel
    bias = frt.FastRPBnd(3, (3, 4, 2), axes=(0, 1), skip=(1, 0), device=tb.device, dtype=torch.float64)
    layer = _torch_mha(tb, rpb=bias)
    x = tb.asarray(_x(rng, 2, 25, 12))
    assert_close(tb, layer(x), tb.to_numpy(_torch_reference(layer, x)), "float64")
    with pytest.raises(ValueError, match="FastRPBnd"):
        frt.MultiheadLinearAttention(12, 3, rpb=bias, causal=True)


def test_torch_mha_without_rpb(tb, rng):
    layer = _torch_mha(tb, feature_map="elu")
    assert layer.rpb is None
    x = tb.asarray(_x(rng, 2, 7, 12))
    assert_close(tb, layer(x), tb.to_numpy(_torch_reference(layer, x)), "float64")


def test_torch_gradients_flow(tb, rng):
    layer = _torch_mha(tb, rpb=16, causal=True)
    x = tb.asarray(_x(rng, 2, 9, 12))
    layer(x).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        g = tb.to_numpy(p.grad)
        assert np.all(np.isfinite(g)) and np.any(g != 0), name


def test_torch_step_reproduces_causal_forward(tb, rng):
    import torch

    import fastrpb.torch as frt

    torch.manual_seed(0)
    bias = frt.FastRPB(3, 16, causal=True, skip=(1, 0), device=tb.device, dtype=torch.float64)
    layer = _torch_mha(tb, rpb=bias, causal=True, chunk_size=4)
    x = tb.asarray(_x(rng, 2, 10, 12))
    with torch.no_grad():
        full = layer(x)
        cache, outs = None, []
        for t in range(10):
            y_t, cache = layer.step(x[:, t], cache)
            outs.append(y_t)
        assert_close(tb, torch.stack(outs, 1), tb.to_numpy(full), "float64")
        # prefill then decode
        prefix, cache = layer(x[:, :6], return_cache=True)
        assert_close(tb, prefix, tb.to_numpy(full[:, :6]), "float64")
        for t in range(6, 10):
            y_t, cache = layer.step(x[:, t], cache)
            assert_close(tb, y_t, tb.to_numpy(full[:, t]), "float64")


def test_torch_layer_errors(tb):
    import fastrpb.torch as frt

    with pytest.raises(ValueError, match="causal FastRPB"):
        frt.MultiheadLinearAttention(8, 2, rpb=frt.FastRPB(2, 8), causal=True)
    with pytest.raises(ValueError, match="heads"):
        frt.MultiheadLinearAttention(8, 2, rpb=frt.FastRPB(4, 8))
    with pytest.raises(ValueError, match="divisible"):
        frt.MultiheadLinearAttention(10, 3)
    layer = frt.MultiheadLinearAttention(8, 2)
    with pytest.raises(ValueError, match="causal=True"):
        layer.step(tb.asarray(np.zeros((1, 8)), "float32"))
    with pytest.raises(ValueError, match="d_model = 8"):
        layer(tb.asarray(np.zeros((1, 3, 5)), "float32"))
    with pytest.raises(ValueError, match="L = 9 tokens"):
        frt.FastRPB(2, 8, device=tb.device)(tb.asarray(np.zeros((2, 9, 3)), "float32"))


def test_torch_compile_runs(tb, rng):
    import torch

    if tb.name != "torch":
        pytest.skip("compiled once, on CPU")
    layer = _torch_mha(tb, rpb=16, causal=True)
    x = tb.asarray(_x(rng, 2, 9, 12))
    # aot_eager runs Dynamo's graph capture and AOTAutograd (what can break on our
    # Python-level dispatch) without needing a C++ toolchain. The default Inductor
    # backend also works here (checked by hand: same result, ~11 s to compile on 2
    # CPU cores), too slow for every test run.
    compiled = torch.compile(layer, backend="aot_eager")
    assert_close(tb, compiled(x), tb.to_numpy(layer(x)), "float64")


# --------------------------------------------------------------------------- flax
def _flax_mha(**kw):
    import jax.numpy as jnp
    from flax import nnx

    import fastrpb.flax as frf

    return frf.MultiheadLinearAttention(12, 3, rngs=nnx.Rngs(0), param_dtype=jnp.float64, **kw)


def _flax_reference(layer, x, key_mask=None):
    import jax.numpy as jnp

    def lin(m, t):
        return t @ m.kernel[...] + m.bias[...]

    def split(t):
        return jnp.swapaxes(jnp.reshape(t, (*t.shape[:-1], layer.heads, layer.head_dim)), -3, -2)

    q, k, v = split(lin(layer.q_proj, x)), split(lin(layer.k_proj, x)), split(lin(layer.v_proj, x))
    mask = None if key_mask is None else key_mask[:, None, :]
    out = fastrpb.linear_attention(q, k, v, feature_map=layer.feature_map, causal=layer.causal, key_mask=mask)
    if layer.rpb is not None:
        vb = v if mask is None else v * mask[..., None]
        out = out + fastrpb.rpb(vb, layer.rpb.weights(), causal=layer.causal, skip=layer.rpb.skip)
    out = jnp.swapaxes(out, -3, -2)
    return lin(layer.out_proj, jnp.reshape(out, (*out.shape[:-2], -1)))


def test_flax_fastrpb_layers(jb, rng):
    import jax.numpy as jnp
    from flax import nnx

    import fastrpb.flax as frf

    bias = frf.FastRPB(4, 16, seed=7)
    assert isinstance(bias.table, nnx.Param) and bias.table[...].shape == (4, 31)
    np.testing.assert_array_equal(np.asarray(bias.table[...]), np.asarray(fastrpb.rpb_init(4, 16, seed=7, like=jnp.zeros(0, jnp.float32))))
    sym = frf.FastRPB(3, 10, causal=True, symmetric=True, rngs=nnx.Rngs(1))
    assert sym.table[...].shape == (3, 10)
    v = jb.asarray(_x(rng, 2, 3, 9, 4), "float32")
    assert_close(jb, sym(v), np.asarray(fastrpb.rpb(v, fastrpb.symmetric_table(sym.table[...]), causal=True)), "float32")
    nd = frf.FastRPBnd(2, (3, 4, 2), axes=(0, 1), skip=(1, 0), rngs=nnx.Rngs(2))
    assert [p[...].shape for p in nd.tables] == [(2, 5), (2, 7)]
    v = jb.asarray(_x(rng, 5, 2, 25, 4), "float32")
    assert_close(jb, nd(v), np.asarray(fastrpb.rpb_nd(v, nd.weights(), (3, 4, 2), skip=(1, 0))), "float32")
    with pytest.raises(TypeError, match="rngs"):
        frf.FastRPB(2, 8)


@pytest.mark.parametrize("causal", [False, True])
def test_flax_mha_is_the_functional_core(jb, rng, causal):
    import jax.numpy as jnp
    from flax import nnx

    layer = _flax_mha(rpb=16, causal=causal)
    x = jb.asarray(_x(rng, 2, 11, 12))
    mask = jnp.asarray(_padding_mask(2, 11))
    y = layer(x, mask)
    assert y.shape == (2, 11, 12)
    assert_close(jb, y, np.asarray(_flax_reference(layer, x, mask)), "float64")
    # under nnx.jit, the same numbers
    jitted = nnx.jit(lambda m, x, mask: m(x, mask))
    assert_close(jb, jitted(layer, x, mask), np.asarray(y), "float64")


def test_flax_step_reproduces_causal_forward(jb, rng):
    import jax.numpy as jnp
    from flax import nnx

    import fastrpb.flax as frf

    bias = frf.FastRPB(3, 16, causal=True, skip=(1, 0), rngs=nnx.Rngs(5), param_dtype=jnp.float64)
    layer = _flax_mha(rpb=bias, causal=True, chunk_size=4)
    x = jb.asarray(_x(rng, 2, 7, 12))
    full = layer(x)
    cache, outs = None, []
    for t in range(7):
        y_t, cache = layer.step(x[:, t], cache)
        outs.append(y_t)
    assert_close(jb, jnp.stack(outs, 1), np.asarray(full), "float64")
    prefix, cache = layer(x[:, :4], return_cache=True)
    step = nnx.jit(lambda m, x_t, c: m.step(x_t, c))
    for t in range(4, 7):
        y_t, cache = step(layer, x[:, t], cache)
        assert_close(jb, y_t, np.asarray(full[:, t]), "float64")


def test_flax_trains_with_optax(jb, rng):
    import jax.numpy as jnp
    import optax
    from flax import nnx

    layer = _flax_mha(rpb=16, causal=True)
    x = jb.asarray(_x(rng, 2, 9, 12))
    target = jnp.zeros_like(x)
    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
        optimizer.update(model, grads)
        return loss, grads

    first, grads = train_step(layer, optimizer)
    table_grad = np.asarray(grads["rpb"]["table"][...])
    assert np.all(np.isfinite(table_grad)) and np.any(table_grad != 0)
    for _ in range(5):
        loss, _ = train_step(layer, optimizer)
    assert float(loss) < float(first)


def test_flax_layers_built_under_jit(jb):
    import jax.numpy as jnp
    from flax import nnx

    import fastrpb.flax as frf

    # sharded initialisation builds the model inside nnx.jit: the seed is a tracer there
    model = nnx.jit(lambda: frf.MultiheadLinearAttention(12, 3, rpb=16, causal=True, rngs=nnx.Rngs(0)))()
    table = np.asarray(model.rpb.table[...])
    assert table.shape == (3, 31) and 0 < table.std() < 0.1
    nd = nnx.jit(lambda: frf.FastRPBnd(2, (3, 4), symmetric=True, rngs=nnx.Rngs(1)))()
    assert [t[...].shape for t in nd.tables] == [(2, 3), (2, 4)]
    assert model(jnp.ones((1, 5, 12))).shape == (1, 5, 12)


def test_flax_layer_errors(jb):
    from flax import nnx

    import fastrpb.flax as frf

    with pytest.raises(ValueError, match="causal FastRPB"):
        frf.MultiheadLinearAttention(8, 2, rpb=frf.FastRPB(2, 8, seed=0), causal=True, rngs=nnx.Rngs(0))
    layer = frf.MultiheadLinearAttention(8, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="causal=True"):
        layer.step(jb.asarray(np.zeros((1, 8)), "float32"))



def _doctest(name: str, **extra) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), extraglobs=extra, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, (name, result)


def test_torch_docstring_examples(tb):
    """The examples in the docstrings (shown in the API reference) run."""
    import torch

    if tb.name != "torch":
        pytest.skip("the docstring examples run on CPU")
    _doctest("fastrpb.torch", torch=torch)


def test_flax_docstring_examples(jb):
    if jb.name != "jax":
        pytest.skip("the docstring examples run on the default device, once")
    _doctest("fastrpb.flax")
