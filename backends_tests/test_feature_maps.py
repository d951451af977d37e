"""Feature maps against their formulas, on every backend and dtype."""

from __future__ import annotations

import numpy as np
import pytest

import oracles
from backends_tests.backends import assert_array, assert_close, check_gradients
from fastrpb import feature_maps as fm
from fastrpb import linear_attention, random_projection


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
    assert f.features(d) == m
    assert f.signature == f"favor(m={m}, d={d})"


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
    np.testing.assert_array_equal(
        wn, backend.to_numpy(random_projection(m, d, seed=7, like=backend.asarray(np.zeros(2), "float64")))
    )
    assert not np.allclose(
        wn, backend.to_numpy(random_projection(m, d, seed=8, like=backend.asarray(np.zeros(2), "float64")))
    )
    for start in range(0, m, d):  # rows of each block are orthogonal directions
        block = wn[start : start + d]
        unit = block / np.linalg.norm(block, axis=1, keepdims=True)
        np.testing.assert_allclose(unit @ unit.T, np.eye(len(block)), atol=1e-12)
    # chi-distributed norms: E|w|^2 = d; over many rows the mean is close to d
    many = backend.to_numpy(random_projection(4000, d, seed=0, like=backend.asarray(np.zeros(2), "float64")))
    assert abs(np.mean(np.sum(many**2, axis=1)) / d - 1) < 0.05
    iid = backend.to_numpy(
        random_projection(m, d, seed=7, orthogonal=False, like=backend.asarray(np.zeros(2), "float64"))
    )
    assert not np.allclose(np.abs(iid[:d] @ iid[:d].T - np.diag(np.diag(iid[:d] @ iid[:d].T))), 0.0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
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
    assert isinstance(fm.resolve("elu"), fm.ELU)
    assert isinstance(fm.resolve("sikf"), fm.SIKF)
    assert fm.resolve("dpfp").features(3) == 6
    assert fm.resolve("relu").features(5) == 5
    square = fm.resolve(lambda x: x * x)
    x = backend.asarray(np.arange(6.0).reshape(2, 3))
    assert_close(backend, square.keys(x), np.arange(6.0).reshape(2, 3) ** 2, "float64")


# (id, call(backend), exception, message); the errors of test_resolve_names_callables_and_errors
_MAP_ERRORS = [
    (
        "unknown name",
        lambda b: fm.resolve("softmax"),
        ValueError,
        r"feature_map 'softmax' is not a known.*'elu', 'relu', 'sikf', 'dpfp'",
    ),
    ("not a map", lambda b: fm.resolve(3), TypeError, "feature_map must be"),
    ("dpfp nu", lambda b: fm.dpfp(0), ValueError, "nu must be >= 1"),
    ("favor 1-d", lambda b: fm.favor(b.asarray(np.zeros(3))), ValueError, "projection must have shape"),
    (
        "callable shape",
        lambda b: fm.resolve(lambda x: b.xp.sum(x, axis=-1)).queries(b.asarray(np.zeros((2, 3)))),
        ValueError,
        "must return an array of shape",
    ),
    (
        "int input",
        lambda b: fm.elu().queries(b.asarray(np.arange(3), None)),
        TypeError,
        "x must have a real floating dtype",
    ),
    (
        "favor width",
        lambda b: fm.favor(random_projection(4, 3, seed=0, like=b.asarray(np.zeros(1)))).queries(
            b.asarray(np.zeros((2, 2)))
        ),
        ValueError,
        r"x has width D = 2 but the favor projection has shape \(m, d\) = \(4, 3\)",
    ),
]


@pytest.mark.parametrize(("call", "exc", "pattern"), [pytest.param(c, e, p, id=i) for i, c, e, p in _MAP_ERRORS])
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


# ----------------------------------------------------------------- Taylor (Based) and Hedgehog


def _hedgehog_projection(backend, rng, m=6, d=4):
    wn = rng.standard_normal((m, d))
    return backend.asarray(wn), wn


def test_taylor_features_match_formula(backend, dtype, rng):
    x, xn = _input(backend, rng, dtype)
    t = fm.taylor()
    for got in (t.queries(x), t.keys(x)):
        assert got.dtype == x.dtype
        assert got.shape[-1] == t.features(4) == 1 + 4 + 10
        assert_close(backend, got, oracles.taylor(xn), dtype)
    assert isinstance(fm.resolve("taylor"), fm.Taylor)
    assert t.signature == "taylor"
    assert [t.features(d) for d in (0, 1, 16)] == [1, 1 + 1 + 1, 1 + 16 + 136]
    for d in (1, 2):  # no pairs i < j, one pair
        y, yn = _input(backend, rng, dtype, shape=(3, d))
        assert_close(backend, t.queries(y), oracles.taylor(yn), dtype)


def test_taylor_kernel_is_second_order_exp(backend, rng):
    # phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(D): fla's and Based's scaling
    qn, kn = rng.standard_normal((5, 6)), rng.standard_normal((7, 6))
    t = fm.taylor()
    K = backend.to_numpy(t.queries(backend.asarray(qn))) @ backend.to_numpy(t.keys(backend.asarray(kn))).T
    s = qn @ kn.T / np.sqrt(6)
    np.testing.assert_allclose(K, 1 + s + s**2 / 2, rtol=1e-12, atol=1e-12)
    assert K.min() >= 0.5 - 1e-12


def test_hedgehog_features_match_formula(backend, dtype, rng):
    x, xn = _input(backend, rng, dtype)
    w, wn = _hedgehog_projection(backend, rng)
    h = fm.hedgehog(backend.xp.astype(w, x.dtype))
    wn = backend.to_numpy(backend.xp.astype(w, x.dtype)).astype(np.float64)
    for got in (h.queries(x), h.keys(x)):
        assert got.dtype == x.dtype
        assert got.shape[-1] == h.features(4) == 12
        assert_close(backend, got, oracles.hedgehog(xn, wn), dtype)
        halves = backend.to_numpy(got).reshape(*got.shape[:-1], 2, 6).sum(-1)
        np.testing.assert_allclose(halves, 1.0, rtol=2e-2 if dtype in ("float16", "bfloat16") else 1e-5)
    assert h.signature == "hedgehog(m=6, d=4)"
    # stable for large logits: the softmaxes never overflow
    big = backend.asarray(np.full((3, 4), 1e4) * rng.standard_normal((3, 4)), "float32")
    assert np.all(np.isfinite(backend.to_numpy(fm.hedgehog(backend.asarray(wn, "float32")).queries(big))))


def test_taylor_and_hedgehog_errors(backend, rng):
    w, _ = _hedgehog_projection(backend, rng)
    with pytest.raises(
        ValueError, match=r"x has width D = 3 but the hedgehog projection has shape \(m, d\) = \(6, 4\)"
    ):
        fm.hedgehog(w).queries(backend.asarray(np.zeros((2, 3))))
    x = backend.asarray(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"q has width D = 3 but the hedgehog projection"):
        linear_attention(x, x, x, feature_map=fm.hedgehog(w))
    with pytest.raises(ValueError, match="projection must have shape"):
        fm.hedgehog(backend.asarray(np.zeros(3)))
    with pytest.raises(TypeError, match="projection must have a real floating dtype"):
        fm.hedgehog(backend.asarray(np.zeros((2, 2), dtype=np.int32), None))
    with pytest.raises(TypeError, match="x must have a real floating dtype"):
        fm.taylor().keys(backend.asarray(np.arange(3), None))
    with pytest.raises(ValueError, match="d must be >= 0"):
        fm.taylor().features(-1)


def _attention_inputs(backend, rng, dtype, L=9, d=4):
    arrays = [backend.asarray(rng.standard_normal((2, L, d)) * 0.8, dtype) for _ in range(2)]
    arrays.append(backend.asarray(rng.standard_normal((2, L, 3)), dtype))
    return arrays, [backend.to_numpy(a).astype(np.float64) for a in arrays]


# elsewhere than NumPy and array-api-strict: the map objects (the name resolves to the same map)
@pytest.mark.subset(lambda name, **_: name != "taylor_name")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", ["taylor", "taylor_name", "hedgehog"])
def test_taylor_hedgehog_attention_match_dense_oracle(backend, dtype, rng, name, causal):
    (q, k, v), (qn, kn, vn) = _attention_inputs(backend, rng, dtype)
    if name == "hedgehog":
        w, wn = _hedgehog_projection(backend, rng)
        fmap, phi = fm.hedgehog(w), lambda a: oracles.hedgehog(a, wn)
    else:
        fmap, phi = ("taylor" if name == "taylor_name" else fm.taylor()), oracles.taylor
    # the maps' maths: compiled on JAX (backend.call); the eager call has its own tests
    out = backend.call(linear_attention, q, k, v, feature_map=fmap, causal=causal, chunk_size=4)
    assert out.dtype == q.dtype
    assert out.shape == (2, 9, 3)
    expected = oracles.kernel_attention(phi(qn), phi(kn), vn, causal=causal, eps=1e-6)
    assert_close(backend, out, expected, dtype)


def test_taylor_hedgehog_under_jit(backend, rng):
    if backend.jit is None:
        pytest.skip(f"{backend.name} has no jit")
    (q, k, v), (qn, kn, vn) = _attention_inputs(backend, rng, "float64")
    w, wn = _hedgehog_projection(backend, rng)
    f = backend.jit(lambda q, k, v, w: linear_attention(q, k, v, feature_map=fm.hedgehog(w), causal=True))
    expected = oracles.kernel_attention(oracles.hedgehog(qn, wn), oracles.hedgehog(kn, wn), vn, causal=True, eps=1e-6)
    assert_close(backend, f(q, k, v, w), expected, "float64")
    g = backend.jit(lambda q, k, v: linear_attention(q, k, v, feature_map="taylor"))
    expected = oracles.kernel_attention(oracles.taylor(qn), oracles.taylor(kn), vn, eps=1e-6)
    assert_close(backend, g(q, k, v), expected, "float64")


@pytest.mark.grad
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_hedgehog_projection_gradients(backend, rng, causal):
    # against float64 central differences; check_gradients compiles the loss once (JAX)
    _, (qn, kn, vn) = _attention_inputs(backend, rng, "float64", L=6, d=3)
    wn = rng.standard_normal((4, 3))
    check_gradients(
        backend,
        lambda q, k, v, w: linear_attention(q, k, v, feature_map=fm.hedgehog(w), causal=causal, chunk_size=4),
        qn,
        kn,
        vn,
        wn,
    )


@pytest.mark.parametrize("name", ["taylor", "hedgehog"])
def test_taylor_hedgehog_decoding_matches_causal_oracle(backend, rng, name):
    from fastrpb import linear_attention_step

    (q, k, v), (qn, kn, vn) = _attention_inputs(backend, rng, "float64", L=6)
    if name == "hedgehog":
        w, wn = _hedgehog_projection(backend, rng)
        fmap, phi = fm.hedgehog(w), lambda a: oracles.hedgehog(a, wn)
    else:
        fmap, phi = "taylor", oracles.taylor
    expected = oracles.kernel_attention(phi(qn), phi(kn), vn, causal=True, eps=1e-6)
    prompt, state = linear_attention(
        q[:, :4, :], k[:, :4, :], v[:, :4, :], feature_map=fmap, causal=True, return_state=True
    )
    outs = [backend.to_numpy(prompt)]
    for t in range(4, 6):
        out_t, state = linear_attention_step(state, q[:, t, :], k[:, t, :], v[:, t, :], feature_map=fmap)
        outs.append(backend.to_numpy(out_t)[:, None, :])
    assert_close(backend, backend.asarray(np.concatenate(outs, axis=1)), expected, "float64")
