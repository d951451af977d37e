"""Reports: the JSON of every raw number, a Markdown table, log-log PNG plots, targets."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .environment import describe_versions


# ------------------------------------------------------------------------- targets
@dataclass
class Target:
    id: str
    text: str
    case: str
    backends: tuple[str, ...]
    sizes: Callable[[int], bool]
    metric: Callable[[dict], float | None]  # from one result record
    ok: Callable[[float], bool]
    show: str  # format of the measured value, e.g. "{:.2f}x"


def _speedup(ref: str) -> Callable[[dict], float | None]:
    return lambda r: r.get("speedup", {}).get(ref)


def _memory_x(variant: str) -> Callable[[dict], float | None]:
    return lambda r: r.get("memory", {}).get(variant, {}).get("x_values")


TARGETS: list[Target] = [
    Target(
        "rpb-paper",
        "FastRPB >= 2x faster than the paper-style 2L-1 native FFT (PyTorch)",
        "rpb",
        ("torch",),
        lambda L: L in (1024, 4096, 16384, 65536),
        _speedup("paper_2L-1"),
        lambda x: x >= 2.0,
        "{:.2f}x",
    ),
    Target(
        "rpb-floor",
        "FastRPB within 1.3x of the FFT floor, speedup >= 0.77 (PyTorch)",
        "rpb",
        ("torch",),
        lambda L: L in (1024, 4096, 16384, 65536),
        _speedup("fft_floor"),
        lambda x: x >= 1 / 1.3,
        "{:.2f}x",
    ),
    Target(
        "rpb-dense",
        "FastRPB >= 20x faster than the dense product (PyTorch)",
        "rpb",
        ("torch",),
        lambda L: L == 4096,
        _speedup("dense"),
        lambda x: x >= 20.0,
        "{:.1f}x",
    ),
    Target(
        "rpb-memory",
        "FastRPB at L = 262,144: peak extra memory < 4x the values",
        "rpb",
        ("torch", "numpy", "jax"),
        lambda L: L == 262144,
        _memory_x("fastrpb"),
        lambda x: x < 4.0,
        "{:.2f}x the values",
    ),
    Target(
        "rpb-jax",
        "FastRPB under jax.jit within 1.2x of the same algorithm in jax.numpy, speedup >= 0.83",
        "rpb",
        ("jax",),
        lambda L: L >= 1024,
        _speedup("native"),
        lambda x: x >= 1 / 1.2,
        "{:.2f}x",
    ),
    Target(
        "attn-native",
        "Non-causal linear attention within 1.2x of the best native implementation (eager), speedup >= 0.83",
        "attention",
        ("numpy", "torch"),
        lambda L: L >= 4096,
        _speedup("native"),
        lambda x: x >= 1 / 1.2,
        "{:.2f}x",
    ),
    Target(
        "attn-jax",
        "Non-causal linear attention under jax.jit within 1.2x of jax.numpy, speedup >= 0.83",
        "attention",
        ("jax",),
        lambda L: L >= 4096,
        _speedup("native"),
        lambda x: x >= 1 / 1.2,
        "{:.2f}x",
    ),
    Target(
        "causal-naive",
        "Causal linear attention >= 10x faster than the naive cumulative sum",
        "causal",
        ("numpy", "torch", "jax"),
        lambda L: L == 16384,
        _speedup("naive_cumsum"),
        lambda x: x >= 10.0,
        "{:.1f}x",
    ),
    Target(
        "causal-noncausal",
        "Causal linear attention within 2.5x of our non-causal time, speedup >= 0.40",
        "causal",
        ("numpy", "torch", "jax"),
        lambda L: L >= 1024,
        _speedup("fastrpb_noncausal"),
        lambda x: x >= 1 / 2.5,
        "{:.2f}x (causal / non-causal time {inv:.2f}x, target <= 2.5x)",
    ),
    Target(
        "causal-softmax",
        "Causal linear attention faster than PyTorch causal softmax (SDPA) from L = 1,024",
        "causal",
        ("torch",),
        lambda L: L >= 1024,
        _speedup("softmax_sdpa"),
        lambda x: x > 1.0,
        "{:.2f}x",
    ),
    Target(
        "causal-jax",
        "Causal linear attention under jax.jit within 1.2x of jax.numpy, speedup >= 0.83",
        "causal",
        ("jax",),
        lambda L: L >= 4096,
        _speedup("native"),
        lambda x: x >= 1 / 1.2,
        "{:.2f}x",
    ),
    Target(
        "packed-padded",
        "Packed causal attention (cu_seqlens, lengths 64..4,096) faster than the same batch padded "
        "to the longest with key_mask, speedup > 1",
        "packed",
        ("numpy", "torch", "jax"),
        lambda L: L >= 4096,
        _speedup("fastrpb_padded"),
        lambda x: x > 1.0,
        "{:.2f}x (packed / padded time {inv:.2f}x)",
    ),
    Target(
        "decode",
        "Decoding step within 2x of the native step, speedup >= 0.50",
        "decode",
        ("numpy", "torch"),
        lambda L: True,
        _speedup("native"),
        lambda x: x >= 1 / 2.0,
        "{:.2f}x",
    ),
    Target(
        "decode-jax",
        "Decoding step under jax.jit within 1.2x of jax.numpy, speedup >= 0.83",
        "decode",
        ("jax",),
        lambda L: True,
        _speedup("native"),
        lambda x: x >= 1 / 1.2,
        "{:.2f}x",
    ),
]


# Targets of the streaming run (``benchmarks.streaming``: decoding with FastRPB from the
# state, chunked prefill), as speedups like every other target: t(reference) / t(ours).
@dataclass
class StreamingTarget:
    id: str
    text: str
    metric: Callable[[dict], float | None]  # from the whole streaming result
    minimum: float


def _decode_at(result: dict, t: int) -> dict | None:
    return next((r for r in result.get("decode", []) if r["t"] == t), None)


def _ratio(result: dict, num: tuple[int, str], den: tuple[int, str]) -> float | None:
    a, b = _decode_at(result, num[0]), _decode_at(result, den[0])
    return None if a is None or b is None else a[num[1]] / b[den[1]]


STREAMING_TARGETS: list[StreamingTarget] = [
    StreamingTarget(
        "decode-rpb",
        "linear_attention_step(rpb=) within 2x of the step without the bias at t = 16,384, speedup >= 0.50",
        lambda r: _ratio(r, (16384, "attention_s"), (16384, "step_rpb_s")),
        1 / 2.0,
    ),
    StreamingTarget(
        "decode-rpb-flat",
        "linear_attention_step(rpb=) at t = 16,384 within 1.5x of t = 1,024, speedup >= 0.67",
        lambda r: _ratio(r, (1024, "step_rpb_s"), (16384, "step_rpb_s")),
        1 / 1.5,
    ),
    StreamingTarget(
        "prefill-pieces",
        "Chunked prefill with rpb= in 8 calls within 1.2x of one call, speedup >= 0.83",
        lambda r: r["prefill"]["one_s"] / r["prefill"]["pieces_s"] if r.get("prefill") else None,
        1 / 1.2,
    ),
]


def streaming_targets(result: dict) -> list[dict]:
    """Each streaming target with its measured speedup (None: not measured in this run) and whether it is met."""
    rows = []
    for tgt in STREAMING_TARGETS:
        value = tgt.metric(result)
        rows.append(
            {"id": tgt.id, "text": tgt.text, "speedup": value, "met": None if value is None else value >= tgt.minimum}
        )
    return rows


def crossovers(results: list[dict]) -> list[dict]:
    """Per backend, the shortest L from which causal linear attention beats softmax at every measured L."""
    out = []
    for b in dict.fromkeys(r["backend"] for r in results if r["case"] == "causal"):
        rows = sorted(
            (r for r in results if r["case"] == "causal" and r["backend"] == b and "error" not in r),
            key=lambda r: r["L"],
        )
        ref = next((n for r in rows for n in r.get("speedup", {}) if n.startswith("softmax")), None)
        if ref is None:
            continue
        pts = [(r["L"], r["speedup"][ref]) for r in rows if ref in r.get("speedup", {})]
        if not pts:
            continue
        L_cross = None
        for i, (L, _) in enumerate(pts):
            if all(s > 1.0 for _, s in pts[i:]):
                L_cross = L
                break
        out.append(dict(backend=b, reference=ref, crossover_L=L_cross, measured=pts))
    return out


def evaluate_targets(results: list[dict]) -> list[dict]:
    rows = []
    for t in TARGETS:
        for r in results:
            if r["case"] != t.case or r["backend"] not in t.backends or not t.sizes(r["L"]) or "error" in r:
                continue
            value = t.metric(r)
            if value is None:
                continue
            rows.append(
                dict(
                    id=t.id,
                    text=t.text,
                    backend=r["backend"],
                    L=r["L"],
                    value=value,
                    met=bool(t.ok(value)),
                    shown=t.show.format(value, inv=1 / value if value else float("inf")),
                )
            )
    return rows


# ------------------------------------------------------------------------- tables
def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def markdown(payload: dict) -> str:
    from .cases import CASES

    m, v, cfg = payload["machine"], payload["versions"], payload["config"]
    lines = [
        "# fastrpb benchmark results",
        "",
        f"- Date: {m['date_utc']}; wall time {payload['wall_s']:.0f} s",
        f"- Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m.get('usable_cpus', m['logical_cpus'])} usable), "
        f"{m.get('memory_gib', '?')} GiB RAM"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
        + f"; load average {m.get('load_average_start')} at start, {m.get('load_average_end')} at end",
        f"- {m['platform']}, Python {m['python']}; "
        + describe_versions({k: val for k, val in v.items() if k != "python"}),
        (
            f"- dtype {cfg['dtype']}, batch 1, 8 heads, 64 features; up to {cfg['repeats']} interleaved rounds "
            f"(fewer, but at least 3, when a comparison would exceed {cfg['budget']} s), median per variant"
        ),
        (
            "- Times in milliseconds. `speedup` = t(reference) / t(fastrpb): above 1, the library is faster. "
            "Memory: peak extra bytes of one call (RSS high-water mark, separate process per case), "
            "and that divided by the size of the values v."
        ),
        (
            "- † a slow reference (a warm call over 1.5 s) sampled once instead of every round; "
            "the library itself is always timed every round."
        ),
    ]
    if payload.get("skipped_backends"):
        lines.append("- Backends not run: " + "; ".join(f"{k} ({r})" for k, r in payload["skipped_backends"].items()))
    lines += [
        "",
        "## Targets",
        "",
        (
            'Every measured value is a speedup, t(reference) / t(fastrpb): "within 1.2x" of a reference '
            "means a speedup of at least 1 / 1.2 = 0.83."
        ),
        "",
        "| target | backend | L | speedup | met |",
        "|---|---|---:|---:|:---:|",
    ]
    for t in payload["targets"]:
        lines.append(
            f"| {t['text']} | {t['backend']} | {t['L']:,} | {t['shown']} | {'yes' if t['met'] else '**no**'} |"
        )
    results = payload["results"]
    if payload.get("crossovers"):
        lines += [
            "",
            "## Crossover: causal linear attention against exact softmax",
            "",
            "| backend | softmax reference | linear is faster from L = | speedup at each L |",
            "|---|---|---:|---|",
        ]
        for c in payload["crossovers"]:
            at = "never (in the measured range)" if c["crossover_L"] is None else f"{c['crossover_L']:,}"
            pts = ", ".join(f"{L:,}: {s:.2f}x" for L, s in c["measured"])
            lines.append(f"| {c['backend']} | {c['reference']} | {at} | {pts} |")
    for case_name in dict.fromkeys(r["case"] for r in results):
        case = CASES[case_name]
        lines += ["", f"## {case.title}", ""]
        for bname in dict.fromkeys(r["backend"] for r in results if r["case"] == case_name):
            rows = [r for r in results if r["case"] == case_name and r["backend"] == bname]
            refs = list(dict.fromkeys(n for r in rows for n in r.get("median_s", {}) if n != r.get("ours")))
            ours = next((r["ours"] for r in rows if "ours" in r), "fastrpb")
            head = (
                f"| {case.unit} | {ours} ms | "
                + " | ".join(f"{n} ms (speedup)" for n in refs)
                + f" | {ours} peak memory |"
            )
            lines += [f"### {bname}", "", head, "|" + "---:|" * (len(refs) + 3)]
            for r in rows:
                if "error" in r:
                    lines.append(f"| {r['L']:,} | error: {r['error']} |" + " |" * (len(refs) + 1))
                    continue
                cells = [f"{r['L']:,}", _ms(r["median_s"][ours])]
                for n in refs:
                    if n in r["median_s"]:
                        bad = " **mismatch**" if n in r.get("check", {}) else ""
                        once = " †" if n in r.get("sampled_once", ()) else ""
                        cells.append(f"{_ms(r['median_s'][n])}{once} ({r['speedup'][n]:.2f}x){bad}")
                    else:
                        cells.append("-")
                mem = r.get("memory", {}).get(ours)
                cells.append(f"{_bytes(mem['extra_bytes'])} ({mem['x_values']:.2f}x v)" if mem else "-")
                lines.append("| " + " | ".join(cells) + " |")
            notes = sorted({f"{k}: {why}" for r in rows for k, why in r.get("skipped", {}).items()})
            if notes:
                lines += ["", "Not run: " + "; ".join(notes) + "."]
            lines.append("")
        # backends against each other
        benches = list(dict.fromkeys(r["backend"] for r in results if r["case"] == case_name))
        if len(benches) > 1:
            lines += [
                f"### {case_name}: backends against each other ({ours} ms)",
                "",
                f"| {case.unit} | " + " | ".join(benches) + " |",
                "|" + "---:|" * (len(benches) + 1),
            ]
            for L in sorted({r["L"] for r in results if r["case"] == case_name}):
                cells = [f"{L:,}"]
                for b in benches:
                    r = next((r for r in results if r["case"] == case_name and r["backend"] == b and r["L"] == L), None)
                    cells.append(_ms(r["median_s"][r["ours"]]) if r and "ours" in r else "-")
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    for case_name in dict.fromkeys(r["case"] for r in results):
        if CASES[case_name].sizes is None:
            lines.append(f"![{case_name} time]({case_name}_time.png)")
            if any("memory" in r for r in results if r["case"] == case_name):
                lines.append(f"![{case_name} memory]({case_name}_memory.png)")
    return "\n".join(lines) + "\n"


def summary(payload: dict) -> str:
    met = [t for t in payload["targets"] if t["met"]]
    missed = [t for t in payload["targets"] if not t["met"]]
    out = [f"targets: {len(met)} met, {len(missed)} missed"]
    for t in missed:
        out.append(f"  missed: {t['text']} [{t['backend']}, L={t['L']}]: {t['shown']}")
    bad = [(r["case"], r["backend"], r["L"], r["check"]) for r in payload["results"] if r.get("check")]
    errors = [(r["case"], r["backend"], r["L"], r["error"]) for r in payload["results"] if "error" in r]
    out += [f"  output mismatch: {b}" for b in bad] + [f"  error: {e}" for e in errors]
    if missed:
        out.append(reading_a_miss(payload, missed[0]))
    return "\n".join(out)


def reading_a_miss(payload: dict, first: dict) -> str:
    """How to read a missed target: the load the machine had, and how to check it."""
    machine = payload.get("machine", {})
    cores = machine.get("usable_cpus") or machine.get("logical_cpus")
    start, end = machine.get("load_average_start"), machine.get("load_average_end")
    load = (
        f"the load average went {start[0]:.1f} -> {end[0]:.1f} on {cores} usable cores during the run"
        if start and end
        else "the machine's load was not recorded"
    )
    busy = bool(start and end and cores and max(start[0], end[0]) > 0.5 * cores)
    return "\n".join(
        [
            f"how to read a miss: {load}{' (a busy machine)' if busy else ''}.",
            "  A ratio compares fastrpb with its reference round by round (A B A B ...), which cancels a steady load but not one that comes and goes;",
            "  a --quick run has few rounds at small sizes, where a burst of another job weighs most. On a shared",
            "  machine, rerun the missed comparison alone, with more rounds and pinned threads, before reading it as",
            (
                f"  a regression: python -m benchmarks --cases {_case_of(first)} --backends {first['backend']} "
                f"--sizes {first['L']} --repeats 11 --threads 1"
            ),
        ]
    )


def _case_of(target: dict) -> str:
    return next(t.case for t in TARGETS if t.id == target["id"])


# ------------------------------------------------------------------------- plots
def slope(Ls: list[int], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log L (over L >= 1024 when there are 3 such)."""
    pts = [(L, y) for L, y in zip(Ls, ys, strict=True) if y and y > 0]
    big = [(L, y) for L, y in pts if L >= 1024]
    if len(big) >= 3:
        pts = big
    if len(pts) < 2:
        return None
    x = np.log([p[0] for p in pts])
    y = np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def plots(payload: dict, out: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:  # pragma: no cover - matplotlib is in the bench extra
        return []
    from .cases import CASES

    results = [r for r in payload["results"] if "error" not in r]
    paths = []
    for case_name in dict.fromkeys(r["case"] for r in results):
        if CASES[case_name].sizes is not None:
            continue  # a fixed-size case (decode) has no curve
        rows = [r for r in results if r["case"] == case_name]
        benches = list(dict.fromkeys(r["backend"] for r in rows))
        for kind in ("time", "memory"):
            fig, axes = plt.subplots(1, len(benches), figsize=(5.2 * len(benches), 4.2), squeeze=False)
            drew = False
            for ax, b in zip(axes[0], benches, strict=True):
                mine = [r for r in rows if r["backend"] == b]
                names = list(dict.fromkeys(n for r in mine for n in r.get("median_s", {})))
                for n in names:
                    pts = []
                    for r in mine:
                        if kind == "time" and n in r.get("median_s", {}):
                            pts.append((r["L"], r["median_s"][n]))
                        elif kind == "memory" and n in r.get("memory", {}):
                            pts.append((r["L"], r["memory"][n]["extra_bytes"]))
                    if not pts:
                        continue
                    Ls, ys = zip(*sorted(pts), strict=True)
                    s = slope(list(Ls), list(ys))
                    ours = n == mine[0].get("ours")
                    label = f"{n} (slope {s:.2f})" if s is not None else n
                    ax.loglog(Ls, ys, marker="o", lw=2.2 if ours else 1.2, ls="-" if ours else "--", label=label)
                    drew = True
                Ls_all = sorted({r["L"] for r in mine})
                ax.set_xticks(Ls_all)
                ax.set_xticklabels([f"{L // 1024}k" if L >= 1024 else str(L) for L in Ls_all])
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set_title(f"{case_name} on {b}")
                ax.set_xlabel("sequence length L")
                ax.set_ylabel("median time (s)" if kind == "time" else "peak extra memory (bytes)")
                ax.grid(True, which="both", alpha=0.3)
                if ax.get_lines():  # a backend without memory rows draws no curve (and no legend)
                    ax.legend(fontsize=7)
            if drew:
                path = os.path.join(out, f"{case_name}_{kind}.png")
                fig.tight_layout()
                fig.savefig(path, dpi=110)
                paths.append(path)
            plt.close(fig)
    return paths


def write_all(payload: dict, out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, "results.json")
    with open(json_path, "w") as fh:
        json.dump(payload, fh, indent=1, default=str)
    md_path = os.path.join(out, "results.md")
    with open(md_path, "w") as fh:
        fh.write(markdown(payload))
    return [json_path, md_path, *plots(payload, out)]
