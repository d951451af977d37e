"""``python -m benchmarks.paper [--quick] [--seeds N] [--steps N] [--tasks ...] [--out DIR]``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from .settings import PRESETS, TASKS


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from .model import VARIANTS

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.paper",
        description="Train every attention variant on Fashion-MNIST and ListOps for several seeds; "
        "write results.json, results.md and curves.png into --out.",
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes for CI (seconds, not a result); = --preset quick")
    ap.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="settings preset (default: full); listops-short: ListOps of 10-64 tokens that small "
        "models learn (default tasks: listops)",
    )
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default 3; --quick: 2)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (same for every model)")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=None, help="default: both (listops-short: listops)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument(
        "--out", type=Path, default=None, help="output directory (default: paper-results or paper-results-quick)"
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="runs trained at the same time, one process each (default: 2, or 1 on a 1-core machine)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default 1)")
    ap.add_argument(
        "--replace",
        action="store_true",
        help="overwrite top-level results of another configuration in --out (per-run files never mix)",
    )
    ap.add_argument(
        "--report-partial",
        action="store_true",
        help="train nothing; report the finished runs of this configuration, marked partial",
    )
    a = ap.parse_args(argv)
    if a.seeds is not None and a.seeds < 1:
        ap.error("--seeds must be >= 1")
    if a.jobs < 1:
        ap.error("--jobs must be >= 1")
    if a.steps is not None and a.steps < 1:
        ap.error("--steps must be >= 1")
    if a.quick and a.preset not in (None, "quick"):
        ap.error("--quick is --preset quick; give one of them")
    a.preset = "quick" if a.quick else (a.preset or "full")
    if a.tasks is None:
        a.tasks = ["listops"] if a.preset == "listops-short" else list(TASKS)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    settings = PRESETS[a.preset]
    if a.steps is not None:
        settings = dataclasses.replace(settings, steps=a.steps)
    if a.threads is not None:
        settings = dataclasses.replace(settings, threads=a.threads)
    seeds = list(range(a.seeds if a.seeds is not None else (2 if a.preset == "quick" else 3)))
    out = a.out or Path(
        {"quick": "paper-results-quick", "full": "paper-results"}.get(a.preset, f"paper-results-{a.preset}")
    )

    from .data import DataMissing
    from .runner import ConfigMismatch, default_command, sweep

    try:
        import torch  # noqa: F401 - imported once here so forked workers share it
        import tqdm  # noqa: F401
    except ImportError as exc:
        print(
            f"error: the paper benchmark needs PyTorch and tqdm ({exc}); pip install 'fastrpb[torch,bench]'",
            file=sys.stderr,
        )
        return 2
    try:
        sweep(
            settings=settings,
            tasks=list(a.tasks),
            variants=list(a.variants),
            seeds=seeds,
            out=out,
            jobs=a.jobs,
            replace=a.replace,
            command=default_command(),
            partial=a.report_partial,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except (DataMissing, ConfigMismatch) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
