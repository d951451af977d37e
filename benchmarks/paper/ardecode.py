"""Decoding cost per token against the position: one attention layer, linear ``step`` vs softmax KV cache.

``python -m benchmarks.paper.ardecode --out docs/experiments/autoregressive/decode-scaling.json``

The throughput of the trained models (``autoregressive.py``) includes everything a
sampler does per token (embedding, MLPs, sampling) and, at 784 tokens and width 32,
a softmax key/value cache is still cheap. This measures the attention layer alone, at
the trained models' width and at a wider one, with ``t`` tokens already decoded:

* linear: ``fastrpb.torch.LinearAttention(causal=True).step`` from the cache
  that ``forward(x, return_cache=True)`` returns after ``t`` tokens (a fixed-size state:
  the cost should not depend on ``t``);
* softmax: ``armodel.FunctionalCausalAttention.step`` with ``t`` keys and values in its
  cache (``fastrpb.softmax_attention`` of the new query over them: O(t)).

Each (width, t) times ``reps`` decoding steps of each layer, interleaved, ``rounds``
times; the best round's mean per token is reported.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def measure(
    *,
    widths=((32, 2), (256, 8)),
    positions=(784, 4096, 16384),
    batch: int = 8,
    reps: int = 30,
    rounds: int = 5,
    threads: int = 1,
) -> dict:
    import torch

    from fastrpb.torch import LinearAttention

    from .armodel import ARVariant, FunctionalCausalAttention

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    for d, heads in widths:
        for t in positions:
            lin = LinearAttention(d, heads, feature_map="elu", causal=True)
            soft = FunctionalCausalAttention(
                d, heads, ARVariant.parse("softmax"), length=t + reps + 1, grid=(1, 1), chunk_size=64, seed=0
            )
            with torch.no_grad():
                x = torch.randn(batch, t, d)
                _, lin_cache0 = lin(x, return_cache=True)
                soft_cache0 = {
                    "t": t,
                    "state": None,
                    "k": torch.randn(batch, heads, t + reps + 1, d // heads),
                    "v": torch.randn(batch, heads, t + reps + 1, d // heads),
                }
                xs = torch.randn(reps, batch, d)
                best = {"linear": float("inf"), "softmax": float("inf")}
                for _ in range(rounds):
                    for name, layer, c0 in (("linear", lin, lin_cache0), ("softmax", soft, soft_cache0)):
                        cache = dict(c0) if isinstance(c0, dict) else c0
                        t0 = time.perf_counter()
                        for i in range(reps):
                            _, cache = layer.step(xs[i], cache)
                        best[name] = min(best[name], (time.perf_counter() - t0) / reps)
            rows.append(
                {
                    "d_model": d,
                    "heads": heads,
                    "batch": batch,
                    "position": t,
                    "linear_ms_per_token": 1000 * best["linear"],
                    "softmax_ms_per_token": 1000 * best["softmax"],
                    "speedup": best["softmax"] / best["linear"],
                }
            )
    return {"reps": reps, "rounds": rounds, "threads": threads, "rows": rows}


def table(res: dict) -> str:
    lines = [
        (
            "| width (heads) | tokens already decoded | linear step ms/token | softmax KV cache ms/token | "
            "linear speed-up |"
        ),
        "|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['d_model']} ({r['heads']}) | {r['position']} | {r['linear_ms_per_token']:.3f} | "
            f"{r['softmax_ms_per_token']:.3f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="small positions, few repetitions (a smoke test)")
    a = ap.parse_args(argv)
    kw = {"positions": (16, 64), "widths": ((16, 2),), "reps": 3, "rounds": 1} if a.quick else {}
    res = measure(**kw)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(table(res))


if __name__ == "__main__":
    main()
