"""fastrpb on the engines users scale out with: sharded JAX, Dask, ``torch.compile``.

- JAX data parallel (``sharded_jax.py``, in a subprocess: 8 emulated CPU devices must
  be set before JAX is imported): under ``jax.jit`` with values sharded over batch,
  heads or both, ``rpb``, ``rpb_nd`` and ``linear_attention(rpb=)`` equal the oracle
  and the unsharded call (gradients too), compile without a value-sized all-gather or
  all-to-all, and keep the input's sharding; eager calls on sharded arrays work.
- Dask: every public function takes Dask arrays chunked along leading axes, lazily,
  equals the float64 oracle after ``.compute()``, and its task graph has the same size
  for L = 1,024 and 4,096.
- ``torch.compile(fullgraph=True)`` of the functions and the layers, with the
  ``eager``/``aot_eager`` backends and ``inductor``, equals the oracle without warnings.
- The runnable examples of docs/scaling.md's "Data parallel" and "Dask" sections.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import oracles
from backends import requested

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _selected(name: str) -> bool:
    names, _ = requested()
    return name in names


@pytest.mark.skipif(not _selected("jax"), reason="jax is not in FASTRPB_BACKENDS")
def test_jax_sharded_jit_keeps_the_work_local():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE)])}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharded_jax.py")], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-6000:]}"
    assert proc.stdout.rstrip().endswith("OK"), proc.stdout
    for layout in ("batch", "heads", "batch+heads"):
        assert f"{layout}: eager calls equal" in proc.stdout


# --------------------------------------------------------------------------- Dask
def _centre(w, M):
    """The central ``2 M - 1`` entries of a table (offsets -(M-1) .. M-1)."""
    mid = (w.shape[-1] - 1) // 2
    return w[..., mid - M + 1 : mid + M]


def _dask_cases():
    import fastrpb

    def la(fmap, causal):
        return lambda v, w: fastrpb.linear_attention(v, v * 0.5, v, feature_map=fmap, causal=causal, rpb=w, chunk_size=16)

    def la_oracle(fmap, causal):
        def oracle(v, w):
            if fmap == "elu":
                out = oracles.kernel_attention(oracles.elu1(v), oracles.elu1(v * 0.5), v, causal=causal, eps=1e-6)
            else:
                out = oracles.exp_kernel_attention(v, v * 0.5, v, causal=causal, eps=1e-6)
            return out + oracles.rpb(v, w, causal=causal)

        return oracle

    cases = {
        "rpb": (lambda v, w: fastrpb.rpb(v, w, skip=(1, 1)), lambda v, w: oracles.rpb(v, w, skip=(1, 1))),
        "rpb causal": (lambda v, w: fastrpb.rpb(v, w, causal=True), lambda v, w: oracles.rpb(v, w, causal=True)),
    }
    for causal in (False, True):
        cases[f"rpb_nd causal={causal}"] = (
            lambda v, w, c=causal: fastrpb.rpb_nd(v, [_centre(w, 16), w], (16, v.shape[-2] // 16), causal=c),
            lambda v, w, c=causal: oracles.rpb_nd(v, [_centre(w, 16), w], (16, v.shape[-2] // 16), causal=c),
        )
        for fmap in ("elu", "sikf"):
            cases[f"linear_attention {fmap} causal={causal} rpb="] = (la(fmap, causal), la_oracle(fmap, causal))
        cases[f"softmax_attention causal={causal}"] = (
            lambda v, w, c=causal: fastrpb.softmax_attention(v, v, v, causal=c),
            lambda v, w, c=causal: oracles.softmax_attention(v, v, v, causal=c),
        )
    return cases


@pytest.mark.skipif(not _selected("numpy"), reason="numpy is not in FASTRPB_BACKENDS")
@pytest.mark.parametrize("case", sorted(_dask_cases()))
def test_dask_lazy_equal_and_graph_independent_of_length(case):
    da = pytest.importorskip("dask.array")
    f, oracle = _dask_cases()[case]
    rng = np.random.default_rng(7)
    B, H, D = 2, 2, 4
    sizes = {}
    for L in (1024, 4096, 64):
        v = rng.standard_normal((B, H, L, D))
        # per-head table, M = L
        w = rng.standard_normal((H, 2 * L - 1)) * 0.1
        dv = da.from_array(v, chunks=(1, 1, L, D))  # chunked along the leading axes only
        dw = da.from_array(w, chunks=(1, 2 * L - 1))
        out = f(dv, dw)
        assert isinstance(out, da.Array), type(out)
        sizes[L] = len(out.__dask_graph__())
    assert sizes[1024] == sizes[4096], sizes
    got = out.compute()
    want = oracle(v, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * max(1.0, float(np.max(np.abs(want)))))


# --------------------------------------------------------------------------- torch.compile
def _torch_cases():
    import torch

    import fastrpb
    import fastrpb.torch as ft

    torch.manual_seed(0)
    x = torch.randn(2, 24, 16, dtype=torch.float64)
    w = torch.randn(4, 2 * 24 - 1, dtype=torch.float64) * 0.1
    q, k, v = (torch.randn(2, 4, 24, 8, dtype=torch.float64) for _ in range(3))
    mla = ft.MultiheadLinearAttention(16, 4, rpb=ft.FastRPB(4, 24, causal=True, dtype=torch.float64), causal=True, dtype=torch.float64)
    lmha = ft.LinearMultiheadAttention(16, 4, batch_first=True, feature_map="elu", dtype=torch.float64)
    return {
        "linear_attention elu": (lambda: fastrpb.linear_attention(q, k, v), lambda: oracles.kernel_attention(
            oracles.elu1(q.numpy()), oracles.elu1(k.numpy()), v.numpy(), eps=1e-6)),
        "linear_attention sikf causal rpb=": (
            lambda: fastrpb.linear_attention(q, k, v, feature_map="sikf", causal=True, rpb=w, chunk_size=8),
            lambda: oracles.exp_kernel_attention(q.numpy(), k.numpy(), v.numpy(), causal=True, eps=1e-6)
            + oracles.rpb(v.numpy(), w.numpy(), causal=True),
        ),
        "softmax_attention causal": (lambda: fastrpb.softmax_attention(q, k, v, causal=True),
                                     lambda: oracles.softmax_attention(q.numpy(), k.numpy(), v.numpy(), causal=True)),
        "rpb": (lambda: fastrpb.rpb(v, w, skip=(1, 0)), lambda: oracles.rpb(v.numpy(), w.numpy(), skip=(1, 0))),
        "rpb causal": (lambda: fastrpb.rpb(v, w, causal=True), lambda: oracles.rpb(v.numpy(), w.numpy(), causal=True)),
        "MultiheadLinearAttention": (lambda: mla(x), None),
        "LinearMultiheadAttention": (lambda: lmha(x, x, x)[0], None),
    }


@pytest.mark.skipif(not _selected("torch"), reason="torch is not in FASTRPB_BACKENDS")
@pytest.mark.parametrize("backend_name", ["eager", "aot_eager"])
def test_torch_compile_fullgraph_without_warnings(backend_name, recwarn):
    torch = pytest.importorskip("torch")
    cases = _torch_cases()
    for name, (f, oracle) in cases.items():
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend=backend_name)
        got = compiled()
        want = f() if oracle is None else torch.as_tensor(oracle())
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-9, atol=1e-9, msg=name)
        if oracle is not None:  # and the uncompiled call, for the layers the reference
            torch.testing.assert_close(got, f(), rtol=1e-9, atol=1e-9, msg=name)
    messages = [str(w.message) for w in recwarn.list]
    assert not messages, messages


@pytest.mark.skipif(not _selected("torch"), reason="torch is not in FASTRPB_BACKENDS")
def test_torch_compile_inductor_rpb_and_attention(recwarn):
    torch = pytest.importorskip("torch")
    cases = _torch_cases()
    for name in ("rpb causal", "linear_attention elu"):
        f, oracle = cases[name]
        torch._dynamo.reset()
        got = torch.compile(f, fullgraph=True, backend="inductor")()
        torch.testing.assert_close(got, torch.as_tensor(oracle()), rtol=1e-9, atol=1e-9, msg=name)
    # (Inductor itself warns about its own use of torch.jit.script_method: not ours)
    ours = [str(w.message) for w in recwarn.list if "lru_cache" in str(w.message) or "fastrpb" in str(w.filename)]
    assert not ours, ours


# --------------------------------------------------------------------------- docs
def _scaling_examples() -> dict[str, str]:
    """The python blocks of docs/scaling.md's "Data parallel" and "Dask" sections."""
    text = (ROOT / "docs" / "scaling.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return {
        "jax": next(b for b in blocks if "jax.jit(lambda q, k, v, w" in b),
        "dask": next(b for b in blocks if "dask.array" in b),
    }


@pytest.mark.skipif(not _selected("jax"), reason="jax is not in FASTRPB_BACKENDS")
def test_docs_data_parallel_example(tmp_path):
    script = tmp_path / "data_parallel.py"
    script.write_text(_scaling_examples()["jax"])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(script)], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    spec, collectives, error = proc.stdout.strip().splitlines()
    assert spec == "P('data', 'model')", spec
    assert collectives == "False False", collectives
    assert float(error) < 1e-4


@pytest.mark.skipif(not _selected("numpy"), reason="numpy is not in FASTRPB_BACKENDS")
def test_docs_dask_example():
    pytest.importorskip("dask.array")
    namespace: dict = {}
    exec(compile(_scaling_examples()["dask"], "scaling.md", "exec"), namespace)
    v = namespace["v"].compute()
    want = oracles.exp_kernel_attention(v, v, v, causal=True, eps=1e-6) + oracles.rpb(v, namespace["w"], causal=True)
    np.testing.assert_allclose(namespace["result"], want, rtol=1e-6, atol=1e-6)
