"""Bytes each device receives in collectives, read from the compiled HLO (docs/scaling.md).

Run: ``PYTHONPATH=src python -m benchmarks.exchange`` (sets 8 emulated CPU devices before
JAX is imported). Two tables:

- sequence parallel (``fastrpb.parallel`` under ``jax.shard_map``), float32
  ``(1, 8, L, 64)``, ``elu``, causal, a per-head table: the result bytes of every
  all-gather and all-to-all of the per-device program, against ``L`` and ``P``;
- data parallel (``jax.jit`` of ``fastrpb.rpb`` and ``linear_attention(rpb=)`` on
  values sharded over the batch axis of ``P`` devices), against the same computation
  written with ``jnp.fft`` directly, which XLA cannot partition (jax#15680).

The bytes are static (shapes of the compiled instructions), not timings.
"""

from __future__ import annotations

import os
import re

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as Spec

import fastrpb
from fastrpb import parallel

_BYTES = {"f32": 4, "f64": 8, "c64": 8, "c128": 16, "s32": 4, "bf16": 2, "f16": 2}


def received(hlo: str) -> int:
    """Sum of the result bytes of the all-gather / all-to-all instructions of ``hlo``."""
    total = 0
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s(all-gather|all-to-all)(-start)?\(", line)
        if m:  # the result type may be a tuple: (f32[...], f32[...])
            for dtype, dims in re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", m.group(1)):
                total += int(np.prod([int(d) for d in dims.split(",") if d])) * _BYTES[dtype]
    return total


def sequence_parallel(P: int, L: int) -> tuple[int, int, int]:
    mesh = Mesh(np.array(jax.devices()[:P]), ("seq",))
    seq = Spec(None, None, "seq", None)
    x = jax.ShapeDtypeStruct((1, 8, L, 64), jnp.float32, sharding=NamedSharding(mesh, seq))
    w = jax.ShapeDtypeStruct((8, 2 * L - 1), jnp.float32, sharding=NamedSharding(mesh, Spec()))
    comm = parallel.jax_axis("seq")
    att = jax.jit(
        jax.shard_map(
            lambda q, k, v: parallel.linear_attention(q, k, v, comm=comm, causal=True),
            mesh=mesh,
            in_specs=(seq,) * 3,
            out_specs=seq,
        )
    )
    bias = jax.jit(
        jax.shard_map(
            lambda v, w: parallel.rpb(v, w, comm=comm, causal=True), mesh=mesh, in_specs=(seq, Spec()), out_specs=seq
        )
    )
    block = 8 * (L // P) * 64 * 4
    return block, received(att.lower(x, x, x).compile().as_text()), received(bias.lower(x, w).compile().as_text())


def data_parallel(P: int, L: int) -> tuple[int, int, int]:
    mesh = Mesh(np.array(jax.devices()[:P]), ("data",))
    x = jax.ShapeDtypeStruct((8, 8, L, 64), jnp.float32, sharding=NamedSharding(mesh, Spec("data")))
    w = jax.ShapeDtypeStruct((8, 2 * L - 1), jnp.float32, sharding=NamedSharding(mesh, Spec()))
    n = 2 * L

    def naive(v, w):  # the same causal bias with jnp.fft on the sequence axis
        kernel = jnp.fft.rfft(w[:, L - 1 :], n=n)[:, :, None]
        return jnp.fft.irfft(jnp.fft.rfft(v, n=n, axis=-2) * kernel, n=n, axis=-2)[..., :L, :]

    ours = jax.jit(lambda q, k, v, w: fastrpb.linear_attention(q, k, v, causal=True, rpb=w))
    return (
        received(jax.jit(naive).lower(x, w).compile().as_text()),
        received(jax.jit(lambda v, w: fastrpb.rpb(v, w, causal=True)).lower(x, w).compile().as_text()),
        received(ours.lower(x, x, x, w).compile().as_text()),
    )


def main() -> None:
    print("| P | L | the device's own block of `v` | `linear_attention`: all-gather | `rpb`: both all-to-alls |")
    print("| --- | --- | --- | --- | --- |")
    for P in (2, 4, 8):
        for L in (1024, 4096, 16384):
            block, att, bias = sequence_parallel(P, L)
            print(f"| {P} | {L:,} | {block:,} | {att:,} | {bias:,} |")
    print()
    print("| P | L | `jnp.fft` causal bias | `fastrpb.rpb` | `fastrpb.linear_attention(rpb=)` |")
    print("| --- | --- | --- | --- | --- |")
    for P in (2, 8):
        for L in (1024, 4096):
            naive, bias, att = data_parallel(P, L)
            print(f"| {P} | {L:,} | {naive:,} | {bias:,} | {att:,} |")


if __name__ == "__main__":
    main()
