"""fastrpb.parallel under ``jax.shard_map`` on 8 emulated CPU devices.

Run as a script by ``test_parallel.py`` (the device count must be set before JAX is
imported, so it cannot share the test process). Asserts, for P = 2, 4, 8, causal and
not, several feature maps, with and without the FastRPB term and skip: the sharded
forward pass and ``jax.grad`` of a scalar loss through ``shard_map`` equal the float64
dense oracle (``oracles.py``) and the single-device call on the whole arrays. Prints
one line per case and ``OK`` at the end.
"""

from __future__ import annotations

import functools
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as Spec

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "src"), os.path.dirname(__file__)]

import fastrpb
import oracles
from fastrpb import parallel

B, H, L, D = 2, 2, 32, 4
RTOL = 1e-9
check = functools.partial(oracles.check_relative, rtol=RTOL)


def oracle_attention(q, k, v, fmap, causal, key_mask, table, skip, proj):
    """float64 dense reference on the whole sequence (NumPy, independent of fastrpb)."""
    if fmap == "elu":
        out = oracles.kernel_attention(oracles.elu1(q), oracles.elu1(k), v, causal=causal, key_mask=key_mask, eps=1e-6)
    elif fmap == "dpfp":
        out = oracles.kernel_attention(oracles.dpfp(q), oracles.dpfp(k), v, causal=causal, key_mask=key_mask, eps=1e-6)
    elif fmap == "sikf":
        out = oracles.exp_kernel_attention(q, k, v, causal=causal, key_mask=key_mask, eps=1e-6)
    else:
        out = oracles.exp_kernel_attention(
            oracles.favor_log(q, proj), oracles.favor_log(k, proj), v, causal=causal, key_mask=key_mask, eps=1e-6
        )
    if table is not None:
        vm = v if key_mask is None else np.where(key_mask[..., None], v, 0.0)
        out = out + oracles.toeplitz(table, L, causal=causal, skip=skip) @ vm
    return out


def value_and_grad(f, km, weight, argnums):
    """``jit`` of ((loss, output), gradients) for ``loss = sum(f(...) * weight)``."""

    def loss(q, k, v, rpb):
        out = f(q, k, v, rpb, km)
        return jnp.sum(out * weight), out

    return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))


