"""fastrpb on the engines users scale out with: sharded JAX, Dask, ``torch.compile``.

- JAX data parallel (``sharded_jax.py``, in a subprocess: 8 emulated CPU devices must
  be set before JAX is imported): under ``jax.jit`` with values sharded over batch,
  heads or both, ``rpb``, ``rpb_nd`` and ``linear_attention(rpb=)`` equal the oracle
  and the unsharded call (gradients too), compile without a value-sized all-gather or
  all-to-all, and keep the input's sharding; eager calls on sharded arrays work.
- Dask: every public function takes Dask arrays chunked along leading axes, lazily,
  equals the float64 oracle after ``.compute()``, and its task graph has the same size
  for L = 1,024 and 4,096. On a ``dask.distributed`` cluster of two worker processes
  (started and closed by the module), the bias, linear attention with the bias and
  the streaming paths compute to what NumPy gives.
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
from backends_tests.backends import requested

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _selected(name: str) -> bool:
    names, _ = requested()
    return name in names


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.skipif(not _selected("jax"), reason="jax is not in FASTRPB_BACKENDS")
def test_jax_sharded_jit_keeps_the_work_local():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE)])}
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharded_jax.py")],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
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


# A fixed (m, D) projection for the maps that take one (favor, rff, hedgehog); the
# library gets it as a Dask array beside Dask inputs (one library per call).
_PROJECTION = np.random.default_rng(11).standard_normal((8, 4)) * 0.5


def _dask_projection():
    import dask.array as da

    return da.from_array(_PROJECTION, chunks=_PROJECTION.shape)


def _dask_map(name: str):
    """``fastrpb.feature_maps.<name>`` made for Dask inputs (its projection a Dask array)."""
    import fastrpb.feature_maps as fm

    if name in ("favor", "rff", "hedgehog"):
        return getattr(fm, name)(_dask_projection())
    return fm.dpfp(nu=2) if name == "dpfp" else getattr(fm, name)()


def _exp_offsets(lx, axes):
    """exp(lx - max over ``axes``): the documented stabilised form of an exponential map."""
    return np.exp(lx - lx.max(axis=axes, keepdims=True))


# name -> (query features, key features) of the float64 oracle, from the formulas
_FEATURES = {
    "elu": (oracles.elu1, oracles.elu1),
    "relu": (oracles.relu, oracles.relu),
    "sikf": (lambda x: _exp_offsets(x, -1), lambda x: _exp_offsets(x, (-2, -1))),
    "dpfp": (lambda x: oracles.dpfp(x, nu=2), lambda x: oracles.dpfp(x, nu=2)),
    "favor": (
        lambda x: _exp_offsets(oracles.favor_log(x, _PROJECTION), -1),
        lambda x: _exp_offsets(oracles.favor_log(x, _PROJECTION), (-2, -1)),
    ),
    "rff": (lambda x: oracles.rff(x, _PROJECTION), lambda x: oracles.rff(x, _PROJECTION)),
    "taylor": (oracles.taylor, oracles.taylor),
    "hedgehog": (lambda x: oracles.hedgehog(x, _PROJECTION), lambda x: oracles.hedgehog(x, _PROJECTION)),
}


def _attention_oracle(fmap, q, k, v, *, causal):
    """Linear attention of the map ``fmap`` (a name of ``_FEATURES``), float64, dense."""
    if fmap == "sikf":
        return oracles.exp_kernel_attention(q, k, v, causal=causal, eps=1e-6)
    if fmap == "favor":
        lq, lk = oracles.favor_log(q, _PROJECTION), oracles.favor_log(k, _PROJECTION)
        return oracles.exp_kernel_attention(lq, lk, v, causal=causal, eps=1e-6)
    fq, fk = _FEATURES[fmap]
    return oracles.kernel_attention(fq(q), fk(k), v, causal=causal, eps=1e-6)


def _queries_keys(fmap, v):
    """The queries and keys of the attention cases. rff's kernel estimate is signed: its
    inputs are kept small, so the estimate stays near 1 and the normaliser well away from 0."""
    return (v * 0.2, v * 0.1) if fmap == "rff" else (v, v * 0.5)


def _concat(parts):
    """Join outputs along the sequence axis (Dask or NumPy)."""
    import dask.array as da

    return da.concatenate(parts, axis=-2) if isinstance(parts[0], da.Array) else np.concatenate(parts, axis=-2)


def _dask_cases():
    import fastrpb
    import fastrpb.feature_maps as fm

    def la(fmap, causal):
        def f(v, w):
            q, k = _queries_keys(fmap, v)
            return fastrpb.linear_attention(q, k, v, feature_map=_dask_map(fmap), causal=causal, rpb=w, chunk_size=16)

        return f

    def la_oracle(fmap, causal):
        def oracle(v, w):
            q, k = _queries_keys(fmap, v)
            return _attention_oracle(fmap, q, k, v, causal=causal) + oracles.rpb(v, w, causal=causal)

        return oracle

    def la_stream(fmap):
        # a prompt in one call, 24 more tokens in a second call, then 8 decoding steps:
        # every call takes and gives back a state of Dask arrays, the FastRPB history included
        def f(v, w):
            q, k = _queries_keys(fmap, v)
            L, m = v.shape[-2], _dask_map(fmap)
            cut = (L - 32, L - 8)
            first, state = fastrpb.linear_attention(
                q[..., : cut[0], :],
                k[..., : cut[0], :],
                v[..., : cut[0], :],
                feature_map=m,
                causal=True,
                rpb=w,
                chunk_size=16,
                return_state=True,
            )
            second, state = fastrpb.linear_attention(
                q[..., cut[0] : cut[1], :],
                k[..., cut[0] : cut[1], :],
                v[..., cut[0] : cut[1], :],
                feature_map=m,
                causal=True,
                rpb=w,
                chunk_size=16,
                initial_state=state,
                return_state=True,
            )
            assert isinstance(state.S, type(v)), type(state.S)  # Dask in, Dask state
            assert isinstance(state.rpb.window, type(v)), type(state.rpb.window)
            rows = []
            for t in range(cut[1], L):
                out_t, state = fastrpb.linear_attention_step(
                    state, q[..., t, :], k[..., t, :], v[..., t, :], feature_map=m, rpb=w
                )
                rows.append(out_t[..., None, :])
            return _concat([first, second, *rows])

        return f

    def rpb_stream(v, w):
        # chunk, chunk, then steps; skip=(1, 0) carried by the state
        L = v.shape[-2]
        first, state = fastrpb.rpb(v[..., : L - 32, :], w, causal=True, skip=(1, 0), return_state=True)
        second, state = fastrpb.rpb(
            v[..., L - 32 : L - 8, :], w, causal=True, skip=(1, 0), initial_state=state, return_state=True
        )
        assert isinstance(state.window, type(v)), state
        rows = []
        for t in range(L - 8, L):
            out_t, state = fastrpb.rpb_step(state, v[..., t, :], w)
            rows.append(out_t[..., None, :])
        return _concat([first, second, *rows])

    def rpb_steps(v, w):
        # 40 steps from the start (state=None), across the 32-token window
        state, rows = None, []
        for t in range(40):
            out_t, state = fastrpb.rpb_step(state, v[..., t, :], w)
            rows.append(out_t[..., None, :])
        return _concat(rows)

    def half(w):
        """The symmetric half ``h`` (offsets 0 .. M - 1) of a table."""
        return w[..., (w.shape[-1] - 1) // 2 :]

    cases = {
        "rpb": (lambda v, w: fastrpb.rpb(v, w, skip=(1, 1)), lambda v, w: oracles.rpb(v, w, skip=(1, 1))),
        "rpb causal": (lambda v, w: fastrpb.rpb(v, w, causal=True), lambda v, w: oracles.rpb(v, w, causal=True)),
        "rpb causal return_state, initial_state, rpb_step": (
            rpb_stream,
            lambda v, w: oracles.rpb(v, w, causal=True, skip=(1, 0)),
        ),
        "rpb_step from the start": (rpb_steps, lambda v, w: oracles.rpb(v[..., :40, :], w, causal=True)),
        "rpb_matrix": (lambda v, w: fastrpb.rpb_matrix(w, v.shape[-2]), lambda v, w: oracles.toeplitz(w, v.shape[-2])),
        "rpb_matrix causal": (
            lambda v, w: fastrpb.rpb_matrix(w, v.shape[-2], causal=True),
            lambda v, w: oracles.toeplitz(w, v.shape[-2], causal=True),
        ),
        "symmetric_table": (
            lambda v, w: fastrpb.symmetric_table(half(w)),
            lambda v, w: np.concatenate([np.flip(half(w)[..., 1:], axis=-1), half(w)], axis=-1),
        ),
        "rpb_init": (
            lambda v, w: fastrpb.rpb_init(3, v.shape[-2], seed=5, like=v, scale=0.1),
            lambda v, w: np.random.default_rng(5).standard_normal((3, 2 * v.shape[-2] - 1)) * 0.1,
        ),
        "random_projection": (
            lambda v, w: fm.random_projection(6, v.shape[-1], seed=4, orthogonal=False, like=v),
            lambda v, w: np.random.default_rng(4).standard_normal((6, v.shape[-1])),
        ),
        "softmax_attention logits_bias=rpb_matrix, rpb=": (
            lambda v, w: fastrpb.softmax_attention(
                v, v * 0.5, v, logits_bias=fastrpb.rpb_matrix(w, v.shape[-2]), rpb=w
            ),
            lambda v, w: (
                oracles.softmax_attention(v, v * 0.5, v, logits_bias=oracles.toeplitz(w, v.shape[-2]))
                + oracles.rpb(v, w)
            ),
        ),
        "linear_attention sikf causal key_mask": (
            lambda v, w: fastrpb.linear_attention(
                v, v * 0.5, v, feature_map="sikf", causal=True, key_mask=v[:, :1, :, 0] > -1.0, chunk_size=16
            ),
            lambda v, w: oracles.exp_kernel_attention(
                v, v * 0.5, v, causal=True, key_mask=v[:, :1, :, 0] > -1.0, eps=1e-6
            ),
        ),
    }
    for causal in (False, True):
        cases[f"rpb_nd causal={causal}"] = (
            lambda v, w, c=causal: fastrpb.rpb_nd(v, [_centre(w, 16), w], (16, v.shape[-2] // 16), causal=c),
            lambda v, w, c=causal: oracles.rpb_nd(v, [_centre(w, 16), w], (16, v.shape[-2] // 16), causal=c),
        )
        for fmap in _FEATURES:
            cases[f"linear_attention {fmap} causal={causal} rpb="] = (la(fmap, causal), la_oracle(fmap, causal))
        cases[f"softmax_attention causal={causal}"] = (
            lambda v, w, c=causal: fastrpb.softmax_attention(v, v, v, causal=c),
            lambda v, w, c=causal: oracles.softmax_attention(v, v, v, causal=c),
        )
    for fmap, (fq, fk) in _FEATURES.items():
        cases[f"feature_maps.{fmap} queries"] = (lambda v, w, m=fmap: _dask_map(m).queries(v), lambda v, w, f=fq: f(v))
        cases[f"feature_maps.{fmap} keys"] = (lambda v, w, m=fmap: _dask_map(m).keys(v), lambda v, w, f=fk: f(v))
    for fmap in ("elu", "sikf", "favor", "taylor"):
        cases[f"linear_attention {fmap} return_state, initial_state, linear_attention_step rpb="] = (
            la_stream(fmap),
            la_oracle(fmap, True),
        )
    return cases


def _refuse_to_compute(*args, **kwargs):
    raise AssertionError("a Dask graph was computed while fastrpb built its result (the call must be lazy)")


@pytest.mark.skipif(not _selected("numpy"), reason="numpy is not in FASTRPB_BACKENDS")
@pytest.mark.parametrize("case", sorted(_dask_cases()))
def test_dask_lazy_equal_and_graph_independent_of_length(case):
    dask = pytest.importorskip("dask")
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
        with dask.config.set(scheduler=_refuse_to_compute):  # nothing computed before .compute()
            out = f(dv, dw)
        assert isinstance(out, da.Array), type(out)
        sizes[L] = len(out.__dask_graph__())
    assert sizes[1024] == sizes[4096], sizes
    got = out.compute(scheduler="sync")
    want = oracle(v, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * max(1.0, float(np.max(np.abs(want)))))


# The cases of _dask_cases that run on a real cluster: the bias (causal and not, N-d),
# linear attention with the bias (causal and not) and the streaming chunk path.
CLUSTER_CASES = [
    "rpb",
    "rpb causal",
    "rpb_nd causal=False",
    "linear_attention elu causal=False rpb=",
    "linear_attention sikf causal=True rpb=",
    "rpb causal return_state, initial_state, rpb_step",
    "linear_attention elu return_state, initial_state, linear_attention_step rpb=",
]


@pytest.fixture(scope="module")
def dask_cluster():
    """A ``dask.distributed`` cluster of two worker processes on 127.0.0.1, for this module."""
    pytest.importorskip("dask.array")
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        yield client


@pytest.mark.slow
@pytest.mark.skipif(not _selected("numpy"), reason="numpy is not in FASTRPB_BACKENDS")
@pytest.mark.parametrize("case", CLUSTER_CASES)
def test_dask_distributed_cluster_equals_numpy(dask_cluster, case):
    """On two worker processes the graph computes to what the same call gives on NumPy
    arrays (and to the float64 oracle); its size does not depend on L."""
    da = pytest.importorskip("dask.array")
    distributed = pytest.importorskip("distributed")
    f, oracle = _dask_cases()[case]
    rng = np.random.default_rng(11)
    sizes, graphs = {}, {}
    for L in (1024, 256):  # computed at the last length
        v = rng.standard_normal((2, 2, L, 4))
        w = rng.standard_normal((2, 2 * L - 1)) * 0.1
        graphs[L] = f(da.from_array(v, chunks=(1, 1, L, 4)), da.from_array(w, chunks=(1, 2 * L - 1)))
        sizes[L] = len(graphs[L].__dask_graph__())
    assert sizes[256] == sizes[1024], sizes
    with distributed.get_task_stream(client=dask_cluster) as stream:
        got = dask_cluster.compute(graphs[256]).result()
    np.testing.assert_allclose(got, f(v, w), rtol=1e-12, atol=1e-12 * max(1.0, float(np.max(np.abs(got)))))
    want = oracle(v, w)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * max(1.0, float(np.max(np.abs(want)))))
    # the tasks ran in the two worker processes, not in this one
    pids = dask_cluster.run(os.getpid)
    assert len(pids) == 2, pids
    assert os.getpid() not in pids.values(), pids
    assert stream.data, "no task ran on the cluster"
    assert {task["worker"] for task in stream.data} <= set(pids), stream.data[:3]


@pytest.mark.skipif(not _selected("numpy"), reason="numpy is not in FASTRPB_BACKENDS")
def test_dask_orthogonal_random_projection_is_lazy_with_orthogonal_blocks():
    dask = pytest.importorskip("dask")
    da = pytest.importorskip("dask.array")
    import fastrpb.feature_maps as fm

    like = da.zeros((2, 4), chunks=(1, 4))
    with dask.config.set(scheduler=_refuse_to_compute):
        w = fm.random_projection(8, 4, seed=2, like=like)
    assert isinstance(w, da.Array), type(w)
    w = w.compute(scheduler="sync")
    for block in (w[:4], w[4:]):  # rows of a block: orthogonal
        gram = block @ block.T
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-12)


@pytest.mark.skipif(not _selected("numpy"), reason="numpy is not in FASTRPB_BACKENDS")
def test_dask_stream_past_the_table_is_an_error_without_computing():
    """The count of a Dask state is known without computing: a stream past the table
    raises (as on NumPy), never a silent NaN."""
    dask = pytest.importorskip("dask")
    da = pytest.importorskip("dask.array")
    import fastrpb

    v = da.from_array(np.ones((2, 6, 3)), chunks=(1, 6, 3))
    w = da.from_array(np.ones((2, 11)), chunks=(1, 11))  # M = 6
    with dask.config.set(scheduler=_refuse_to_compute):
        _, state = fastrpb.rpb(v, w, causal=True, return_state=True)
        with pytest.raises(ValueError, match="past the bias table w"):
            fastrpb.rpb_step(state, v[..., 0, :], w)
        with pytest.raises(ValueError, match="past the bias table w"):
            fastrpb.rpb(v[..., :1, :], w, causal=True, initial_state=state)


@pytest.mark.skipif(not _selected("numpy"), reason="numpy is not in FASTRPB_BACKENDS")
def test_dask_cu_seqlens_array_is_refused_static_offsets_work():
    """Packed offsets set shapes: a Dask ``cu_seqlens`` would have to be computed, so it is a
    ValueError that says to pass Python ints; a tuple works lazily."""
    dask = pytest.importorskip("dask")
    da = pytest.importorskip("dask.array")
    import fastrpb

    rng = np.random.default_rng(3)
    v = rng.standard_normal((2, 2, 24, 4))
    w = rng.standard_normal((2, 47)) * 0.1
    dv, dw = da.from_array(v, chunks=(1, 1, 24, 4)), da.from_array(w, chunks=(1, 47))
    with dask.config.set(scheduler=_refuse_to_compute):
        with pytest.raises(ValueError, match=r"cu_seqlens must be concrete.*tuple of Python ints"):
            fastrpb.linear_attention(dv, dv, dv, causal=True, cu_seqlens=da.from_array(np.array([0, 10, 24])))
        out = fastrpb.linear_attention(dv, dv * 0.5, dv, causal=True, rpb=dw, cu_seqlens=(0, 10, 24))
    assert isinstance(out, da.Array), type(out)
    want = np.concatenate(
        [
            oracles.kernel_attention(
                oracles.elu1(v[..., s, :]), oracles.elu1(v[..., s, :] * 0.5), v[..., s, :], causal=True, eps=1e-6
            )
            + oracles.rpb(v[..., s, :], w, causal=True)
            for s in (slice(0, 10), slice(10, 24))
        ],
        axis=-2,
    )
    np.testing.assert_allclose(out.compute(scheduler="sync"), want, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- torch.compile
def _torch_cases():
    import torch

    import fastrpb
    import fastrpb.torch as ft

    torch.manual_seed(0)
    x = torch.randn(2, 24, 16, dtype=torch.float64)
    w = torch.randn(4, 2 * 24 - 1, dtype=torch.float64) * 0.1
    q, k, v = (torch.randn(2, 4, 24, 8, dtype=torch.float64) for _ in range(3))
    mla = ft.LinearAttention(
        16, 4, rpb=ft.FastRPB(4, 24, causal=True, dtype=torch.float64), causal=True, dtype=torch.float64
    )
    lmha = ft.MultiheadAttention(16, 4, batch_first=True, feature_map="elu", dtype=torch.float64)
    return {
        "linear_attention elu": (
            lambda: fastrpb.linear_attention(q, k, v),
            lambda: oracles.kernel_attention(oracles.elu1(q.numpy()), oracles.elu1(k.numpy()), v.numpy(), eps=1e-6),
        ),
        "linear_attention sikf causal rpb=": (
            lambda: fastrpb.linear_attention(q, k, v, feature_map="sikf", causal=True, rpb=w, chunk_size=8),
            lambda: (
                oracles.exp_kernel_attention(q.numpy(), k.numpy(), v.numpy(), causal=True, eps=1e-6)
                + oracles.rpb(v.numpy(), w.numpy(), causal=True)
            ),
        ),
        "softmax_attention causal": (
            lambda: fastrpb.softmax_attention(q, k, v, causal=True),
            lambda: oracles.softmax_attention(q.numpy(), k.numpy(), v.numpy(), causal=True),
        ),
        "rpb": (lambda: fastrpb.rpb(v, w, skip=(1, 0)), lambda: oracles.rpb(v.numpy(), w.numpy(), skip=(1, 0))),
        "rpb causal": (lambda: fastrpb.rpb(v, w, causal=True), lambda: oracles.rpb(v.numpy(), w.numpy(), causal=True)),
        "LinearAttention": (lambda: mla(x), None),
        "MultiheadAttention": (lambda: lmha(x, x, x)[0], None),
    }


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
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


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
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
    """The python blocks of docs/scaling.md's "Data parallel" and "Dask" sections (the
    first Dask block, and the one on a ``LocalCluster``)."""
    text = (ROOT / "docs" / "scaling.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return {
        "jax": next(b for b in blocks if "jax.jit(lambda q, k, v, w" in b),
        "dask": next(b for b in blocks if "dask.array" in b),
        "cluster": next(b for b in blocks if "LocalCluster" in b),
    }


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.skipif(not _selected("jax"), reason="jax is not in FASTRPB_BACKENDS")
def test_docs_data_parallel_example(tmp_path):
    script = tmp_path / "data_parallel.py"
    script.write_text(_scaling_examples()["jax"])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(script)], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    spec, collectives, error = proc.stdout.strip().splitlines()
    assert spec == "P('data', 'model')", spec
    assert collectives == "False False", collectives
    assert float(error) < 1e-4


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.skipif(not _selected("numpy"), reason="numpy is not in FASTRPB_BACKENDS")
def test_docs_dask_example():
    pytest.importorskip("dask.array")
    namespace: dict = {}
    exec(compile(_scaling_examples()["dask"], "scaling.md", "exec"), namespace)
    v = namespace["v"].compute()
    want = oracles.exp_kernel_attention(v, v, v, causal=True, eps=1e-6) + oracles.rpb(v, namespace["w"], causal=True)
    np.testing.assert_allclose(namespace["result"], want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not _selected("numpy"), reason="numpy is not in FASTRPB_BACKENDS")
def test_docs_dask_cluster_example(tmp_path):
    pytest.importorskip("distributed")
    script = tmp_path / "cluster.py"
    script.write_text(_scaling_examples()["cluster"])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(script)], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == "(2, 4, 256, 16) 2", proc.stdout
