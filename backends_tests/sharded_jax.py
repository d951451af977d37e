"""Data parallel JAX: fastrpb under ``jax.jit`` with inputs sharded over leading axes.

Run as a script by ``test_engines.py`` (the 8 emulated CPU devices must be set before
JAX is imported). For values sharded over the batch axis, the heads axis and both
(a 4 x 2 mesh), ``rpb`` (causal or not, with skip), ``rpb_nd`` (causal or not) and
``linear_attention`` (non-causal and causal, several feature maps, with ``rpb=``)
must, under ``jax.jit`` (every case on the batch x heads mesh, one case of each
function on the one-axis layouts):

- equal the float64 dense oracle (``oracles.py``) and the unsharded call;
- compile to a program without an all-gather or all-to-all of a value-sized array
  (one example's values of one head, ``L x D`` numbers, or more);
- keep the input's sharding on the output;
- give the unsharded gradient under ``jax.grad`` (on the batch x heads mesh, but for
  the sikf and favor attention, whose backward compiles for long).

Eager calls on the sharded arrays (a replicated table beside sharded values) must
work and equal the oracle too. Prints one line per case and ``OK``.
"""

from __future__ import annotations

import functools
import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as Spec

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "src"), os.path.dirname(__file__)]

import fastrpb
import oracles

B, H, L, D = 8, 4, 24, 4
GRID = (6, 4)
RTOL = 1e-9
check = functools.partial(oracles.check_relative, rtol=RTOL)


