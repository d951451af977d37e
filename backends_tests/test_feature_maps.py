"""Feature maps against their formulas, on every backend and dtype."""

from __future__ import annotations

import numpy as np
import pytest

import oracles
from backends import assert_array, assert_close
from fastrpb import feature_maps as fm
from fastrpb import random_projection


def _input(backend, rng, dtype, shape=(2, 5, 4), scale=1.5):
    x = backend.asarray(rng.standard_normal(shape) * scale, dtype)
    return x, backend.to_numpy(x).astype(np.float64)  # what the code really got


@pytest.mark.parametrize("name", ["elu", "relu", "dpfp1", "dpfp3"])
def test_plain_maps_match_formula(backend, dtype, rng, name):
    x, xn = _input(backend, rng, dtype)
    fmap, formula = {
        "elu": (fm.elu(), oracles.elu1),
        "relu": (fm.relu(), oracles.relu),
        "dpfp1": (fm.dpfp(), oracles.dpfp),
        "dpfp3": (fm.dpfp(3), lambda a: oracles.dpfp(a, 3)),
    }[name]
    for got in (fmap.queries(x), fmap.keys(x)):
        assert_close(backend, got, formula(xn), dtype)
        assert got.shape[-1] == fmap.features(4)
        assert np.all(backend.to_numpy(got) >= 0)


@pytest.mark.needs_dtype("bfloat16")
def test_elu_keeps_small_features_in_bfloat16(backend):
    # elu(x) + 1 as (exp(x) - 1) + 1 rounds exp(-5) = 0.0067 to 0.0078 in bfloat16 (16 %)
    xn = -np.linspace(3.0, 8.0, 11)
    got = backend.to_numpy(fm.elu().queries(backend.asarray(xn, "bfloat16")))
    exact = np.exp(backend.to_numpy(backend.asarray(xn, "bfloat16")).astype(np.float64))
    np.testing.assert_allclose(got, exact, rtol=8e-3)


def test_sikf_features_with_offsets(backend, dtype, rng):
    x, xn = _input(backend, rng, dtype, scale=3.0)
    m = fm.sikf()
    q, k = backend.to_numpy(m.queries(x)), backend.to_numpy(m.keys(x))
    tol = dict(float64=1e-12, float32=1e-5, float16=2e-3, bfloat16=2e-2)[dtype]
    # queries: exp(x - row max); keys: exp(x - max over the whole sequence)
    np.testing.assert_allclose(q, np.exp(xn - xn.max(-1, keepdims=True)), rtol=tol, atol=tol)
    np.testing.assert_allclose(k, np.exp(xn - xn.max((-2, -1), keepdims=True)), rtol=tol, atol=tol)
    big = backend.asarray(np.full((3, 2), 1e4) + rng.standard_normal((3, 2)), "float32")
    assert np.all(np.isfinite(backend.to_numpy(m.queries(big))))
    assert np.all(np.isfinite(backend.to_numpy(m.keys(big))))


def test_favor_features_match_formula(backend, rng):
    d, m = 4, 16
    x, xn = _input(backend, rng, "float64", scale=0.7)
    w = random_projection(m, d, seed=3, like=x)
    wn = backend.to_numpy(w)
    f = fm.favor(w)
    log = oracles.favor_log(xn, wn)
    # the stabilisers are one constant per query row and one per key sequence
    assert_close(backend, f.queries(x), np.exp(log - log.max(-1, keepdims=True)), "float64")
    assert_close(backend, f.keys(x), np.exp(log - log.max((-2, -1), keepdims=True)), "float64")
    assert f.features(d) == m and f.signature == f"favor(m={m}, d={d})"


def test_rff_features_match_formula(backend, dtype, rng):
    x, xn = _input(backend, rng, dtype, scale=0.5)
    w = random_projection(8, 4, seed=1, like=backend.asarray(np.zeros(1), "float64"))
    f = fm.rff(w)
    got = f.queries(x)
    assert f.features(4) == 16
    assert_close(backend, got, oracles.rff(xn, backend.to_numpy(w)), dtype)


def _mean_kernel_error(backend, m, x, y, exact, seeds, make):
    errs = []
    for seed in seeds:
        w = random_projection(m, x.shape[-1], seed=seed, like=x)
        f = make(w)
        approx = backend.to_numpy(f.queries(x)) @ backend.to_numpy(f.keys(y)).T
        errs.append(np.abs(approx - exact).mean())
    return float(np.mean(errs))


def test_rff_approaches_gaussian_kernel(backend, rng):
    xn, yn = rng.standard_normal((6, 3)) * 0.5, rng.standard_normal((5, 3)) * 0.5
    exact = np.exp(-0.5 * ((xn[:, None, :] - yn[None, :, :]) ** 2).sum(-1))
    x, y = backend.asarray(xn), backend.asarray(yn)
    coarse = _mean_kernel_error(backend, 16, x, y, exact, range(6), fm.rff)
    fine = _mean_kernel_error(backend, 2048, x, y, exact, range(6), fm.rff)
    assert fine < 0.25 * coarse, (coarse, fine)
    assert fine < 0.03


