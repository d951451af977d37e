"""Interleaved step timing: every variant on the same batch, round after round.

The per-run step times of the sweep are measured while the machine does whatever it
does at that moment (here: a 2-core machine shared with other work), and different
variants train at different moments. This measurement puts every variant of a task
in one process, on one fixed training batch, and times one optimiser step of each in
turn, ``rounds`` times; the *minimum* over rounds is the least disturbed estimate and
the ratios between variants are comparable because the rounds interleave them.
"""

from __future__ import annotations

import time

import numpy as np

from .settings import Settings
from .train import TaskData, _batch, geometry


def interleaved_step_times(d: TaskData, variants: list[str], s: Settings, *, rounds: int, seed: int = 0) -> dict:
    import torch

    from . import data as data_mod
    from .model import Classifier

    torch.set_num_threads(s.threads)
    vocab = None if d.name == "fmnist" else len(data_mod.VOCAB)
    idx = np.random.default_rng(seed).permutation(len(d.y_train))[: s.batch]
    xb, mask = _batch(d, idx, train=True)
    yb = torch.from_numpy(d.y_train[idx])
    models, opts = {}, {}
    for v in variants:
        torch.manual_seed(seed)
        models[v] = Classifier(
            vocab=vocab,
            n_classes=10,
            d=s.d_model,
            heads=s.heads,
            layers=s.layers,
            d_ff=s.d_ff,
            variant=v,
            geom=geometry(d.name, s),
            seed=seed,
        )
        opts[v] = torch.optim.AdamW(models[v].parameters(), lr=s.lr, weight_decay=s.weight_decay)

    def step(v: str) -> float:
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(models[v](xb, mask), yb)
        opts[v].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models[v].parameters(), s.clip)
        opts[v].step()
        return time.perf_counter() - t0

    for v in variants:  # warm-up: one-off allocations and first-call costs
        step(v)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            times[v].append(step(v))
    return {
        "tokens": int(xb.shape[1]) + (1 if d.name == "fmnist" else 0),
        "batch": s.batch,
        "rounds": rounds,
        "threads": s.threads,
        "per_variant": {v: {"min_s": min(t), "median_s": float(np.median(t)), "all_s": t} for v, t in times.items()},
    }