def collectives(hlo: str) -> list[tuple[str, int]]:
    """(kind, element count) of every all-gather / all-to-all in compiled HLO text."""
    found = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s(all-gather|all-to-all)(-start)?\(", line)
        if m:  # the result type may be a tuple: (f32[...], f32[...])
            for _, dims in re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", m.group(1)):
                found.append((m.group(2), int(np.prod([int(d) for d in dims.split(",") if d]))))
    return found


def main() -> None:
    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(20261130)
    q = rng.standard_normal((B, H, L, D))
    k = rng.standard_normal((B, H, L, D))
    v = rng.standard_normal((B, H, L, D))
    w = rng.standard_normal((H, 2 * L - 1)) * 0.3
    w_rows = rng.standard_normal((H, 2 * GRID[0] - 1)) * 0.3
    w_cols = rng.standard_normal((H, 2 * GRID[1] - 1)) * 0.3
    proj = rng.standard_normal((6, D))
    maps = {"elu": "elu", "sikf": "sikf", "dpfp": "dpfp", "favor": fastrpb.feature_maps.favor(jnp.asarray(proj))}

    def oracle_la(fmap, causal, table):
        if fmap == "elu":
            out = oracles.kernel_attention(oracles.elu1(q), oracles.elu1(k), v, causal=causal, eps=1e-6)
        elif fmap == "dpfp":
            out = oracles.kernel_attention(oracles.dpfp(q), oracles.dpfp(k), v, causal=causal, eps=1e-6)
        elif fmap == "sikf":
            out = oracles.exp_kernel_attention(q, k, v, causal=causal, eps=1e-6)
        else:
            out = oracles.exp_kernel_attention(
                oracles.favor_log(q, proj), oracles.favor_log(k, proj), v, causal=causal, eps=1e-6
            )
        return out + oracles.rpb(v, table, causal=causal)

    cases = []
    for causal in (False, True):
        for skip in ((0, 0), (1, 2)):
            cases.append(
                (
                    f"rpb causal={causal} skip={skip}",
                    lambda q, k, v, w, wr, wc, c=causal, s=skip: fastrpb.rpb(v, w, causal=c, skip=s),
                    oracles.rpb(v, w, causal=causal, skip=skip),
                )
            )
        cases.append(
            (
                f"rpb_nd causal={causal}",
                lambda q, k, v, w, wr, wc, c=causal: fastrpb.rpb_nd(v, [wr, wc], GRID, causal=c),
                oracles.rpb_nd(v, [w_rows, w_cols], GRID, causal=causal),
            )
        )
    for fmap, causal in (("elu", False), ("sikf", True), ("dpfp", True), ("favor", False)):
        cases.append(
            (
                f"linear_attention {fmap} causal={causal} rpb=",
                lambda q, k, v, w, wr, wc, f=fmap, c=causal: fastrpb.linear_attention(
                    q, k, v, feature_map=maps[f], causal=c, rpb=w, chunk_size=8
                ),
                oracle_la(fmap, causal, w),
            )
        )

    # the detector finds the gather XLA makes of an FFT it cannot partition (jax#15680)
    sharded_v = jax.device_put(jnp.asarray(v), NamedSharding(mesh, Spec("data")))
    naive = jax.jit(lambda x: jnp.fft.irfft(jnp.fft.rfft(x, n=2 * L, axis=-2) * 2.0, n=2 * L, axis=-2))
    assert any(n >= L * D for _, n in collectives(naive.lower(sharded_v).compile().as_text())), "collective detector"

    # a long input, which eager code transforms in blocks of leading indices: compiled
    # (not run), it must not gather either
    big_v = jax.ShapeDtypeStruct((8, 8, 1024, 64), jnp.float32, sharding=NamedSharding(mesh, Spec("data", "model")))
    big_w = jax.ShapeDtypeStruct((8, 2047), jnp.float32, sharding=NamedSharding(mesh, Spec("model")))
    for causal in (False, True):
        hlo = jax.jit(lambda v, w, c=causal: fastrpb.rpb(v, w, causal=c)).lower(big_v, big_w).compile().as_text()
        big = [(kind, n) for kind, n in collectives(hlo) if n >= 1024 * 64]
        assert not big, f"long input, causal={causal}: value-sized collectives {big}"
    print("long input: no value-sized collectives")

    # every case on the 4 x 2 mesh (values over batch and heads), with gradients; on the
    # two one-axis layouts one case of each function (a compilation each: seconds)
    ONE_LAYOUT_EACH = {"rpb causal=True skip=(1, 2)", "rpb_nd causal=False", "linear_attention sikf causal=True rpb="}
    # gradients of every case but two exponential-frame attentions (their backward
    # compiles for 20 s; dpfp's causal and elu's non-causal backward stay)
    NO_GRADIENT = {"linear_attention sikf causal=True rpb=", "linear_attention favor causal=False rpb="}
    assert {name for name, _, _ in cases} >= ONE_LAYOUT_EACH | NO_GRADIENT
    layouts = {
        "batch": (Spec("data"), Spec()),
        "heads": (Spec(None, "model"), Spec("model")),
        "batch+heads": (Spec("data", "model"), Spec("model")),
    }
    value_size = L * D
    plain = tuple(jnp.asarray(x) for x in (q, k, v, w, w_rows, w_cols))
    # the unsharded results, once per case: each layout is compared with them
    unsharded = [jax.jit(f)(*plain) for _, f, _ in cases]
    for layout, (vspec, wspec) in layouts.items():
        on_v, on_w = NamedSharding(mesh, vspec), NamedSharding(mesh, wspec)
        args = tuple(jax.device_put(jnp.asarray(x), on_v) for x in (q, k, v)) + tuple(
            jax.device_put(jnp.asarray(x), on_w) for x in (w, w_rows, w_cols)
        )
        for (name, f, want), ref in zip(cases, unsharded, strict=True):
            if layout != "batch+heads" and name not in ONE_LAYOUT_EACH:
                continue
            # one compilation per case and layout: its program is inspected and run
            compiled = jax.jit(f).lower(*args).compile()
            big = [(kind, n) for kind, n in collectives(compiled.as_text()) if n >= value_size]
            assert not big, f"{layout} {name}: value-sized collectives {big}"
            out = compiled(*args)
            assert out.sharding.is_equivalent_to(args[2].sharding, out.ndim), (
                f"{layout} {name}: output sharding {out.sharding} != {args[2].sharding}"
            )
            check(f"{layout} {name} (oracle)", out, want)
            check(f"{layout} {name} (unsharded)", out, ref)
            print(f"{layout}: {name}: no value-sized collectives, sharding kept, equal")
            if layout != "batch+heads" or name in NO_GRADIENT:
                continue
            # gradients: value, table (and queries/keys) through the partitioned FFTs
            weight = jnp.asarray(rng.standard_normal(want.shape))

            def loss(*a, f=f, weight=weight):
                return jnp.sum(f(*a) * weight)

            grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))
            compiled = grads.lower(*args).compile()
            big = [(kind, n) for kind, n in collectives(compiled.as_text()) if n >= value_size]
            assert not big, f"{layout} {name} grad: value-sized collectives {big}"
            for j, (g, g_ref) in enumerate(zip(compiled(*args), grads(*plain), strict=True)):
                check(f"{layout} {name} grad {j}", g, g_ref, rtol=1e-8)
            print(f"{layout}: {name}: gradients equal, no value-sized collectives")
        # eager calls on sharded arrays: a replicated or sharded table beside sharded values
        replicated = jax.device_put(jnp.asarray(w), NamedSharding(mesh, Spec()))
        for table in (replicated, args[3]):
            check(f"{layout} eager rpb", fastrpb.rpb(args[2], table), oracles.rpb(v, w))
            check(
                f"{layout} eager linear_attention",
                fastrpb.linear_attention(args[0], args[1], args[2], rpb=table, causal=True),
                oracle_la("elu", True, w),
            )
        print(f"{layout}: eager calls equal")
    print("OK")


if __name__ == "__main__":
    main()
