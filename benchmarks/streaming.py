"""Decoding with FastRPB: per-token time of the causal bias after a prefix of t tokens.

    python -m benchmarks.streaming [--ts 256,1024,4096,16384] [--plot PATH] [--json PATH]

torch CPU float32, 8 heads x 64 features, one sequence. Three per-token times at
each t, each the median over rounds of a mean over a run of consecutive steps from
the same state (the state is immutable, so every round starts from the same prefix):

- ``new``: ``fastrpb.rpb_step`` (online FFT convolution), averaged over ``--span``
  steps from t so that the block completions (every 32 tokens, larger ones rarer)
  are counted at their amortised share;
- ``old``: what a decoder without a streaming bias does (and the layers' ``step``
  did): append the token to the value cache and run ``rpb(cache, w, causal=True)``
  over the whole history, keeping the last row;
- ``attention``: one ``linear_attention_step`` (elu, same shapes), the cost that the
  bias is added to.

Self-contained (the benchmark package is being restructured): it imports only
fastrpb, torch and, for the plot, matplotlib.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np

HEADS, FEATURES = 8, 64


def _median_mean(fn: Any, steps: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean time of ``steps`` calls of ``fn(round)``."""
    samples = []
    for _ in range(rounds):
        run = fn()
        start = time.perf_counter()
        for _ in range(steps):
            next(run)
        samples.append((time.perf_counter() - start) / steps)
    return statistics.median(samples)


def measure(t: int, *, span: int, old_steps: int, rounds: int, seed: int = 0) -> dict[str, float]:
    import torch

    import fastrpb

    rng = np.random.default_rng(seed)
    total = t + max(span, old_steps)
    M = total + 1
    v = torch.tensor(rng.standard_normal((HEADS, total, FEATURES)), dtype=torch.float32)
    w = fastrpb.rpb_init(HEADS, M, seed=seed, like=v)
    q = torch.tensor(rng.standard_normal((HEADS, total, FEATURES)), dtype=torch.float32)
    k = torch.tensor(rng.standard_normal((HEADS, total, FEATURES)), dtype=torch.float32)

    with torch.no_grad():
        _, prefix = fastrpb.rpb(v[:, :t], w, causal=True, return_state=True)
        _, attn_state = fastrpb.linear_attention(q[:, :t], k[:, :t], v[:, :t], causal=True, return_state=True)

        def new_run() -> Any:
            state = prefix
            for i in range(t, total):
                _, state = fastrpb.rpb_step(state, v[:, i], w)
                yield

        def old_run() -> Any:
            cache = v[:, :t]
            for i in range(t, total):
                cache = torch.cat([cache, v[:, i : i + 1]], dim=-2)
                fastrpb.rpb(cache, w, causal=True)[..., -1, :]
                yield

        def attention_run() -> Any:
            state = attn_state
            for i in range(t, total):
                _, state = fastrpb.linear_attention_step(state, q[:, i], k[:, i], v[:, i])
                yield

        # warm-up (allocator, FFT plans)
        for fn in (new_run, old_run, attention_run):
            run = fn()
            for _ in range(min(4, old_steps)):
                next(run)
        return {
            "t": t,
            "new_s": _median_mean(new_run, span, rounds),
            "old_s": _median_mean(old_run, old_steps, rounds),
            "attention_s": _median_mean(attention_run, span, rounds),
        }


def plot(rows: list[dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [int(r["t"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(ts, [1e3 * r["old_s"] for r in rows], "o-", label="old: rpb over the history each token")
    ax.loglog(ts, [1e3 * r["new_s"] for r in rows], "s-", label="new: rpb_step (online FFT convolution)")
    ax.loglog(ts, [1e3 * r["attention_s"] for r in rows], "^--", label="linear_attention_step (elu), for scale")
    ax.set_xlabel("tokens already in the sequence, t")
    ax.set_ylabel("time per token (ms)")
    ax.set_title(f"Causal FastRPB decoding, torch CPU float32, {HEADS} heads x {FEATURES}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streaming", description=__doc__.splitlines()[0])
    parser.add_argument("--ts", default="256,1024,4096,16384", help="prefix lengths t (comma separated)")
    parser.add_argument("--span", type=int, default=512, help="rpb_step calls averaged per round")
    parser.add_argument("--old-steps", type=int, default=8, help="calls of the old method per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default; 1 by default: a step is many small ops)")
    parser.add_argument("--plot", default=None, help="write the plot here (PNG)")
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    ts = [int(x) for x in args.ts.split(",") if x]
    print(f"torch {torch.__version__} CPU float32, {HEADS} heads x {FEATURES}, {torch.get_num_threads()} threads")
    print(f"{'t':>7} {'new ms':>9} {'old ms':>9} {'old/new':>8} {'attn step ms':>13} {'new/attn':>9}")
    rows = []
    for t in ts:
        row = measure(t, span=args.span, old_steps=args.old_steps, rounds=args.rounds)
        rows.append(row)
        print(
            f"{t:>7} {1e3 * row['new_s']:>9.3f} {1e3 * row['old_s']:>9.3f} {row['old_s'] / row['new_s']:>8.1f} "
            f"{1e3 * row['attention_s']:>13.3f} {row['new_s'] / row['attention_s']:>9.2f}"
        )
    by_t = {r["t"]: r for r in rows}
    if 1024 in by_t and 16384 in by_t:
        ratio = by_t[16384]["new_s"] / by_t[1024]["new_s"]
        print(f"new per-token time at t = 16,384 / at t = 1,024: {ratio:.2f} (target <= 1.5)")
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
