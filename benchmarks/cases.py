"""The comparisons of issue 4: what is timed against what, on one backend at one L.

A *case* builds, for a backend, a length ``L`` and a dtype, the inputs and a list of
*variants*: zero-argument callables timed side by side. The first variant is the
library (``ours``); every other is a reference it is reported against as a ratio.
Shapes follow the issue: batch 1, 8 heads, 64 features, float32 unless asked.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fastrpb

from . import baselines

BATCH, HEADS, FEATURES = 1, 8, 64


@dataclass
class Variant:
    name: str
    fn: Callable[[], Any]
    ours: bool = False
    same_output: bool = True  # its output must match ours (checked once per run)
    memory: bool = True  # measure its peak memory


@dataclass
class Built:
    variants: list[Variant]
    values_bytes: int  # size of the values array v, the unit of the memory target
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why not run here


@dataclass
class Case:
    name: str
    title: str
    build: Callable[..., Built]
    sizes: tuple[int, ...] | None = None  # fixed sizes (decode); None: the run's sizes
    unit: str = "L"
    applies: Callable[[str, int, dict], bool] | None = None  # (backend, L, config) -> run it?


def _itemsize(dtype: str) -> int:
    return {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtype]


# ------------------------------------------------------------------------- FastRPB
PAPER_MAX_LEN = 65536
LONGEST_ON = ("torch", "torch_cuda", "jax_gpu", "cupy")  # backends that run L = 262,144 (the memory target)


def _rpb_applies(backend: str, L: int, cfg: dict) -> bool:
    return L < 262144 or backend in LONGEST_ON or cfg.get("sizes_explicit", False)


def build_rpb(bench: Any, L: int, dtype: str, *, cap_bytes: int, quick: bool) -> Built:
    v = bench.random((BATCH, HEADS, L, FEATURES), seed=1, dtype=dtype)
    w = bench.random((HEADS, 2 * L - 1), seed=2, dtype=dtype, scale=0.01)
    jit = bench.compile
    ours = jit(lambda v, w: fastrpb.rpb(v, w))
    native = jit(baselines.rpb_native(bench))
    paper = jit(baselines.rpb_paper(bench))
    floor = jit(baselines.rpb_floor(bench))
    variants = [
        Variant("fastrpb", lambda: ours(v, w), ours=True),
        Variant("native", lambda: native(v, w), memory=False),
        Variant("fft_floor", lambda: floor(v), same_output=False),
    ]
    skipped = {}
    if L <= PAPER_MAX_LEN:
        # its memory is measured while it is cheap: past 16,384 one call takes seconds
        variants.insert(2, Variant("paper_2L-1", lambda: paper(v, w), memory=L <= 16384))
    else:
        skipped["paper_2L-1"] = (
            f"its FFT length 2L - 1 = {2 * L - 1:,} is prime: tens of seconds a call; run up to L = {PAPER_MAX_LEN:,}"
        )
    dense_bytes = HEADS * L * L * _itemsize(dtype)
    if dense_bytes <= cap_bytes:
        xp = bench.xp
        dense = jit(lambda v, w: xp.matmul(fastrpb.rpb_matrix(w, L), v))
        variants.append(Variant("dense", lambda: dense(v, w), memory=False))  # L^2 by construction
    else:
        skipped["dense"] = f"the {HEADS} x L x L matrix needs {dense_bytes / 2**30:.1f} GiB > cap"
    return Built(variants, BATCH * HEADS * L * FEATURES * _itemsize(dtype), skipped)


# ------------------------------------------------------------------ linear attention
def _attention_api():
    fn = getattr(fastrpb, "linear_attention", None)
    if fn is None:
        raise RuntimeError("fastrpb.linear_attention is not available on this branch yet")
    return fastrpb


def _qkv(bench: Any, L: int, dtype: str) -> tuple[Any, Any, Any]:
    shape = (BATCH, HEADS, L, FEATURES)
    # logits of a trained model are O(1); 0.5 keeps ELU on both of its branches
    return (
        bench.random(shape, seed=3, dtype=dtype, scale=0.5),
        bench.random(shape, seed=4, dtype=dtype, scale=0.5),
        bench.random(shape, seed=5, dtype=dtype),
    )


def build_attention(bench: Any, L: int, dtype: str, *, cap_bytes: int, quick: bool) -> Built:
    api = _attention_api()
    q, k, v = _qkv(bench, L, dtype)
    jit = bench.compile
    ours = jit(lambda q, k, v: api.linear_attention(q, k, v, feature_map="elu"))
    native = jit(baselines.attention_native(bench))
    roofline = jit(baselines.matmul_roofline(bench))
    variants = [
        Variant("fastrpb", lambda: ours(q, k, v), ours=True),
        Variant("native", lambda: native(q, k, v)),
        Variant("matmul_roofline", lambda: roofline(q, k, v), same_output=False, memory=False),
    ]
    return Built(variants, BATCH * HEADS * L * FEATURES * _itemsize(dtype))


SOFTMAX_MAX_LEN = 16384  # O(L^2) time: 65,536 would take minutes per call on 2 cores
NAIVE_MAX_LEN = 16384  # the target's length; beyond it the naive cumsum takes many seconds a call
CAUSAL_MAX_LEN = 65536


def build_causal(bench: Any, L: int, dtype: str, *, cap_bytes: int, quick: bool) -> Built:
    api = _attention_api()
    q, k, v = _qkv(bench, L, dtype)
    jit = bench.compile
    ours = jit(lambda q, k, v: api.linear_attention(q, k, v, feature_map="elu", causal=True))
    noncausal = jit(lambda q, k, v: api.linear_attention(q, k, v, feature_map="elu"))
    variants = [
        Variant("fastrpb", lambda: ours(q, k, v), ours=True),
        Variant("fastrpb_noncausal", lambda: noncausal(q, k, v), same_output=False, memory=False),
    ]
    skipped = {}
    if L % 64 == 0:
        native = jit(baselines.causal_chunked(bench))
        variants.append(Variant("native", lambda: native(q, k, v)))
    naive_bytes = L * FEATURES * FEATURES * _itemsize(dtype) * (2 if bench.name.startswith("jax") else 1)
    if L > NAIVE_MAX_LEN:
        skipped["naive_cumsum"] = f"O(L F Dv) memory and time; run up to L = {NAIVE_MAX_LEN:,}"
    elif naive_bytes <= 2 * cap_bytes:
        naive = jit(baselines.causal_naive(bench))
        variants.append(Variant("naive_cumsum", lambda: naive(q, k, v), memory=False))  # L F Dv by construction
    else:
        skipped["naive_cumsum"] = f"its per-head L x F x Dv buffer needs {naive_bytes / 2**30:.1f} GiB > 2 x cap"
    softmax = baselines.softmax_native(bench)
    if softmax is None:
        skipped["softmax"] = f"{bench.name} has no native softmax attention"
    elif L > SOFTMAX_MAX_LEN:
        skipped["softmax"] = f"O(L^2) time; run up to L = {SOFTMAX_MAX_LEN:,}"
    else:
        name = "softmax_sdpa" if bench.name.startswith("torch") else "softmax_dot_product_attention"
        logits_bytes = HEADS * L * L * _itemsize(dtype)
        if bench.name.startswith("jax"):
            if logits_bytes > cap_bytes:
                skipped[name] = f"it materialises the {logits_bytes / 2**30:.1f} GiB logits on CPU > cap"
            else:
                xp = bench.xp
                qt, kt, vt = (xp.permute_dims(x, (0, 2, 1, 3)) for x in (q, k, v))
                sm = jit(softmax)
                variants.append(Variant(name, lambda: sm(qt, kt, vt), same_output=False, memory=False))
        else:
            variants.append(Variant(name, lambda: softmax(q, k, v), same_output=False, memory=False))
    return Built(variants, BATCH * HEADS * L * FEATURES * _itemsize(dtype), skipped)


def build_decode(bench: Any, L: int, dtype: str, *, cap_bytes: int, quick: bool) -> Built:
    api = _attention_api()
    shape = (BATCH, HEADS, FEATURES)
    q_t = bench.random(shape, seed=6, dtype=dtype, scale=0.5)
    k_t = bench.random(shape, seed=7, dtype=dtype, scale=0.5)
    v_t = bench.random(shape, seed=8, dtype=dtype)
    _, state = api.linear_attention_step(None, q_t, k_t, v_t)  # a state after one token
    jit = bench.compile
    ours = jit(lambda s, q, k, v: api.linear_attention_step(s, q, k, v)[0])
    step = baselines.step_native(bench)
    native = jit(lambda S, z, q, k, v: step(S, z, q, k, v)[0])
    S, z = state.S, state.z
    variants = [
        Variant("fastrpb", lambda: ours(state, q_t, k_t, v_t), ours=True, memory=False),
        Variant("native", lambda: native(S, z, q_t, k_t, v_t), memory=False),
    ]
    return Built(variants, BATCH * HEADS * FEATURES * _itemsize(dtype))


PACKED_SHORTEST, PACKED_LONGEST = 64, 4096


def packed_lengths(L: int, seed: int = 0) -> list[int]:
    """Sequence lengths drawn uniformly from 64..4,096 that add up to ``L`` exactly."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while sum(lengths) < L:
        lengths.append(int(rng.integers(PACKED_SHORTEST, PACKED_LONGEST + 1)))
    lengths[-1] -= sum(lengths) - L
    if lengths[-1] < PACKED_SHORTEST and len(lengths) > 1:
        lengths[-2] += lengths.pop()
    return lengths