def main() -> None:
    assert len(jax.devices()) == 8, jax.devices()
    rng = np.random.default_rng(20260311)
    q = rng.standard_normal((B, H, L, D)) * 2
    k = rng.standard_normal((B, H, L, D)) * 2
    v = rng.standard_normal((B, H, L, D))
    table = rng.standard_normal((H, 2 * L - 1)) * 0.1
    key_mask = rng.random((B, H, L)) > 0.2
    proj = rng.standard_normal((6, D))
    maps = {
        "elu": "elu",
        "sikf": "sikf",
        "dpfp": "dpfp",
        "favor": fastrpb.feature_maps.favor(jnp.asarray(proj)),
    }
    cases = [
        # (P, map, causal, with bias, skip, key mask)
        # (each a compilation of the forward and backward, sharded and not: seconds; the
        # exponential frame's merge causal and not, plain features causal and not)
        (4, "elu", True, True, (3, 2), False),
        (8, "sikf", True, False, (0, 0), True),
        (8, "favor", False, False, (0, 0), True),
        (2, "dpfp", False, True, (0, 5), False),
    ]
    for P, fmap, causal, with_bias, skip, masked in cases:
        mesh = Mesh(np.array(jax.devices()[:P]), ("seq",))
        seq = Spec(None, None, "seq", None)
        rpb = jnp.asarray(table) if with_bias else None
        km = jnp.asarray(key_mask) if masked else None
        kw = {"feature_map": maps[fmap], "causal": causal, "chunk_size": 3, "rpb_skip": skip}

        def sharded(q, k, v, rpb, km, kw=kw, mesh=mesh, seq=seq):
            def body(q, k, v, rpb, km):
                return parallel.linear_attention(q, k, v, comm=parallel.jax_axis("seq"), key_mask=km, rpb=rpb, **kw)

            specs = (seq, seq, seq, None if rpb is None else Spec(), None if km is None else Spec(None, None, "seq"))
            return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=seq)(q, k, v, rpb, km)

        def single(q, k, v, rpb, km, kw=kw):  # the single-device call on the whole arrays
            return fastrpb.linear_attention(q, k, v, key_mask=km, rpb=rpb, **kw)

        qs, ks = q, k
        if fmap == "sikf":  # large logits, later keys larger: the state merge must rescale exactly
            qs, ks = 10 * q, 10 * k + 1.5 * np.arange(L)[:, None]
        args = (jnp.asarray(qs), jnp.asarray(ks), jnp.asarray(v), rpb)
        weight = jnp.asarray(rng.standard_normal((B, H, L, D)))
        argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
        # forward and gradients of a scalar loss in one compiled function each
        (_, got), g_sharded = value_and_grad(sharded, km, weight, argnums)(*args)
        (_, ref), g_single = value_and_grad(single, km, weight, argnums)(*args)
        want = oracle_attention(
            qs, ks, v, fmap, causal, key_mask if masked else None, table if with_bias else None, skip, proj
        )
        e1 = check(f"P={P} {fmap} causal={causal} forward vs oracle", got, want)
        e2 = check(f"P={P} {fmap} causal={causal} forward vs single", got, ref)
        e3 = max(check(f"P={P} {fmap} grad {n}", a, b) for n, a, b in zip("qkvw", g_sharded, g_single, strict=False))
        print(
            f"P={P} {fmap:5s} causal={causal!s:5s} bias={with_bias!s:5s} skip={skip} mask={masked!s:5s} "
            f"err oracle {e1:.1e} single {e2:.1e} grad {e3:.1e}"
        )

    # the bias alone: per-head table, a shared 1-d table, odd column counts (padding)
    for P, shape, w_shape, causal, skip in [
        (8, (3, L, 5), (3, 2 * L + 1), False, (2, 1)),
        (4, (2, 1, L, 3), (2 * L - 1,), True, (0, 0)),
        (2, (L, 1), (2, 2 * L - 1), True, (1, 1)),
    ]:
        mesh = Mesh(np.array(jax.devices()[:P]), ("seq",))
        x = jnp.asarray(rng.standard_normal(shape))
        w = jnp.asarray(rng.standard_normal(w_shape))
        vspec = Spec(*([None] * (len(shape) - 2)), "seq", None)
        ospec = Spec(*([None] * (max(len(shape), len(w_shape) + 1) - 2)), "seq", None)

        def sharded_rpb(x, w, vspec=vspec, ospec=ospec, mesh=mesh, causal=causal, skip=skip):
            def body(x, w):
                return parallel.rpb(x, w, comm=parallel.jax_axis("seq"), causal=causal, skip=skip)

            return jax.shard_map(body, mesh=mesh, in_specs=(vspec, Spec()), out_specs=ospec)(x, w)

        dense = oracles.toeplitz(w, L, causal=causal, skip=skip)
        weight = jnp.asarray(rng.standard_normal(np.broadcast_shapes(shape[:-2], w_shape[:-1]) + shape[-2:]))

        def single(x, w, causal=causal, skip=skip):
            return fastrpb.rpb(x, w, causal=causal, skip=skip)

        (_, got), g1 = value_and_grad(lambda x, w, *_: sharded_rpb(x, w), None, weight, (0, 1))(x, w, None, None)
        (_, ref), g2 = value_and_grad(lambda x, w, *_, single=single: single(x, w), None, weight, (0, 1))(
            x, w, None, None
        )
        e1 = check(f"rpb P={P} {shape} forward vs oracle", got, dense @ x)
        check(f"rpb P={P} {shape} forward vs single", got, ref)
        e2 = max(check(f"rpb P={P} grad {n}", a, b) for n, a, b in zip("vw", g1, g2, strict=False))
        print(f"rpb P={P} v{shape} w{w_shape} causal={causal} skip={skip} err oracle {e1:.1e} grad {e2:.1e}")

    # what crosses devices: the attention exchanges states only (no value-sized gather)
    mesh = Mesh(np.array(jax.devices()[:8]), ("seq",))
    for length in (64, 256):
        x = jnp.zeros((1, 1, length, D))

        def body(q, k, v):
            return parallel.linear_attention(q, k, v, comm=parallel.jax_axis("seq"), causal=True)

        f = jax.shard_map(body, mesh=mesh, in_specs=(seq,) * 3, out_specs=seq)
        hlo = jax.jit(f).lower(x, x, x).as_text()  # StableHLO: the collectives as written
        gathers = [line for line in hlo.splitlines() if "all_gather" in line]
        assert len(gathers) == 1, gathers
        assert f"tensor<8x1x1x{D}x{D + 1}xf64>" in gathers[0], gathers
        assert "all_to_all" not in hlo
    print("OK")


if __name__ == "__main__":
    main()
