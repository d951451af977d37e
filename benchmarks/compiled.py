"""Decoding with the bias, eager against compiled: per-token time, compile time, recompiles.

    python -m benchmarks.compiled [--ts 1024,16384] [--steps 64] [--json PATH]

One decoding step ``linear_attention_step(state, q_t, k_t, v_t, rpb=w)`` (elu, 8 heads x
64 features, float32, one thread) after a prompt of ``t`` tokens (table ``M = t +
steps``), in four modes: PyTorch eager, ``torch.compile`` (Inductor, ``fullgraph``),
JAX eager, ``jax.jit``. Each time is the mean over ``--steps`` consecutive steps from
the prompt's state (so window and level completions count at their share), the
median over ``--rounds``. The compiled modes also report the first call (compile
time) and the number of graphs compiled over all the steps (Dynamo's unique graphs;
jit traces, counted by a Python side effect).

``--jax-prompt`` (default 4,096) also times eager JAX against eager NumPy over the
first 50 steps after that prompt (4 heads, d = 32, sikf), the first step included.

The committed run is ``docs/performance/compiled.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np

HEADS, FEATURES = 8, 64


def _mean_steps(step: Any, state: Any, tokens: list, steps: int, sync: Any) -> tuple[float, float]:
    """(first call, mean of the following calls) of ``steps`` steps from ``state``."""
    start = time.perf_counter()
    out, s = step(state, *tokens[0])
    sync(out)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(1, steps):
        out, s = step(s, *tokens[i])
    sync(out)
    return first, (time.perf_counter() - start) / (steps - 1)


def decode(t: int, steps: int, rounds: int, modes: list[str]) -> dict[str, Any]:
    import fastrpb

    rng = np.random.default_rng(0)
    M = t + steps
    q, k, v = (rng.standard_normal((HEADS, t + steps, FEATURES)).astype(np.float32) for _ in range(3))
    w = (rng.standard_normal((HEADS, 2 * M - 1)) / 8).astype(np.float32)
    row: dict[str, Any] = {"t": t}
    if any(m.startswith("torch") for m in modes):
        import torch

        tq, tk, tv, tw = (torch.from_numpy(x) for x in (q, k, v, w))
        _, state = fastrpb.linear_attention(tq[:, :t], tk[:, :t], tv[:, :t], causal=True, rpb=tw, return_state=True)
        tokens = [(tq[:, i], tk[:, i], tv[:, i]) for i in range(t, t + steps)]

        def eager(s: Any, a: Any, b: Any, c: Any) -> Any:
            return fastrpb.linear_attention_step(s, a, b, c, rpb=tw)

        if "torch" in modes:
            row["torch_eager_s"] = statistics.median(
                _mean_steps(eager, state, tokens, steps, lambda o: None)[1] for _ in range(rounds)
            )
        if "torch_compile" in modes:
            from torch._dynamo.utils import counters

            torch._dynamo.reset()
            counters.clear()
            compiled = torch.compile(eager, fullgraph=True)
            first, _ = _mean_steps(compiled, state, tokens, steps, lambda o: None)
            row["torch_compile_first_s"] = first
            row["torch_compile_s"] = statistics.median(
                _mean_steps(compiled, state, tokens, steps, lambda o: None)[1] for _ in range(rounds)
            )
            row["torch_compile_graphs"] = int(counters["stats"]["unique_graphs"])
    if any(m.startswith("jax") for m in modes):
        import jax
        import jax.numpy as jnp

        jq, jk, jv, jw = (jnp.asarray(x) for x in (q, k, v, w))
        _, state = fastrpb.linear_attention(jq[:, :t], jk[:, :t], jv[:, :t], causal=True, rpb=jw, return_state=True)
        tokens = [(jq[:, i], jk[:, i], jv[:, i]) for i in range(t, t + steps)]
        traces: list[None] = []

        def step(s: Any, a: Any, b: Any, c: Any) -> Any:
            traces.append(None)
            return fastrpb.linear_attention_step(s, a, b, c, rpb=jw)

        def sync(o: Any) -> None:
            jax.block_until_ready(o)

        if "jax" in modes:
            row["jax_eager_s"] = statistics.median(
                _mean_steps(step, state, tokens, steps, sync)[1] for _ in range(rounds)
            )
        if "jax_jit" in modes:
            traces.clear()
            jitted = jax.jit(step)
            first, _ = _mean_steps(jitted, state, tokens, steps, sync)
            row["jax_jit_first_s"] = first
            row["jax_jit_s"] = statistics.median(
                _mean_steps(jitted, state, tokens, steps, sync)[1] for _ in range(rounds)
            )
            row["jax_jit_traces"] = len(traces)
    return row


def jax_after_prompt(L: int, steps: int = 50) -> dict[str, Any]:
    """Mean of the first ``steps`` eager steps after an ``L``-token prompt (first included):
    JAX against NumPy (4 heads, d = 32, sikf)."""
    import jax.numpy as jnp

    import fastrpb

    rng = np.random.default_rng(1)
    H, d, M = 4, 32, L + steps
    q, k, v = (rng.standard_normal((H, L + steps, d)).astype(np.float32) for _ in range(3))
    w = (rng.standard_normal((H, 2 * M - 1)) / 8).astype(np.float32)
    row: dict[str, Any] = {"prompt": L, "steps": steps}
    for name, conv in (("numpy", np.asarray), ("jax", jnp.asarray)):
        a, b, c, tw = (conv(x) for x in (q, k, v, w))
        _, state = fastrpb.linear_attention(
            a[:, :L], b[:, :L], c[:, :L], feature_map="sikf", causal=True, rpb=tw, return_state=True
        )
        start = time.perf_counter()
        for i in range(L, L + steps):
            out, state = fastrpb.linear_attention_step(state, a[:, i], b[:, i], c[:, i], feature_map="sikf", rpb=tw)
        np.asarray(out)
        row[f"{name}_s"] = (time.perf_counter() - start) / steps
    row["ratio"] = row["jax_s"] / row["numpy_s"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ts", default="1024,16384", help="prompt lengths t (comma separated)")
    parser.add_argument("--steps", type=int, default=64, help="decoding steps timed from each prompt")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="torch,torch_compile,jax,jax_jit")
    parser.add_argument("--jax-prompt", type=int, default=4096, help="0: skip the eager JAX row")
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    modes = args.modes.split(",")
    result: dict[str, Any] = {
        "decode": [],
        "machine": {
            "torch": torch.__version__,
            "threads": 1,
            "heads": HEADS,
            "features": FEATURES,
            "steps": args.steps,
            "rounds": args.rounds,
        },
    }
    for t in (int(x) for x in args.ts.split(",")):
        row = decode(t, args.steps, args.rounds, modes)
        print(json.dumps(row), flush=True)
        result["decode"].append(row)
    if args.jax_prompt:
        result["jax_after_prompt"] = jax_after_prompt(args.jax_prompt)
        print(json.dumps(result["jax_after_prompt"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
