"""The records of an MQAR sweep: the variants, which runs are missing, the summary per
(variant, length). Shared by the runner (``mqar``) and the report (``mqarreport``), so
neither imports the other's module back.
"""

from __future__ import annotations

import math

import numpy as np

FEATURE_MAPS = ("elu", "relu", "sikf", "dpfp", "favor", "taylor", "hedgehog")
MQAR_VARIANTS = ("softmax", *FEATURE_MAPS, *(f"{m}+rpb" for m in FEATURE_MAPS))


def plan(variants: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """Seed by seed, so that a sweep cut short has whole seeds."""
    return [(v, sd) for sd in seeds for v in variants]


def missing_runs(runs: list[dict], variants: list[str], lengths: list[int], seeds: list[int]) -> list[dict]:
    have = {(r["variant"], r["seq_len"], r["seed"]) for r in runs}
    return [
        {"variant": v, "seq_len": L, "seed": sd}
        for v, sd in plan(variants, seeds)
        for L in sorted(lengths)
        if (v, L, sd) not in have
    ]


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
