"""What the public functions hand back: plain arrays that belong to the caller.

On NumPy every result (and every array of a returned state) is an ordinary writable
array that owns its memory, or a view of a buffer no larger than itself: never a
read-only ``broadcast_to`` view, never a slice that keeps a larger work buffer (the
padded irfft output, about twice the result) alive. And no function keeps a view of
the caller's input in a state: a decoding loop that reuses one input array for every
token gets the same numbers as fresh arrays (checked against the dense float64
oracle on every backend whose arrays can be written in place).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fastrpb
import oracles
from backends_tests.backends import assert_close

# name -> a call of the public function on small float64 NumPy inputs (rng given)
CALLS = {
    "rpb": lambda r: fastrpb.rpb(r.standard_normal((4, 2)), r.standard_normal(7)),
    "rpb-causal": lambda r: fastrpb.rpb(r.standard_normal((4, 2)), r.standard_normal(7), causal=True),
    "rpb-heads": lambda r: fastrpb.rpb(r.standard_normal((2, 3, 8, 2)), r.standard_normal((3, 15))),
    "rpb-skip": lambda r: fastrpb.rpb(r.standard_normal((6, 2)), r.standard_normal(7), skip=(1, 1)),
    "rpb-state": lambda r: fastrpb.rpb(r.standard_normal((4, 2)), r.standard_normal(7), causal=True, return_state=True),
    "rpb-packed": lambda r: fastrpb.rpb(r.standard_normal((6, 2)), r.standard_normal(11), cu_seqlens=(0, 2, 6)),
    "rpb_step": lambda r: fastrpb.rpb_step(
        fastrpb.rpb_step(None, r.standard_normal(2), r.standard_normal(7))[1],
        r.standard_normal(2),
        r.standard_normal(7),
    ),
    "rpb_nd": lambda r: fastrpb.rpb_nd(
        r.standard_normal((12, 2)), [r.standard_normal(5), r.standard_normal(7)], (3, 4)
    ),
    "rpb_matrix": lambda r: fastrpb.rpb_matrix(r.standard_normal(7), 4),
    "symmetric_table": lambda r: fastrpb.symmetric_table(r.standard_normal(4)),
    "rpb_init": lambda r: fastrpb.rpb_init(2, 4, seed=0, like=np.zeros(1)),
    "linear_attention": lambda r: fastrpb.linear_attention(*_qkv(r)),
    "linear_attention-causal-bias": lambda r: fastrpb.linear_attention(
        *_qkv(r), causal=True, rpb=r.standard_normal((2, 9))
    ),
    "linear_attention-state": lambda r: fastrpb.linear_attention(*_qkv(r), causal=True, return_state=True),
    "linear_attention-state-broadcast": lambda r: fastrpb.linear_attention(
        r.standard_normal((1, 5, 4)),
        r.standard_normal((1, 5, 4)),
        r.standard_normal((3, 5, 2)),
        causal=True,
        return_state=True,
    ),
    "linear_attention-state-sikf": lambda r: fastrpb.linear_attention(
        *_qkv(r), feature_map="sikf", causal=True, return_state=True
    ),
    "linear_attention-packed-state": lambda r: fastrpb.linear_attention(
        *_qkv(r), causal=True, return_state=True, cu_seqlens=(0, 2, 2, 5)
    ),
    "linear_attention_step": lambda r: fastrpb.linear_attention_step(None, *(x[:, 0] for x in _qkv(r))),
    "softmax_attention": lambda r: fastrpb.softmax_attention(*_qkv(r)),
    "softmax_attention-causal": lambda r: fastrpb.softmax_attention(*_qkv(r), causal=True),
    **{
        f"feature_map-{name}": (lambda r, name=name: _feature_map(r, name))
        for name in ("elu", "relu", "sikf", "dpfp", "taylor", "favor", "rff", "hedgehog")
    },
    "random_projection": lambda r: fastrpb.random_projection(4, 3, seed=0, like=np.zeros(1)),
}


def _qkv(r: np.random.Generator) -> tuple[np.ndarray, ...]:
    return r.standard_normal((2, 5, 4)), r.standard_normal((2, 5, 4)), r.standard_normal((2, 5, 3))


def _feature_map(r: np.random.Generator, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The query and key features of one map."""
    fm = fastrpb.feature_maps
    projection = fastrpb.random_projection(6, 4, seed=0, like=np.zeros(1))
    fmap = getattr(fm, name)(projection) if name in ("favor", "rff", "hedgehog") else getattr(fm, name)()
    x = r.standard_normal((2, 5, 4))
    return fmap.queries(x), fmap.keys(x)


def _arrays(out: Any, name: str) -> list[tuple[str, np.ndarray]]:
    """Every array in a result: the array itself, or the fields of a tuple / state."""
    if isinstance(out, np.ndarray):
        return [(name, out)]
    if isinstance(out, (tuple, list)):
        fields = getattr(out, "_fields", range(len(out)))
        return [a for f, x in zip(fields, out, strict=True) for a in _arrays(x, f"{name}.{f}")]
    return []


@pytest.mark.only_backends(
    "numpy", reason="NumPy's views and read-only flags; other libraries have their own memory model"
)
@pytest.mark.parametrize("case", list(CALLS))
def test_results_are_plain_writable_arrays(backend, rng, case):
    found = _arrays(CALLS[case](rng), case)
    assert found, f"{case} returned no array"
    for name, x in found:
        assert x.flags.writeable, f"{name} is read-only"
        assert x.flags.owndata or x.base.nbytes <= x.nbytes, (
            f"{name} ({x.nbytes} bytes) is a view that keeps a {x.base.nbytes}-byte buffer alive"
        )
        x += 1  # the caller may write into it


def test_rpb_result_is_the_oracle_and_writable(backend, rng):
    v, w = rng.standard_normal((4, 2)), rng.standard_normal(7)
    out = fastrpb.rpb(backend.asarray(v), backend.asarray(w))
    assert_close(backend, out, oracles.rpb(v, w), "float64")
    if backend.name == "numpy":
        out += 1
        np.testing.assert_allclose(out, oracles.rpb(v, w) + 1, rtol=1e-12)


@pytest.mark.skip_backends("jax", "jax_gpu", reason="immutable arrays: a caller cannot overwrite its input")
def test_streaming_keeps_no_view_of_the_callers_input(backend, rng):
    """A decoding loop that reuses one input array (token by token, then chunk by chunk)
    gets the causal bias of the whole sequence: the state copies what it keeps."""
    L, D, M = 80, 3, 80
    v, w = rng.standard_normal((L, D)), rng.standard_normal(2 * M - 1)
    expected = oracles.rpb(v, w, causal=True)
    wb = backend.asarray(w)
    token = backend.asarray(np.zeros(D))
    state = None
    for t in range(L):
        token[...] = backend.asarray(v[t])
        out, state = fastrpb.rpb_step(state, token, wb)
        assert_close(backend, out, expected[t], "float64")
    chunk = backend.asarray(np.zeros((L, D)))
    state, outs = None, []
    for a, b in [(0, 10), (10, 30), (30, 37), (37, 60), (60, 80)]:  # unequal chunks: the history is re-read
        chunk[: b - a, ...] = backend.asarray(v[a:b])
        out, state = fastrpb.rpb(chunk[: b - a, ...], wb, causal=True, initial_state=state, return_state=True)
        outs.append(backend.to_numpy(out))
        chunk[...] = backend.asarray(np.full((L, D), np.nan))  # what a reused buffer holds between calls
    np.testing.assert_allclose(np.concatenate(outs), expected, rtol=1e-9, atol=1e-12)
