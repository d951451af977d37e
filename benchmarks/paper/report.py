"""Tables, plots, claim checks and the docs page, all computed from ``results.json``.

``python -m benchmarks.paper.report RESULTS.json --page docs/experiments.md`` regenerates
the Experiments page; no number on it is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from ..environment import describe_versions
from .verdict import two_se_verdict

TASK_TITLES = {
    "fmnist": "Fashion-MNIST (784 pixels + class token, 2-d FastRPB)",
    "listops": "ListOps (generated, LRA definition, 1-d FastRPB)",
}
LRA_LISTOPS = {"Transformer": 36.37, "Linear Transformer": 16.13, "Performer": 18.01, "chance": 10.0}
VARIANT_TITLES = {
    "softmax": "softmax",
    "softmax+rpb": "softmax + FastRPB",
    "softmax+logits": "softmax + logits bias (rpb_matrix)",
    "elu": "linear, elu+1",
    "elu+rpb": "linear, elu+1 + FastRPB",
    "sikf": "linear, SIKF",
    "sikf+rpb": "linear, SIKF + FastRPB",
}


def _row(summary: list[dict], task: str, variant: str) -> dict | None:
    for r in summary:
        if r["task"] == task and r["variant"] == variant:
            return r
    return None


def _fmt_mem(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def table(results: dict) -> str:
    lines = []
    for task in results["tasks"]:
        info = results["data"][task]
        lines.append(f"#### {TASK_TITLES.get(task, task)}")
        lines.append("")
        extra = ""
        if "len_mean" in info:
            extra = f", sequence length {info['len_min']}-{info['len_max']} (mean {info['len_mean']:.0f})"
        lines.append(
            f"{info['n_train']} training / {info['n_test']} test examples{extra}; "
            f"majority-class test accuracy {100 * info['majority_class_test_acc']:.1f} %."
        )
        lines.append("")
        tim = results.get("timing", {}).get(task)
        lines.append(
            "| model | test accuracy % (mean ± std) | seeds | ms / step in training | ms / step interleaved "
            "| peak extra MB | peak RSS MB | params |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for v in results["variants"]:
            r = _row(results["summary"], task, v)
            if r is None:
                continue
            flag = "" if r["all_finite"] else " (non-finite loss!)"
            it = tim["per_variant"].get(v) if tim else None
            it_s = f"{1000 * it['min_s']:.0f}" if it else "n/a"
            lines.append(
                f"| {VARIANT_TITLES.get(v, v)} | {100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f}{flag} | "
                f"{len(r['seeds'])} | {1000 * r['step_time_s']:.0f} | {it_s} | {_fmt_mem(r['peak_extra_mb'])} | "
                f"{_fmt_mem(r['peak_rss_mb'])} | {r['n_params']} |"
            )
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- claims
def _time_ratio(results: dict, task: str, a: str, b: str, ra: dict, rb: dict) -> float:
    """Step-time ratio a/b: from the interleaved timing where there is one (less disturbed)."""
    per = results.get("timing", {}).get(task, {}).get("per_variant", {})
    if a in per and b in per:
        return per[a]["min_s"] / per[b]["min_s"]
    return ra["step_time_s"] / rb["step_time_s"]


def _compare(results: dict, task: str, a: str, b: str) -> dict | None:
    """Is variant ``a`` better than ``b``? Difference of mean accuracies and its standard error."""
    ra, rb = _row(results["summary"], task, a), _row(results["summary"], task, b)
    if ra is None or rb is None:
        return None
    na, nb = len(ra["seeds"]), len(rb["seeds"])
    diff = ra["acc_mean"] - rb["acc_mean"]
    se = math.sqrt(ra["acc_std"] ** 2 / na + rb["acc_std"] ** 2 / nb)
    verdict = two_se_verdict(diff, se, min(na, nb))
    return {
        "task": task,
        "a": a,
        "b": b,
        "diff": diff,
        "se": se,
        "verdict": verdict,
        "time_ratio": _time_ratio(results, task, a, b, ra, rb),
        "mem_ratio": (ra["peak_extra_mb"] / rb["peak_extra_mb"])
        if ra["peak_extra_mb"] and rb["peak_extra_mb"]
        else None,
    }


def claims(results: dict) -> list[dict]:
    out = []
    for task in results["tasks"]:
        c = _compare(results, task, "sikf", "elu")
        if c:
            out.append({**c, "claim": "SIKF is more accurate than elu+1"})
        for base in ("sikf", "elu", "softmax"):
            c = _compare(results, task, f"{base}+rpb", base)
            if c:
                out.append({**c, "claim": f"FastRPB improves {VARIANT_TITLES[base]}"})
        c = _compare(results, task, "softmax+rpb", "softmax+logits")
        if c:
            out.append({**c, "claim": "FastRPB on the values beats the same tables as a softmax logits bias"})
    return out


def claims_md(results: dict) -> str:
    lines = [
        "| task | claim | accuracy difference (points) | verdict | time ratio | peak-memory ratio |",
        "|---|---|---|---|---|---|",
    ]
    for c in claims(results):
        mem = "n/a" if c["mem_ratio"] is None else f"{c['mem_ratio']:.2f}"
        lines.append(
            f"| {c['task']} | {c['claim']} ({c['a']} vs {c['b']}) | {100 * c['diff']:+.1f} ± {100 * c['se']:.1f} | "
            f"{c['verdict']} | {c['time_ratio']:.2f} | {mem} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plot
def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colours = {"softmax": "tab:blue", "elu": "tab:orange", "sikf": "tab:green"}
    tasks = results["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.6 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        ax_loss, ax_acc = axes[i]
        for v in results["variants"]:
            rs = [r for r in results["runs"] if r["task"] == task and r["variant"] == v]
            if not rs:
                continue
            base, _, bias = v.partition("+")
            style = {"": "--", "rpb": "-", "logits": ":"}[bias]
            kw = dict(color=colours.get(base, "k"), linestyle=style, label=VARIANT_TITLES.get(v, v))
            loss = np.mean([r["loss"] for r in rs], axis=0)
            k = max(1, len(loss) // 20)
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax_loss.plot(np.arange(len(smooth)) + k, smooth, **kw)
            correct = np.mean([r["train_correct"] for r in rs], axis=0) / rs[0]["batch"] * 100
            smooth_acc = np.convolve(correct, np.ones(k) / k, mode="valid")
            ax_acc.plot(np.arange(len(smooth_acc)) + k, smooth_acc, alpha=0.8, **kw)
            steps = [p["step"] for p in rs[0]["curve"]]
            acc = np.array([[p["acc"] for p in r["curve"]] for r in rs]) * 100
            ax_acc.errorbar(
                steps,
                acc.mean(0),
                yerr=acc.std(0, ddof=1) if len(rs) > 1 else None,
                capsize=3,
                marker="o",
                ms=4,
                color=kw["color"],
                linestyle="none",
            )
        ax_loss.set_title(f"{task}: training loss (mean over seeds, moving average)", fontsize=10)
        ax_loss.set_xlabel("step")
        ax_acc.set_title(f"{task}: accuracy %: training batches (lines), test (points, ± std)", fontsize=10)
        ax_acc.set_xlabel("step")
        ax_acc.axhline(
            100 * results["data"][task]["majority_class_test_acc"],
            color="grey",
            lw=0.8,
            label="most frequent test label",
        )
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict, out: Path) -> None:
    head = "**PARTIAL RESULTS** (the sweep did not finish)\n\n" if results.get("partial") else ""
    (out / "results.md").write_text(head + table(results) + "\n" + claims_md(results) + "\n")
    plot(results, out / "curves.png")


# ----------------------------------------------------------------------------- docs page
def page(
    results: dict,
    *,
    results_rel: str,
    plot_rel: str,
    results_arg: str,
    extras: list[tuple[dict, str, str]] = (),
    autoregressive: dict | None = None,
    mqar: dict | None = None,
) -> str:
    """The Experiments page; ``extras`` are (results, path as given, plot path relative to the page)
    of further sweeps with the same settings (e.g. more seeds for some models); ``autoregressive`` holds what
    ``python -m benchmarks.paper.autoregressive`` wrote: ``runs``, ``meta``, ``samples_rel``, ``arg``,
    ``decode`` (or None), ``dirs`` and ``more``, further sweeps as (runs, meta, samples_rel, arg); ``mqar`` what
    ``python -m benchmarks.paper.mqar`` wrote: ``runs``, ``meta``, ``plot_rel``, ``arg`` and ``dir``."""
    s = results["settings"]
    v = results["versions"]
    m = results["machine"]
    cl = claims(results)
    lines = [
        "# Experiments: do the paper's claims hold at small scale?",
        "",
        (f"<!-- GENERATED by `python -m benchmarks.paper.report` from `{results_arg}`; do not edit by hand. -->"),
        "",
        *(
            [
                "**PARTIAL RESULTS**: the run did not finish; "
                + str(len(results["missing_runs"]))
                + " of the planned runs are missing ("
                + ", ".join(f"{m['task']}/{m['variant']}/seed {m['seed']}" for m in results["missing_runs"][:12])
                + (", ..." if len(results["missing_runs"]) > 12 else "")
                + "). Rows with fewer seeds than planned say so in the seeds column.",
                "",
            ]
            if results.get("partial")
            else []
        ),
        (
            "The FastRPB paper (Zubkov & Gavrilov, arXiv:2202.11364) claims that (1) the "
            "shift-invariant kernel SIKF makes linear attention more accurate than elu+1 at the "
            "same speed, and (2) FastRPB adds positional information cheaply and improves "
            "accuracy on long sequences, on images and on text-like tasks. This page tests both "
            "with this library's own code (`fastrpb.linear_attention`, `fastrpb.softmax_attention`, "
            "`fastrpb.rpb`, `fastrpb.rpb_nd`, `fastrpb.rpb_matrix` on PyTorch tensors) on real, offline "
            "data, with small models that a 2-core CPU trains in well under an hour "
            f"(this sweep: {results['sweep_wall_s'] / 60:.0f} min). It is a small-scale check, "
            "not a reproduction of the paper's numbers."
        ),
        *(
            [
                "",
                (
                    "The last part, [Autoregressive Fashion-MNIST](#autoregressive-fashion-mnist-causal-attention-next-pixel-prediction), "
                    "tests the causal setting, where linear attention decodes in O(1) per token: next-pixel prediction "
                    "(bits per dimension), the causal FastRPB, SIKF against elu+1, and sampling speed against softmax with a "
                    "key/value cache."
                ),
            ]
            if autoregressive is not None
            else []
        ),
        *(
            [
                "",
                (
                    "[Which feature map? Multi-query associative recall](#which-feature-map-multi-query-associative-recall-mqar) "
                    "compares every feature map of the library, with and without FastRPB, against softmax on the recall task "
                    "that separates them in the Zoology and Based papers."
                ),
            ]
            if mqar is not None
            else []
        ),
        "",
        "## How it was run",
        "",
        "```sh",
        "apt-get install -y dataset-fashion-mnist   # Fashion-MNIST, from Debian",
        "pip install -e '.[torch,bench]'",
        f"PYTHONPATH=src:. {results['command']}",
        *[f"PYTHONPATH=src:. {ex['command']}" for ex, _, _ in extras],
        *(
            [
                f"PYTHONPATH=src:. {m['command']}"
                for m in [autoregressive["meta"], *(x[1] for x in autoregressive["more"])]
            ]
            if autoregressive is not None
            else []
        ),
        *(
            [
                f"PYTHONPATH=src:. python -m benchmarks.paper.ardecode --out {autoregressive['dirs'][0]}/decode-scaling.json"
            ]
            if autoregressive is not None and autoregressive["decode"] is not None
            else []
        ),
        *([f"PYTHONPATH=src:. {mqar['meta']['command']}"] if mqar is not None else []),
        f"PYTHONPATH=src:. python -m benchmarks.paper.report {results_arg} --page docs/experiments.md"
        + "".join(f" --extra {arg}" for _, arg, _ in extras)
        + "".join(f" --autoregressive {d}" for d in (autoregressive["dirs"] if autoregressive is not None else ()))
        + (f" --mqar {mqar['dir']}" if mqar is not None else ""),
        "```",
        "",
        (
            f"- Config hash `{results['config_hash']}` (settings and code); finished {results['finished_utc']}, "
            f"sweep wall time {results['sweep_wall_s'] / 60:.1f} min with {results['jobs']} worker(s) of "
            f"{s['threads']} thread(s) each."
        ),
        "- Versions: " + describe_versions(v) + ".",
        # the older key names (affinity_cpus, cpus, mem_gb) read the results of earlier runs
        (
            f"- Machine: {m.get('cpu', '?')}, {m.get('usable_cpus', m.get('affinity_cpus', m.get('cpus')))} CPU cores usable, "
            f"{m.get('memory_gib', m.get('mem_gb', '?'))} GB RAM, {m.get('platform')}. Load average "
            f"{results['loadavg_start'][0]:.1f} at the start and {results['loadavg_end'][0]:.1f} at the end: the machine "
            "was shared, so times are indicative; compare them within a task."
        ),
        f"- Seeds: {', '.join(map(str, results['seeds']))} (initialisation, FastRPB tables and batch order; the data are fixed).",
        "",
        "### Data",
        "",
        (
            f"- **Fashion-MNIST**, read from Debian's `dataset-fashion-mnist` files: a class-balanced subset of "
            f"{results['data'].get('fmnist', {}).get('n_train', s['fmnist_train'])} training and "
            f"{results['data'].get('fmnist', {}).get('n_test', s['fmnist_test'])} test images. Each image is a sequence "
            "of 784 pixel tokens (row-major) after a class token; the 2-d FastRPB uses "
            "`rpb_nd(v, (w_row, w_col), grid=(28, 28), skip=(1, 0))`."
        ),
        (
            f"- **ListOps**, generated by `benchmarks/paper/data.py` following Long Range Arena's definition "
            f"(MAX, MIN, MED, SM over digits, depth up to {s['listops_max_depth']}, up to {s['listops_max_args']} "
            f"arguments), {s['listops_train']} training and {s['listops_test']} test expressions, lengths "
            f"{s['listops_min_len']}-{s['listops_max_len']} tokens (LRA uses 500-2000; the short end keeps softmax "
            "trainable on a CPU). The 1-d FastRPB is `rpb(v, w, skip=(1, 0))`."
        ),
        "",
        "### Models",
        "",
        (
            f"All models are the same pre-LayerNorm Transformer encoder: width {s['d_model']}, {s['heads']} heads, "
            f"{s['layers']} layers, MLP {s['d_ff']}, fixed sinusoidal absolute positions, classification from the class "
            f"token; AdamW (lr {s['lr']}, weight decay {s['weight_decay']}, {int(100 * s['warmup'])} % warm-up then linear "
            f"decay, gradient clipping {s['clip']}), batch {s['batch']}, {s['steps']} steps, float32. Only the attention "
            "differs:"
        ),
        "",
        (
            "- *softmax*: `softmax_attention`; *+ logits bias*: the same kind of per-head tables turned into a dense "
            "logits bias with `rpb_matrix` (the classical relative bias, O(L²));"
        ),
        '- *linear, elu+1* and *linear, SIKF*: `linear_attention(feature_map="elu" | "sikf")`;',
        (
            "- *+ FastRPB*: the attention output plus `B V` (per-head tables from `rpb_init`, learned), "
            "O(L log L) by FFT."
        ),
        "",
        f"Accuracy is measured once, after the last step, on the {s['fmnist_test']} / {s['listops_test']} test "
        "examples (no model selection on the test set). Time in training: "
        + results["time_measure"]
        + ". "
        + (
            "Time interleaved: " + results["timing_measure"] + f" ({s.get('timing_rounds')} rounds). "
            if results.get("timing")
            else ""
        )
        + "Memory: "
        + results["memory_measure"]
        + ".",
        "",
        "## Results",
        "",
        table(results),
        f"![learning curves]({plot_rel})",
        "",
        "## Which claims held at this scale",
        "",
        (
            "A claim *held* when the accuracy difference exceeds two standard errors "
            "(standard error from the seeds' spread), *did not hold* when the opposite difference does, "
            "and is *not resolved* otherwise. Time and memory ratios are those of the first model to the second "
            "(time from the interleaved measurement where there is one)."
        ),
        "",
        claims_md(results),
        "",
    ]
    lines += _plain_statement(results, cl)
    for ex, arg, ex_plot in extras:
        lines += _extra_section(results, ex, arg, ex_plot)
    lines += _summary(results, [ex for ex, _, _ in extras])
    if autoregressive is not None:
        from .arreport import section

        lines += [
            section(
                autoregressive["runs"],
                autoregressive["meta"],
                samples_rel=autoregressive["samples_rel"],
                results_arg=autoregressive["arg"],
                decode=autoregressive["decode"],
                more=autoregressive["more"],
            )
        ]
    if mqar is not None:
        from .mqarreport import section as mqar_section

        lines += [mqar_section(mqar["runs"], mqar["meta"], plot_rel=mqar["plot_rel"], results_arg=mqar["arg"])]
    return "\n".join(lines) + "\n"


def _extra_section(main: dict, ex: dict, arg: str, plot_rel: str) -> list[str]:
    same = ex["config_hash"] == main["config_hash"]
    names = "; ".join(VARIANT_TITLES.get(v, v) for v in ex["variants"])
    out = [
        f"## Further sweep: {ex['settings']['steps']} steps, {len(ex['seeds'])} seeds ({names})",
        "",
        f"These models were run again with {len(ex['seeds'])} seeds and {ex['settings']['steps']} steps "
        f"(`{ex['command']}`, results in `{arg}`, {ex['sweep_wall_s'] / 60:.0f} min). "
        + (
            f"Settings and code are identical to the main sweep (same config hash `{ex['config_hash']}`)."
            if same
            else _differences(main, ex)
        ),
        "",
    ]
    shared = []
    for r in ex["runs"]:
        for m in main["runs"]:
            if (m["task"], m["variant"], m["seed"]) == (r["task"], r["variant"], r["seed"]):
                shared.append(abs(m["test_acc"] - r["test_acc"]))
    if shared and same:
        worst = max(shared)
        out.append(
            f"Reproducibility: the {len(shared)} (task, model, seed) runs that both sweeps trained give "
            + (
                "identical test accuracies."
                if worst == 0
                else f"test accuracies that differ by up to {100 * worst:.2f} points."
            )
        )
        out.append("")
    out += [table(ex), f"![learning curves, further sweep]({plot_rel})", "", claims_md(ex), ""]
    out += _plain_statement(ex, claims(ex), closing=False)
    return out


def _differences(main: dict, ex: dict) -> str:
    diff = [
        f"{k} = {v} (main sweep: {main['settings'].get(k)})"
        for k, v in ex["settings"].items()
        if main["settings"].get(k) != v
    ]
    code = "the same code" if ex.get("code_digest") == main.get("code_digest") else "**different code**"
    return (
        f"Config hash `{ex['config_hash']}`: "
        + ("; ".join(diff) if diff else "the same settings")
        + f", {code} (digest `{ex.get('code_digest')}`)."
    )


def _summary(main: dict, extras: list[dict]) -> list[str]:
    """Every claim in every sweep, side by side."""
    sweeps = [main, *extras]
    heads = [
        f"{sw['settings']['steps']} steps, {len(sw['seeds'])} seeds" + (" (main)" if i == 0 else "")
        for i, sw in enumerate(sweeps)
    ]
    cells: dict[tuple, dict[int, str]] = {}
    titles: dict[tuple, str] = {}
    for i, sw in enumerate(sweeps):
        for c in claims(sw):
            key = (c["task"], c["a"], c["b"])
            titles[key] = c["claim"]
            word = c["verdict"].split(" (")[0]
            cells.setdefault(key, {})[i] = f"{100 * c['diff']:+.1f} ± {100 * c['se']:.1f}: {word}"
    out = [
        "## Summary",
        "",
        "Accuracy difference in points ± standard error, and the verdict, for every claim in every sweep.",
        "",
        "| task | claim | " + " | ".join(heads) + " |",
        "|---|---|" + "---|" * len(sweeps),
    ]
    for task in main["tasks"]:
        name = {"fmnist": "Fashion-MNIST", "listops": "ListOps"}.get(task, task)
        for key, title in titles.items():
            if key[0] == task:
                out.append(
                    f"| {name} | {title} | " + " | ".join(cells[key].get(i, "—") for i in range(len(sweeps))) + " |"
                )
    out.append("")
    return out


def _plain_statement(results: dict, cl: list[dict], *, closing: bool = True) -> list[str]:
    out = ["### In words", ""]
    for task in results["tasks"]:
        tc = [c for c in cl if c["task"] == task]
        if not tc:
            continue
        held = [c for c in tc if c["verdict"] == "held"]
        opposite = [c for c in tc if c["verdict"].startswith("did not")]
        unresolved = [c for c in tc if c["verdict"].startswith("not resolved")]
        name = {"fmnist": "Fashion-MNIST", "listops": "ListOps"}.get(task, task)
        parts = []
        if held:
            parts.append("held: " + "; ".join(f"{c['claim']} ({100 * c['diff']:+.1f} points)" for c in held))
        if opposite:
            parts.append(
                "the opposite was seen: " + "; ".join(f"{c['claim']} ({100 * c['diff']:+.1f} points)" for c in opposite)
            )
        if unresolved:
            parts.append(
                "not resolved: "
                + "; ".join(f"{c['claim']} ({100 * c['diff']:+.1f} ± {100 * c['se']:.1f})" for c in unresolved)
            )
        out.append(f"- **{name}** — " + ". ".join(parts) + ".")
        sp = [c for c in tc if c["a"] == "sikf" and c["b"] == "elu"]
        if sp:
            out.append(f"  SIKF costs {sp[0]['time_ratio']:.2f}x the time per step of elu+1.")
        rp = [c for c in tc if c["a"].endswith("+rpb") and c["b"] in ("elu", "sikf")]
        if rp:
            out.append(
                "  FastRPB costs "
                + ", ".join(
                    f"{c['time_ratio']:.2f}x time"
                    + (f" and {c['mem_ratio']:.2f}x peak extra memory" if c["mem_ratio"] else "")
                    + f" on {c['b']}"
                    for c in rp
                )
                + "."
            )
    if "listops" in results["tasks"]:
        best = max((r for r in results["summary"] if r["task"] == "listops"), key=lambda r: r["acc_mean"])
        maj = results["data"]["listops"]["majority_class_test_acc"]
        ref = ", ".join(f"{k} {val:.2f}" for k, val in LRA_LISTOPS.items())
        out.append(
            f"- **ListOps in context**: the Long Range Arena leaderboard reports accuracy % {ref} (full-size models "
            f"trained on sequences of 500-2000 tokens). Here, on expressions of {results['settings']['listops_min_len']}-"
            f"{results['settings']['listops_max_len']} tokens, the best small model, "
            f"{VARIANT_TITLES.get(best['variant'], best['variant'])}, reaches {100 * best['acc_mean']:.1f} ± "
            f"{100 * best['acc_std']:.1f} %, against {100 * maj:.1f} % for always answering the most frequent digit."
        )
    for task in results["tasks"]:
        rows = [r for r in results["summary"] if r["task"] == task]
        maj = results["data"][task]["majority_class_test_acc"]
        if rows and max(r["acc_mean"] for r in rows) - maj < 0.02:
            name = {"fmnist": "Fashion-MNIST", "listops": "ListOps"}.get(task, task)
            out.append(
                f"- **No model learned {name} at this scale**: every mean test accuracy is within 2 points of "
                f"always answering the most frequent label ({100 * maj:.1f} %), so the claims cannot be judged "
                "on this task here; it needs far more training than this budget allows."
            )
    out.append("")
    if not closing:
        return out
    out.append(
        "These are small models trained for few steps on a shared 2-core CPU, early in training; "
        "a claim that is not resolved here may well hold at "
        "the paper's scale, and one that held here is evidence, not proof. The library's `softmax_attention` "
        "is a plain array-API implementation (the exact reference), not a fused kernel such as PyTorch's "
        "`scaled_dot_product_attention`, so softmax times here are higher than a tuned softmax would give; "
        "compare linear variants with each other."
    )
    out.append("")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="results.json written by `python -m benchmarks.paper`")
    ap.add_argument("--page", type=Path, help="write the Experiments docs page here (e.g. docs/experiments.md)")
    ap.add_argument("--outputs", action="store_true", help="also rewrite results.md and curves.png next to the JSON")
    ap.add_argument(
        "--extra",
        type=Path,
        action="append",
        default=[],
        help="results.json of a further sweep (e.g. more seeds for some models) to add to the page",
    )
    ap.add_argument(
        "--autoregressive",
        type=Path,
        action="append",
        default=[],
        help="output directory of `python -m benchmarks.paper.autoregressive` (results.json, sweep.json, "
        "samples.png) to add to the page; repeat it for further variants (same settings), whose rows "
        "join the first directory's table",
    )
    ap.add_argument(
        "--mqar",
        type=Path,
        default=None,
        help="output directory of `python -m benchmarks.paper.mqar` (results.json, sweep.json, accuracy.png) "
        "to add to the page",
    )
    a = ap.parse_args(argv)
    results = json.loads(a.results.read_text())
    if a.outputs:
        write_outputs(results, a.results.parent)
    if a.page:
        rel = lambda p: os.path.relpath(p, a.page.parent)  # noqa: E731
        extras = [(json.loads(x.read_text()), str(x), rel(x.parent / "curves.png")) for x in a.extra]
        ar = None
        if a.autoregressive:
            from .arreport import load_dir

            d, *more = a.autoregressive
            runs, meta, decode = load_dir(d)
            ar = {
                "runs": runs,
                "meta": meta,
                "samples_rel": rel(d / "samples.png"),
                "arg": str(d / "results.json"),
                "decode": decode,
                "dirs": [str(x) for x in a.autoregressive],
                "more": [(*load_dir(x)[:2], rel(x / "samples.png"), str(x / "results.json")) for x in more],
            }
        mq = None
        if a.mqar:
            from .mqarreport import load_dir as mqar_load

            mq_runs, mq_meta = mqar_load(a.mqar)
            mq = {
                "runs": mq_runs,
                "meta": mq_meta,
                "plot_rel": rel(a.mqar / "accuracy.png"),
                "arg": str(a.mqar / "results.json"),
                "dir": str(a.mqar),
            }
        a.page.write_text(
            page(
                results,
                results_rel=rel(a.results),
                plot_rel=rel(a.results.parent / "curves.png"),
                results_arg=str(a.results),
                extras=extras,
                autoregressive=ar,
                mqar=mq,
            )
        )
        print(f"wrote {a.page}")
    if not a.page and not a.outputs:
        print(table(results))
        print(claims_md(results))


if __name__ == "__main__":
    main()
