"""The PyTorch and Flax NNX layers, tested once over a ``framework`` fixture.

Each test body is written once and runs on every framework: ``torch`` (and
``torch_cuda``) and ``flax`` (and ``flax_gpu``, on the ``jax``/``jax_gpu`` backends),
each skipped with its reason when its backend is not selected by ``FASTRPB_BACKENDS``
(or has no GPU here). A selected JAX backend without Flax installed is an error, as
for any missing library. The ``Framework`` object below holds the few lines that
differ (building a layer, reading a parameter, one training step); outputs are
compared with dense float64 NumPy oracles assembled from ``oracles.py`` and the
layer's parameters, never with the library's own functions.

The drop-in ``MultiheadAttention`` exists for PyTorch only; its tests are at
the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fastrpb
import oracles
from backends_tests.backends import Backend, assert_close, load, requested

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _backend(name: str) -> Backend:
    names, explicit = requested()
    if name not in names:
        pytest.skip(f"{name} is not in FASTRPB_BACKENDS")
    backend, reason = load(name, explicit)
    if backend is None:
        pytest.skip(reason)
    return backend


# --------------------------------------------------------------------------- frameworks
_FLAX_FORWARD: Any = None  # nnx.jit(lambda m, x: m(x)), made on first use (Framework.forward)
_FLAX_PREFILL: Any = None  # the same for a call with a cache (Framework.prefill)
_FLAX_STEP: Any = None  # the same for a decoding step (Framework.step)


@dataclass
class Framework:
    """What differs between the PyTorch and Flax layers, for the tests."""

    name: str  # "torch" or "flax"
    backend: Backend

    @property
    def module(self) -> Any:
        import importlib

        return importlib.import_module(f"fastrpb.{self.name}")

    # ---- building
    def _kw(self) -> dict[str, Any]:
        if self.name == "torch":
            import torch

            return dict(device=self.backend.device, dtype=torch.float64)
        import jax.numpy as jnp

        return dict(param_dtype=jnp.float64)

    def mha(self, d_model: int = 12, heads: int = 3, **kw: Any) -> Any:
        if self.name == "torch":
            import torch

            torch.manual_seed(0)
        else:
            from flax import nnx

            kw.setdefault("rngs", nnx.Rngs(0))
        return self.module.LinearAttention(d_model, heads, **self._kw(), **kw)

    def bias(self, *args: Any, seed: int = 1, **kw: Any) -> Any:
        return self.module.FastRPB(*args, seed=seed, **self._kw(), **kw)

    def bias_nd(self, *args: Any, seed: int = 1, **kw: Any) -> Any:
        return self.module.FastRPBnd(*args, seed=seed, **self._kw(), **kw)

    # ---- arrays
    def array(self, x: np.ndarray, dtype: str = "float64") -> Any:
        return self.backend.asarray(x, dtype)

    def mask(self, m: np.ndarray) -> Any:
        return self.backend.asarray(m, None)

    def numpy(self, x: Any) -> np.ndarray:
        if self.name == "flax" and hasattr(x, "get_value"):  # an nnx.Variable
            x = x[...]
        if isinstance(x, np.ndarray):
            return x.astype(np.float64)
        return self.backend.to_numpy(x).astype(np.float64)

    def linear(self, m: Any) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) of a projection with ``y = x W + b``."""
        if self.name == "torch":
            return self.numpy(m.weight).T, self.numpy(m.bias)
        return self.numpy(m.kernel), self.numpy(m.bias)

    def raw_tables(self, bias: Any) -> list[np.ndarray]:
        if hasattr(bias, "tables"):
            return [self.numpy(t) for t in bias.tables]
        return [self.numpy(bias.table)]

    def stack(self, xs: list[Any]) -> Any:
        return self.backend.xp.stack(xs, axis=1)

    def forward(self, layer: Any, x: Any) -> Any:
        """``layer(x)``; under ``nnx.jit`` for Flax, one compilation per shape instead of
        one per eager operation (for tests that call a layer on many lengths)."""
        if self.name == "torch":
            return layer(x)
        global _FLAX_FORWARD
        if _FLAX_FORWARD is None:
            from flax import nnx

            _FLAX_FORWARD = nnx.jit(lambda m, x: m(x))
        return _FLAX_FORWARD(layer, x)

    def prefill(self, layer: Any, x: Any, cache: Any) -> tuple[Any, Any]:
        """``layer(x, return_cache=True, cache=cache)``; under ``nnx.jit`` for Flax, as
        ``forward``."""
        if self.name == "torch":
            return layer(x, return_cache=True, cache=cache)
        global _FLAX_PREFILL
        if _FLAX_PREFILL is None:
            from flax import nnx

            _FLAX_PREFILL = nnx.jit(lambda m, x, c: m(x, return_cache=True, cache=c))
        return _FLAX_PREFILL(layer, x, cache)

    def step(self, layer: Any, x_t: Any, cache: Any = None) -> tuple[Any, Any]:
        """``layer.step(x_t, cache)``; under ``nnx.jit`` for Flax, as ``forward`` (a
        decoding loop of many steps; the eager step keeps tests of its own)."""
        if self.name == "torch":
            return layer.step(x_t, cache)
        global _FLAX_STEP
        if _FLAX_STEP is None:
            from flax import nnx

            _FLAX_STEP = nnx.jit(lambda m, x, c: m.step(x, c))
        return _FLAX_STEP(layer, x_t, cache)

    # ---- training
    def no_grad(self) -> Any:
        import contextlib

        if self.name == "torch":
            import torch

            return torch.no_grad()
        return contextlib.nullcontext()

    def grads(self, layer: Any, x: Any) -> dict[str, np.ndarray]:
        """Gradients of mean(layer(x)^2) by parameter name."""
        if self.name == "torch":
            layer.zero_grad()
            (layer(x) ** 2).mean().backward()
            return {n: self.numpy(p.grad) for n, p in layer.named_parameters()}
        import jax
        import jax.numpy as jnp
        from flax import nnx

        # under nnx.jit: one compilation of the backward pass, not one per operation
        grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x) ** 2)))(layer)
        flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]
        return {jax.tree_util.keystr(path): np.asarray(g) for path, g in flat}

    def train(self, layer: Any, loss: Any, steps: int) -> list[float]:
        """``steps`` Adam steps on ``loss(layer)``; the losses seen."""
        if self.name == "torch":
            import torch

            opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
            out = []
            for _ in range(steps):
                opt.zero_grad()
                value = loss(layer)
                value.backward()
                opt.step()
                out.append(float(value.detach()))
            return out
        import optax
        from flax import nnx

        optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)

        @nnx.jit
        def step(model: Any, optimizer: Any) -> Any:
            value, grads = nnx.value_and_grad(loss)(model)
            optimizer.update(model, grads)
            return value

        return [float(step(layer, optimizer)) for _ in range(steps)]


