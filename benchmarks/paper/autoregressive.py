"""Autoregressive Fashion-MNIST: next-pixel prediction with causal attention.

``python -m benchmarks.paper.autoregressive [--quick] [--seeds N] [--steps N] [--out DIR]``

Every image is a sequence of ``side * side`` pixel tokens in raster order (784 for the
full 28 x 28), each pixel quantised to ``levels`` intensity levels
(``level = pixel * levels // 256``); a causal Transformer (``armodel.py``) predicts each
pixel from the earlier ones. For every variant and seed this trains one model and
reports, from that same model:

* ``bits_per_dim``: the test negative log-likelihood in bits per pixel (of the
  quantised image: at most ``log2(levels)``, the uniform guess);
* ``train_s_per_step``: median wall time of one optimiser step;
* ``generate_tokens_per_s`` / ``generate_images_per_s``: sampling ``gen_images`` images
  pixel by pixel with the decoding path (linear attention: the layer's ``step``, O(1)
  per token; softmax: a key/value cache, O(t) per token), timed over the whole image;
* the sampled images (the page draws them as a grid).

Per-run results land in ``OUT/runs/<config hash>/<variant>/seed<k>.json`` (a restart
reuses the finished runs of the same settings and code); ``OUT/results.json`` is the
list of runs, ``OUT/sweep.json`` the settings, machine, versions and the per-variant
summary, ``OUT/samples.png`` the image grid and ``OUT/results.md`` the page section.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .ardata import FULL, QUICK, ARSettings, decode_samples, encode_samples, load, quantise

__all__ = ["FULL", "QUICK", "ARSettings", "decode_samples", "encode_samples", "load", "quantise", "sweep", "main"]


def code_digest() -> str:
    here = Path(__file__).resolve().parent
    lib = Path(__import__("fastrpb").__file__).resolve().parent
    files = [
        *sorted(lib.rglob("*.py")),
        here / "ardata.py",
        here / "armodel.py",
        here / "model.py",
        here / "autoregressive.py",
    ]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def config_hash(s: ARSettings, code: str) -> str:
    return hashlib.sha256(json.dumps({"settings": s.hashed(), "code": code}, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- one run
def build(variant: str, seed: int, s: ARSettings):
    from .armodel import PixelTransformer

    return PixelTransformer(
        levels=s.levels,
        grid=(s.side, s.side),
        d=s.d_model,
        heads=s.heads,
        layers=s.layers,
        d_ff=s.d_ff,
        variant=variant,
        chunk_size=s.chunk_size,
        seed=seed,
    )


def _lr(step: int, s: ARSettings) -> float:
    warm = max(1, int(s.warmup * s.steps))
    if step < warm:
        return s.lr * (step + 1) / warm
    return s.lr * max(0.0, (s.steps - step) / max(1, s.steps - warm))


def bits_per_dim(model, x: np.ndarray, s: ARSettings) -> float:
    """Mean negative log2-likelihood per pixel over the images ``x``."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x), s.eval_batch):
            px = torch.from_numpy(x[i : i + s.eval_batch])
            logits = model(px)
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, s.levels), px.reshape(-1), reduction="sum")
            total += float(nll)
            count += px.numel()
    model.train()
    return total / count / math.log(2.0)


def generate(model, s: ARSettings, seed: int) -> tuple[np.ndarray, float]:
    """Sample ``s.gen_images`` images with the decoding path; return them and the wall time."""
    import torch

    g = torch.Generator().manual_seed(10_000 + seed)
    model.eval()
    t0 = time.perf_counter()
    out = model.sample(s.gen_images, generator=g)
    dt = time.perf_counter() - t0
    model.train()
    return out.numpy(), dt


