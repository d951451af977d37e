"""Multi-query associative recall (MQAR) across every feature map, with and without FastRPB.

``python -m benchmarks.paper.mqar [--quick] [--seeds N] [--lengths L ...] [--steps N] [--out DIR]``

The task, built the Zoology way (Arora et al. 2023, "Zoology: measuring and improving
recall in efficient language models") and written here from its definition: a vocabulary
split into keys ``[1, V/2)`` and values ``[V/2, V)``; a sequence starts with
``num_kv_pairs`` key-value pairs ``k_1 v_1 k_2 v_2 ...`` (distinct keys, values drawn with
replacement); the rest of the sequence is filler tokens (``0``) in which every key is
asked once, at random later positions. A causal model reads the sequence and must
predict, at each query key, the value that followed that key in the context. The score
is the accuracy of those predictions (one per key-value pair; chance is ``2 / V``).

Every model is the same small causal Transformer (``armodel.Block``: pre-LayerNorm,
sinusoidal positions); only the attention differs:

* ``softmax``: ``fastrpb.softmax_attention(causal=True)`` (``armodel.FunctionalCausalAttention``);
* ``elu``, ``relu``, ``sikf``, ``dpfp``, ``favor``, ``taylor``, ``hedgehog``: the layer
  ``fastrpb.torch.LinearAttention(feature_map=..., causal=True)``; ``favor`` with a fixed
  random projection of ``2 * head_dim`` rows, ``hedgehog`` with its trained ``W``;
* ``<map>+rpb``: the same layer with a causal 1-d ``fastrpb.torch.FastRPB`` over the whole sequence.

Runs go seed by seed (every variant and length of seed 0, then seed 1, ...), and each
finished run is appended to ``OUT/results.json`` at once (written atomically), so a
sweep cut short still leaves every finished run; a restart with the same settings and
code skips the runs already there. ``OUT/sweep.json`` holds the settings, command,
machine and versions; ``OUT/results.md`` and ``OUT/accuracy.png`` the page section.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FEATURE_MAPS = ("elu", "relu", "sikf", "dpfp", "favor", "taylor", "hedgehog")
MQAR_VARIANTS = ("softmax", *FEATURE_MAPS, *(f"{m}+rpb" for m in FEATURE_MAPS))
FILLER = 0


@dataclass(frozen=True)
class MQARSettings:
    # --- task
    vocab: int = 64  # keys [1, vocab/2), values [vocab/2, vocab), 0 = filler
    num_kv_pairs: int = 8
    test: int = 256  # fixed test sequences per length
    data_seed: int = 1234
    # --- model (identical for every variant)
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    d_ff: int = 128
    chunk_size: int = 64
    short_conv: int = 3  # kernel of the causal depthwise convolution before each attention (0: none)
    # --- optimisation (identical for every variant)
    steps: int = 300
    batch: int = 16  # fresh sequences every step
    lr: float = 3e-3
    warmup: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0
    long_from: int = 512  # runs of this length or longer train with the two settings below
    long_steps: int = 150
    long_batch: int = 4
    eval_batch: int = 64
    # --- execution (does not change results, so not hashed)
    threads: int = 1

    UNHASHED = ("threads",)

    def hashed(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.UNHASHED}


FULL = MQARSettings()
QUICK = MQARSettings(
    vocab=16,
    num_kv_pairs=3,
    test=16,
    d_model=16,
    heads=2,
    layers=1,
    d_ff=32,
    chunk_size=16,
    steps=3,
    batch=4,
    long_from=32,
    long_steps=2,
    long_batch=2,
    eval_batch=16,
)


# ----------------------------------------------------------------------------- data
def generate(
    n: int, seq_len: int, num_kv_pairs: int, vocab: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` MQAR sequences: ``tokens (n, seq_len)`` and ``targets (n, seq_len)``.

    ``targets[i, t]`` is the value the model must predict at token ``t`` (a query key),
    ``-1`` elsewhere. Every key of the context is queried once, in random order, at
    distinct random positions after the context.
    """
    half = vocab // 2
    if num_kv_pairs < 1 or num_kv_pairs > half - 1:
        raise ValueError(f"num_kv_pairs must be in [1, {half - 1}] for vocab {vocab}, got {num_kv_pairs}")
    context = 2 * num_kv_pairs
    if seq_len < context + num_kv_pairs:
        raise ValueError(f"seq_len must be at least 3 * num_kv_pairs = {context + num_kv_pairs}, got {seq_len}")
    tokens = np.full((n, seq_len), FILLER, dtype=np.int64)
    targets = np.full((n, seq_len), -1, dtype=np.int64)
    rows = np.arange(n)[:, None]
    keys = np.argsort(rng.random((n, half - 1)), axis=1)[:, :num_kv_pairs] + 1  # distinct, in [1, half)
    values = rng.integers(half, vocab, size=(n, num_kv_pairs))
    tokens[:, 0:context:2] = keys
    tokens[:, 1:context:2] = values
    # query positions: distinct, uniformly among the positions after the context
    where = np.sort(np.argsort(rng.random((n, seq_len - context)), axis=1)[:, :num_kv_pairs], axis=1) + context
    order = np.argsort(rng.random((n, num_kv_pairs)), axis=1)  # which pair each query asks
    tokens[rows, where] = keys[rows, order]
    targets[rows, where] = values[rows, order]
    return tokens, targets


