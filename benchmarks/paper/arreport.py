"""Table, verdicts, sample grid and page section of the autoregressive experiment.

Everything is computed from ``results.json`` (the list of runs) and ``sweep.json``
(settings, machine, summary) written by ``python -m benchmarks.paper.autoregressive``.
"""

from __future__ import annotations

import math
from pathlib import Path

from .verdict import two_se_verdict

AR_TITLES = {
    "softmax": "softmax (KV cache)",
    "softmax+rpb": "softmax + causal FastRPB",
    "softmax+rpb2d": "softmax + causal 2-d FastRPB",
    "elu": "linear, elu+1",
    "elu+rpb": "linear, elu+1 + causal FastRPB",
    "elu+rpb2d": "linear, elu+1 + causal 2-d FastRPB",
    "sikf": "linear, SIKF",
    "sikf+rpb": "linear, SIKF + causal FastRPB",
    "sikf+rpb2d": "linear, SIKF + causal 2-d FastRPB",
}


def _row(meta: dict, v: str) -> dict | None:
    return next((r for r in meta["summary"] if r["variant"] == v), None)


def _gen_rate(meta: dict, v: str) -> tuple[float, str] | None:
    """Tokens/s of variant ``v``: the interleaved measurement where there is one."""
    tim = meta.get("generation_timing")
    if tim and v in tim["per_variant"]:
        return tim["per_variant"][v]["tokens_per_s"], "interleaved"
    r = _row(meta, v)
    return (r["generate_tokens_per_s"], "per run") if r else None


def compare_bpd(meta: dict, a: str, b: str) -> dict | None:
    """Is ``a`` better (lower bits/dim) than ``b``? Improvement ``b - a`` and its standard error."""
    ra, rb = _row(meta, a), _row(meta, b)
    if ra is None or rb is None:
        return None
    gain = rb["bits_per_dim_mean"] - ra["bits_per_dim_mean"]
    se = math.sqrt(ra["bits_per_dim_se"] ** 2 + rb["bits_per_dim_se"] ** 2)
    verdict = two_se_verdict(gain, se, min(len(ra["seeds"]), len(rb["seeds"])))
    return {
        "a": a,
        "b": b,
        "gain": gain,
        "se": se,
        "verdict": verdict,
        "time_ratio": ra["train_s_per_step"] / rb["train_s_per_step"],
    }


def bpd_claims(meta: dict) -> list[dict]:
    out = []
    for base in ("elu", "sikf", "softmax"):
        for bias in ("rpb", "rpb2d"):
            c = compare_bpd(meta, f"{base}+{bias}", base)
            if c:
                kind = "causal FastRPB" if bias == "rpb" else "causal 2-d FastRPB"
                who = "causal linear attention" if base != "softmax" else "causal softmax attention"
                out.append({**c, "claim": f"{kind} improves {who}'s bits/dim ({AR_TITLES[base]})"})
    for base in ("elu", "sikf", "softmax"):
        c = compare_bpd(meta, f"{base}+rpb2d", f"{base}+rpb")
        if c:
            out.append({**c, "claim": f"the causal 2-d FastRPB beats the causal 1-d FastRPB ({AR_TITLES[base]})"})
    for bias in ("", "+rpb", "+rpb2d"):
        c = compare_bpd(meta, f"sikf{bias}", f"elu{bias}")
        if c:
            both = {"": "", "+rpb": " (both with causal FastRPB)", "+rpb2d": " (both with causal 2-d FastRPB)"}[bias]
            out.append({**c, "claim": "SIKF vs elu+1 in the causal setting" + both})
    return out


def speed_claims(meta: dict) -> list[dict]:
    out = []
    for bias in ("", "+rpb", "+rpb2d"):
        ref = _gen_rate(meta, f"softmax{bias}")
        for base in ("elu", "sikf"):
            lin = _gen_rate(meta, f"{base}{bias}")
            if ref is None or lin is None:
                continue
            ratio = lin[0] / ref[0]
            word = "faster" if ratio > 1.1 else ("slower" if ratio < 1 / 1.1 else "as fast (within 10 %)")
            out.append(
                {
                    "a": f"{base}{bias}",
                    "b": f"softmax{bias}",
                    "ratio": ratio,
                    "how": lin[1],
                    "a_tps": lin[0],
                    "b_tps": ref[0],
                    "verdict": word,
                }
            )
    return out