@pytest.fixture(params=["torch", "torch_cuda", "flax", "flax_gpu"])
def framework(request: pytest.FixtureRequest) -> Framework:
    """A layer framework on one backend of the matrix."""
    backend_name = {"torch": "torch", "torch_cuda": "torch_cuda", "flax": "jax", "flax_gpu": "jax_gpu"}[request.param]
    backend = _backend(backend_name)
    if request.param.startswith("flax"):
        try:
            import flax.nnx  # noqa: F401
            import optax  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                f"the JAX backend is selected but Flax/optax are not installed ({exc}); "
                "pip install -e '.[flax]' or narrow FASTRPB_BACKENDS"
            ) from exc
    return Framework("torch" if request.param.startswith("torch") else "flax", backend)


@pytest.fixture(params=["torch", "torch_cuda"])
def tb(request: pytest.FixtureRequest) -> Backend:
    """A PyTorch backend (CPU, or CUDA where there is a GPU), for the PyTorch-only tests."""
    return _backend(request.param)


@pytest.fixture
def torch_cpu() -> Backend:
    """The PyTorch CPU backend, for what runs once (compilation, gloo processes)."""
    return _backend("torch")


# --------------------------------------------------------------------------- oracles
def full_table(raw: np.ndarray, symmetric: bool) -> np.ndarray:
    """``w`` from a stored table; a symmetric one stores ``h`` with ``w(t) = h[|t|]``."""
    return np.concatenate([np.flip(raw[..., 1:], -1), raw], -1) if symmetric else raw


def bias_oracle(w: np.ndarray, v: np.ndarray, *, causal: bool = False, skip: tuple[int, int] = (0, 0)) -> np.ndarray:
    return oracles.toeplitz(w, v.shape[-2], causal=causal, skip=skip) @ v


def bias_nd_oracle(
    tables: list[np.ndarray | None], grid: tuple[int, ...], v: np.ndarray, skip: tuple[int, int]
) -> np.ndarray:
    """Per head: the separable N-d Toeplitz matrix on the grid tokens, zero on the skipped ones."""
    heads = next(t for t in tables if t is not None).shape[0]
    a, b = skip
    L = v.shape[-2]
    B = np.zeros((heads, L, L))
    for h in range(heads):
        B[h, a : L - b, a : L - b] = oracles.toeplitz_nd([None if t is None else t[h] for t in tables], grid)
    return B @ v


def attention_oracle(
    feature: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, projection: Any = None, **kw: Any
) -> np.ndarray:
    if feature == "sikf":
        return oracles.exp_kernel_attention(q, k, v, **kw)
    if feature == "favor":
        return oracles.exp_kernel_attention(oracles.favor_log(q, projection), oracles.favor_log(k, projection), v, **kw)
    if feature == "rff":
        return oracles.kernel_attention(oracles.rff(q, projection), oracles.rff(k, projection), v, **kw)
    if feature == "hedgehog":
        return oracles.kernel_attention(oracles.hedgehog(q, projection), oracles.hedgehog(k, projection), v, **kw)
    features = {"elu": oracles.elu1, "relu": oracles.relu}[feature]
    return oracles.kernel_attention(features(q), features(k), v, **kw)


def multihead_oracle(
    projections: list[tuple[np.ndarray, np.ndarray]],
    heads: int,
    x: np.ndarray,
    kx: np.ndarray | None = None,
    vx: np.ndarray | None = None,
    *,
    feature: str = "sikf",
    causal: bool = False,
    keep: np.ndarray | None = None,
    bias: Any = None,
    projection: Any = None,
    eps: float = 1e-6,
) -> np.ndarray:
    """Dense float64 multi-head linear attention plus ``bias(values)`` (padding values zeroed)."""
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = projections
    kx = x if kx is None else kx
    vx = kx if vx is None else vx

    def split(t: np.ndarray) -> np.ndarray:
        return np.swapaxes(t.reshape(*t.shape[:-1], heads, -1), -3, -2)

    q, k, v = split(x @ wq + bq), split(kx @ wk + bk), split(vx @ wv + bv)
    mask = None if keep is None else keep[..., None, :]
    out = attention_oracle(feature, q, k, v, causal=causal, key_mask=mask, eps=eps, projection=projection)
    if bias is not None:
        out = out + bias(v if mask is None else np.where(mask[..., None], v, 0.0))
    out = np.swapaxes(out, -3, -2)
    return out.reshape(*out.shape[:-2], -1) @ wo + bo


def layer_oracle(
    fw: Framework,
    layer: Any,
    x: np.ndarray,
    keep: np.ndarray | None = None,
    *,
    feature: str = "sikf",
    projection: Any = None,
    kx: Any = None,
    vx: Any = None,
) -> np.ndarray:
    """The oracle of a ``LinearAttention`` from its parameters."""
    bias = None
    if layer.rpb is not None:
        rpb = layer.rpb
        tables = [full_table(t, rpb.symmetric) for t in fw.raw_tables(rpb)]
        if hasattr(rpb, "grid"):
            per_axis: list[np.ndarray | None] = [None] * len(rpb.grid)
            for n, a in enumerate(rpb.axes):
                per_axis[a] = tables[0] if rpb.share else tables[n]
            bias = lambda v: bias_nd_oracle(per_axis, rpb.grid, v, rpb.skip)  # noqa: E731
        else:
            bias = lambda v: bias_oracle(tables[0], v, causal=rpb.causal, skip=rpb.skip)  # noqa: E731
    projections = [fw.linear(m) for m in (layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj)]
    return multihead_oracle(
        projections,
        layer.heads,
        x,
        kx,
        vx,
        feature=feature,
        causal=layer.causal,
        keep=keep,
        bias=bias,
        projection=projection,
        eps=layer.eps,
    )


def _padding(B: int, L: int) -> np.ndarray:
    keep = np.ones((B, L), dtype=bool)
    keep[0, L - 3 :] = False  # the first sequence is padded at the end
    return keep