def build_packed(bench: Any, L: int, dtype: str, *, cap_bytes: int, quick: bool) -> Built:
    """Causal linear attention of a packed batch (``cu_seqlens``) against the same
    sequences padded to the longest with ``key_mask`` (issue 10)."""
    import numpy as np

    api = _attention_api()
    lengths = packed_lengths(L)
    offsets = tuple(int(c) for c in np.concatenate([[0], np.cumsum(lengths)]))
    q, k, v = _qkv(bench, L, dtype)
    longest, N = max(lengths), len(lengths)
    index = np.zeros((N, longest), dtype=np.int64)
    valid = np.zeros((N, longest), dtype=bool)
    for n, (a, b) in enumerate(itertools.pairwise(offsets)):
        index[n, : b - a] = np.arange(a, b)
        valid[n, : b - a] = True
    xp = bench.xp

    def pad(x: Any) -> Any:
        rows = xp.take(x[0, ...], bench.asarray(index.reshape(-1), None), axis=1)  # (H, N * longest, D)
        rows = xp.reshape(rows, (HEADS, N, longest, FEATURES))
        return xp.permute_dims(rows, (1, 0, 2, 3))

    qp, kp, vp = pad(q), pad(k), pad(v)
    mask = bench.asarray(valid[:, None, :], None)
    jit = bench.compile
    ours = jit(lambda q, k, v: api.linear_attention(q, k, v, causal=True, cu_seqlens=offsets))
    padded = jit(lambda q, k, v, m: api.linear_attention(q, k, v, causal=True, key_mask=m))
    variants = [
        Variant("fastrpb_packed", lambda: ours(q, k, v), ours=True),
        Variant("fastrpb_padded", lambda: padded(qp, kp, vp, mask), same_output=False),
    ]
    return Built(variants, BATCH * HEADS * L * FEATURES * _itemsize(dtype))


CASES: dict[str, Case] = {
    "rpb": Case(
        "rpb",
        "FastRPB: fastrpb.rpb vs native FFT, paper-style 2L-1 FFT, FFT floor, dense product",
        build_rpb,
        applies=_rpb_applies,
    ),
    "attention": Case(
        "attention", "Non-causal linear attention (ELU+1) vs hand-written native and the bare matmuls", build_attention
    ),
    "causal": Case(
        "causal",
        "Causal linear attention vs native chunked, naive cumsum, softmax and our non-causal",
        build_causal,
        applies=lambda b, L, cfg: L <= CAUSAL_MAX_LEN or cfg.get("sizes_explicit", False),
    ),
    "decode": Case(
        "decode",
        "Decoding: one linear_attention_step (1, 8 heads, 64) vs a hand-written native step",
        build_decode,
        sizes=(1,),
        unit="tokens",
    ),
    "packed": Case(
        "packed",
        "Packed causal linear attention (cu_seqlens, lengths 64..4,096) vs padded to the longest + key_mask",
        build_packed,
        applies=lambda b, L, cfg: L >= 4096,
    ),
}