def test_set(seq_len: int, s: MQARSettings) -> tuple[np.ndarray, np.ndarray]:
    return generate(s.test, seq_len, s.num_kv_pairs, s.vocab, np.random.default_rng([s.data_seed, seq_len]))


# ----------------------------------------------------------------------------- model
def build(variant: str, seq_len: int, seed: int, s: MQARSettings):
    """The causal Transformer for ``variant`` (seeded: same initialisation for the same seed)."""
    import torch
    from torch import nn

    from fastrpb import feature_maps as fm
    from fastrpb.torch import FastRPB, LinearAttention

    from .armodel import ARVariant, Block, FunctionalCausalAttention
    from .model import sinusoidal

    if variant not in MQAR_VARIANTS:
        raise ValueError(f"unknown MQAR variant {variant!r}; known: {', '.join(MQAR_VARIANTS)}")
    base, _, bias = variant.partition("+")
    dh = s.d_model // s.heads

    def attention(i: int) -> nn.Module:
        if base == "softmax":
            return FunctionalCausalAttention(
                s.d_model,
                s.heads,
                ARVariant("softmax", "softmax", None),
                length=seq_len,
                grid=(1, seq_len),
                chunk_size=s.chunk_size,
                seed=seed,
            )
        feature = base
        if base == "favor":  # a fixed random projection, drawn from the run's seed and the layer
            feature = fm.favor(fm.random_projection(2 * dh, dh, seed=seed * 1000 + i, like=torch.empty(0)))
        rpb = FastRPB(s.heads, seq_len, causal=True, seed=seed * 1000 + 17 * i) if bias else None
        return LinearAttention(s.d_model, s.heads, feature_map=feature, rpb=rpb, causal=True, chunk_size=s.chunk_size)

    class ShortConv(nn.Module):
        """``x + conv(ln(x))``: a causal depthwise convolution over the last ``short_conv`` tokens."""

        def __init__(self) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(s.d_model)
            self.conv = nn.Conv1d(s.d_model, s.d_model, s.short_conv, groups=s.d_model, padding=s.short_conv - 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(self.ln(x).transpose(1, 2))[..., : x.shape[1]]  # the left padding keeps it causal
            return x + y.transpose(1, 2)

    class Recall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(s.vocab, s.d_model)
            self.register_buffer("pos", sinusoidal(seq_len, s.d_model), persistent=False)
            self.blocks = nn.ModuleList(
                [
                    nn.Sequential(*([ShortConv()] if s.short_conv else []), Block(s.d_model, s.d_ff, attention(i)))
                    for i in range(s.layers)
                ]
            )
            self.ln = nn.LayerNorm(s.d_model)
            self.head = nn.Linear(s.d_model, s.vocab)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.embed(tokens) + self.pos[: tokens.shape[1]]
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.ln(x))

    torch.manual_seed(seed)
    return Recall()


# ----------------------------------------------------------------------------- one run
def _lr(step: int, s: MQARSettings) -> float:
    warm = max(1, int(s.warmup * s.steps))
    if step < warm:
        return s.lr * (step + 1) / warm
    return s.lr * max(0.0, (s.steps - step) / max(1, s.steps - warm))


def accuracy(model, tokens: np.ndarray, targets: np.ndarray, s: MQARSettings) -> float:
    """Fraction of the queries whose most likely next token is the right value."""
    import torch

    right = total = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(tokens), s.eval_batch):
            logits = model(torch.from_numpy(tokens[i : i + s.eval_batch]))
            y = torch.from_numpy(targets[i : i + s.eval_batch])
            asked = y >= 0
            right += int((logits.argmax(-1)[asked] == y[asked]).sum())
            total += int(asked.sum())
    model.train()
    return right / total