def train_one(
    xtr: np.ndarray,
    xte: np.ndarray,
    variant: str,
    seed: int,
    s: ARSettings,
    *,
    progress=None,
    state_path: Path | None = None,
) -> dict:
    import torch

    torch.set_num_threads(s.threads)
    torch.manual_seed(seed)
    model = build(variant, seed, s)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(len(xtr)), 0
    losses, times = [], []
    finite = True
    for step in range(s.steps):
        if pos + s.batch > len(order):
            order, pos = rng.permutation(len(xtr)), 0
        px = torch.from_numpy(xtr[order[pos : pos + s.batch]])
        pos += s.batch
        for grp in opt.param_groups:
            grp["lr"] = _lr(step, s)
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(px).reshape(-1, s.levels), px.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip)
        opt.step()
        times.append(time.perf_counter() - t0)
        lv = float(loss.detach()) / math.log(2.0)
        finite = finite and math.isfinite(lv)
        losses.append(lv)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(bpd=f"{lv:.3f}", refresh=False)
    t0 = time.perf_counter()
    bpd = bits_per_dim(model, xte, s)
    eval_s = time.perf_counter() - t0
    samples, gen_s = generate(model, s, seed)
    tokens = samples.size
    if state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), state_path)
    skip = min(5, max(0, len(times) - 1))
    return {
        "variant": variant,
        "seed": seed,
        "bits_per_dim": bpd,
        "train_s_per_step": float(np.median(times[skip:])),
        "generate_tokens_per_s": tokens / gen_s,
        "generate_images_per_s": samples.shape[0] / gen_s,
        "generate_s": gen_s,
        "generate_images": int(samples.shape[0]),
        "tokens_per_image": int(samples.shape[1]),
        "levels": s.levels,
        "train_bits_per_dim": losses,
        "loss_finite": finite,
        "eval_s": eval_s,
        "n_params": sum(p.numel() for p in model.parameters()),
        "samples_hex": encode_samples(samples, s.levels),
        "threads": s.threads,
        "loadavg": os.getloadavg(),
    }


def interleaved_generation(out: Path, h: str, variants: list[str], s: ARSettings, *, seed: int, rounds: int) -> dict:
    """Generation throughput of the trained seed-``seed`` models, variant after variant, ``rounds`` times; the best round.

    The per-run numbers are measured while another run trains beside them on a shared
    machine; here every model generates in one process, in turn, so the ratios compare.
    """
    import torch

    torch.set_num_threads(s.threads)
    models = {}
    for v in variants:
        m = build(v, seed, s)
        m.load_state_dict(torch.load(run_path(out, h, v, seed).with_suffix(".pt")))
        models[v] = m
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            times[v].append(generate(models[v], s, seed)[1])
    tokens = s.gen_images * s.side * s.side
    return {
        "seed": seed,
        "rounds": rounds,
        "images": s.gen_images,
        "tokens": tokens,
        "per_variant": {
            v: {"best_s": min(t), "all_s": t, "tokens_per_s": tokens / min(t), "images_per_s": s.gen_images / min(t)}
            for v, t in times.items()
        },
    }