def test_random_projection_properties(backend, dtype):
    like = backend.asarray(np.zeros(2), dtype)
    d, m = 8, 20
    w = random_projection(m, d, seed=7, like=like)
    assert_array(backend, w, dtype, shape=(m, d))
    wn = backend.to_numpy(random_projection(m, d, seed=7, like=backend.asarray(np.zeros(2), "float64")))
    np.testing.assert_array_equal(wn, backend.to_numpy(random_projection(m, d, seed=7, like=backend.asarray(np.zeros(2), "float64"))))
    assert not np.allclose(wn, backend.to_numpy(random_projection(m, d, seed=8, like=backend.asarray(np.zeros(2), "float64"))))
    for start in range(0, m, d):  # rows of each block are orthogonal directions
        block = wn[start : start + d]
        unit = block / np.linalg.norm(block, axis=1, keepdims=True)
        np.testing.assert_allclose(unit @ unit.T, np.eye(len(block)), atol=1e-12)
    # chi-distributed norms: E|w|^2 = d; over many rows the mean is close to d
    many = backend.to_numpy(random_projection(4000, d, seed=0, like=backend.asarray(np.zeros(2), "float64")))
    assert abs(np.mean(np.sum(many**2, axis=1)) / d - 1) < 0.05
    iid = backend.to_numpy(random_projection(m, d, seed=7, orthogonal=False, like=backend.asarray(np.zeros(2), "float64")))
    assert not np.allclose(np.abs(iid[:d] @ iid[:d].T - np.diag(np.diag(iid[:d] @ iid[:d].T))), 0.0)


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        pytest.param(dict(m=0), ValueError, "m must be >= 1", id="m zero"),
        pytest.param(dict(d=2.5), TypeError, "d must be an int", id="d float"),
        pytest.param(dict(seed="a"), TypeError, "seed must be an int", id="seed str"),
        pytest.param(dict(like=[1.0]), TypeError, "like must be an array", id="like list"),
    ],
)
def test_random_projection_errors(backend, kwargs, exc, pattern):
    args = {**dict(m=4, d=4, seed=0, like=backend.asarray(np.zeros(2))), **kwargs}
    with pytest.raises(exc, match=pattern):
        random_projection(args["m"], args["d"], seed=args["seed"], like=args["like"])


def test_resolve_names_callables_and_errors(backend):
    assert isinstance(fm.resolve("elu"), fm.ELU) and isinstance(fm.resolve("sikf"), fm.SIKF)
    assert fm.resolve("dpfp").features(3) == 6 and fm.resolve("relu").features(5) == 5
    square = fm.resolve(lambda x: x * x)
    x = backend.asarray(np.arange(6.0).reshape(2, 3))
    assert_close(backend, square.keys(x), np.arange(6.0).reshape(2, 3) ** 2, "float64")


# (id, call(backend), exception, message); the errors of test_resolve_names_callables_and_errors
_MAP_ERRORS = [
    ("unknown name", lambda b: fm.resolve("softmax"), ValueError, r"feature_map 'softmax' is not a known.*'elu', 'relu', 'sikf', 'dpfp'"),
    ("not a map", lambda b: fm.resolve(3), TypeError, "feature_map must be"),
    ("dpfp nu", lambda b: fm.dpfp(0), ValueError, "nu must be >= 1"),
    ("favor 1-d", lambda b: fm.favor(b.asarray(np.zeros(3))), ValueError, "projection must have shape"),
    ("callable shape", lambda b: fm.resolve(lambda x: b.xp.sum(x, axis=-1)).queries(b.asarray(np.zeros((2, 3)))), ValueError, "must return an array of shape"),
    ("int input", lambda b: fm.elu().queries(b.asarray(np.arange(3), None)), TypeError, "x must have a real floating dtype"),
    ("favor width", lambda b: fm.favor(random_projection(4, 3, seed=0, like=b.asarray(np.zeros(1)))).queries(b.asarray(np.zeros((2, 2)))),
     ValueError, r"x has width D = 2 but the favor projection has shape \(m, d\) = \(4, 3\)"),
]


@pytest.mark.parametrize("call, exc, pattern", [pytest.param(c, e, p, id=i) for i, c, e, p in _MAP_ERRORS])
def test_feature_map_errors(backend, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(backend)


@pytest.mark.jit
def test_maps_under_jit(backend, rng):
    x, xn = _input(backend, rng, "float64")
    for fmap, formula in ((fm.sikf(), lambda a: np.exp(a - a.max(-1, keepdims=True))), (fm.elu(), oracles.elu1)):
        assert_close(backend, backend.jit(fmap.queries)(x), formula(xn), "float64")
    w = backend.jit(lambda like: random_projection(6, 4, seed=5, like=like))(x)
    np.testing.assert_array_equal(backend.to_numpy(w), backend.to_numpy(random_projection(6, 4, seed=5, like=x)))
    f = fm.favor(w)
    assert_close(backend, backend.jit(f.keys)(x), backend.to_numpy(f.keys(x)), "float64")