# --------------------------------------------------------------------------- import
def test_import_fastrpb_imports_no_framework():
    code = (
        "import sys, fastrpb\n"
        "bad = [m for m in ('torch', 'jax', 'flax', 'cupy') if m in sys.modules]\n"
        "assert not bad, f'import fastrpb imported {bad}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, cwd=ROOT)


def test_layer_modules_load_lazily(tb):
    code = (
        "import sys, fastrpb\n"
        "assert 'torch' not in sys.modules\n"
        "layer = fastrpb.torch.FastRPB(2, 8)\n"  # attribute access imports the submodule
        "import torch\n"
        "assert isinstance(layer, torch.nn.Module) and 'jax' not in sys.modules\n"
        "assert fastrpb.torch.MultiheadAttention is not None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, cwd=ROOT)


# --------------------------------------------------------------------------- bias modules
def test_fastrpb_table_is_rpb_init(framework):
    fw = framework
    bias = fw.bias(4, 16, seed=7)
    raw = fw.raw_tables(bias)[0]
    assert raw.shape == (4, 31)
    like = fw.array(np.zeros(0))
    np.testing.assert_array_equal(raw, fw.numpy(fastrpb.rpb_init(4, 16, seed=7, like=like)))
    assert fw.raw_tables(fw.bias(4, 16, symmetric=True))[0].shape == (4, 16)
    assert fw.raw_tables(fw.bias(None, 5))[0].shape == (9,)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["table", "symmetric"])
def test_fastrpb_matches_dense_oracle(framework, rng, causal, symmetric):
    fw = framework
    bias = fw.bias(3, 10, causal=causal, symmetric=symmetric, skip=(1, 1))
    w = full_table(fw.raw_tables(bias)[0], symmetric)
    vn = rng.standard_normal((2, 3, 9, 4))
    assert_close(fw.backend, bias(fw.array(vn)), bias_oracle(w, vn, causal=causal, skip=(1, 1)), "float64")
    assert_close(fw.backend, bias.weights(), w, "float64")
    assert_close(fw.backend, bias.matrix(9), oracles.toeplitz(w, 9, causal=causal), "float64")


@pytest.mark.parametrize("share", [False, True], ids=["per-axis", "shared"])
def test_fastrpbnd_matches_dense_oracle(framework, rng, share):
    fw = framework
    # an RGB "image": 3 x 4 pixels, 2 channel tokens each, plus a class token
    bias = fw.bias_nd(2, (3, 4, 2), axes=(0, 1), skip=(1, 0), share=share, symmetric=True)
    raw = fw.raw_tables(bias)
    assert [t.shape for t in raw] == ([(2, 4)] if share else [(2, 3), (2, 4)])
    assert bias.lengths == ([4] if share else [3, 4])
    full = [full_table(t, True) for t in raw]
    tables = [full[0], full[0], None] if share else [full[0], full[1], None]  # a longer table is read centred
    assert bias.weights()[2] is None
    vn = rng.standard_normal((5, 2, 25, 4))
    expected = bias_nd_oracle(tables, (3, 4, 2), vn, (1, 0))
    assert_close(fw.backend, bias(fw.array(vn)), expected, "float64")


# --------------------------------------------------------------------------- attention layer
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mha_matches_dense_oracle(framework, rng, causal):
    fw = framework
    layer = fw.mha(rpb=16, causal=causal)
    xn = rng.standard_normal((2, 11, 12))
    keep = _padding(2, 11)
    y = layer(fw.array(xn), fw.mask(keep))
    assert_close(fw.backend, y, layer_oracle(fw, layer, xn, keep), "float64")
    assert_close(fw.backend, layer(fw.array(xn)), layer_oracle(fw, layer, xn), "float64")
    # any leading dimensions
    assert tuple(layer(fw.array(rng.standard_normal((2, 2, 5, 12)))).shape) == (2, 2, 5, 12)


def test_mha_padding_values_never_reach_the_output(framework, rng):
    """Whatever the padding tokens hold, the real tokens' outputs are those of the clean
    input: the bias module sees zeroed padding values. (NaN garbage in the attention
    term itself is the core's non-finite policy, tested with linear_attention.)"""
    fw = framework
    layer = fw.mha(rpb=16)
    xn = rng.standard_normal((2, 11, 12))
    keep = _padding(2, 11)
    garbage = xn.copy()
    garbage[~keep] = 50.0 * rng.standard_normal(garbage[~keep].shape)
    y = fw.numpy(layer(fw.array(garbage), fw.mask(keep)))
    np.testing.assert_allclose(y[keep], layer_oracle(fw, layer, xn, keep)[keep], rtol=1e-10, atol=1e-10)


def test_mha_cross_attention(framework, rng):
    fw = framework
    layer = fw.mha(feature_map="elu")
    xn, kn, vn = rng.standard_normal((2, 5, 12)), rng.standard_normal((2, 8, 12)), rng.standard_normal((2, 8, 12))
    keep = _padding(2, 8)
    y = layer(fw.array(xn), fw.mask(keep), inputs_k=fw.array(kn), inputs_v=fw.array(vn))
    assert_close(fw.backend, y, layer_oracle(fw, layer, xn, keep, feature="elu", kx=kn, vx=vn), "float64")
    # inputs_v defaults to inputs_k
    y = layer(fw.array(xn), inputs_k=fw.array(kn))
    assert_close(fw.backend, y, layer_oracle(fw, layer, xn, feature="elu", kx=kn), "float64")


def test_mha_with_nd_bias(framework, rng):
    fw = framework
    # a class token and a 3 x 4 image with 2 channel tokens per pixel
    bias = fw.bias_nd(3, (3, 4, 2), axes=(0, 1), skip=(1, 0))
    layer = fw.mha(rpb=bias)
    xn = rng.standard_normal((2, 25, 12))
    assert_close(fw.backend, layer(fw.array(xn)), layer_oracle(fw, layer, xn), "float64")


@pytest.mark.parametrize("name", ["favor", "rff"])
def test_mha_projection_map_matches_dense_oracle(framework, rng, name):
    fw = framework
    wn = rng.standard_normal((6, 4))
    fmap = getattr(fastrpb.feature_maps, name)(fw.array(wn))
    layer = fw.mha(feature_map=fmap, causal=True)
    xn = 0.3 * rng.standard_normal((2, 7, 12))
    expected = layer_oracle(fw, layer, xn, feature=name, projection=wn)
    assert_close(fw.backend, layer(fw.array(xn)), expected, "float64")


def test_projection_is_module_state(framework, rng):
    """favor's projection is saved and restored with the layer (PyTorch: a buffer;
    Flax: a FeatureMapArray variable) and cast with it."""
    fw = framework
    favor = fastrpb.feature_maps.favor
    a = fw.mha(feature_map=favor(fw.array(rng.standard_normal((6, 4)), "float32")))
    b = fw.mha(feature_map=favor(fw.array(rng.standard_normal((6, 4)), "float32")))
    x = fw.array(0.3 * rng.standard_normal((2, 7, 12)))
    assert "float64" in str(a.feature_map.projection.dtype)  # held in the layer's dtype
    assert np.max(np.abs(fw.numpy(a(x)) - fw.numpy(b(x)))) > 1e-6
    if fw.name == "torch":
        assert "feature_map_projection" in a.state_dict()
        assert "feature_map_projection" not in dict(a.named_parameters())
        b.load_state_dict(a.state_dict())
        import copy

        cast = copy.deepcopy(a).float()
        assert cast.feature_map_projection.dtype == fw.backend.native.float32
        assert cast.double().feature_map.projection.dtype == fw.backend.native.float64
    else:
        from flax import nnx

        import fastrpb.flax as frf

        state = nnx.state(a, frf.FeatureMapArray)
        assert "feature_map_projection" in state
        assert "feature_map_projection" not in nnx.state(a, nnx.Param)
        nnx.update(b, nnx.state(a))
    assert_close(fw.backend, b(x), fw.numpy(a(x)), "float64")


@pytest.mark.parametrize("start", ["identity", "given"])
def test_hedgehog_projection_is_a_trained_parameter(framework, rng, start):
    """``feature_map="hedgehog"`` makes ``W`` a parameter starting at the identity
    (``hedgehog(W0)``: at a copy of ``W0``); it gets gradients, training moves it, and
    the layer computes Hedgehog attention with the ``W`` it holds."""
    fw = framework
    w0 = np.eye(4) if start == "identity" else rng.standard_normal((6, 4))  # head_dim 4
    given = fw.array(w0)
    layer = fw.mha(
        feature_map="hedgehog" if start == "identity" else fastrpb.feature_maps.hedgehog(given), rpb=16, causal=True
    )
    np.testing.assert_array_equal(fw.numpy(layer.feature_map_projection), w0)
    if fw.name == "torch":
        assert "feature_map_projection" in dict(layer.named_parameters())
    else:
        from flax import nnx

        assert "feature_map_projection" in nnx.state(layer, nnx.Param)
    xn = rng.standard_normal((2, 9, 12))
    x = fw.array(xn)
    grads = fw.grads(layer, x)
    (g,) = (g for name, g in grads.items() if "feature_map_projection" in name)
    assert g.shape == w0.shape
    assert np.all(np.isfinite(g))
    assert np.any(g != 0)
    target = fw.array(rng.standard_normal((2, 9, 12)))
    losses = fw.train(layer, lambda m: ((m(x) - target) ** 2).mean(), 6)
    assert losses[-1] < losses[0]
    w = fw.numpy(layer.feature_map_projection)
    assert np.max(np.abs(w - w0)) > 1e-3  # trained
    np.testing.assert_array_equal(fw.numpy(given), w0)  # the caller's array is never written to
    # the map the layer calls linear_attention with is hedgehog(W) with the W it holds
    assert layer.feature_map.signature == f"hedgehog(m={w0.shape[0]}, d=4)"
    np.testing.assert_array_equal(fw.numpy(layer.feature_map.projection), w)
    assert_close(fw.backend, layer(x), layer_oracle(fw, layer, xn, feature="hedgehog", projection=w), "float64")
    with fw.no_grad():
        y_t, _ = layer.step(x[:, 0])
    assert_close(fw.backend, y_t, layer_oracle(fw, layer, xn[:, :1], feature="hedgehog", projection=w)[:, 0], "float64")


def test_gradients_reach_every_parameter(framework, rng):
    fw = framework
    layer = fw.mha(rpb=16, causal=True)
    grads = fw.grads(layer, fw.array(rng.standard_normal((2, 9, 12))))
    assert len(grads) == 9  # 4 weights, 4 biases, the bias table
    for name, g in grads.items():
        assert np.all(np.isfinite(g)), name
        assert np.any(g != 0), name


def test_training_lowers_the_loss(framework, rng):
    fw = framework
    layer = fw.mha(rpb=16, causal=True)
    x = fw.array(rng.standard_normal((2, 9, 12)))
    target = fw.array(rng.standard_normal((2, 9, 12)))
    losses = fw.train(layer, lambda m: ((m(x) - target) ** 2).mean(), 6)
    assert losses[-1] < losses[0]


def test_step_reproduces_causal_forward(framework, rng):
    fw = framework
    bias = fw.bias(3, 16, causal=True, skip=(1, 0))
    layer = fw.mha(rpb=bias, causal=True, chunk_size=4)
    xn = rng.standard_normal((2, 8, 12))
    x = fw.array(xn)
    expected = layer_oracle(fw, layer, xn)
    with fw.no_grad():
        cache, outs = None, []
        for t in range(8):
            y_t, cache = fw.step(layer, x[:, t], cache)
            outs.append(y_t)
        assert_close(fw.backend, fw.stack(outs), expected, "float64")
        # prefill then decode
        prefix, cache = layer(x[:, :5], return_cache=True)
        assert_close(fw.backend, prefix, expected[:, :5], "float64")
        for t in range(5, 8):
            y_t, cache = fw.step(layer, x[:, t], cache)
            assert_close(fw.backend, y_t, expected[:, t], "float64")


@pytest.mark.parametrize("bias", [False, True], ids=["plain", "rpb"])
def test_chunked_prefill_with_cache_equals_one_pass(framework, rng, bias):
    # chunks of several tokens (an empty and a one-token chunk among them), then steps:
    # each output equals the full causal pass, the bias included
    fw = framework
    layer = fw.mha(rpb=fw.bias(3, 40, causal=True, skip=(1, 0)) if bias else None, causal=True, chunk_size=4)
    L = 38  # crosses the bias history's first block boundary (32 tokens)
    xn = rng.standard_normal((2, L, 12))
    x = fw.array(xn)
    expected = layer_oracle(fw, layer, xn)
    with fw.no_grad():
        cache, start = None, 0
        for end in (3, 3, 4, 20, 34):  # compiled for Flax: one compilation per chunk length
            y, cache = fw.prefill(layer, x[:, start:end], cache)
            assert_close(fw.backend, y, expected[:, start:end], "float64")
            start = end
        assert cache.values is None  # no value cache: the bias history is in the state
        assert (cache.state.rpb is not None) == bias
        for t in range(34, L):
            y_t, cache = layer.step(x[:, t], cache)
            assert_close(fw.backend, y_t, expected[:, t], "float64")
        # the last chunk without return_cache: the output alone
        _, cache = fw.prefill(layer, x[:, :30], None)
        assert_close(fw.backend, layer(x[:, 30:], cache=cache), expected[:, 30:], "float64")


# one id per case: (build the layer, call it) -> the error and a phrase of its message
ERRORS = {
    "cache-noncausal-layer": (
        lambda fw: fw.mha(8, 2),
        lambda fw, m: m(
            fw.array(np.zeros((1, 3, 8))),
            cache=fw.prefill(fw.mha(8, 2, causal=True), fw.array(np.zeros((1, 3, 8))), None)[1],
        ),
        ValueError,
        "cache= continues a causal sequence",
    ),
    "cache-not-a-cache": (
        lambda fw: fw.mha(8, 2, causal=True),
        lambda fw, m: m(fw.array(np.zeros((1, 3, 8))), cache=(1, 2)),
        TypeError,
        "LayerCache",
    ),
    "cache-skip-end": (
        lambda fw: fw.mha(8, 2, rpb=fw.bias(2, 8, causal=True, skip=(0, 1)), causal=True),
        lambda fw, m: m(fw.array(np.zeros((1, 3, 8))), return_cache=True),
        ValueError,
        "cannot honour skip",
    ),
    "causal-layer-noncausal-bias": (
        lambda fw: fw.mha(8, 2, rpb=fw.bias(2, 8), causal=True),
        None,
        ValueError,
        "causal FastRPB",
    ),
    "bias-heads": (lambda fw: fw.mha(8, 2, rpb=fw.bias(4, 8)), None, ValueError, "heads"),
    "causal-nd-bias": (lambda fw: fw.mha(12, 3, rpb=fw.bias_nd(3, (3, 4)), causal=True), None, ValueError, "FastRPBnd"),
    "not-a-bias": (lambda fw: fw.mha(8, 2, rpb="16"), None, TypeError, "rpb"),
    "indivisible": (lambda fw: fw.mha(10, 3), None, ValueError, "divisible"),
    "step-noncausal": (
        lambda fw: fw.mha(8, 2),
        lambda fw, m: m.step(fw.array(np.zeros((1, 8)))),
        ValueError,
        "causal=True",
    ),
    "width": (lambda fw: fw.mha(8, 2), lambda fw, m: m(fw.array(np.zeros((1, 3, 5)))), ValueError, "d_model = 8"),
    "cache-noncausal": (
        lambda fw: fw.mha(8, 2),
        lambda fw, m: m(fw.array(np.zeros((1, 3, 8))), return_cache=True),
        ValueError,
        "causal",
    ),
    "cross-with-bias": (
        lambda fw: fw.mha(8, 2, rpb=8),
        lambda fw, m: m(fw.array(np.zeros((1, 3, 8))), inputs_k=fw.array(np.zeros((1, 5, 8)))),
        ValueError,
        "Lq = 3 and Lk = 5",
    ),
    "bias-too-short": (
        lambda fw: fw.bias(2, 8),
        lambda fw, m: m(fw.array(np.zeros((2, 9, 3)))),
        ValueError,
        "L = 9 tokens",
    ),
    # flags take True or False only, as the functions' flags do: a string read from a
    # config file ("no", "false") is truthy and would silently switch the flag on
    "flag-bias-causal-str": (lambda fw: fw.bias(2, 8, causal="no"), None, TypeError, "causal must be a bool"),
    "flag-bias-causal-int": (lambda fw: fw.bias(2, 8, causal=1), None, TypeError, "causal must be a bool"),
    "flag-bias-symmetric": (lambda fw: fw.bias(2, 8, symmetric="yes"), None, TypeError, "symmetric must be a bool"),
    "flag-nd-share": (lambda fw: fw.bias_nd(2, (3, 4), share="yes"), None, TypeError, "share must be a bool"),
    "flag-nd-symmetric": (lambda fw: fw.bias_nd(2, (3, 4), symmetric=0), None, TypeError, "symmetric must be a bool"),
    "flag-attention-causal-str": (lambda fw: fw.mha(8, 2, causal="no"), None, TypeError, "causal must be a bool"),
    "flag-attention-causal-int": (lambda fw: fw.mha(8, 2, causal=1), None, TypeError, "causal must be a bool"),
    "attention-eps": (lambda fw: fw.mha(8, 2, eps=-1.0), None, ValueError, "eps must be a finite float >= 0"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_layer_errors(framework, case):
    build, call, error, phrase = ERRORS[case]
    with pytest.raises(error, match=phrase):  # noqa: PT012 - a case fails when the layer is built or when it is called
        layer = build(framework)
        call(framework, layer)


# --------------------------------------------------------------------------- PyTorch only
@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
def test_torch_compile_runs(torch_cpu, rng):
    import torch

    tb = torch_cpu
    fw = Framework("torch", tb)
    layer = fw.mha(rpb=16, causal=True)
    xn = rng.standard_normal((2, 9, 12))
    # aot_eager runs Dynamo's graph capture and AOTAutograd (what can break on our
    # Python-level dispatch) without needing a C++ toolchain. The default Inductor
    # backend also works here (checked by hand: same result, ~11 s to compile on 2
    # CPU cores), too slow for every test run.
    compiled = torch.compile(layer, backend="aot_eager")
    assert_close(tb, compiled(fw.array(xn)), layer_oracle(fw, layer, xn), "float64")


# --------------------------------------------------------------------------- Flax only
def _flax(jax_backend: str = "jax") -> Framework:
    return Framework("flax", _backend(jax_backend))


def test_flax_jit_gives_the_eager_numbers(rng):
    from flax import nnx

    fw = _flax()
    layer = fw.mha(rpb=16, causal=True)
    xn = rng.standard_normal((2, 11, 12))
    keep = _padding(2, 11)
    jitted = nnx.jit(lambda m, x, mask: m(x, mask))
    assert_close(fw.backend, jitted(layer, fw.array(xn), fw.mask(keep)), layer_oracle(fw, layer, xn, keep), "float64")
    _, cache = layer(fw.array(xn[:, :4]), return_cache=True)
    y_t, cache = nnx.jit(lambda m, x_t, c: m.step(x_t, c))(layer, fw.array(xn[:, 4]), cache)
    assert_close(fw.backend, y_t, layer_oracle(fw, layer, xn[:, :5])[:, 4], "float64")


def test_flax_same_rngs_same_table_under_jit():
    """Sharded initialisation builds the model inside nnx.jit: the same nnx.Rngs must
    give the same table there as eagerly."""
    from flax import nnx

    import fastrpb.flax as frf

    fw = _flax()
    eager = frf.LinearAttention(12, 3, rpb=16, causal=True, rngs=nnx.Rngs(0))
    traced = nnx.jit(lambda: frf.LinearAttention(12, 3, rpb=16, causal=True, rngs=nnx.Rngs(0)))()
    table = fw.numpy(eager.rpb.table)
    assert table.shape == (3, 31)
    assert 0.005 < table.std() < 0.02
    np.testing.assert_array_equal(fw.numpy(traced.rpb.table), table)
    nd_eager = frf.FastRPBnd(2, (3, 4), symmetric=True, rngs=nnx.Rngs(1))
    nd_traced = nnx.jit(lambda: frf.FastRPBnd(2, (3, 4), symmetric=True, rngs=nnx.Rngs(1)))()
    for a, b in zip(fw.raw_tables(nd_eager), fw.raw_tables(nd_traced), strict=True):
        np.testing.assert_array_equal(b, a)
    assert [t.shape for t in fw.raw_tables(nd_traced)] == [(2, 3), (2, 4)]
    assert fw.forward(traced, fw.array(np.ones((1, 5, 12)), "float32")).shape == (1, 5, 12)


def test_flax_restored_state_with_numpy_leaves(rng):
    """flax.serialization.from_bytes restores NumPy arrays; the layers take them as nnx.Linear does."""
    import flax.serialization
    from flax import nnx

    fw = _flax()
    favor = fastrpb.feature_maps.favor
    source = fw.mha(rpb=16, causal=True, feature_map=favor(fw.array(rng.standard_normal((6, 4)))))
    target = fw.mha(rpb=16, causal=True, feature_map=favor(fw.array(rng.standard_normal((6, 4)))), rngs=nnx.Rngs(1))
    data = flax.serialization.to_bytes(nnx.to_pure_dict(nnx.state(source)))
    state = nnx.state(target)
    restored = flax.serialization.from_bytes(nnx.to_pure_dict(state), data)
    assert isinstance(restored["rpb"]["table"], np.ndarray)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(target, state)
    assert isinstance(target.rpb.table[...], np.ndarray)
    xn = 0.3 * rng.standard_normal((2, 7, 12))
    assert_close(fw.backend, target(fw.array(xn)), fw.numpy(source(fw.array(xn))), "float64")
    y_t, _ = target.step(fw.array(xn[:, 0]))
    assert_close(fw.backend, y_t, fw.numpy(source(fw.array(xn[:, :1]))[:, 0]), "float64")
    # NumPy inputs and masks too
    keep = _padding(2, 7)
    assert_close(fw.backend, target(xn, keep), fw.numpy(source(fw.array(xn), fw.mask(keep))), "float64")


def test_flax_bias_needs_rngs_or_seed():
    import fastrpb.flax as frf

    _flax()
    with pytest.raises(TypeError, match="rngs"):
        frf.FastRPB(2, 8)


# --------------------------------------------------------------------------- drop-in (PyTorch)
def _lma(tb: Backend, E: int = 12, H: int = 3, **kw: Any) -> Any:
    import torch

    import fastrpb.torch as frt

    torch.manual_seed(0)
    layer = frt.MultiheadAttention(E, H, device=tb.device, dtype=torch.float64, **kw)
    with torch.no_grad():  # torch's initialisation zeroes the biases: give them values to test
        if layer.in_proj_bias is not None:
            layer.in_proj_bias.normal_()
            layer.out_proj.bias.normal_()
    return layer


def _lma_oracle(tb: Backend, layer: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray, **kw: Any) -> np.ndarray:
    """Batch-first (N, L, E) NumPy in and out."""
    fw = Framework("torch", tb)
    E = layer.embed_dim
    b = fw.numpy(layer.in_proj_bias) if layer.in_proj_bias is not None else np.zeros(3 * E)
    bo = fw.numpy(layer.out_proj.bias) if layer.out_proj.bias is not None else np.zeros(E)
    projections = [
        (fw.numpy(layer.q_proj_weight).T, b[:E]),
        (fw.numpy(layer.k_proj_weight).T, b[E : 2 * E]),
        (fw.numpy(layer.v_proj_weight).T, b[2 * E :]),
        (fw.numpy(layer.out_proj.weight).T, bo),
    ]
    if layer.rpb is not None:
        w = fw.raw_tables(layer.rpb)[0]
        kw["bias"] = lambda vals: bias_oracle(w, vals, causal=layer.rpb.causal, skip=layer.rpb.skip)
    return multihead_oracle(projections, layer.num_heads, q, k, v, eps=layer.eps, **kw)


def _causal_masks(tb: Backend, L: int) -> dict[str, Any]:
    import torch

    above = np.triu(np.ones((L, L), dtype=bool), 1)
    return {
        "is_causal": dict(is_causal=True),
        "bool-mask": dict(attn_mask=torch.as_tensor(above, device=tb.device)),
        "float-mask": dict(attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(L, device=tb.device)),
        "hint-and-mask": dict(is_causal=True, attn_mask=torch.as_tensor(above, device=tb.device)),
    }


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("padding", [None, "bool", "float"])
def test_lma_matches_dense_oracle(tb, rng, batch_first, padding):
    import torch

    layer = _lma(tb, batch_first=batch_first, rpb=16)
    qn = rng.standard_normal((2, 9, 12))
    keep = _padding(2, 9)
    kpm = None
    if padding == "bool":
        kpm = torch.as_tensor(~keep, device=tb.device)  # torch's polarity: True = pad
    elif padding == "float":
        kpm = torch.as_tensor(np.where(keep, 0.0, -np.inf), device=tb.device)
    x = tb.asarray(qn if batch_first else np.swapaxes(qn, 0, 1))
    out, weights = layer(x, x, x, key_padding_mask=kpm)
    assert weights is None  # need_weights=True (the default): never formed, documented
    expected = _lma_oracle(tb, layer, qn, qn, qn, keep=None if padding is None else keep)
    assert_close(tb, out, expected if batch_first else np.swapaxes(expected, 0, 1), "float64")


@pytest.mark.parametrize("how", ["is_causal", "bool-mask", "float-mask", "hint-and-mask"])
def test_lma_causal_calls(tb, rng, how):
    layer = _lma(tb, batch_first=True, rpb=16, causal=False, feature_map="elu")
    layer.rpb = _lma(tb, batch_first=True, rpb=16, causal=True).rpb  # a causal bias on a non-causal layer
    qn = rng.standard_normal((2, 9, 12))
    x = tb.asarray(qn)
    out, _ = layer(x, x, x, need_weights=False, **_causal_masks(tb, 9)[how])
    assert_close(tb, out, _lma_oracle(tb, layer, qn, qn, qn, causal=True, feature="elu"), "float64")


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("bias", [False, True], ids=["plain", "rpb"])
def test_lma_chunked_prefill_and_step_equal_one_causal_pass(tb, rng, batch_first, bias):
    """``forward(..., cache=, return_cache=True)`` over chunks of several tokens (an
    empty and a one-token chunk among them), then ``step``: each output equals the
    full causal pass, the FastRPB term included (the bias history is in the cache)."""
    import torch

    import fastrpb.torch as frt

    rpb = frt.FastRPB(3, 40, causal=True, skip=(1, 0), seed=1, device=tb.device, dtype=torch.float64) if bias else None
    layer = _lma(tb, batch_first=batch_first, causal=True, chunk_size=4, rpb=rpb)
    L = 38  # crosses the bias history's first block boundary (32 tokens)
    xn = rng.standard_normal((2, L, 12))
    expected = _lma_oracle(tb, layer, xn, xn, xn, causal=True)

    def layout(a: np.ndarray) -> np.ndarray:  # batch-first NumPy -> the layer's layout
        return a if batch_first else np.swapaxes(a, 0, 1)

    with torch.no_grad():
        cache, start = None, 0
        for end in (3, 3, 4, 20, 34):
            x = tb.asarray(layout(xn[:, start:end]))
            y, weights, cache = layer(x, x, x, cache=cache, return_cache=True)
            assert weights is None
            assert_close(tb, y, layout(expected[:, start:end]), "float64")
            start = end
        assert cache.values is None  # no value cache: the bias history is in the state
        assert (cache.state.rpb is not None) == bias
        for t in range(34, L):
            x_t = tb.asarray(xn[:, t])  # one token (N, E), whatever the layout
            y_t, cache = layer.step(x_t, x_t, x_t, cache)
            assert_close(tb, y_t, expected[:, t], "float64")
        # the last chunk without return_cache: the usual (output, None)
        x = tb.asarray(layout(xn[:, :30]))
        _, _, cache = layer(x, x, x, return_cache=True)
        x = tb.asarray(layout(xn[:, 30:]))
        y, weights = layer(x, x, x, cache=cache)
        assert weights is None
        assert_close(tb, y, layout(expected[:, 30:]), "float64")


def test_lma_cache_on_causal_calls_of_a_noncausal_layer(tb, rng):
    """A layer built without causal=True carries a cache through causal calls (the
    chunk's causal attn_mask, or is_causal=True, as nn.TransformerDecoderLayer passes
    them), with padding keys, and steps unbatched tokens."""
    import torch

    layer = _lma(tb, feature_map="elu")
    xn = rng.standard_normal((1, 9, 12))
    keep = np.ones((1, 9), dtype=bool)
    keep[0, 1] = False  # a padding key inside the first chunk
    expected = _lma_oracle(tb, layer, xn, xn, xn, causal=True, feature="elu", keep=keep)
    with torch.no_grad():
        x = tb.asarray(np.swapaxes(xn[:, :4], 0, 1))
        pad = torch.as_tensor(~keep[:, :4], device=tb.device)
        y, _, cache = layer(
            x, x, x, key_padding_mask=pad, attn_mask=_causal_masks(tb, 4)["bool-mask"]["attn_mask"], return_cache=True
        )
        assert_close(tb, y, np.swapaxes(expected[:, :4], 0, 1), "float64")
        x = tb.asarray(xn[0, 4:7])  # unbatched (L, E)
        y, _, cache = layer(x, x, x, is_causal=True, cache=cache, return_cache=True)
        assert_close(tb, y, expected[0, 4:7], "float64")
        for t in range(7, 9):
            x_t = tb.asarray(xn[0, t])  # unbatched (E,)
            y_t, cache = layer.step(x_t, x_t, x_t, cache)
            assert_close(tb, y_t, expected[0, t], "float64")


def test_lma_cross_attention_kdim_vdim_unbatched(tb, rng):
    layer = _lma(tb, kdim=5, vdim=7, dropout=0.5)
    layer.eval()  # dropout off
    qn, kn, vn = rng.standard_normal((2, 4, 12)), rng.standard_normal((2, 6, 5)), rng.standard_normal((2, 6, 7))
    out, _ = layer(*(tb.asarray(np.swapaxes(a, 0, 1)) for a in (qn, kn, vn)))
    assert_close(tb, out, np.swapaxes(_lma_oracle(tb, layer, qn, kn, vn), 0, 1), "float64")
    # unbatched (L, E), as torch accepts
    out, _ = layer(tb.asarray(qn[0]), tb.asarray(kn[0]), tb.asarray(vn[0]))
    assert_close(tb, out, _lma_oracle(tb, layer, qn[:1], kn[:1], vn[:1])[0], "float64")


def test_lma_dropout_acts_in_training(tb, rng):
    import torch

    layer = _lma(tb, dropout=0.5)
    x = tb.asarray(rng.standard_normal((5, 2, 12)))
    torch.manual_seed(1)
    a, _ = layer(x, x, x)
    torch.manual_seed(2)
    b, _ = layer(x, x, x)
    assert not torch.allclose(a, b)
    layer.eval()
    assert torch.equal(layer(x, x, x)[0], layer(x, x, x)[0])


def test_lma_loads_a_torch_multihead_attention_state(tb, rng):
    import torch

    torch.manual_seed(3)
    mha = torch.nn.MultiheadAttention(12, 3, batch_first=True, device=tb.device, dtype=torch.float64)
    layer = _lma(tb, batch_first=True)
    layer.load_state_dict(mha.state_dict())  # the packed in_proj_weight is split
    E = 12
    w = mha.in_proj_weight.detach()
    assert torch.equal(layer.q_proj_weight, w[:E])
    assert torch.equal(layer.v_proj_weight, w[2 * E :])
    qn = rng.standard_normal((2, 6, 12))
    x = tb.asarray(qn)
    assert_close(tb, layer(x, x, x)[0], _lma_oracle(tb, layer, qn, qn, qn), "float64")


def _encoder(tb: Backend, lma: Any) -> Any:
    import torch

    torch.manual_seed(0)
    enc = torch.nn.TransformerEncoderLayer(
        12, 4, dim_feedforward=24, dropout=0.0, batch_first=True, device=tb.device, dtype=torch.float64
    )
    enc.self_attn = lma
    return enc


def test_lma_in_transformer_encoder_layer(tb, rng):
    import torch

    import fastrpb.torch as frt

    lma = frt.MultiheadAttention(12, 4, batch_first=True, rpb=16, device=tb.device, dtype=torch.float64)
    enc = _encoder(tb, lma)
    x = tb.asarray(rng.standard_normal((2, 10, 12)))
    pad = torch.zeros((2, 10), dtype=torch.bool, device=tb.device)
    pad[0, -2:] = True
    train_out = enc(x, src_key_padding_mask=pad)
    enc.eval()
    with torch.no_grad():  # torch's fused native fast path (softmax) must not be taken
        eval_out = enc(x, src_key_padding_mask=pad)
    assert_close(tb, eval_out, tb.to_numpy(train_out), "float64")
    enc.train()
    target = tb.asarray(rng.standard_normal((2, 10, 12)))
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = ((enc(x, src_key_padding_mask=pad) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert lma.rpb.table.grad is not None
    assert float(lma.rpb.table.grad.abs().sum()) > 0
    # a stack built around the layer: torch's nested-tensor conversion stays off, and
    # eval without gradients gives the training-mode numbers
    stack = torch.nn.TransformerEncoder(enc, 2, enable_nested_tensor=False)
    train_out = stack(x, src_key_padding_mask=pad)
    stack.eval()
    with torch.no_grad():
        assert_close(tb, stack(x, src_key_padding_mask=pad), tb.to_numpy(train_out), "float64")


def test_lma_in_transformer_decoder_layer(tb, rng):
    import torch

    import fastrpb.torch as frt

    torch.manual_seed(0)
    kw = dict(device=tb.device, dtype=torch.float64)
    dec = torch.nn.TransformerDecoderLayer(12, 4, dim_feedforward=24, dropout=0.0, **kw)  # sequence-first
    dec.self_attn = frt.MultiheadAttention(12, 4, rpb=16, causal=True, **kw)
    dec.multihead_attn = frt.MultiheadAttention(12, 4, **kw)
    tgt = tb.asarray(rng.standard_normal((7, 2, 12)))  # (T, N, E)
    memory = tb.asarray(rng.standard_normal((11, 2, 12)))  # (S, N, E): cross-attention, S != T
    mask = torch.nn.Transformer.generate_square_subsequent_mask(7, device=tb.device, dtype=torch.float64)
    target = tb.asarray(rng.standard_normal((7, 2, 12)))
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = ((dec(tgt, memory, tgt_mask=mask) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    # causal: an output never depends on later target tokens
    later = tgt.clone()
    later[5:] = 100.0
    with torch.no_grad():
        assert_close(
            tb, dec(later, memory, tgt_mask=mask)[:5], tb.to_numpy(dec(tgt, memory, tgt_mask=mask)[:5]), "float64"
        )


LMA_ERRORS = {
    "add_bias_kv": (dict(add_bias_kv=True), None, ValueError, "add_bias_kv"),
    "add_zero_attn": (dict(add_zero_attn=True), None, ValueError, "add_zero_attn"),
    "flag-causal-str": (dict(causal="no"), None, TypeError, "causal must be a bool"),
    "flag-causal-int": (dict(causal=1), None, TypeError, "causal must be a bool"),
    "flag-batch_first": (dict(batch_first="yes"), None, TypeError, "batch_first must be a bool"),
    "flag-bias": (dict(bias="no"), None, TypeError, "bias must be a bool"),
    "flag-add_bias_kv": (dict(add_bias_kv="False"), None, TypeError, "add_bias_kv must be a bool"),
    "indivisible": (dict(E=10), None, ValueError, "divisible"),
    "dropout": (dict(dropout=1.5), None, ValueError, "dropout"),
    "mask-not-causal": (
        dict(),
        dict(attn_mask=lambda t: t.ones((5, 5), dtype=t.bool).tril()),
        ValueError,
        "causal mask",
    ),
    "mask-additive": (
        dict(),
        dict(attn_mask=lambda t: t.zeros((5, 5), dtype=t.float64) + 0.5),
        ValueError,
        "causal mask",
    ),
    "mask-3d": (dict(), dict(attn_mask=lambda t: t.zeros((6, 5, 5), dtype=t.bool)), ValueError, "2-d"),
    "mask-int": (dict(), dict(attn_mask=lambda t: t.zeros((5, 5), dtype=t.int64)), TypeError, "bool or floating"),
    "padding-shape": (
        dict(),
        dict(key_padding_mask=lambda t: t.zeros((2, 4), dtype=t.bool)),
        ValueError,
        "key_padding_mask",
    ),
    "padding-additive": (
        dict(),
        dict(key_padding_mask=lambda t: t.full((2, 5), 0.5, dtype=t.float64)),
        ValueError,
        "-inf",
    ),
    "causal-call-noncausal-bias": (dict(rpb=8), dict(is_causal=True), ValueError, "build the layer with causal=True"),
    "nested": (dict(), "nested", TypeError, "packed sequences"),
    "rank": (dict(), "rank", ValueError, "batched 3-d"),
    "cache-noncausal-call": (dict(), dict(return_cache=True), ValueError, "needs a causal call"),
    "cache-noncausal": (
        dict(),
        dict(cache=lambda t: fastrpb.torch.LayerCache(None)),
        ValueError,
        "continues a causal sequence",
    ),
    "cache-not-a-cache": (dict(), dict(is_causal=True, cache=(1, 2)), TypeError, "LayerCache"),
    "cache-skip-end": (
        dict(
            rpb=lambda tb: fastrpb.torch.FastRPB(
                3, 8, causal=True, skip=(0, 1), device=tb.device, dtype=tb.native.float64
            )
        ),
        dict(is_causal=True, return_cache=True),
        ValueError,
        "cannot honour skip",
    ),
    "step-noncausal-bias": (dict(rpb=8), "step", ValueError, "build the layer with causal=True"),
    "step-rank": (dict(), "step-rank", ValueError, "one token each"),
    "step-not-a-cache": (dict(), "step-cache", TypeError, "LayerCache"),
}


@pytest.mark.parametrize("case", list(LMA_ERRORS))
def test_lma_errors(tb, case):
    import torch

    build, call, error, phrase = LMA_ERRORS[case]
    with pytest.raises(error, match=phrase):  # noqa: PT012 - a case fails when the layer is built or when it is called
        layer = _lma(tb, **{k: v(tb) if callable(v) else v for k, v in build.items()})
        x = torch.zeros((5, 2, 12), dtype=torch.float64, device=tb.device)
        if call == "step":
            layer.step(x[0], x[0], x[0])
        elif call == "step-rank":
            layer.step(x, x, x)
        elif call == "step-cache":
            layer.step(x[0], x[0], x[0], (1, 2))
        elif call == "nested":
            nt = torch.nested.nested_tensor(
                [torch.zeros(3, 12), torch.zeros(5, 12)], layout=torch.jagged, dtype=torch.float64, device=tb.device
            )
            layer(nt, nt, nt)
        elif call == "rank":
            layer(x[None], x, x)
        elif call is not None:
            layer(x, x, x, **{k: v(torch) if callable(v) else v for k, v in call.items()})


def test_lma_cross_attention_with_bias_needs_equal_lengths(tb):
    import torch

    layer = _lma(tb, rpb=8)
    q, kv = (torch.zeros((n, 2, 12), dtype=torch.float64, device=tb.device) for n in (3, 5))
    with pytest.raises(ValueError, match="Lq = 3 and Lk = 5"):
        layer(q, kv, kv)


# --------------------------------------------------------------------------- FSDP2 (PyTorch)
FSDP2_SCRIPT = r"""
import os, sys, socket
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 3


def build():
    import fastrpb.torch as frt
    torch.manual_seed(0)
    return frt.LinearAttention(8, 2, rpb=12, causal=True, dtype=torch.float64)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 10, 8, generator=g, dtype=torch.float64), torch.randn(4, 10, 8, generator=g, dtype=torch.float64)


def train(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def worker(rank, world, port, out):
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = build()
    fully_shard(model.rpb)
    fully_shard(model)
    x, y = data()
    n = x.shape[0] // world
    train(model, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n])
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(full, out)
    dist.destroy_process_group()
    # Leave without interpreter shutdown: gloo worker threads that outlive
    # destroy_process_group (the sharded model can still hold the group) and free a collective's
    # Python-owned tensors during shutdown need the GIL, are made to exit, and abort
    # the process (flaky SIGABRT, "terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    out = sys.argv[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, out), nprocs=2, join=True)
    ref = build()
    train(ref, *data())
    got = torch.load(out)
    for k, v in ref.state_dict().items():
        err = (got[k] - v).abs().max().item()
        assert err < 1e-10, (k, err)
    print("ok", sorted(got))
"""


@pytest.mark.slow
def test_fsdp2_per_submodule_training_equals_one_process(torch_cpu, tmp_path):
    """``fully_shard(model.rpb); fully_shard(model)`` on 2 gloo processes (127.0.0.1),
    3 SGD steps on half a batch each: the parameters equal one process on the whole
    batch. Works because the attention layer calls its bias module (FSDP2 gathers the
    table in that call) instead of reading the table itself."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out.pt")],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok" in done.stdout
