"""Table, plot, verdicts and page section of the MQAR sweep (``python -m benchmarks.paper.mqar``).

Everything is computed from ``results.json`` (one record per run) and ``sweep.json``
(settings, command, machine). ``python -m benchmarks.paper.mqarreport DIR`` rewrites
``DIR/results.md`` and ``DIR/accuracy.png``; ``python -m benchmarks.paper.report ...
--mqar DIR`` puts the section on the experiments page.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .mqarruns import FEATURE_MAPS, missing_runs, summarise
from .verdict import two_se_verdict

MAP_TITLES = {
    "elu": "elu+1",
    "relu": "ReLU",
    "sikf": "SIKF",
    "dpfp": "DPFP",
    "favor": "FAVOR+",
    "taylor": "Taylor (Based)",
    "hedgehog": "Hedgehog (trained W)",
}


def title(v: str) -> str:
    if v == "softmax":
        return "softmax"
    base, _, bias = v.partition("+")
    return f"linear, {MAP_TITLES.get(base, base)}" + (" + FastRPB" if bias else "")


def _row(rows: list[dict], v: str, L: int) -> dict | None:
    return next((r for r in rows if r["variant"] == v and r["seq_len"] == L), None)


def compare(rows: list[dict], a: str, b: str, L: int) -> dict | None:
    """Is ``a`` more accurate than ``b`` at length ``L``? The two-standard-error rule of the other sections."""
    ra, rb = _row(rows, a, L), _row(rows, b, L)
    if ra is None or rb is None:
        return None
    diff = ra["accuracy_mean"] - rb["accuracy_mean"]
    se = math.sqrt(ra["accuracy_se"] ** 2 + rb["accuracy_se"] ** 2)
    verdict = two_se_verdict(diff, se, min(len(ra["seeds"]), len(rb["seeds"])))
    return {
        "a": a,
        "b": b,
        "seq_len": L,
        "diff": diff,
        "se": se,
        "verdict": verdict,
        "time_ratio": ra["train_s_per_step"] / rb["train_s_per_step"],
    }


def best_linear(rows: list[dict], L: int) -> str | None:
    lin = [r for r in rows if r["seq_len"] == L and r["variant"] != "softmax"]
    return max(lin, key=lambda r: r["accuracy_mean"])["variant"] if lin else None


def claims(rows: list[dict], lengths: list[int]) -> list[dict]:
    out = []
    for L in lengths:
        for bias in ("", "+rpb"):
            c = compare(rows, f"sikf{bias}", f"elu{bias}", L)
            if c:
                out.append(
                    {
                        **c,
                        "group": "sikf",
                        "claim": "SIKF is more accurate than elu+1" + (" (both with FastRPB)" if bias else ""),
                    }
                )
        for m in FEATURE_MAPS:
            c = compare(rows, f"{m}+rpb", m, L)
            if c:
                out.append({**c, "group": "rpb", "claim": f"FastRPB improves recall ({MAP_TITLES[m]})"})
        best = best_linear(rows, L)
        c = compare(rows, best, "softmax", L) if best else None
        if c:
            out.append(
                {**c, "group": "best", "claim": f"the best linear map ({title(best)}) is more accurate than softmax"}
            )
    return out


def _word(c: dict) -> str:
    return c["verdict"].split(" (")[0]


def table(rows: list[dict], meta: dict) -> str:
    lengths = meta["lengths"]
    planned = len(meta["seeds"])
    head = (
        "| model | "
        + " | ".join(f"L = {L}: accuracy (mean ± s.e.)" for L in lengths)
        + " | "
        + " | ".join(f"L = {L}: s / step" for L in lengths)
        + " | params |"
    )
    lines = [head, "|---|" + "---|" * (2 * len(lengths) + 1)]
    for v in meta["variants"]:
        cells, times, params = [], [], None
        for L in lengths:
            r = _row(rows, v, L)
            if r is None:
                cells.append("—")
                times.append("—")
                continue
            few = f" ({len(r['seeds'])} of {planned} seeds)" if len(r["seeds"]) < planned else ""
            flag = "" if r["all_finite"] else " (non-finite loss!)"
            cells.append(f"{r['accuracy_mean']:.3f} ± {r['accuracy_se']:.3f}{few}{flag}")
            times.append(f"{r['train_s_per_step']:.3f}")
            params = params or r["n_params"]
        lines.append(f"| {title(v)} | " + " | ".join(cells) + " | " + " | ".join(times) + f" | {params or '—'} |")
    return "\n".join(lines)


def claims_md(rows: list[dict], meta: dict) -> str:
    lines = ["| L | claim | accuracy gained (± s.e.) | verdict | time per step ratio |", "|---|---|---|---|---|"]
    for c in claims(rows, meta["lengths"]):
        lines.append(
            f"| {c['seq_len']} | {c['claim']} ({c['a']} vs {c['b']}) | {c['diff']:+.3f} ± {c['se']:.3f} | "
            f"{c['verdict']} | {c['time_ratio']:.2f} |"
        )
    return "\n".join(lines)


def in_words(rows: list[dict], meta: dict) -> list[str]:
    cl = claims(rows, meta["lengths"])
    chance = 2 / meta["settings"]["vocab"]
    out = []
    sk = [c for c in cl if c["group"] == "sikf"]
    if sk:
        out.append(
            "- **SIKF against elu+1**: "
            + "; ".join(
                f"L = {c['seq_len']}{' with FastRPB' if c['a'].endswith('+rpb') else ''}: "
                + (
                    "SIKF better"
                    if c["verdict"] == "held"
                    else "elu+1 better"
                    if c["verdict"].startswith("did not")
                    else "no resolved difference"
                )
                + f" ({c['diff']:+.3f} ± {c['se']:.3f})"
                for c in sk
            )
            + "."
        )
    for L in meta["lengths"]:
        rp = [c for c in cl if c["group"] == "rpb" and c["seq_len"] == L]
        if not rp:
            continue
        held = [MAP_TITLES[c["b"]] for c in rp if c["verdict"] == "held"]
        opp = [MAP_TITLES[c["b"]] for c in rp if c["verdict"].startswith("did not")]
        rest = [MAP_TITLES[c["b"]] for c in rp if c["verdict"].startswith("not resolved")]
        mean_gain = sum(c["diff"] for c in rp) / len(rp)
        out.append(
            f"- **Does FastRPB help recall at L = {L}?** Helped: {', '.join(held) or 'none'}; hurt: "
            f"{', '.join(opp) or 'none'}; not resolved: {', '.join(rest) or 'none'} (mean change over the "
            f"{len(rp)} maps {mean_gain:+.3f})."
        )
    for L in meta["lengths"]:
        ranked = sorted((r for r in rows if r["seq_len"] == L), key=lambda r: -r["accuracy_mean"])
        if ranked:
            out.append(
                f"- **Ranking at L = {L}** (mean accuracy): "
                + ", ".join(f"{title(r['variant']).removeprefix('linear, ')} {r['accuracy_mean']:.3f}" for r in ranked)
                + "."
            )
    for c in (c for c in cl if c["group"] == "best"):
        soft = _row(rows, "softmax", c["seq_len"])
        assert soft is not None
        word = {"held": "above softmax", "did not hold": "below softmax"}.get(
            _word(c), "within 2 standard errors of softmax"
        )
        out.append(
            f"- **Best linear map against softmax at L = {c['seq_len']}**: {title(c['a'])} reaches "
            f"{soft['accuracy_mean'] + c['diff']:.3f} against softmax's {soft['accuracy_mean']:.3f}: {word} "
            f"({c['diff']:+.3f} ± {c['se']:.3f})."
        )
    for L in meta["lengths"]:
        at = [r for r in rows if r["seq_len"] == L]
        if at and max(r["accuracy_mean"] for r in at) < chance + 0.05:
            out.append(
                f"- **No model learned the task at L = {L}** within this budget: every mean accuracy is within "
                f"5 points of chance ({chance:.3f}), so the verdicts at this length say nothing about the maps."
            )
        soft = _row(rows, "softmax", L)
        if soft is not None and soft["accuracy_mean"] < 0.5 and any(r["accuracy_mean"] >= chance + 0.05 for r in at):
            out.append(
                f"- **Softmax did not learn the task well at L = {L}** ({soft['accuracy_mean']:.3f}): at this "
                "budget the comparison with the linear maps is a comparison of early training, not of capacity."
            )
    return out


def non_finite(runs: list[dict]) -> list[str]:
    """One line naming the models whose training loss became NaN or infinite, and at which step."""
    bad = []
    for r in runs:
        if r["loss_finite"] or r["seq_len"] != min(x["seq_len"] for x in runs if x["variant"] == r["variant"]):
            continue
        phases = sorted(
            (x for x in runs if (x["variant"], x["seed"]) == (r["variant"], r["seed"])), key=lambda x: x["seq_len"]
        )
        losses = [v for x in phases for v in x["loss"]]
        step = next(i for i, v in enumerate(losses) if not math.isfinite(v))
        bad.append(f"{title(r['variant'])}, seed {r['seed']} (from step {step + 1} of {len(losses)})")
    if not bad:
        return []
    return [
        "- **Training diverged** (the loss became NaN or infinite) for: " + "; ".join(bad) + ". The final accuracy "
        "of such a model counts in the means above, as a failure of that variant to train at this learning rate."
    ]


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = meta["lengths"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colours = dict(zip(FEATURE_MAPS, plt.get_cmap("tab10").colors[1:], strict=False))
    for ax, with_rpb in zip(axes, (False, True), strict=True):
        names = ["softmax", *(f"{m}+rpb" if with_rpb else m for m in FEATURE_MAPS)]
        for v in names:
            pts = [(L, _row(rows, v, L)) for L in lengths]
            pts = [(L, r) for L, r in pts if r is not None]
            if not pts:
                continue
            colour = "black" if v == "softmax" else colours[v.split("+")[0]]
            ax.errorbar(
                [L for L, _ in pts],
                [r["accuracy_mean"] for _, r in pts],
                yerr=[2 * r["accuracy_se"] for _, r in pts],
                marker="o",
                capsize=3,
                color=colour,
                linestyle="--" if v == "softmax" else "-",
                label=title(v).removeprefix("linear, "),
            )
        ax.axhline(2 / meta["settings"]["vocab"], color="grey", linewidth=0.8, linestyle=":", label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.set_xlabel("sequence length")
        ax.set_title(
            "linear maps + FastRPB (softmax for reference)" if with_rpb else "linear maps without bias, softmax"
        )
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0].set_ylabel("MQAR accuracy (mean, ± 2 s.e.)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def section(runs: list[dict], meta: dict, *, plot_rel: str, results_arg: str, heading: str = "##") -> str:
    s = meta["settings"]
    rows = summarise(runs)
    m = meta["machine"]
    half = s["vocab"] // 2
    partial = ""
    missing = missing_runs(runs, meta["variants"], meta["lengths"], meta["seeds"])
    if missing:
        partial = (
            f"**PARTIAL RESULTS**: {len(missing)} planned run(s) did not finish within the time budget ("
            + ", ".join(f"{x['variant']}/L = {x['seq_len']}/seed {x['seed']}" for x in missing[:12])
            + (", ..." if len(missing) > 12 else "")
            + "); the table says which cells have fewer seeds than planned.\n\n"
        )
    lengths = meta["lengths"]
    first, *longer = lengths
    busy = sum(r["train_s"] + r["eval_s"] for r in runs)
    loads = [r["loadavg"][0] for r in runs]
    cores = m.get("usable_cpus", m.get("affinity_cpus", m.get("cpus")))
    training = f"{s['steps']} steps of {s['batch']} fresh sequences at L = {first}" + "".join(
        f", then {s['long_steps']} steps of {s['long_batch']} at L = {L}" for L in longer
    )
    tests = f"{s['test']} at L = {first}" + "".join(f", {s['long_test']} at L = {L}" for L in longer)
    lines = [
        f"{heading} Which feature map? Multi-query associative recall (MQAR)",
        "",
        partial
        + (
            "The Zoology and Based papers (Arora et al. 2023, 2024) showed that multi-query associative recall "
            "separates linear-attention feature maps sharply. The task, generated by "
            "`benchmarks/paper/mqar.py` from its definition: a vocabulary of "
            f"{s['vocab']} tokens (keys 1-{half - 1}, values {half}-{s['vocab'] - 1}, 0 a filler); each sequence "
            f"starts with {s['num_kv_pairs']} key-value pairs (distinct keys, random values), then filler tokens "
            "in which every key is asked once, at random distinct later positions; at each asked key the model "
            "must predict the value that followed that key in the context. Accuracy is the fraction of right answers "
            f"over all queries of fixed test sequences ({tests}; {s['num_kv_pairs']} queries each; chance "
            f"{2 / s['vocab']:.3f}, a guess among the values)."
        ),
        "",
        (
            f"Every model is the same causal pre-LayerNorm Transformer (width {s['d_model']}, {s['heads']} heads of "
            f"{s['d_model'] // s['heads']}, {s['layers']} layers, MLP {s['d_ff']}, sinusoidal positions"
            + (
                f", and before each attention a causal depthwise convolution over {s['short_conv']} tokens, the short "
                "convolution of Zoology's and Based's models: every model, softmax included, has it, so the attention "
                "does the recall, not the local token shift"
                if s.get("short_conv")
                else ""
            )
            + "). As in Zoology, one model per variant and seed learns all the lengths: "
            f"{training}, the same model and optimiser throughout (AdamW lr {s['lr']}, one schedule of "
            f"{int(100 * s['warmup'])} % warm-up then linear decay to 0, clipping {s['clip']}); every length is then "
            "tested with the final model. Only the attention differs: `softmax_attention(causal=True)`, or the layer "
            '`LinearAttention(feature_map=..., causal=True)` with `"elu"`, `"relu"`, `"sikf"`, `"dpfp"` '
            f"(nu = 1), `favor(random_projection({2 * (s['d_model'] // s['heads'])}, {s['d_model'] // s['heads']}))` "
            '(fixed), `"taylor"` or `"hedgehog"` (its W trained with the model, from the identity), each without and '
            f"with a causal 1-d FastRPB over the whole sequence (`FastRPB(heads, {lengths[-1]}, causal=True)`)."
        ),
        "",
        (
            "**What was cut to fit the budget** (the sweep shared a 2-core machine with other work; Zoology trains "
            "width 64-512 models for tens of thousands of steps on a vocabulary of 8,192 with up to 64 pairs): "
            f"width {s['d_model']} and {s['layers']} layers, a vocabulary of {s['vocab']}, {s['num_kv_pairs']} key-value "
            f"pairs at every length, {len(meta['seeds'])} seeds, a few hundred steps, and at the long length only a "
            "short phase of small batches, where one softmax step costs the most. The numbers therefore compare "
            "the maps early in training at a small state size; they are not the maps' capacity."
        ),
        "",
        (
            f"Command: `PYTHONPATH=src:. {meta['command']}` (config hash `{meta['config_hash']}`; the runner appends "
            "each finished model to the JSON and a later invocation with the same settings and code trains only the "
            f"missing ones). Training and testing took {busy / 60:.0f} min in all, in one process of "
            f"{s['threads']} thread; the load average of the shared machine ({cores} cores) was "
            f"{min(loads):.1f}-{max(loads):.1f} at the ends of the runs, so times are indicative: compare them "
            f"within a length. Raw runs: `{results_arg}`."
        ),
        "",
        table(rows, meta),
        "",
        f"![MQAR accuracy against sequence length]({plot_rel})",
        "",
        f"{heading}# Verdicts (MQAR)",
        "",
        (
            "Accuracy gained = accuracy of the first model minus the second; a claim *held* when the gain exceeds two "
            "standard errors (from the seeds' spread), *did not hold* when the opposite does, and is *not resolved* "
            "otherwise. The best linear map is the one with the highest mean accuracy at that length, chosen on these "
            "same runs (which flatters it a little against softmax)."
        ),
        "",
        claims_md(rows, meta),
        "",
        *in_words(rows, meta),
        *non_finite(runs),
        "",
    ]
    return "\n".join(lines)


def load_dir(out: Path) -> tuple[list[dict], dict]:
    return json.loads((out / "results.json").read_text()), json.loads((out / "sweep.json").read_text())


def write_outputs(runs: list[dict], meta: dict, out: Path) -> None:
    plot(summarise(runs), meta, out / "accuracy.png")
    (out / "results.md").write_text(
        section(runs, meta, plot_rel="accuracy.png", results_arg=str(out / "results.json")) + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.paper.mqarreport DIR``: rewrite DIR's results.md and accuracy.png from its JSON files."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out", type=Path, help="output directory of `python -m benchmarks.paper.mqar`")
    a = ap.parse_args(argv)
    runs, meta = load_dir(a.out)
    write_outputs(runs, meta, a.out)
    print(f"wrote {a.out / 'results.md'} and {a.out / 'accuracy.png'}")


if __name__ == "__main__":
    main()