# ----------------------------------------------------------------------------- sweep
def run_path(out: Path, h: str, variant: str, seed: int) -> Path:
    return out / "runs" / h / variant.replace("+", "_") / f"seed{seed}.json"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _worker(args) -> str:
    xtr, xte, variant, seed, s, h, path = args
    from tqdm import tqdm

    try:
        with tqdm(
            total=s.steps,
            desc=f"ar {variant:14s} seed {seed}",
            leave=True,
            dynamic_ncols=True,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
            file=sys.stderr,
        ) as bar:
            res = train_one(xtr, xte, variant, seed, s, progress=bar, state_path=Path(path).with_suffix(".pt"))
        res["config_hash"] = h
        _atomic_write(Path(path), json.dumps(res))
        return ""
    except BaseException:
        return f"{variant} seed {seed}:\n{traceback.format_exc()}"


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for v in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == v]
        b = np.array([r["bits_per_dim"] for r in rs])
        n = len(b)
        rows.append(
            {
                "variant": v,
                "seeds": sorted(r["seed"] for r in rs),
                "bits_per_dim_mean": float(b.mean()),
                "bits_per_dim_std": float(b.std(ddof=1)) if n > 1 else 0.0,
                "bits_per_dim_se": float(b.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
                "train_s_per_step": float(np.median([r["train_s_per_step"] for r in rs])),
                "generate_tokens_per_s": float(np.median([r["generate_tokens_per_s"] for r in rs])),
                "generate_images_per_s": float(np.median([r["generate_images_per_s"] for r in rs])),
                "n_params": rs[0]["n_params"],
                "all_finite": all(r["loss_finite"] for r in rs),
            }
        )
    return rows


def sweep(
    *,
    s: ARSettings,
    variants: list[str],
    seeds: list[int],
    out: Path,
    jobs: int,
    command: str,
    partial: bool = False,
    timing_rounds: int = 2,
    log=print,
) -> dict:
    import multiprocessing as mp

    from ..environment import machine, versions
    from . import arreport

    code = code_digest()
    h = config_hash(s, code)
    log(f"autoregressive: config hash {h}; per-run results in {out / 'runs' / h}")
    t_all = time.perf_counter()
    load0 = os.getloadavg()
    xtr, xte = load(s)
    todo = [
        (xtr, xte, v, sd, s, h, str(run_path(out, h, v, sd)))
        for sd in seeds
        for v in variants
        if not run_path(out, h, v, sd).exists()
    ]
    if len(todo) < len(variants) * len(seeds):
        log(f"autoregressive: reusing {len(variants) * len(seeds) - len(todo)} finished run(s)")
    # the slowest models (softmax) first within each seed, so the two workers end together
    todo.sort(key=lambda t: (t[3], not t[2].startswith("softmax")))
    if todo and not partial:
        from .train import warm_imports

        warm_imports()
        with mp.get_context("fork").Pool(jobs, maxtasksperchild=1) as pool:
            errors = [e for e in pool.imap(_worker, todo) if e]
        if errors:
            raise RuntimeError(f"{len(errors)} autoregressive run(s) failed; first: {errors[0]}")
    runs, missing = [], []
    for sd in seeds:
        for v in variants:
            p = run_path(out, h, v, sd)
            if p.exists():
                runs.append(json.loads(p.read_text()))
            else:
                missing.append({"variant": v, "seed": sd})
    if missing and not partial:
        raise RuntimeError(f"{len(missing)} run(s) have no result: {missing[:3]}")
    if not runs:
        raise RuntimeError(f"no finished runs of configuration {h} in {out / 'runs' / h}")
    timing = None
    tseed = seeds[0]
    tpath = out / "runs" / h / f"generation-timing-seed{tseed}-{'_'.join(v.replace('+', '_') for v in variants)}.json"
    have = all(run_path(out, h, v, tseed).with_suffix(".pt").exists() for v in variants)
    if tpath.exists():
        timing = json.loads(tpath.read_text())
    elif timing_rounds > 0 and have and not partial:
        log(f"autoregressive: interleaved generation timing, {len(variants)} models, {timing_rounds} rounds")
        timing = interleaved_generation(out, h, variants, s, seed=tseed, rounds=timing_rounds)
        _atomic_write(tpath, json.dumps(timing))
    meta = {
        "config_hash": h,
        "code_digest": code,
        "command": command,
        "settings": dataclasses.asdict(s),
        "variants": variants,
        "seeds": seeds,
        "jobs": jobs,
        "versions": versions(),
        "machine": machine(),
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
        "sweep_wall_s": time.perf_counter() - t_all,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "partial": bool(missing),
        "missing_runs": missing,
        "generation_timing": timing,
        "summary": summarise(runs),
        # how the sampling loop adds the 1-d bias: "streaming" = rpb_step from the state (every
        # variant); sweeps before it recomputed the bias over the value history per token
        "decode_bias": "streaming",
        # how it adds the causal 2-d bias: "streaming" = rpb_nd_step from the state; sweeps before it
        # reapplied rpb_nd(..., causal=True) to the whole zero-padded grid per token
        "decode_bias_2d": "streaming",
    }
    _atomic_write(out / "results.json", json.dumps(runs))
    _atomic_write(out / "sweep.json", json.dumps(meta, indent=1))
    arreport.write_outputs(runs, meta, out)
    log(f"wrote {out / 'results.json'}, {out / 'sweep.json'}, {out / 'samples.png'}, {out / 'results.md'}")
    return {"runs": runs, "meta": meta}


def main(argv: list[str] | None = None) -> int:
    import shlex

    from .armodel import AR_VARIANTS, default_variants

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.paper.autoregressive",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="7 x 7 images, 4 levels, 20 steps: seconds, not a result")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --quick: 2)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--levels", type=int, default=None, help="intensity levels per pixel (default 16)")
    ap.add_argument(
        "--variants", nargs="+", choices=AR_VARIANTS, default=None, help="default: every variant this fastrpb supports"
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument(
        "--timing-rounds", type=int, default=2, help="rounds of the interleaved generation timing (0: none)"
    )
    ap.add_argument("--report-partial", action="store_true", help="train nothing; report the finished runs")
    a = ap.parse_args(argv)
    s = QUICK if a.quick else FULL
    if a.steps is not None:
        s = dataclasses.replace(s, steps=a.steps)
    if a.levels is not None:
        s = dataclasses.replace(s, levels=a.levels)
    seeds = list(range(a.seeds if a.seeds is not None else (2 if a.quick else 3)))
    variants = list(a.variants or default_variants())
    out = a.out or Path("paper-ar-results-quick" if a.quick else "paper-ar-results")
    from .data import DataMissing

    try:
        for v in variants:  # a clear error before any training, e.g. a 2-d variant without causal rpb_nd
            from .armodel import ARVariant

            ARVariant.parse(v)
        sweep(
            s=s,
            variants=variants,
            seeds=seeds,
            out=out,
            jobs=a.jobs,
            partial=a.report_partial,
            timing_rounds=a.timing_rounds,
            command="python -m benchmarks.paper.autoregressive "
            + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])),
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except (DataMissing, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
