"""Export and deploy: the torch layers through ``torch.export`` and ONNX Runtime, the
functions through ``jax.export``, every torch layer under ``torch.compile(fullgraph=True)``.

- ONNX and ``torch.export``: each configuration (``CASES``) is exported once per test
  module at batch 2 with a dynamic batch dimension, and run at batch 3: ONNX Runtime
  (CPU) and the ``ExportedProgram``'s module are compared with eager PyTorch (to 1e-4
  in float32) and with the dense float64 oracle of ``test_layers``. The ONNX graph is
  checked: the opset, a ``DFT`` node wherever there is a FastRPB, and no
  complex-valued tensor anywhere (inputs, outputs, initialisers, every intermediate
  after shape inference, constants, subgraphs).
- ``jax.export``: ``rpb`` and ``linear_attention`` with ``rpb=`` exported with a
  symbolic batch, serialised, deserialised and called on another batch size, against
  the eager call and the oracle.
- ``torch.compile(fullgraph=True)``: every torch layer, forward and backward, float32
  and bfloat16, equals eager (outputs and every gradient); ``aot_eager`` (Dynamo and
  AOTAutograd, no C++ toolchain) for all, Inductor for one.

Sizes are tiny: exporting, not arithmetic, is what is tested here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from test_layers import Framework, _backend, _lma_oracle, bias_nd_oracle, bias_oracle, full_table, layer_oracle

import fastrpb
import oracles
from backends_tests.backends import assert_close, tolerance

H, DH, L, M = 2, 4, 12, 16  # heads, head width, tokens, table length
E = H * DH  # model width
GRID = (3, 4)  # L tokens on a 2-d grid
CHUNK = 4  # causal chunks of the layers: several chunks in L tokens
JL, JM = 72, 80  # jax.export: tokens (more than a chunk of 64) and table length
OPSET = 18  # the ONNX opset we export to (ONNX's DFT exists from opset 17)


def _require_onnx() -> Any:
    """onnx and onnxruntime (the ``fastrpb[export]`` extra), or a skip with the reason."""
    pytest.importorskip("onnx", reason="the export extra (pip install 'fastrpb[export]') is not installed")
    return pytest.importorskip(
        "onnxruntime", reason="the export extra (pip install 'fastrpb[export]') is not installed"
    )


# --------------------------------------------------------------------------- configurations
@dataclass
class Case:
    """A layer to export, its inputs for a batch, and its float64 oracle."""

    layer: Any  # a float32 torch.nn.Module in eval mode, returning one tensor
    inputs: Callable[[np.random.Generator, int], tuple[np.ndarray, ...]]
    oracle: Callable[..., np.ndarray]  # the float64 output from the NumPy inputs
    fft: bool  # holds a FastRPB: the ONNX graph must reach DFT


def _torch_module() -> Any:
    import torch

    class Output(torch.nn.Module):
        """``MultiheadAttention`` as self-attention returning the output only (not ``(y, None)``)."""

        def __init__(self, layer: Any, **kw: Any) -> None:
            super().__init__()
            self.layer, self.kw = layer, kw

        def forward(self, x: Any, key_padding_mask: Any = None) -> Any:
            return self.layer(x, x, x, key_padding_mask, **self.kw)[0]

    return Output


def _values(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, ...]:
    return (rng.standard_normal((batch, H, L, DH)).astype(np.float32),)


def _tokens(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, ...]:
    return (rng.standard_normal((batch, L, E)).astype(np.float32),)


def _padded(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, ...]:
    """Tokens and a torch-style ``key_padding_mask`` (True = padding): the last 3 keys of the first sequence."""
    pad = np.zeros((batch, L), dtype=bool)
    pad[0, L - 3 :] = True
    return (*_tokens(rng, batch), pad)


def _fastrpb(tb: Any, **kw: Any) -> Case:
    import torch

    fw = Framework("torch", tb)
    layer = fw.module.FastRPB(H, M, seed=1, dtype=torch.float32, **kw).eval()
    w = full_table(fw.raw_tables(layer)[0], layer.symmetric)
    return Case(layer, _values, lambda v: bias_oracle(w, v, causal=layer.causal, skip=layer.skip), fft=True)


def _fastrpbnd(tb: Any) -> Case:
    import torch

    fw = Framework("torch", tb)
    layer = fw.module.FastRPBnd(H, GRID, seed=1, dtype=torch.float32).eval()
    tables = fw.raw_tables(layer)
    return Case(layer, _values, lambda v: bias_nd_oracle(tables, GRID, v, (0, 0)), fft=True)


def _linear_attention(tb: Any, feature: str, causal: bool, bias: bool) -> Case:
    import torch

    fw = Framework("torch", tb)
    torch.manual_seed(0)
    rpb = fw.module.FastRPB(H, M, causal=causal, seed=1, dtype=torch.float32) if bias else None
    layer = fw.module.LinearAttention(
        E, H, feature_map=feature, causal=causal, rpb=rpb, chunk_size=CHUNK, dtype=torch.float32
    ).eval()
    return Case(layer, _tokens, lambda x: layer_oracle(fw, layer, x, feature=feature), fft=bias)


def _multihead(tb: Any, how: str) -> Case:
    import torch

    fw = Framework("torch", tb)
    torch.manual_seed(0)
    causal = how == "is_causal"
    attn = fw.module.MultiheadAttention(
        E,
        H,
        batch_first=True,
        rpb=fw.module.FastRPB(H, M, causal=causal, seed=1, dtype=torch.float32),
        chunk_size=CHUNK,
        dtype=torch.float32,
    )
    with torch.no_grad():  # torch's initialisation zeroes the biases: give them values to test
        attn.in_proj_bias.normal_()
        attn.out_proj.bias.normal_()
    layer = _torch_module()(attn, **({"is_causal": True} if causal else {})).eval()
    if causal:
        return Case(layer, _tokens, lambda x: _lma_oracle(tb, attn, x, x, x, causal=True), fft=True)
    return Case(layer, _padded, lambda x, pad: _lma_oracle(tb, attn, x, x, x, keep=~pad), fft=True)


CASES: dict[str, Callable[[Any], Case]] = {
    "FastRPB": lambda tb: _fastrpb(tb),
    "FastRPB-causal": lambda tb: _fastrpb(tb, causal=True),
    "FastRPB-symmetric": lambda tb: _fastrpb(tb, symmetric=True),
    "FastRPB-skip": lambda tb: _fastrpb(tb, skip=(1, 2)),
    "FastRPBnd-2d": _fastrpbnd,
    **{
        f"LinearAttention-{feature}-{'causal' if causal else 'full'}-{'rpb' if bias else 'plain'}": (
            lambda tb, f=feature, c=causal, b=bias: _linear_attention(tb, f, c, b)
        )
        for feature in ("elu", "sikf")
        for causal in (False, True)
        for bias in (False, True)
    },
    "MultiheadAttention-key_padding_mask": lambda tb: _multihead(tb, "key_padding_mask"),
    "MultiheadAttention-is_causal": lambda tb: _multihead(tb, "is_causal"),
}


def _torch_inputs(arrays: tuple[np.ndarray, ...]) -> tuple[Any, ...]:
    import torch

    return tuple(torch.as_tensor(a) for a in arrays)


@pytest.fixture(scope="module")
def exported() -> Callable[[str], tuple[Case, Any]]:
    """``name -> (case, ExportedProgram)``: each configuration exported once, at batch 2, the batch dynamic."""
    cache: dict[str, tuple[Case, Any]] = {}

    def get(name: str) -> tuple[Case, Any]:
        if name not in cache:
            import torch

            case = CASES[name](_backend("torch"))
            example = _torch_inputs(case.inputs(np.random.default_rng(0), 2))
            batch = torch.export.Dim("batch")
            program = torch.export.export(case.layer, example, dynamic_shapes=tuple({0: batch} for _ in example))
            cache[name] = (case, program)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def onnx_models(exported: Callable[[str], tuple[Case, Any]]) -> Callable[[str], tuple[Case, Any]]:
    """``name -> (case, onnx.ModelProto)``, from the ``ExportedProgram`` of ``exported``."""
    cache: dict[str, tuple[Case, Any]] = {}

    def get(name: str) -> tuple[Case, Any]:
        if name not in cache:
            import torch

            case, program = exported(name)
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=OPSET, verbose=False)
            cache[name] = (case, onnx_program.model_proto)
        return cache[name]

    return get


def _check(got: np.ndarray, case: Case, inputs: tuple[np.ndarray, ...]) -> None:
    """``got`` (float32, from an exported graph) equals eager PyTorch and the float64 oracle."""
    import torch

    with torch.no_grad():
        eager = case.layer(*_torch_inputs(inputs)).numpy()
    assert got.shape == eager.shape, (got.shape, eager.shape)
    assert got.dtype == np.float32, got.dtype
    scale = float(np.max(np.abs(eager)))
    np.testing.assert_allclose(got, eager, rtol=1e-4, atol=1e-4 * scale)
    oracle = case.oracle(*(a.astype(np.float64) if a.dtype == np.float32 else a for a in inputs))
    tol = tolerance("float32")
    np.testing.assert_allclose(got, oracle, rtol=tol["rtol"], atol=tol["atol"] * float(np.max(np.abs(oracle))))


# --------------------------------------------------------------------------- torch.export
@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.uses_backend("torch")
@pytest.mark.parametrize("name", list(CASES))
def test_torch_export_runs_another_batch(exported, name, rng):
    case, program = exported(name)
    inputs = case.inputs(rng, 3)
    got = program.module()(*_torch_inputs(inputs))
    _check(got.detach().numpy(), case, inputs)


# --------------------------------------------------------------------------- ONNX
COMPLEX = ("COMPLEX64", "COMPLEX128")


def complex_tensors(model: Any) -> list[str]:
    """The names of every complex-valued tensor of an ONNX model: graph inputs, outputs,
    initialisers, intermediates (after shape inference), constants, and subgraphs."""
    import onnx

    complex_types = {getattr(onnx.TensorProto, t) for t in COMPLEX}
    found: list[str] = []

    def walk(graph: Any) -> None:
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.tensor_type.elem_type in complex_types:
                found.append(value.name)
        found.extend(t.name for t in graph.initializer if t.data_type in complex_types)
        for node in graph.node:
            for attr in node.attribute:
                tensors = [attr.t, *attr.tensors] if attr.HasField("t") else list(attr.tensors)
                found.extend(f"{node.name}.{attr.name}" for t in tensors if t.data_type in complex_types)
                for sub in (attr.g, *attr.graphs) if attr.HasField("g") else attr.graphs:
                    walk(sub)

    walk(onnx.shape_inference.infer_shapes(model).graph)
    return found


def test_complex_tensor_check_finds_one():
    """The check below can fail: a graph with one complex intermediate is caught."""
    _require_onnx()
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["z"], to=TensorProto.COMPLEX64),
            helper.make_node("Cast", ["z"], ["y"], to=TensorProto.FLOAT),
        ],
        "g",
        [x],
        [y],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    assert complex_tensors(model) == ["z"]
    assert (
        complex_tensors(
            onnx.shape_inference.infer_shapes(
                helper.make_model(
                    helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                    opset_imports=[helper.make_opsetid("", OPSET)],
                )
            )
        )
        == []
    )


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.uses_backend("torch")
@pytest.mark.parametrize("name", list(CASES))
def test_onnx_graph_is_real_and_reaches_dft(onnx_models, name):
    _require_onnx()
    case, model = onnx_models(name)
    assert {(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")} == {("", OPSET)}
    assert complex_tensors(model) == []
    ops = {node.op_type for node in model.graph.node}
    assert ("DFT" in ops) == case.fft, sorted(ops)
    # the batch is a named dimension of every input and of the output, not a number
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param, value


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.uses_backend("torch")
@pytest.mark.parametrize("name", list(CASES))
def test_onnx_runtime_runs_another_batch(onnx_models, name, rng):
    ort = _require_onnx()
    case, model = onnx_models(name)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = case.inputs(rng, 3)
    feed = {i.name: a for i, a in zip(session.get_inputs(), inputs, strict=True)}
    (got,) = session.run(None, feed)
    _check(got, case, inputs)


# --------------------------------------------------------------------------- jax.export
def _jax_attention(feature: str, causal: bool) -> tuple[Callable[..., Any], Callable[..., np.ndarray]]:
    def f(q: Any, k: Any, v: Any, w: Any) -> Any:
        return fastrpb.linear_attention(q, k, v, feature_map=feature, causal=causal, rpb=w)

    def oracle(q: np.ndarray, k: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        if feature == "sikf":
            attention = oracles.exp_kernel_attention(q, k, v, causal=causal, eps=1e-6)
        else:
            attention = oracles.kernel_attention(oracles.elu1(q), oracles.elu1(k), v, causal=causal, eps=1e-6)
        return attention + oracles.rpb(v, w, causal)

    return f, oracle


JAX_CASES: dict[str, tuple[Callable[..., Any], Callable[..., np.ndarray], int]] = {
    "rpb": (lambda v, w: fastrpb.rpb(v, w), lambda v, w: oracles.rpb(v, w), 1),
    "rpb-causal": (lambda v, w: fastrpb.rpb(v, w, causal=True), lambda v, w: oracles.rpb(v, w, True), 1),
    **{
        f"linear_attention-{feature}-{'causal' if causal else 'full'}-rpb": (*_jax_attention(feature, causal), 3)
        for feature in ("elu", "sikf")
        for causal in (False, True)
    },
}


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.uses_backend("jax")
@pytest.mark.parametrize("name", list(JAX_CASES))
def test_jax_export_symbolic_batch(name, rng):
    import jax
    import jax.numpy as jnp
    from jax import export

    backend = _backend("jax")
    f, oracle, n_batched = JAX_CASES[name]
    (b,) = export.symbolic_shape("b")
    specs = [jax.ShapeDtypeStruct((b, H, JL, DH), jnp.float32)] * n_batched
    specs.append(jax.ShapeDtypeStruct((H, 2 * JM - 1), jnp.float32))
    blob = export.export(jax.jit(f))(*specs).serialize()
    restored = export.deserialize(blob)
    assert "b" in str(restored.in_avals[0].shape), restored.in_avals
    arrays = [rng.standard_normal((3, H, JL, DH)) for _ in range(n_batched)]
    arrays.append(0.1 * rng.standard_normal((H, 2 * JM - 1)))
    inputs = [jnp.asarray(a, dtype=jnp.float32) for a in arrays]
    got = restored.call(*inputs)
    assert_close(backend, got, f(*inputs), "float32", rtol=1e-5, atol=1e-5)
    assert_close(backend, got, oracle(*(np.asarray(x, dtype=np.float64) for x in inputs)), "float32")


# --------------------------------------------------------------------------- torch.compile
def _compile_case(name: str, precision: str) -> tuple[Any, tuple[Any, ...]]:
    """A torch layer of ``COMPILE_CASES`` in ``precision``, and its inputs (batch 2)."""
    import torch

    import fastrpb.torch as frt

    torch.manual_seed(0)
    dtype = getattr(torch, precision)
    kind, _, options = name.partition("-")
    causal = "causal" in options
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.standard_normal((2, L + 1, E)), dtype=dtype)  # one token more: a skipped one
    keep = torch.ones((2, L + 1), dtype=torch.bool)
    keep[0, -3:] = False
    if kind.startswith("FastRPB"):
        layer = frt.FastRPBnd(H, GRID, seed=1) if kind == "FastRPBnd" else frt.FastRPB(H, M, causal=causal, seed=1)
        return layer.to(dtype), (torch.as_tensor(rng.standard_normal((2, H, L, DH)), dtype=dtype),)
    if kind == "LinearAttention":
        feature = "elu" if "elu" in options else "sikf"
        rpb: Any = None
        if "rpbnd" in options:
            rpb = frt.FastRPBnd(H, GRID, skip=(1, 0), seed=1)
        elif "rpb" in options:
            rpb = frt.FastRPB(H, M, causal=causal, seed=1)
        layer = frt.LinearAttention(E, H, feature_map=feature, causal=causal, rpb=rpb, chunk_size=CHUNK)
        args = (x, keep) if "mask" in options else (x if "rpbnd" in options else x[:, :L],)
        return layer.to(dtype), args
    attn = frt.MultiheadAttention(
        E, H, batch_first=True, rpb=frt.FastRPB(H, M, causal=causal, seed=1), chunk_size=CHUNK
    )
    layer = _torch_module()(attn, **({"is_causal": True} if causal else {}))
    return layer.to(dtype), ((x[:, :L], ~keep[:, :L]) if "mask" in options else (x[:, :L],))


COMPILE_CASES = [
    "FastRPB",
    "FastRPB-causal",
    "FastRPBnd",
    "LinearAttention-elu-rpb-mask",
    "LinearAttention-elu-rpbnd-mask",
    "LinearAttention-elu-causal-rpb",
    "LinearAttention-sikf-causal-rpb",
    "LinearAttention-sikf-rpbnd",
    "MultiheadAttention-mask",
    "MultiheadAttention-causal",
]


def _forward_backward(layer: Any, args: tuple[Any, ...], call: Any = None) -> tuple[Any, dict[str, Any]]:
    """The output of ``call`` (default: ``layer``) and the gradients of ``sum(output *
    fixed weights)`` by parameter of ``layer`` and by input."""
    import torch

    layer.zero_grad()
    inputs = [a.detach().requires_grad_(a.is_floating_point()) for a in args]
    out = (layer if call is None else call)(*inputs)
    weights = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape).to(out.dtype)
    (out * weights).float().sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    grads.update({f"input {i}": a.grad for i, a in enumerate(inputs) if a.requires_grad})
    return out.detach(), grads


def _assert_compiled_equals_eager(name: str, precision: str, backend: str) -> None:
    import torch

    tb = _backend("torch")
    torch._dynamo.reset()  # a fresh cache: no recompile limit shared across the cases
    layer, args = _compile_case(name, precision)
    expected, expected_grads = _forward_backward(layer, args)
    got, grads = _forward_backward(layer, args, torch.compile(layer, fullgraph=True, backend=backend))
    tol = dict(rtol=1e-5, atol=1e-5) if precision == "float32" else {}
    assert_close(tb, got, expected, precision, **tol)
    assert grads.keys() == expected_grads.keys()
    for key, grad in grads.items():
        assert grad is not None, f"no gradient reaches {key}"
        assert_close(tb, grad, expected_grads[key], precision, **tol)


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.uses_backend("torch")
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", COMPILE_CASES)
def test_fullgraph_compile_equals_eager(name, precision):
    """Forward and backward under ``torch.compile(fullgraph=True)`` (Dynamo and AOTAutograd)."""
    _assert_compiled_equals_eager(name, precision, "aot_eager")


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.uses_backend("torch")
def test_fullgraph_compile_with_inductor():
    """The default backend too (C++ code generation), forward and backward, on the causal
    bias layer: the quickest case to compile that has parameters and an FFT (test_engines
    compiles attention and the bias forward with Inductor against the float64 oracle)."""
    _assert_compiled_equals_eager("FastRPB-causal", "float32", "inductor")