def steps_batch(s: MQARSettings, seq_len: int) -> tuple[int, int]:
    """Training steps and sequences per step at ``seq_len`` (long sequences: fewer, smaller steps)."""
    return (s.long_steps, s.long_batch) if seq_len >= s.long_from else (s.steps, s.batch)


def train_one(variant: str, seq_len: int, seed: int, s: MQARSettings) -> dict:
    import torch

    steps, batch = steps_batch(s, seq_len)
    s = dataclasses.replace(s, steps=steps, batch=batch)  # the learning-rate schedule follows the run's steps

    torch.set_num_threads(s.threads)
    model = build(variant, seq_len, seed, s)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    rng = np.random.default_rng([seed, seq_len, 7])
    losses, times = [], []
    finite = True
    t_run = time.perf_counter()
    for step in range(s.steps):
        x, y = (torch.from_numpy(a) for a in generate(s.batch, seq_len, s.num_kv_pairs, s.vocab, rng))
        for grp in opt.param_groups:
            grp["lr"] = _lr(step, s)
        t0 = time.perf_counter()
        logits = model(x)
        asked = y >= 0
        loss = torch.nn.functional.cross_entropy(logits[asked], y[asked])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip)
        opt.step()
        times.append(time.perf_counter() - t0)
        lv = float(loss.detach())
        finite = finite and math.isfinite(lv)
        losses.append(lv)
    train_s = time.perf_counter() - t_run
    acc = accuracy(model, *test_set(seq_len, s), s)
    skip = min(5, max(0, len(times) - 1))  # the first steps include one-off allocations
    return {
        "variant": variant,
        "seed": seed,
        "seq_len": seq_len,
        "num_kv_pairs": s.num_kv_pairs,
        "accuracy": acc,
        "train_s_per_step": float(np.median(times[skip:])),
        "train_s": train_s,
        "steps": s.steps,
        "n_test_queries": s.test * s.num_kv_pairs,
        "loss": [round(v, 4) for v in losses],
        "loss_finite": finite,
        "n_params": sum(p.numel() for p in model.parameters()),
        "threads": s.threads,
        "loadavg": list(os.getloadavg()),
    }


