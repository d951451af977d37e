"""Empty inputs: a zero-size batch, head, sequence or feature dimension gives a correctly
shaped empty (or zero) result on every backend, never a crash.

The expected values come from the dense float64 oracles, which handle empty arrays by
the rules of NumPy. Where a width is zero but the output is not empty (``Dk = 0``) the
kernel is a sum over no features, 0, so attention gives zeros and only the FastRPB
term ``B v`` remains.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastrpb
import oracles
from backends_tests.backends import assert_close
from fastrpb import feature_maps as fm

EPS = 1e-6

# (lead, L, Dk, Dv): one zero-size dimension each
SHAPES = [
    pytest.param((0,), 5, 4, 3, id="batch0"),
    pytest.param((2, 0), 5, 4, 3, id="heads0"),
    pytest.param((2,), 0, 4, 3, id="L0"),
    pytest.param((2,), 5, 0, 3, id="Dk0"),
    pytest.param((2,), 5, 4, 0, id="Dv0"),
]
MAPS = ["elu", "relu", "sikf", "dpfp", "favor"]
# every map with every shape, but favor with Dk = 0: its projection has width d >= 1,
# so Dk = 0 is a width error there (a case of test_validate)
MAP_SHAPES = [
    pytest.param(name, *shape.values, id=f"{shape.id}-{name}")
    for shape in SHAPES
    for name in MAPS
    if not (name == "favor" and shape.values[2] == 0)
]


# the maps the other backends than NumPy and array-api-strict run: the maps are one
# array-API code, the plain and the exponential kernel are not
KERNELS = ("elu", "sikf")


def _arrays(backend, rng, lead, L, Dk, Dv):
    qn = rng.standard_normal((*lead, L, Dk))
    kn = rng.standard_normal((*lead, L, Dk))
    vn = rng.standard_normal((*lead, L, Dv))
    wn = rng.standard_normal((2 * L + 1,))  # M = L + 1 >= L
    return [backend.asarray(x) for x in (qn, kn, vn, wn)], (qn, kn, vn, wn)


def _map(backend, name, Dk, rng):
    """The map to pass and a float64 oracle ``attend(qn, kn, vn, causal)`` for it."""
    if name == "favor":
        pn = rng.standard_normal((8, Dk))
        return fm.favor(backend.asarray(pn)), _exponential(lambda x: oracles.favor_log(x, pn))
    if name == "sikf":
        return name, _exponential(lambda x: x)
    phi = {"elu": oracles.elu1, "relu": oracles.relu, "dpfp": oracles.dpfp}[name]
    return name, lambda qn, kn, vn, causal: oracles.kernel_attention(phi(qn), phi(kn), vn, causal=causal, eps=EPS)


def _exponential(log_phi):
    """Exponential maps take eps relative to the largest kernel term (their oracle, which
    takes maxima and so needs non-empty arrays); with an empty array the output is
    empty or, with no features, zero (the kernel is a sum over none): the plain
    kernel oracle with ``phi = exp(log_phi)`` says so."""

    def attend(qn, kn, vn, causal):
        lq, lk = log_phi(qn), log_phi(kn)
        if lq.size == 0 or lk.size == 0:
            return oracles.kernel_attention(np.exp(lq), np.exp(lk), vn, causal=causal, eps=EPS)
        return oracles.exp_kernel_attention(lq, lk, vn, causal=causal, eps=EPS)

    return attend


def _bias(wn, L, vn, causal):
    return oracles.toeplitz(wn, L, causal=causal) @ vn


# every map with every zero-size shape on NumPy and array-api-strict; the other backends
# take the plain (elu) and the exponential (sikf) kernel, (non-causal, plain) and (causal,
# FastRPB): each kernel and the bias term meet every empty shape there too
@pytest.mark.subset(lambda name, causal, with_rpb, **_: name in KERNELS and causal == with_rpb)
@pytest.mark.parametrize("with_rpb", [False, True], ids=["plain", "rpb"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("name", "lead", "L", "Dk", "Dv"), MAP_SHAPES)
def test_linear_attention(backend, rng, name, causal, with_rpb, lead, L, Dk, Dv):
    (q, k, v, w), (qn, kn, vn, wn) = _arrays(backend, rng, lead, L, Dk, Dv)
    feature_map, attend = _map(backend, name, Dk, rng)
    out = fastrpb.linear_attention(q, k, v, feature_map=feature_map, causal=causal, rpb=w if with_rpb else None)
    expected = attend(qn, kn, vn, causal)
    if with_rpb:
        expected = expected + _bias(wn, L, vn, causal)
    assert_close(backend, out, expected, "float64", scale=1.0)


@pytest.mark.subset(lambda name, **_: name in KERNELS)
@pytest.mark.parametrize(("name", "lead", "L", "Dk", "Dv"), MAP_SHAPES)
def test_linear_attention_state_then_step(backend, rng, name, lead, L, Dk, Dv):
    (q, k, v, _), (qn, kn, vn, _) = _arrays(backend, rng, lead, L + 1, Dk, Dv)
    feature_map, attend = _map(backend, name, Dk, rng)
    # a prompt of L tokens, then one decoding step: together the causal attention of L + 1
    _, state = fastrpb.linear_attention(
        q[..., :L, :], k[..., :L, :], v[..., :L, :], feature_map=feature_map, causal=True, return_state=True
    )
    out, state = fastrpb.linear_attention_step(state, q[..., L, :], k[..., L, :], v[..., L, :], feature_map=feature_map)
    assert_close(backend, out, attend(qn, kn, vn, True)[..., L, :], "float64", scale=1.0)
    F = fastrpb.feature_maps.resolve(feature_map).features(Dk)
    assert tuple(state.S.shape)[-2:] == (F, Dv)
    assert tuple(state.z.shape)[-1:] == (F,)


@pytest.mark.subset(lambda name, **_: name in KERNELS)
@pytest.mark.parametrize(("name", "lead", "L", "Dk", "Dv"), MAP_SHAPES)
def test_step_from_nothing(backend, rng, name, lead, L, Dk, Dv):
    (q, k, v, _), (qn, kn, vn, _) = _arrays(backend, rng, lead, 1, Dk, Dv)
    feature_map, attend = _map(backend, name, Dk, rng)
    out, _ = fastrpb.linear_attention_step(None, q[..., 0, :], k[..., 0, :], v[..., 0, :], feature_map=feature_map)
    assert_close(backend, out, attend(qn, kn, vn, True)[..., 0, :], "float64", scale=1.0)


@pytest.mark.parametrize("with_rpb", [False, True], ids=["plain", "rpb"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("lead", "L", "Dk", "Dv"), SHAPES)
def test_softmax_attention(backend, rng, causal, with_rpb, lead, L, Dk, Dv):
    (q, k, v, w), (qn, kn, vn, wn) = _arrays(backend, rng, lead, L, Dk, Dv)
    out = fastrpb.softmax_attention(q, k, v, causal=causal, rpb=w if with_rpb else None)
    if L == 0:  # no queries: no output rows (the oracle's row maximum needs a key)
        expected = np.zeros((*lead, 0, Dv))
    else:  # Dk = 0: every logit is 0 whatever the scale, uniform weights
        expected = oracles.softmax_attention(qn, kn, vn, causal=causal, scale=1.0 if Dk == 0 else None)
    if with_rpb:
        expected = expected + _bias(wn, L, vn, causal)
    assert_close(backend, out, expected, "float64", scale=1.0)


RPB_SHAPES = [
    pytest.param((0,), (), 5, 3, id="batch0"),
    pytest.param((0, 2), (2,), 5, 3, id="batch0-head-tables"),
    pytest.param((1,), (0,), 5, 3, id="tables0"),  # broadcast(1, 0) = 0
    pytest.param((2,), (), 0, 3, id="L0"),
    pytest.param((2,), (), 5, 0, id="D0"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("v_lead", "w_lead", "L", "D"), RPB_SHAPES)
def test_rpb(backend, rng, causal, v_lead, w_lead, L, D):
    vn = rng.standard_normal((*v_lead, L, D))
    wn = rng.standard_normal((*w_lead, 2 * L + 1))
    out = fastrpb.rpb(backend.asarray(vn), backend.asarray(wn), causal=causal)
    expected = oracles.toeplitz(wn, L, causal=causal)[..., :, :] @ vn
    assert_close(backend, out, expected, "float64", scale=1.0)


@pytest.mark.parametrize(("v_lead", "D"), [pytest.param((0,), 3, id="batch0"), pytest.param((2,), 0, id="D0")])
def test_rpb_nd(backend, rng, v_lead, D):
    grid = (2, 3)
    vn = rng.standard_normal((*v_lead, 6, D))
    tables = [rng.standard_normal((3,)), rng.standard_normal((5,))]
    out = fastrpb.rpb_nd(backend.asarray(vn), [backend.asarray(t) for t in tables], grid)
    assert_close(backend, out, oracles.toeplitz_nd(tables, grid) @ vn, "float64", scale=1.0)


@pytest.mark.parametrize(("w_lead", "L"), [pytest.param((), 0, id="L0"), pytest.param((0,), 3, id="tables0")])
def test_rpb_matrix(backend, rng, w_lead, L):
    wn = rng.standard_normal((*w_lead, 7))
    out = fastrpb.rpb_matrix(backend.asarray(wn), L)
    M = 4
    i = np.arange(L)
    expected = wn[..., M - 1 + i[:, None] - i[None, :]] if L else np.zeros((*w_lead, 0, 0))
    assert_close(backend, out, expected, "float64", scale=1.0)