def table(runs: list[dict], meta: dict) -> str:
    s = meta["settings"]
    tokens = s["side"] * s["side"]
    lines = [
        (
            "| model | test bits/dim (mean ± s.e.) | seeds | s / training step | sampling tokens/s | "
            "sampling images/s | params |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for v in meta["variants"]:
        r = _row(meta, v)
        if r is None:
            continue
        flag = "" if r["all_finite"] else " (non-finite loss!)"
        rate = _gen_rate(meta, v)
        tps = rate[0] if rate else r["generate_tokens_per_s"]
        lines.append(
            f"| {AR_TITLES.get(v, v)} | {r['bits_per_dim_mean']:.3f} ± {r['bits_per_dim_se']:.3f}{flag} | "
            f"{len(r['seeds'])} | {r['train_s_per_step']:.3f} | {tps:.0f} | {tps / tokens:.2f} | {r['n_params']} |"
        )
    return "\n".join(lines)


def claims_md(meta: dict) -> str:
    lines = ["| claim | bits/dim gained (± s.e.) | verdict | training time ratio |", "|---|---|---|---|"]
    for c in bpd_claims(meta):
        lines.append(
            f"| {c['claim']} ({c['a']} vs {c['b']}) | {c['gain']:+.3f} ± {c['se']:.3f} | {c['verdict']} | "
            f"{c['time_ratio']:.2f} |"
        )
    lines += [
        "",
        "| decoding | tokens/s | softmax tokens/s | speed-up | verdict | measured |",
        "|---|---|---|---|---|---|",
    ]
    for c in speed_claims(meta):
        lines.append(
            f"| {AR_TITLES[c['a']]} vs {AR_TITLES[c['b']]} | {c['a_tps']:.0f} | {c['b_tps']:.0f} | "
            f"{c['ratio']:.2f}x | {c['verdict']} | {c['how']} |"
        )
    return "\n".join(lines)


def in_words(meta: dict) -> list[str]:
    s = meta["settings"]
    tokens = s["side"] * s["side"]
    out = []
    rp = [c for c in bpd_claims(meta) if c["b"] in ("elu", "sikf") and "rpb" in c["a"]]
    if rp:
        out.append(
            "- **FastRPB improves causal linear attention's bits/dim**: "
            + "; ".join(
                f"{AR_TITLES[c['a']]} vs {AR_TITLES[c['b']]}: {c['verdict'].split(' (')[0]} ({c['gain']:+.3f} ± {c['se']:.3f} bits/dim, "
                f"{c['time_ratio']:.2f}x the training time per step)"
                for c in rp
            )
            + "."
        )
    two = [c for c in bpd_claims(meta) if c["a"].endswith("rpb2d") and c["b"].endswith("+rpb")]
    if two:
        out.append(
            "- **The causal 2-d FastRPB (raster order) against the 1-d one**: "
            + "; ".join(
                f"{AR_TITLES[c['b'].split('+')[0]]}: {c['verdict'].split(' (')[0]} ({c['gain']:+.3f} ± {c['se']:.3f} bits/dim "
                f"for the 2-d bias, {c['time_ratio']:.2f}x the training time per step)"
                for c in two
            )
            + "."
        )
    sk = [c for c in bpd_claims(meta) if c["a"].startswith("sikf") and c["b"].startswith("elu")]
    if sk:
        out.append(
            "- **SIKF vs elu+1 in the causal setting**: "
            + "; ".join(
                f"{c['a']} vs {c['b']}: "
                + (
                    "SIKF better"
                    if c["verdict"] == "held"
                    else "elu+1 better"
                    if c["verdict"].startswith("did not")
                    else "no resolved difference"
                )
                + f" ({c['gain']:+.3f} ± {c['se']:.3f} bits/dim for SIKF, {c['time_ratio']:.2f}x the training time per step)"
                for c in sk
            )
            + "."
        )
    sp = speed_claims(meta)
    if sp:
        out.append(
            f"- **Linear decoding vs softmax decoding at {tokens} tokens**: "
            + "; ".join(
                f"{AR_TITLES[c['a']]} {c['verdict']} {'as' if c['verdict'].startswith('as') else 'than'} {AR_TITLES[c['b']]}: {c['ratio']:.2f}x "
                f"({c['a_tps']:.0f} vs {c['b_tps']:.0f} tokens/s)"
                for c in sp
            )
            + "."
        )
    return out


def samples_plot(runs: list[dict], meta: dict, path: Path, test_images=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    s = meta["settings"]
    side, levels = s["side"], s["levels"]
    seed = meta["seeds"][0]
    rows = []
    if test_images is not None:
        rows.append(("test images", np.asarray(test_images)[: s["gen_images"]]))
    for v in meta["variants"]:
        r = next((r for r in runs if r["variant"] == v and r["seed"] == seed), None)
        if r is not None:
            from .ardata import decode_samples

            rows.append((AR_TITLES.get(v, v), decode_samples(r["samples_hex"], levels)))
    cols = max(len(x) for _, x in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.1 * cols + 2.2, 1.15 * len(rows)), squeeze=False)
    for i, (title, imgs) in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if j < len(imgs):
                ax.imshow(imgs[j].reshape(side, side), cmap="gray", vmin=0, vmax=levels - 1, interpolation="nearest")
        axes[i][0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"samples (seed {seed} models, temperature 1, {levels} levels)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def decode_md(decode: dict) -> list[str]:
    from .ardecode import table as decode_table

    rows = decode["rows"]
    parts = []
    for d in dict.fromkeys(r["d_model"] for r in rows):
        rs = sorted((r for r in rows if r["d_model"] == d), key=lambda r: r["position"])
        lo, hi = rs[0], rs[-1]
        parts.append(
            f"width {d}: from {lo['position']} to {hi['position']} tokens the linear step goes from "
            f"{lo['linear_ms_per_token']:.2f} to {hi['linear_ms_per_token']:.2f} ms/token and the softmax cache from "
            f"{lo['softmax_ms_per_token']:.2f} to {hi['softmax_ms_per_token']:.2f} ms/token (linear speed-up "
            f"{lo['speedup']:.1f}x to {hi['speedup']:.1f}x)"
        )
    words = (
        "The attention layer alone (`python -m benchmarks.paper.ardecode`: one layer, batch "
        f"{rows[0]['batch']}, the best of {decode['rounds']} rounds of {decode['reps']} steps; a sampler adds a "
        "fixed cost per token for embeddings, MLPs and sampling): " + "; ".join(parts) + "."
    )
    return ["", decode_table(decode), "", words]


def combine(runs: list[dict], meta: dict, more: list[tuple]) -> tuple[list[dict], dict]:
    """The first sweep with the variants of further sweeps (same settings) added to its runs and summary.

    Each further sweep's generation throughput is its own interleaved measurement.
    """
    import copy

    meta = copy.deepcopy(meta)
    runs = list(runs)
    tim = meta.get("generation_timing")
    for r2, m2, *_ in more:
        if m2["settings"] != meta["settings"]:
            diff = {k: (meta["settings"].get(k), v) for k, v in m2["settings"].items() if meta["settings"].get(k) != v}
            raise ValueError(f"a further autoregressive sweep has other settings than the first: {diff}")
        new = [v for v in m2["variants"] if v not in meta["variants"]]
        meta["variants"] += new
        meta["summary"] += [r for r in m2["summary"] if r["variant"] in new]
        runs += [r for r in r2 if r["variant"] in new]
        t2 = m2.get("generation_timing")
        if tim and t2:
            tim["per_variant"].update({v: t2["per_variant"][v] for v in new if v in t2["per_variant"]})
    return runs, meta


def section(
    runs: list[dict],
    meta: dict,
    *,
    samples_rel: str,
    results_arg: str,
    heading: str = "##",
    decode: dict | None = None,
    more: list[tuple] = (),
) -> str:
    first_variants = list(meta["variants"])
    runs, meta = combine(runs, meta, list(more))
    s = meta["settings"]
    tokens = s["side"] * s["side"]
    m = meta["machine"]
    tim = meta.get("generation_timing")
    partial = ""
    if meta.get("partial"):
        partial = (
            f"**PARTIAL RESULTS**: {len(meta['missing_runs'])} planned run(s) did not finish ("
            + ", ".join(f"{x['variant']}/seed {x['seed']}" for x in meta["missing_runs"][:12])
            + "); the seeds column says how many each row has.\n\n"
        )
    have_2d = any(v.endswith("rpb2d") for v in meta["variants"])
    further = ""
    for _r2, m2, rel2, arg2 in more:
        names = ", ".join(AR_TITLES.get(v, v) for v in m2["variants"] if v not in first_variants)
        code = (
            "the same code"
            if m2["code_digest"] == meta["code_digest"]
            else (
                f"code digest `{m2['code_digest']}` against `{meta['code_digest']}`: the library changed between the sweeps"
            )
        )
        further += (
            f"\n\nThe rows {names} come from a further sweep with the same settings "
            f"(`PYTHONPATH=src:. {m2['command']}`, config hash `{m2['config_hash']}`, {code}; "
            f"{m2['sweep_wall_s'] / 60:.0f} min; raw runs `{arg2}`); their sampling throughput is that sweep's "
            "own interleaved measurement, and their training times were measured under another load of the "
            f"shared machine (compare times across the sweeps with care). Their samples: ![samples, further sweep]({rel2})"
        )
    lines = [
        f"{heading} Autoregressive Fashion-MNIST (causal attention, next-pixel prediction)",
        "",
        partial
        + f"Each image is a sequence of {tokens} pixel tokens in raster order"
        + (
            f" ({28 // s['side']} x {28 // s['side']} average-pooled to {s['side']} x {s['side']})"
            if s["side"] != 28
            else ""
        )
        + f", every pixel quantised to **{s['levels']} intensity levels** (`level = pixel * {s['levels']} // 256`; "
        f"not 8-bit, to keep the CPU cost sane, so bits/dim are not comparable with 8-bit results such as the "
        f"Linear Transformers paper's 0.644 on MNIST; the uniform guess is {math.log2(s['levels']):.0f} bits/dim). "
        f"A causal pre-LayerNorm Transformer (width {s['d_model']}, {s['heads']} heads, {s['layers']} layers, MLP "
        f"{s['d_ff']}, sinusoidal positions, a BOS token in front) predicts every pixel from the earlier ones; "
        f"AdamW lr {s['lr']}, {int(100 * s['warmup'])} % warm-up then linear decay, batch {s['batch']} images, "
        f"{s['steps']} steps, trained on a class-balanced subset of {s['train']} training images; bits/dim on "
        f"{s['test']} test images. Variants: `softmax_attention(causal=True)`, `LinearAttention(feature_map="
        '"elu" | "sikf", causal=True)`, each without and with a causal 1-d FastRPB '
        f"(`FastRPB(heads, {tokens + 1}, causal=True)` over the BOS token and the pixels)"
        + (
            " and the causal 2-d FastRPB in raster order (`rpb_nd(..., causal=True)`)."
            if have_2d
            else ". The causal 2-d FastRPB (raster order, `rpb_nd(..., causal=True)`) is not in this fastrpb yet: "
            "`armodel.py` adds the variants `*+rpb2d` as soon as `rpb_nd` takes `causal`."
        )
        + further,
        "",
        f"Sampling: {s['gen_images']} images per model, pixel by pixel at temperature 1, from the same trained models: "
        "linear attention through the layer's `step` (a fixed-size state per layer), softmax through a key/value "
        "cache (`softmax_attention` of the new query over the cached keys, O(t) per token); "
        + (
            "the causal 1-d FastRPB term streams in both from a state of its own (`rpb_step`, an online FFT "
            "convolution: amortised O(D log² t) per token, never an FFT over the history). "
            if meta.get("decode_bias") == "streaming"
            else "with FastRPB this sweep's decoding recomputed the bias over the value history, O(t log t) per token "
            "(the library's streaming bias came later). "
        )
        + (
            (
                "The causal 2-d FastRPB term streams too, in raster order (`rpb_nd_step`: per-axis running terms, "
                "its amortised cost per token flat in t, as the 1-d step's), so the 2-d rows compare with softmax as "
                "the 1-d rows do. "
                if meta.get("decode_bias_2d") == "streaming"
                else "This sweep's 2-d rows applied `rpb_nd(..., causal=True)` to the whole zero-padded grid at every "
                "token (O(L log L) per token), so their sampling speed says nothing about the 2-d bias itself. "
            )
            if have_2d
            else ""
        )
        + (
            f"Throughput in the tables is the interleaved measurement: the seed-{tim['seed']} models of all variants "
            f"generate in one process, in turn, {tim['rounds']} rounds, best round; the per-run numbers in "
            "`results.json` were taken right after each run's training, next to another training run."
            if tim
            else "Throughput is the median over seeds of the per-run measurement."
        ),
        "",
        (
            f"Command: `PYTHONPATH=src:. {meta['command']}` (config hash `{meta['config_hash']}`, "
            f"{meta['sweep_wall_s'] / 60:.0f} min with {meta['jobs']} worker(s) of {s['threads']} thread; "
            f"load average {meta['loadavg_start'][0]:.1f} at the start and {meta['loadavg_end'][0]:.1f} at the end on "
            f"{m.get('usable_cpus', m.get('affinity_cpus', m.get('cpus')))} cores: times are indicative). Raw runs: `{results_arg}`."
        ),
        "",
        table(runs, meta),
        "",
        f"![samples]({samples_rel})",
        "",
        f"{heading}# Verdicts (causal)",
        "",
        (
            "Bits/dim gained = bits/dim of the second model minus the first (positive: the first is better); a claim "
            "*held* when the gain exceeds two standard errors (from the seeds' spread)."
        ),
        "",
        claims_md(meta),
        "",
        *in_words(meta),
        *(decode_md(decode) if decode else []),
        "",
    ]
    return "\n".join(lines)


def load_dir(out: Path) -> tuple[list[dict], dict, dict | None]:
    """``results.json``, ``sweep.json`` and (if measured) ``decode-scaling.json`` of an output directory."""
    import json

    dec = out / "decode-scaling.json"
    return (
        json.loads((out / "results.json").read_text()),
        json.loads((out / "sweep.json").read_text()),
        json.loads(dec.read_text()) if dec.exists() else None,
    )


def write_outputs(runs: list[dict], meta: dict, out: Path) -> None:
    from .ardata import ARSettings, load
    from .data import DataMissing

    s = ARSettings(**meta["settings"])
    try:
        test = load(s)[1]
    except DataMissing:  # the grid is still useful without the row of test images
        test = None
    samples_plot(runs, meta, out / "samples.png", test)
    dec = load_dir(out)[2] if (out / "results.json").exists() else None
    (out / "results.md").write_text(
        section(runs, meta, samples_rel="samples.png", results_arg=str(out / "results.json"), decode=dec) + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.paper.arreport DIR``: rewrite DIR's results.md and samples.png from its JSON files."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out", type=Path, help="output directory of `python -m benchmarks.paper.autoregressive`")
    a = ap.parse_args(argv)
    runs, meta, _ = load_dir(a.out)
    write_outputs(runs, meta, a.out)
    print(f"wrote {a.out / 'results.md'} and {a.out / 'samples.png'}")


if __name__ == "__main__":
    main()