# ----------------------------------------------------------------------------- sweep
def code_digest() -> str:
    here = Path(__file__).resolve().parent
    lib = Path(__import__("fastrpb").__file__).resolve().parent
    files = [*sorted(lib.rglob("*.py")), here / "armodel.py", here / "model.py", here / "mqar.py"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def config_hash(s: MQARSettings, code: str) -> str:
    return hashlib.sha256(json.dumps({"settings": s.hashed(), "code": code}, sort_keys=True).encode()).hexdigest()[:12]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def plan(variants: list[str], lengths: list[int], seeds: list[int]) -> list[tuple[str, int, int]]:
    """Seed by seed, so that a sweep cut short has whole seeds; within a seed the short length first."""
    return [(v, L, sd) for sd in seeds for L in sorted(lengths) for v in variants]


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for v, L in dict.fromkeys((r["variant"], r["seq_len"]) for r in runs):
        rs = [r for r in runs if r["variant"] == v and r["seq_len"] == L]
        a = np.array([r["accuracy"] for r in rs])
        n = len(a)
        rows.append(
            {
                "variant": v,
                "seq_len": L,
                "num_kv_pairs": rs[0]["num_kv_pairs"],
                "seeds": sorted(r["seed"] for r in rs),
                "accuracy_mean": float(a.mean()),
                "accuracy_std": float(a.std(ddof=1)) if n > 1 else 0.0,
                "accuracy_se": float(a.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
                "train_s_per_step": float(np.median([r["train_s_per_step"] for r in rs])),
                "n_params": rs[0]["n_params"],
                "all_finite": all(r["loss_finite"] for r in rs),
            }
        )
    return rows


def sweep(
    *,
    s: MQARSettings,
    variants: list[str],
    lengths: list[int],
    seeds: list[int],
    out: Path,
    command: str,
    deadline: float | None = None,
    log=print,
) -> dict:
    """Train every (variant, length, seed) not yet in ``out/results.json``; append each as it finishes.

    ``deadline`` (a ``time.time()``): start no run after it; the report then says which runs are missing.
    """
    from ..environment import machine, versions
    from . import mqarreport

    code = code_digest()
    h = config_hash(s, code)
    res_path = out / "results.json"
    runs: list[dict] = json.loads(res_path.read_text()) if res_path.exists() else []
    other = {r.get("config_hash") for r in runs} - {h}
    if other:
        raise ValueError(
            f"{res_path} holds runs of another configuration (hash {', '.join(map(str, other))}); "
            f"this one is {h}: use another --out"
        )
    done = {(r["variant"], r["seq_len"], r["seed"]) for r in runs}
    todo = [t for t in plan(variants, lengths, seeds) if t not in done]
    log(f"mqar: config hash {h}; {len(done)} run(s) already in {res_path}, {len(todo)} to train")
    t_all = time.perf_counter()
    load0 = list(os.getloadavg())
    meta = {
        "config_hash": h,
        "code_digest": code,
        "command": command,
        "settings": dataclasses.asdict(s),
        "variants": variants,
        "lengths": sorted(lengths),
        "seeds": seeds,
        "versions": versions(),
        "machine": machine(),
        "loadavg_start": load0,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _atomic_write(out / "sweep.json", json.dumps({**meta, "finished": False}, indent=1))
    failures = []
    for i, (v, L, sd) in enumerate(todo):
        if deadline is not None and time.time() > deadline:
            log(f"mqar: deadline reached; {len(todo) - i} run(s) not started")
            break
        try:
            r = train_one(v, L, sd, s)
        except Exception:
            failures.append(f"{v} L={L} seed {sd}:\n{traceback.format_exc()}")
            log("FAILED " + failures[-1])
            continue
        r["config_hash"] = h
        runs.append(r)
        _atomic_write(res_path, json.dumps(runs, indent=0))
        log(
            f"mqar [{i + 1}/{len(todo)}] {v:14s} L={L:5d} seed {sd}: accuracy {r['accuracy']:.3f}, "
            f"{r['train_s_per_step'] * 1e3:.0f} ms/step, {r['train_s']:.0f} s"
        )
    missing = [
        {"variant": v, "seq_len": L, "seed": sd}
        for v, L, sd in plan(variants, lengths, seeds)
        if (v, L, sd) not in {(r["variant"], r["seq_len"], r["seed"]) for r in runs}
    ]
    meta.update(
        {
            "finished": True,
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sweep_wall_s": time.perf_counter() - t_all,
            "loadavg_end": list(os.getloadavg()),
            "partial": bool(missing),
            "missing_runs": missing,
            "summary": summarise(runs) if runs else [],
        }
    )
    _atomic_write(out / "sweep.json", json.dumps(meta, indent=1))
    if runs:
        mqarreport.write_outputs(runs, meta, out)
    if failures:
        raise RuntimeError(f"{len(failures)} MQAR run(s) failed; first: {failures[0]}")
    return {"runs": runs, "meta": meta}


def main(argv: list[str] | None = None) -> int:
    import shlex

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.paper.mqar",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 3 steps: seconds, not a result")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --quick: 1)")
    ap.add_argument(
        "--lengths", type=int, nargs="+", default=None, help="sequence lengths (default 64 1024; --quick: 24 40)"
    )
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--variants", nargs="+", choices=MQAR_VARIANTS, default=list(MQAR_VARIANTS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    ap.add_argument(
        "--deadline-min",
        type=float,
        default=None,
        help="start no run after this many minutes (the missing runs are reported)",
    )
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    s = QUICK if a.quick else FULL
    for field in ("steps", "batch", "threads"):
        if getattr(a, field) is not None:
            if getattr(a, field) < 1:
                ap.error(f"--{field} must be >= 1")
            s = dataclasses.replace(s, **{field: getattr(a, field)})
    seeds = list(range(a.seeds if a.seeds is not None else (1 if a.quick else 3)))
    lengths = a.lengths or ([24, 40] if a.quick else [64, 1024])
    out = a.out or Path("paper-mqar-results-quick" if a.quick else "paper-mqar-results")
    deadline = time.time() + 60 * a.deadline_min if a.deadline_min is not None else None
    try:
        for L in lengths:
            generate(1, L, s.num_kv_pairs, s.vocab, np.random.default_rng(0))  # bad sizes fail before training
        sweep(
            s=s,
            variants=list(a.variants),
            lengths=lengths,
            seeds=seeds,
            out=out,
            deadline=deadline,
            command="python -m benchmarks.paper.mqar "
            + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])),
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
