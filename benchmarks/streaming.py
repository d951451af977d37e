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
  bias is added to;
- ``step_rpb``: ``linear_attention_step(..., rpb=w)``, attention and bias in one call
  from the state's bias history (target: within 2x of ``attention`` at t = 16,384
  and within 1.5x of itself at t = 1,024);
- ``step_old``: ``linear_attention_step`` plus the old bias over the history (what the
  layers' ``step`` did before the state carried the bias).

``--prefill L`` (default 65,536) also times chunked prefill: ``linear_attention(...,
causal=True, rpb=w)`` on L tokens in one call against ``--pieces`` calls (8) that pass
the state along (target: within 1.2x).

``--grids`` (default ``28x28,128x128``) times the causal 2-d bias in raster order
from a prefix of half the grid: ``nd`` is ``fastrpb.rpb_nd_step`` averaged over whole
rows (their row-end updates counted at their amortised share), ``1d`` the 1-d
``rpb_step`` at the same t with the same heads and features, ``nd_old`` what a decoder
without the N-d stream does (``rpb_nd`` over the value history padded with zeros to
the grid, keeping the token's row). Targets: ``nd`` at 128 x 128 within 1.5x of ``nd``
at 28 x 28, and ``nd`` within 3x of ``1d``.

It imports fastrpb, torch, the targets of ``benchmarks.report`` and, for the plot,
matplotlib. The committed run is ``docs/performance/streaming.json`` and
``streaming.png`` (``--json``, ``--plot``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from typing import Any

import numpy as np

HEADS, FEATURES = 8, 64


def _median_means(runs: dict[str, tuple[Any, int]], rounds: int) -> dict[str, float]:
    """Per name, the median over ``rounds`` of the mean time of ``steps`` calls of ``fn()``'s
    generator, for ``runs = {name: (fn, steps)}``. The rounds are interleaved (A B C A B
    C ...), so a change of load on the shared machine hits every variant alike."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (fn, steps) in runs.items():
            run = fn()
            start = time.perf_counter()
            for _ in range(steps):
                next(run)
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(x) for name, x in samples.items()}


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
        # the prefix by one chunk of t - 1 tokens and one step: the first step after a
        # chunk builds the online levels once (one FFT per level), which the per-token
        # times below must not count t / span times over
        _, prefix = fastrpb.rpb(v[:, : t - 1], w, causal=True, return_state=True)
        _, prefix = fastrpb.rpb_step(prefix, v[:, t - 1], w)
        _, attn_state = fastrpb.linear_attention(q[:, :t], k[:, :t], v[:, :t], causal=True, return_state=True)
        _, both_state = fastrpb.linear_attention(
            q[:, : t - 1], k[:, : t - 1], v[:, : t - 1], causal=True, rpb=w, return_state=True
        )
        _, both_state = fastrpb.linear_attention_step(both_state, q[:, t - 1], k[:, t - 1], v[:, t - 1], rpb=w)

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

        def step_rpb_run() -> Any:
            state = both_state
            for i in range(t, total):
                _, state = fastrpb.linear_attention_step(state, q[:, i], k[:, i], v[:, i], rpb=w)
                yield

        def step_old_run() -> Any:
            state, cache = attn_state, v[:, :t]
            for i in range(t, total):
                out, state = fastrpb.linear_attention_step(state, q[:, i], k[:, i], v[:, i])
                cache = torch.cat([cache, v[:, i : i + 1]], dim=-2)
                out = out + fastrpb.rpb(cache, w, causal=True)[..., -1, :]
                yield

        # warm-up (allocator, FFT plans)
        for fn in (new_run, old_run, attention_run, step_rpb_run, step_old_run):
            run = fn()
            for _ in range(min(4, old_steps)):
                next(run)
        runs = {
            "new_s": (new_run, span),
            "old_s": (old_run, old_steps),
            "attention_s": (attention_run, span),
            "step_rpb_s": (step_rpb_run, span),
            "step_old_s": (step_old_run, old_steps),
        }
        return {"t": t, **_median_means(runs, rounds)}


def measure_nd(grid: tuple[int, int], *, span_rows: int, old_steps: int, rounds: int, seed: int = 0) -> dict[str, Any]:
    """Per-token times of the causal 2-d bias on ``grid`` from a prefix of half its rows."""
    import torch

    import fastrpb

    rng = np.random.default_rng(seed)
    G0, G1 = grid
    N, t = G0 * G1, (G0 // 2) * G1
    span = min(span_rows * G1, N - t)
    v = torch.tensor(rng.standard_normal((HEADS, N, FEATURES)), dtype=torch.float32)
    tables = [fastrpb.rpb_init(HEADS, g, seed=seed + a, like=v) for a, g in enumerate(grid)]
    w = fastrpb.rpb_init(HEADS, N, seed=seed, like=v)
    with torch.no_grad():
        # each prefix by a chunk of t - 1 tokens and one step: the first step after a chunk
        # builds the 1-d levels once, which the rounds below must not count every time
        _, nd_prefix = fastrpb.rpb_nd(v[:, : t - 1], tables, grid, causal=True, return_state=True)
        _, nd_prefix = fastrpb.rpb_nd_step(nd_prefix, v[:, t - 1], tables, grid=grid)
        _, prefix = fastrpb.rpb(v[:, : t - 1], w, causal=True, return_state=True)
        _, prefix = fastrpb.rpb_step(prefix, v[:, t - 1], w)

        def nd_run() -> Any:
            state = nd_prefix
            for i in range(t, t + span):
                _, state = fastrpb.rpb_nd_step(state, v[:, i], tables, grid=grid)
                yield

        def one_d_run() -> Any:
            state = prefix
            for i in range(t, t + span):
                _, state = fastrpb.rpb_step(state, v[:, i], w)
                yield

        def old_run() -> Any:
            cache = torch.zeros_like(v)
            cache[:, :t] = v[:, :t]
            for i in range(t, t + span):
                cache[:, i] = v[:, i]
                fastrpb.rpb_nd(cache, tables, grid, causal=True)[..., i, :]
                yield

        for fn in (nd_run, one_d_run, old_run):  # warm-up
            run = fn()
            for _ in range(min(4, old_steps)):
                next(run)
        runs = {"nd_s": (nd_run, span), "1d_s": (one_d_run, span), "nd_old_s": (old_run, old_steps)}
        return {"grid": list(grid), "t": t, "span": span, **_median_means(runs, rounds)}


def prefill(L: int, pieces: int, *, rounds: int, seed: int = 0) -> dict[str, float]:
    """One causal call with the bias on ``L`` tokens against ``pieces`` calls passing the state."""
    import torch

    import fastrpb

    rng = np.random.default_rng(seed)
    q, k, v = (torch.tensor(rng.standard_normal((HEADS, L, FEATURES)) * 0.5, dtype=torch.float32) for _ in range(3))
    w = fastrpb.rpb_init(HEADS, L, seed=seed, like=v)
    bounds = [round(i * L / pieces) for i in range(pieces + 1)]

    def one() -> None:
        fastrpb.linear_attention(q, k, v, causal=True, rpb=w)

    def split() -> None:
        state = None
        for a, b in itertools.pairwise(bounds):
            _, state = fastrpb.linear_attention(
                q[:, a:b], k[:, a:b], v[:, a:b], causal=True, rpb=w, initial_state=state, return_state=True
            )

    with torch.no_grad():
        one(), split()  # warm-up
        times: dict[str, list[float]] = {"one_s": [], "pieces_s": []}
        for _ in range(rounds):  # interleaved, so a change of machine load hits both
            for key, fn in (("one_s", one), ("pieces_s", split)):
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    return {"L": L, "pieces": pieces, **{k: statistics.median(x) for k, x in times.items()}}


def plot(rows: list[dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [int(r["t"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.loglog(ts, [1e3 * r["step_old_s"] for r in rows], "o-", label="step + bias, old: rpb over the history")
    ax.loglog(ts, [1e3 * r["step_rpb_s"] for r in rows], "s-", label="step + bias, new: linear_attention_step(rpb=)")
    ax.loglog(ts, [1e3 * r["attention_s"] for r in rows], "^--", label="linear_attention_step without bias")
    ax.loglog(ts, [1e3 * r["old_s"] for r in rows], "o:", alpha=0.5, label="bias alone, old")
    ax.loglog(ts, [1e3 * r["new_s"] for r in rows], "s:", alpha=0.5, label="bias alone, new: rpb_step")
    ax.set_xlabel("tokens already in the sequence, t")
    ax.set_ylabel("time per token (ms)")
    ax.set_title(f"Causal FastRPB decoding, torch CPU float32, {HEADS} heads x {FEATURES}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streaming", description=__doc__.splitlines()[0])
    parser.add_argument("--ts", default="256,1024,4096,16384", help="prefix lengths t (comma separated)")
    parser.add_argument("--span", type=int, default=512, help="rpb_step calls averaged per round")
    parser.add_argument("--old-steps", type=int, default=8, help="calls of the old method per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default; 1 by default: a step is many small ops)",
    )
    parser.add_argument("--plot", default=None, help="write the plot here (PNG)")
    parser.add_argument("--json", default=None, help="write the numbers here")
    parser.add_argument("--prefill", type=int, default=65536, help="tokens of the chunked-prefill timing (0: skip it)")
    parser.add_argument("--pieces", type=int, default=8, help="calls the chunked prefill is split into")
    parser.add_argument("--grids", default="28x28,128x128", help="2-d grids of the N-d decoding rows ('' to skip)")
    parser.add_argument("--nd-rows", type=int, default=4, help="grid rows of rpb_nd_step averaged per round")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    ts = [int(x) for x in args.ts.split(",") if x]
    print(f"torch {torch.__version__} CPU float32, {HEADS} heads x {FEATURES}, {torch.get_num_threads()} threads")
    print(
        f"{'t':>7} {'new ms':>9} {'old ms':>9} {'old/new':>8} {'attn step ms':>13} {'new/attn':>9} "
        f"{'step+rpb ms':>12} {'/attn':>6} {'step+old ms':>12}"
    )
    rows = []
    for t in ts:
        row = measure(t, span=args.span, old_steps=args.old_steps, rounds=args.rounds)
        rows.append(row)
        print(
            f"{t:>7} {1e3 * row['new_s']:>9.3f} {1e3 * row['old_s']:>9.3f} {row['old_s'] / row['new_s']:>8.1f} "
            f"{1e3 * row['attention_s']:>13.3f} {row['new_s'] / row['attention_s']:>9.2f} "
            f"{1e3 * row['step_rpb_s']:>12.3f} {row['step_rpb_s'] / row['attention_s']:>6.2f} {1e3 * row['step_old_s']:>12.3f}"
        )
    by_t = {r["t"]: r for r in rows}
    if 1024 in by_t and 16384 in by_t:
        ratio = by_t[16384]["new_s"] / by_t[1024]["new_s"]
        print(f"rpb_step per-token time at t = 16,384 / at t = 1,024: {ratio:.2f} (target <= 1.5)")
        ratio = by_t[16384]["step_rpb_s"] / by_t[1024]["step_rpb_s"]
        print(f"linear_attention_step(rpb=) at t = 16,384 / at t = 1,024: {ratio:.2f} (target <= 1.5)")
    if 16384 in by_t:
        ratio = by_t[16384]["step_rpb_s"] / by_t[16384]["attention_s"]
        print(f"linear_attention_step(rpb=) / without the bias at t = 16,384: {ratio:.2f} (target <= 2)")
    result: dict[str, Any] = {"decode": rows}
    grids = [tuple(int(g) for g in x.split("x")) for x in args.grids.split(",") if x]
    if grids:
        print(f"{'grid':>9} {'t':>6} {'nd ms':>8} {'1d ms':>8} {'nd/1d':>6} {'nd old ms':>10} {'old/nd':>7}")
        result["nd"] = []
        for grid in grids:
            row = measure_nd(grid, span_rows=args.nd_rows, old_steps=args.old_steps, rounds=args.rounds)
            result["nd"].append(row)
            print(
                f"{'x'.join(map(str, grid)):>9} {row['t']:>6} {1e3 * row['nd_s']:>8.3f} {1e3 * row['1d_s']:>8.3f} "
                f"{row['nd_s'] / row['1d_s']:>6.2f} {1e3 * row['nd_old_s']:>10.3f} {row['nd_old_s'] / row['nd_s']:>7.1f}"
            )
        if len(result["nd"]) > 1:
            first, last = result["nd"][0], result["nd"][-1]
            print(
                f"rpb_nd_step per token, grid {last['grid']} / grid {first['grid']}: {last['nd_s'] / first['nd_s']:.2f} (target <= 1.5)"
            )
        worst = max(r["nd_s"] / r["1d_s"] for r in result["nd"])
        print(f"rpb_nd_step / rpb_step per token, worst grid: {worst:.2f} (target <= 3)")
    if args.prefill:
        pre = prefill(args.prefill, args.pieces, rounds=args.rounds)
        result["prefill"] = pre
        print(
            f"chunked prefill, {pre['L']:,} tokens with rpb: one call {pre['one_s']:.3f} s, {pre['pieces']} calls "
            f"{pre['pieces_s']:.3f} s, ratio {pre['pieces_s'] / pre['one_s']:.2f} (target <= 1.2)"
        )
    from .report import streaming_targets

    result["targets"] = streaming_targets(result)
    for tgt in result["targets"]:
        shown = (
            "not measured" if tgt["speedup"] is None else f"{tgt['speedup']:.2f}x, {'met' if tgt['met'] else 'MISSED'}"
        )
        print(f"target: {tgt['text']}: {shown}")
    result["machine"] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "heads": HEADS,
        "features": FEATURES,
        "span": args.span,
        "rounds": args.rounds,
    }
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
