"""Multi-query associative recall (MQAR) across every feature map, with and without FastRPB.

``python -m benchmarks.paper.mqar [--quick] [--seeds N] [--lengths L ...] [--steps N] [--deadline-min M] [--out DIR]``

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

Each model is built for the longest length and learns the lengths in turn, shortest
first, with one optimiser and one learning-rate schedule (Zoology, too, trains one model
on several lengths): a few hundred steps at the short length, then a short phase at each
longer one, which is where a step costs the most. Every length is tested with the final
model; the JSON holds one record per (variant, seed, length).

Models go seed by seed (every variant of seed 0, then seed 1, ...), and each finished
model's records are appended to ``OUT/results.json`` at once (written atomically), so a
sweep cut short still leaves every finished run; a restart with the same settings and
code skips the models already there. ``OUT/sweep.json`` holds the settings, command,
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

from .mqarruns import MQAR_VARIANTS, missing_runs, plan, summarise

FILLER = 0


@dataclass(frozen=True)
class MQARSettings:
    # --- task
    lengths: tuple[int, ...] = (64, 1024)  # trained in this order, one model per (variant, seed)
    vocab: int = 32  # keys [1, vocab/2), values [vocab/2, vocab), 0 = filler
    num_kv_pairs: int = 4
    test: int = 128  # fixed test sequences at the shortest length
    long_test: int = 64  # fixed test sequences at each longer length
    data_seed: int = 1234
    # --- model (identical for every variant)
    d_model: int = 32
    heads: int = 2
    layers: int = 2
    d_ff: int = 64
    chunk_size: int = 64
    short_conv: int = 3  # kernel of the causal depthwise convolution before each attention (0: none)
    # --- optimisation (identical for every variant)
    steps: int = 300  # at the shortest length
    batch: int = 8  # fresh sequences every step
    long_steps: int = 60  # then at each longer length, the same model and optimiser
    long_batch: int = 2
    lr: float = 1e-2
    warmup: float = 0.1  # one schedule over all the steps: warm-up, then linear decay to 0
    weight_decay: float = 0.01
    clip: float = 1.0
    eval_batch: int = 32
    # --- execution (does not change results, so not hashed)
    threads: int = 1

    UNHASHED = ("threads",)

    def hashed(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.UNHASHED}

    def phases(self) -> list[tuple[int, int, int]]:
        """``(seq_len, steps, batch)`` in training order: the shortest length first."""
        first, *rest = sorted(self.lengths)
        return [(first, self.steps, self.batch)] + [(L, self.long_steps, self.long_batch) for L in rest]


FULL = MQARSettings()
QUICK = MQARSettings(
    lengths=(24, 40),
    vocab=16,
    num_kv_pairs=3,
    test=16,
    long_test=8,
    d_model=16,
    heads=2,
    layers=1,
    d_ff=32,
    chunk_size=16,
    steps=3,
    batch=4,
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
    """The fixed test sequences of one length (the same for every variant and seed)."""
    n = s.test if seq_len == min(s.lengths) else s.long_test
    return generate(n, seq_len, s.num_kv_pairs, s.vocab, np.random.default_rng([s.data_seed, seq_len]))


# ----------------------------------------------------------------------------- model
def build(variant: str, seq_len: int, seed: int, s: MQARSettings):
    """The causal Transformer for ``variant``, for sequences of up to ``seq_len`` tokens (seeded)."""
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
def _lr(step: int, total: int, s: MQARSettings) -> float:
    warm = max(1, int(s.warmup * total))
    if step < warm:
        return s.lr * (step + 1) / warm
    return s.lr * max(0.0, (total - step) / max(1, total - warm))


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


def train_one(variant: str, seed: int, s: MQARSettings) -> list[dict]:
    """Train one model through the phases of ``s`` (shortest length first); one record per length.

    Each record's ``accuracy`` is measured on that length's test set after all the
    training; ``accuracy_after_phase`` right after the phase at that length;
    ``train_s_per_step`` is the median step time of that phase.
    """
    import torch

    torch.set_num_threads(s.threads)
    phases = s.phases()
    total = sum(n for _, n, _ in phases)
    model = build(variant, max(s.lengths), seed, s)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    rng = np.random.default_rng([seed, 7])
    step = 0
    records = []
    finite = True
    for L, n_steps, batch in phases:
        losses, times = [], []
        t_phase = time.perf_counter()
        for _ in range(n_steps):
            x, y = (torch.from_numpy(a) for a in generate(batch, L, s.num_kv_pairs, s.vocab, rng))
            for grp in opt.param_groups:
                grp["lr"] = _lr(step, total, s)
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
            step += 1
        train_s = time.perf_counter() - t_phase
        t0 = time.perf_counter()
        acc = accuracy(model, *test_set(L, s), s)
        skip = min(5, max(0, len(times) - 1))  # the first steps include one-off allocations
        records.append(
            {
                "variant": variant,
                "seed": seed,
                "seq_len": L,
                "num_kv_pairs": s.num_kv_pairs,
                "accuracy_after_phase": acc,
                "train_s_per_step": float(np.median(times[skip:])),
                "train_s": train_s,
                "eval_s": time.perf_counter() - t0,
                "steps": n_steps,
                "batch": batch,
                "n_test_queries": len(test_set(L, s)[0]) * s.num_kv_pairs,
                "loss": [round(v, 4) for v in losses],
            }
        )
    for r in records:  # every length again with the final model (the last phase's is already measured)
        r["accuracy"] = (
            r["accuracy_after_phase"] if r is records[-1] else accuracy(model, *test_set(r["seq_len"], s), s)
        )
        r.update(
            loss_finite=finite,
            n_params=sum(p.numel() for p in model.parameters()),
            threads=s.threads,
            loadavg=list(os.getloadavg()),
        )
    return records


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


def sweep(
    *,
    s: MQARSettings,
    variants: list[str],
    seeds: list[int],
    out: Path,
    command: str,
    deadline: float | None = None,
    log=print,
) -> dict:
    """Train every (variant, seed) not yet in ``out/results.json``; append its records as it finishes.

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
    done = {(r["variant"], r["seed"]) for r in runs}
    todo = [t for t in plan(variants, seeds) if t not in done]
    log(f"mqar: config hash {h}; {len(done)} model(s) already in {res_path}, {len(todo)} to train")
    t_all = time.perf_counter()
    load0 = list(os.getloadavg())
    meta = {
        "config_hash": h,
        "code_digest": code,
        "command": command,
        "settings": dataclasses.asdict(s),
        "variants": variants,
        "lengths": sorted(s.lengths),
        "seeds": seeds,
        "versions": versions(),
        "machine": machine(),
        "loadavg_start": load0,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _atomic_write(out / "sweep.json", json.dumps({**meta, "finished": False}, indent=1))
    failures = []
    for i, (v, sd) in enumerate(todo):
        if deadline is not None and time.time() > deadline:
            log(f"mqar: deadline reached; {len(todo) - i} model(s) not trained")
            break
        try:
            recs = train_one(v, sd, s)
        except Exception:
            failures.append(f"{v} seed {sd}:\n{traceback.format_exc()}")
            log("FAILED " + failures[-1])
            continue
        for r in recs:
            r["config_hash"] = h
        runs += recs
        _atomic_write(res_path, json.dumps(runs, indent=0))
        log(
            f"mqar [{i + 1}/{len(todo)}] {v:14s} seed {sd}: "
            + ", ".join(
                f"L={r['seq_len']} accuracy {r['accuracy']:.3f} ({r['train_s_per_step'] * 1e3:.0f} ms/step, {r['train_s']:.0f} s)"
                for r in recs
            )
        )
    missing = missing_runs(runs, variants, list(s.lengths), seeds)
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
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few steps: seconds, not a result")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --quick: 1)")
    ap.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="sequence lengths, trained shortest first (default 64 1024)",
    )
    ap.add_argument("--steps", type=int, default=None, help="steps at the shortest length")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step at the shortest length")
    ap.add_argument("--long-steps", type=int, default=None, help="steps at each longer length")
    ap.add_argument("--long-batch", type=int, default=None, help="sequences per step at each longer length")
    ap.add_argument("--variants", nargs="+", choices=MQAR_VARIANTS, default=list(MQAR_VARIANTS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    ap.add_argument(
        "--deadline-min",
        type=float,
        default=None,
        help="start no model after this many minutes (the missing runs are reported)",
    )
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    s = QUICK if a.quick else FULL
    for field in ("steps", "batch", "long_steps", "long_batch", "threads"):
        if getattr(a, field) is not None:
            if getattr(a, field) < 1:
                ap.error(f"--{field.replace('_', '-')} must be >= 1")
            s = dataclasses.replace(s, **{field: getattr(a, field)})
    if a.lengths is not None:
        if len(set(a.lengths)) != len(a.lengths):
            ap.error(f"--lengths must be distinct, got {a.lengths}")
        s = dataclasses.replace(s, lengths=tuple(sorted(a.lengths)))
    seeds = list(range(a.seeds if a.seeds is not None else (1 if a.quick else 3)))
    out = a.out or Path("paper-mqar-results-quick" if a.quick else "paper-mqar-results")
    deadline = time.time() + 60 * a.deadline_min if a.deadline_min is not None else None
    try:
        for L in s.lengths:
            generate(1, L, s.num_kv_pairs, s.vocab, np.random.default_rng(0))  # bad sizes fail before training
        sweep(
            s=s,
            variants=list(a.variants),
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
