"""One validation rule per kind of argument, applied by every public function.

Every malformed call is its own test id, run on every backend: a bool option that is
not a bool, a required array that is ``None``, a seed, a scale, an uncalled feature-map
factory, bias arguments that are checked even when no bias is given, N-d tables that
fit the values but not each other. Each must raise ``TypeError``/``ValueError`` naming
the argument.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastrpb
import oracles
from backends_tests.backends import assert_close
from fastrpb import feature_maps as fm
from fastrpb import linear_attention, linear_attention_step, softmax_attention


def _a(backend, *shape):
    return backend.asarray(np.linspace(-1.0, 1.0, int(np.prod(shape))).reshape(shape))


def _qkv(backend):
    return _a(backend, 2, 5, 4), _a(backend, 2, 5, 4), _a(backend, 2, 5, 3)


def _tok(backend):
    return _a(backend, 2, 4), _a(backend, 2, 4), _a(backend, 2, 3)


# (id, call(backend), exception, message pattern)
CASES = [
    # ---- flags: booleans must be bool, in every function
    (
        "rpb-causal-str",
        lambda b: fastrpb.rpb(_a(b, 5, 3), _a(b, 9), causal="no"),
        TypeError,
        r"causal must be a bool.*str 'no'",
    ),
    (
        "rpb-causal-int",
        lambda b: fastrpb.rpb(_a(b, 5, 3), _a(b, 9), causal=1),
        TypeError,
        r"causal must be a bool.*int 1",
    ),
    (
        "rpb_matrix-causal-str",
        lambda b: fastrpb.rpb_matrix(_a(b, 9), 3, causal="yes"),
        TypeError,
        r"causal must be a bool",
    ),
    ("linear-causal-int", lambda b: linear_attention(*_qkv(b), causal=1), TypeError, r"causal must be a bool.*int 1"),
    ("linear-causal-str", lambda b: linear_attention(*_qkv(b), causal="no"), TypeError, r"causal must be a bool"),
    (
        "linear-return_state-int",
        lambda b: linear_attention(*_qkv(b), causal=True, return_state=1),
        TypeError,
        r"return_state must be a bool",
    ),
    ("softmax-causal-str", lambda b: softmax_attention(*_qkv(b), causal="no"), TypeError, r"causal must be a bool"),
    (
        "random_projection-orthogonal-int",
        lambda b: fm.random_projection(4, 4, seed=0, orthogonal=1, like=_a(b, 1)),
        TypeError,
        r"orthogonal must be a bool",
    ),
    # ---- required arrays: None or a non-array is a TypeError naming the argument
    ("rpb-v-none", lambda b: fastrpb.rpb(None, _a(b, 9)), TypeError, r"v must be an array.*got None"),
    ("rpb-w-none", lambda b: fastrpb.rpb(_a(b, 5, 3), None), TypeError, r"w must be an array.*got None"),
    ("rpb-w-list", lambda b: fastrpb.rpb(_a(b, 5, 3), [0.0] * 9), TypeError, r"w must be an array.*list"),
    ("rpb_nd-v-none", lambda b: fastrpb.rpb_nd(None, [_a(b, 9)], (5,)), TypeError, r"v must be an array.*got None"),
    ("rpb_matrix-w-none", lambda b: fastrpb.rpb_matrix(None, 3), TypeError, r"w must be an array.*got None"),
    ("symmetric_table-h-none", lambda b: fastrpb.symmetric_table(None), TypeError, r"h must be an array.*got None"),
    (
        "rpb_init-like-none",
        lambda b: fastrpb.rpb_init(2, 4, seed=0, like=None),
        TypeError,
        r"like must be an array.*got None",
    ),
    ("linear-q-none", lambda b: linear_attention(None, *_qkv(b)[1:]), TypeError, r"q must be an array.*got None"),
    (
        "linear-k-none",
        lambda b: linear_attention(_qkv(b)[0], None, _qkv(b)[2]),
        TypeError,
        r"k must be an array.*got None",
    ),
    ("linear-v-none", lambda b: linear_attention(*_qkv(b)[:2], None), TypeError, r"v must be an array.*got None"),
    (
        "softmax-k-none",
        lambda b: softmax_attention(_qkv(b)[0], None, _qkv(b)[2]),
        TypeError,
        r"k must be an array.*got None",
    ),
    (
        "step-q_t-none",
        lambda b: linear_attention_step(None, None, *_tok(b)[1:]),
        TypeError,
        r"q_t must be an array.*got None",
    ),
    (
        "step-v_t-none",
        lambda b: linear_attention_step(None, *_tok(b)[:2], None),
        TypeError,
        r"v_t must be an array.*got None",
    ),
    ("feature_map-queries-none", lambda b: fm.elu().queries(None), TypeError, r"x must be an array.*got None"),
    ("favor-projection-none", lambda b: fm.favor(None), TypeError, r"projection must be an array.*got None"),
    # ---- integers
    ("rpb_matrix-L-float", lambda b: fastrpb.rpb_matrix(_a(b, 9), 3.0), TypeError, r"L must be an int, got float"),
    ("rpb_matrix-L-negative", lambda b: fastrpb.rpb_matrix(_a(b, 9), -1), ValueError, r"L must be >= 0, got -1"),
    ("rpb_matrix-L-bool", lambda b: fastrpb.rpb_matrix(_a(b, 9), True), TypeError, r"L must be an int, got bool"),
    (
        "rpb_init-max_len-zero",
        lambda b: fastrpb.rpb_init(2, 0, seed=0, like=_a(b, 1)),
        ValueError,
        r"max_len must be >= 1, got 0",
    ),
    (
        "linear-chunk_size-float",
        lambda b: linear_attention(*_qkv(b), causal=True, chunk_size=2.0),
        TypeError,
        r"chunk_size must be an int",
    ),
    # ---- seeds
    (
        "rpb_init-seed-negative",
        lambda b: fastrpb.rpb_init(2, 4, seed=-1, like=_a(b, 1)),
        ValueError,
        r"seed must be >= 0, got -1",
    ),
    (
        "rpb_init-seed-float",
        lambda b: fastrpb.rpb_init(2, 4, seed=1.5, like=_a(b, 1)),
        TypeError,
        r"seed must be an int, got float",
    ),
    (
        "random_projection-seed-negative",
        lambda b: fm.random_projection(4, 4, seed=-3, like=_a(b, 1)),
        ValueError,
        r"seed must be >= 0, got -3",
    ),
    # ---- floats: eps non-negative and finite, scale finite
    (
        "linear-eps-nan",
        lambda b: linear_attention(*_qkv(b), eps=float("nan")),
        ValueError,
        r"eps must be a finite float >= 0, got nan",
    ),
    (
        "linear-eps-str",
        lambda b: linear_attention(*_qkv(b), eps="small"),
        TypeError,
        r"eps must be a non-negative float, got str",
    ),
    (
        "step-eps-negative",
        lambda b: linear_attention_step(None, *_tok(b), eps=-1.0),
        ValueError,
        r"eps must be a finite float >= 0",
    ),
    (
        "softmax-scale-nan",
        lambda b: softmax_attention(*_qkv(b), scale=float("nan")),
        ValueError,
        r"scale must be a finite float, got nan",
    ),
    (
        "softmax-scale-inf",
        lambda b: softmax_attention(*_qkv(b), scale=float("inf")),
        ValueError,
        r"scale must be a finite float, got inf",
    ),
    (
        "softmax-scale-bool",
        lambda b: softmax_attention(*_qkv(b), scale=True),
        TypeError,
        r"scale must be a float, got bool",
    ),
    (
        "rpb_init-scale-nan",
        lambda b: fastrpb.rpb_init(2, 4, seed=0, like=_a(b, 1), scale=float("nan")),
        ValueError,
        r"scale must be a finite float >= 0",
    ),
    # ---- skip pairs and grids, also when no bias is given
    ("rpb-skip-str", lambda b: fastrpb.rpb(_a(b, 5, 3), _a(b, 9), skip="garbage"), TypeError, r"skip must be a pair"),
    (
        "linear-rpb_skip-without-rpb",
        lambda b: linear_attention(*_qkv(b), rpb_skip="garbage"),
        TypeError,
        r"rpb_skip must be a pair",
    ),
    (
        "linear-rpb_skip-negative-without-rpb",
        lambda b: linear_attention(*_qkv(b), rpb_skip=(-1, 0)),
        ValueError,
        r"rpb_skip\[0\] must be >= 0, got -1",
    ),
    (
        "softmax-rpb_skip-without-rpb",
        lambda b: softmax_attention(*_qkv(b), rpb_skip=(0, 0, 0)),
        TypeError,
        r"rpb_skip must be a pair",
    ),
    (
        "linear-rpb_grid-str",
        lambda b: linear_attention(*_qkv(b), rpb_tables=(_a(b, 9),), rpb_grid="5"),
        TypeError,
        r"rpb_grid must be a non-empty sequence",
    ),
    (
        "rpb_nd-grid-float",
        lambda b: fastrpb.rpb_nd(_a(b, 5, 3), [_a(b, 9)], (5.0,)),
        TypeError,
        r"grid\[0\] must be an int",
    ),
    # ---- bias tables
    (
        "rpb-w-even",
        lambda b: fastrpb.rpb(_a(b, 5, 3), _a(b, 8)),
        ValueError,
        r"w must have an odd last dimension.*got length 8",
    ),
    ("rpb_matrix-w-even", lambda b: fastrpb.rpb_matrix(_a(b, 8), 3), ValueError, r"w must have an odd last dimension"),
    ("rpb_matrix-w-short", lambda b: fastrpb.rpb_matrix(_a(b, 5), 4), ValueError, r"L = 4 tokens.*M = 3"),
    (
        "rpb_matrix-w-int",
        lambda b: fastrpb.rpb_matrix(b.asarray(np.zeros(9, dtype=np.int32), None), 3),
        TypeError,
        r"w must have a real floating dtype",
    ),
    (
        "rpb_nd-tables-do-not-fit-each-other",
        lambda b: fastrpb.rpb_nd(_a(b, 6, 3), [_a(b, 2, 3), _a(b, 3, 5)], (2, 3)),
        ValueError,
        r"leading dimensions of v, tables\[0\] and tables\[1\] do not broadcast",
    ),
    (
        "rpb_nd-table-does-not-fit-v",
        lambda b: fastrpb.rpb_nd(_a(b, 2, 6, 3), [_a(b, 3, 3), None], (2, 3)),
        ValueError,
        r"leading dimensions of tables\[0\] \(3,\).*v \(2,\)",
    ),
    # ---- shapes and broadcasting of q, k, v
    (
        "linear-lead",
        lambda b: linear_attention(_a(b, 2, 5, 4), _a(b, 3, 5, 4), _a(b, 3, 5, 3)),
        ValueError,
        r"leading dimensions of q, k and v do not broadcast: q \(2,\), k \(3,\), v \(3,\)",
    ),
    (
        "softmax-lead",
        lambda b: softmax_attention(_a(b, 2, 5, 4), _a(b, 3, 5, 4), _a(b, 3, 5, 3)),
        ValueError,
        r"leading dimensions of q, k and v",
    ),
    (
        "step-lead",
        lambda b: linear_attention_step(None, _a(b, 2, 4), _a(b, 3, 4), _a(b, 3, 3)),
        ValueError,
        r"leading dimensions of q_t, k_t and v_t",
    ),
    (
        "step-q_t-0d",
        lambda b: linear_attention_step(None, b.xp.reshape(_a(b, 1), ()), _a(b, 4), _a(b, 3)),
        ValueError,
        r"q_t must have shape \(\.\.\., D\)",
    ),
    (
        "linear-key_mask-lead",
        lambda b: linear_attention(*_qkv(b), key_mask=b.asarray(np.ones((3, 5), dtype=bool), None)),
        ValueError,
        r"leading dimensions of key_mask \(3,\)",
    ),
    # ---- feature maps: an uncalled factory or a class is not a map
    (
        "linear-feature_map-factory-dpfp",
        lambda b: linear_attention(*_qkv(b), feature_map=fm.dpfp),
        TypeError,
        r"feature_map must be a feature map, got the factory dpfp itself: call it",
    ),
    (
        "linear-feature_map-factory-elu",
        lambda b: linear_attention(*_qkv(b), feature_map=fm.elu),
        TypeError,
        r"factory elu itself: call it",
    ),
    (
        "linear-feature_map-factory-favor",
        lambda b: linear_attention(*_qkv(b), feature_map=fm.favor),
        TypeError,
        r"factory favor itself: call it",
    ),
    (
        "linear-feature_map-class",
        lambda b: linear_attention(*_qkv(b), feature_map=fm.ELU),
        TypeError,
        r"got the class ELU itself",
    ),
    (
        "step-feature_map-factory",
        lambda b: linear_attention_step(None, *_tok(b), feature_map=fm.sikf),
        TypeError,
        r"factory sikf itself: call it",
    ),
]


@pytest.mark.parametrize(("call", "exc", "pattern"), [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_bad_argument_is_rejected_by_name(backend, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(backend)


def test_case_ids_are_unique():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("causal", [pytest.param(True, id="causal"), pytest.param(False, id="full")])
def test_numpy_bool_flag_is_a_bool(backend, causal):
    # a NumPy bool (e.g. read from a config array) is accepted and means what it says
    vn, wn = np.linspace(-1.0, 1.0, 15).reshape(5, 3), np.linspace(0.5, -0.5, 9)
    out = fastrpb.rpb(backend.asarray(vn), backend.asarray(wn), causal=np.bool_(causal))
    assert_close(backend, out, oracles.toeplitz(wn, 5, causal=causal) @ vn, "float64")
