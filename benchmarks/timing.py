"""Interleaved timing: warm up, calibrate, then rounds of A B C, B C A, C A B ...

Every variant of one comparison is sampled once per round, in the same round, so a
machine that slows down (other jobs, thermal limits) slows all of them alike and the
ratios survive. Each sample times ``number`` back-to-back calls, chosen so that a
sample lasts at least ``min_sample`` seconds (microsecond steps need many calls);
the clock is read only after the backend's ``sync`` (CUDA synchronise, JAX
``block_until_ready``, CuPy stream synchronise).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _one(fn: Callable[[], Any], sync: Callable[[Any], None], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        out = fn()
        sync(out)
    elapsed = time.perf_counter() - start
    del out
    return elapsed / number


def _settle(elapsed: float) -> None:
    """Let the runtime finish releasing what the last sample allocated before the next.

    JAX frees a call's buffers on a background thread after ``block_until_ready``
    returns, and the OS unmaps large blocks lazily: a call that follows one which
    dropped a 512 MiB buffer (JAX's softmax logits at L = 4,096) ran 3x slower. The
    pause (a quarter of the sample, at most 0.2 s; none for samples under 20 ms) is
    outside the timed region.
    """
    if elapsed > 0.02:
        gc.collect()
        time.sleep(min(0.2, 0.25 * elapsed))


def check_outputs(bench: Any, variants: list, outputs: dict[str, Any], *, dtype: str) -> dict[str, str]:
    """Compare each same-output variant's result with ours; return {name: problem}."""
    ours = next(v for v in variants if v.ours)
    ref = bench.to_numpy(outputs[ours.name]).astype(np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 1.0
    tol = {"float64": 1e-9, "float32": 2e-3, "float16": 5e-2, "bfloat16": 1e-1}[dtype] * max(scale, 1e-30)
    problems = {}
    for v in variants:
        if v.ours or not v.same_output:
            continue
        got = bench.to_numpy(outputs[v.name]).astype(np.float64)
        if got.shape != ref.shape:
            problems[v.name] = f"shape {got.shape} != ours {ref.shape}"
        elif not np.all(np.abs(got - ref) <= tol):
            problems[v.name] = f"max |diff| {float(np.max(np.abs(got - ref))):.3g} > {tol:.3g}"
    return problems


def measure(
    bench: Any,
    variants: list,
    *,
    dtype: str,
    repeats: int,
    min_repeats: int = 3,
    min_sample: float = 0.005,
    budget: float = 10.0,
    heavy: float = 1.5,
) -> dict[str, Any]:
    """Time ``variants`` interleaved; return raw samples, medians and the check.

    A reference whose warm call takes longer than ``heavy`` seconds (the naive
    cumulative sum, the prime-length FFT at long L) is sampled once, not every round:
    it is then several times slower than the library and one sample decides the
    ratio, while every round of it would cost the whole run's budget. Eager libraries
    reuse the warm-up call as that sample; JAX (which compiled in it) calls once more.
    """
    sync = bench.sync
    # warm-up: the first call compiles (jax.jit), plans FFTs, faults in pages
    outputs, warm = {}, {}
    for v in variants:
        start = time.perf_counter()
        out = v.fn()
        sync(out)
        warm[v.name] = time.perf_counter() - start
        outputs[v.name] = out
        _settle(warm[v.name])
    problems = check_outputs(bench, variants, outputs, dtype=dtype)
    del outputs, out
    compiles = bench.name.startswith("jax")
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    once = {v.name for v in variants if not v.ours and warm[v.name] > heavy}
    for name in once:
        v = next(x for x in variants if x.name == name)
        samples[name].append(_one(v.fn, sync, 1) if compiles else warm[name])
        _settle(samples[name][-1])
    timed = [v for v in variants if v.name not in once]
    # calibrate the calls per sample (and the rounds the budget allows) on a second,
    # warm call; an eager warm-up slower than ten samples already says "one call"
    first = {}
    for v in timed:
        first[v.name] = warm[v.name] if warm[v.name] > 10 * min_sample and not compiles else _one(v.fn, sync, 1)
        _settle(first[v.name])
    number = {name: max(1, math.ceil(min_sample / max(t, 1e-9))) for name, t in first.items()}
    number.update(dict.fromkeys(once, 1))
    round_time = sum(first[n] * number[n] for n in first)
    rounds = int(min(repeats, max(min_repeats, budget // max(round_time, 1e-9))))
    for r in range(rounds):
        # rotate the order every round: a call that follows one which freed a large
        # buffer pays the page faults of re-mapping it (on JAX a 512 MiB softmax made
        # the next call 3x slower), so no variant may always come first
        shift = r % len(timed) if timed else 0
        for v in timed[shift:] + timed[:shift]:
            samples[v.name].append(_one(v.fn, sync, number[v.name]))
            _settle(samples[v.name][-1] * number[v.name])
    return {
        "number": number,
        "rounds": rounds,
        "sampled_once": sorted(once),
        "samples_s": samples,
        "median_s": {name: float(np.median(s)) for name, s in samples.items()},
        "check": problems,
    }


def paired_ratio(samples: dict[str, list[float]], ours: str, ref: str) -> float:
    """Median over rounds of ``t_ref / t_ours`` (each round's pair ran back to back)."""
    n = min(len(samples[ours]), len(samples[ref]))
    a = np.asarray(samples[ours][:n])
    b = np.asarray(samples[ref][:n])
    return float(np.median(b / a))
