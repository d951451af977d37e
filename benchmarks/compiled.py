"""Eager against compiled, with the bias: decoding, a training step, compile time, recompiles.

    python -m benchmarks.compiled [--ts 1024,16384] [--warmup 8] [--steps 64] [--rounds 7] [--train 4096] [--json PATH]

One decoding step ``linear_attention_step(state, q_t, k_t, v_t, rpb=w)`` (elu, 8 heads x
64 features, float32, one thread) after a prompt of ``t`` tokens (table ``M = t +
warmup + steps``), in these modes: PyTorch eager, ``torch.compile`` (Inductor, ``fullgraph``) of
the step with ``donate=True`` (the bias levels updated in place), ``torch.compile`` of
the plain step (``torch_compile_copy``: the levels copied at every token), JAX eager,
``jax.jit`` with the state donated (``donate_argnums=0``). Each time is the mean over
``--steps`` consecutive steps (window and level completions at their share) after
``--warmup`` untimed ones, from a fresh copy of the prompt's state, the median over
``--rounds`` rounds. The untimed steps are the first one, which builds the levels
after the prompt, and what follows it: on the benchmark machine (a virtual machine)
single steps of 11-18 ms came within the first five after the compiled mode's
rebuild, with no page fault counted in the process, and made one round in two of
64 steps twice as long as the others at t = 16,384. The rounds
alternate the modes of a library, so the machine's load falls on all of them alike.
The compiled modes also report the first call (compile time) and the number of
graphs compiled over all the steps (Dynamo's unique graphs; jit traces, counted by a
Python side effect).

``--train`` (default L = 4,096) also times one training step, forward and backward, of
``fastrpb.torch.LinearAttention(512, 8, feature_map="elu", rpb=L, causal=True)`` (the
layer with a causal FastRPB) on one sequence of ``L`` tokens: eager against
``torch.compile`` (Inductor, ``fullgraph``), and its flax twin under ``jax.jit``
(``nnx.value_and_grad``), with the first calls (the compiles) and the graphs compiled.

Compile times are from scratch: unless ``TORCHINDUCTOR_CACHE_DIR`` is set, Inductor
caches into a new temporary directory (its default cache, kept between runs, would
make a first call seconds where a cold one takes minutes).

``--jax-prompt`` (default 4,096) also times eager JAX against eager NumPy over the
first 50 steps after that prompt (4 heads, d = 32, sikf), the first step included.

A compiled mode whose first call (the compile) runs past ``--compile-limit`` seconds
is stopped and recorded as unfinished (``*_unfinished``); the JSON is rewritten after
every measurement, so a run cut short keeps what finished. Rows run in this order:
the eager JAX row, the training step, then the decode rows.

The committed run is ``docs/performance/compiled.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

HEADS, FEATURES = 8, 64


class Unfinished(Exception):
    """A compile ran past the limit."""


@contextlib.contextmanager
def _limit(seconds: float) -> Iterator[None]:
    """Raise ``Unfinished`` in this (main) thread after ``seconds``."""

    def stop(signum: int, frame: Any) -> None:
        raise Unfinished

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _first_call(row: dict[str, Any], name: str, limit: float, call: Callable[[], Any], sync: Any) -> bool:
    """Time ``call()`` (a compile) into ``row[name + "_first_s"]``; False if it ran past ``limit``."""
    try:
        with _limit(limit):
            start = time.perf_counter()
            sync(call())
            row[f"{name}_first_s"] = time.perf_counter() - start
    except Exception as exc:  # Dynamo wraps what its compiler raised
        if not _stopped(exc):
            raise
        row[f"{name}_unfinished"] = f"the first call did not finish in {limit:.0f} s"
        return False
    return True


def _stopped(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or was raised from, the limit's ``Unfinished``."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, Unfinished):
            return True
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
        seen += 1
    return False


def _mean_steps(step: Any, state: Any, tokens: list, warmup: int, sync: Any) -> tuple[float, float]:
    """(first call, mean of the calls after the first ``warmup``) of the steps over
    ``tokens`` from ``state``."""
    start = time.perf_counter()
    out, s = step(state, *tokens[0])
    sync(out)
    first = time.perf_counter() - start
    for i in range(1, warmup):
        out, s = step(s, *tokens[i])
    sync(out)
    start = time.perf_counter()
    for i in range(warmup, len(tokens)):
        out, s = step(s, *tokens[i])
    sync(out)
    return first, (time.perf_counter() - start) / (len(tokens) - warmup)


def decode(
    t: int,
    steps: int,
    rounds: int,
    warmup: int,
    modes: list[str],
    limit: float = 1e9,
    save: Callable[[], None] = lambda: None,
    row: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The decode row at ``t``, filled into ``row`` (if given): for each library, the
    compiled modes' first calls, then ``rounds`` rounds that alternate its modes (so
    the machine's load falls on all of them alike), the median round of each."""
    import fastrpb

    rng = np.random.default_rng(0)
    n = warmup + steps  # the tokens stepped after the prompt
    M = t + n
    q, k, v = (rng.standard_normal((HEADS, t + n, FEATURES)).astype(np.float32) for _ in range(3))
    w = (rng.standard_normal((HEADS, 2 * M - 1)) / 8).astype(np.float32)
    row = {} if row is None else row
    row["t"] = t
    if any(m.startswith("torch") for m in modes):
        import torch
        from torch._dynamo.utils import counters

        tq, tk, tv, tw = (torch.from_numpy(x) for x in (q, k, v, w))
        _, state = fastrpb.linear_attention(tq[:, :t], tk[:, :t], tv[:, :t], causal=True, rpb=tw, return_state=True)
        tokens = [(tq[:, i], tk[:, i], tv[:, i]) for i in range(t, t + n)]

        def eager(s: Any, a: Any, b: Any, c: Any) -> Any:
            return fastrpb.linear_attention_step(s, a, b, c, rpb=tw)

        def donating(s: Any, a: Any, b: Any, c: Any) -> Any:
            return fastrpb.linear_attention_step(s, a, b, c, rpb=tw, donate=True)

        def fresh() -> Any:  # a donated state is consumed: each round starts from a copy
            return torch.utils._pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, state)

        torch._dynamo.reset()

        def graphs() -> int:
            return int(counters["stats"]["unique_graphs"])

        runs: dict[str, Any] = {}
        if "torch" in modes:
            runs["torch_eager"] = eager
        for mode, step in (("torch_compile", donating), ("torch_compile_copy", eager)):
            if mode in modes:
                compiled, before = torch.compile(step, fullgraph=True), graphs()
                first = functools.partial(compiled, fresh(), *tokens[0])
                if _first_call(row, mode, limit, first, lambda o: None):
                    runs[mode] = compiled
                row[f"{mode}_graphs"] = graphs() - before
                save()
        _alternate(row, runs, fresh, tokens, warmup, rounds, lambda o: None, graphs)
        save()
    if any(m.startswith("jax") for m in modes):
        import jax
        import jax.numpy as jnp

        jq, jk, jv, jw = (jnp.asarray(x) for x in (q, k, v, w))
        _, jstate = fastrpb.linear_attention(jq[:, :t], jk[:, :t], jv[:, :t], causal=True, rpb=jw, return_state=True)
        jtokens = [(jq[:, i], jk[:, i], jv[:, i]) for i in range(t, t + n)]
        traces: list[None] = []

        def step(s: Any, a: Any, b: Any, c: Any) -> Any:
            traces.append(None)
            return fastrpb.linear_attention_step(s, a, b, c, rpb=jw, donate=True)

        def sync(o: Any) -> None:
            jax.block_until_ready(o)

        def jfresh() -> Any:
            return jax.tree.map(jnp.copy, jstate)

        jruns: dict[str, Any] = {}
        if "jax" in modes:
            jruns["jax_eager"] = step
        if "jax_jit" in modes:
            jitted, before = jax.jit(step, donate_argnums=0), len(traces)
            if _first_call(row, "jax_jit", limit, lambda: jitted(jfresh(), *jtokens[0]), sync):
                jruns["jax_jit"] = jitted
            row["jax_jit_traces"] = len(traces) - before
            save()
        _alternate(row, jruns, jfresh, jtokens, warmup, rounds, sync, lambda: len(traces) if "jax_jit" in jruns else 0)
        save()
    return row


def _alternate(
    row: dict[str, Any], runs: dict[str, Any], fresh: Any, tokens: list, warmup: int, rounds: int, sync: Any, count: Any
) -> None:
    """``rounds`` rounds of every mode in turn, each from a fresh copy of the prompt's
    state; ``row[mode + "_s"]``: its median round. Compilations during the rounds (by
    ``count``, Dynamo's graphs or JAX's traces, 0 for eager) add to the compiled
    modes' counts."""
    times: dict[str, list[float]] = {mode: [] for mode in runs}
    for _ in range(rounds):
        for mode, step in runs.items():
            before = count()
            times[mode].append(_mean_steps(step, fresh(), tokens, warmup, sync)[1])
            if not mode.endswith("eager"):
                key = f"{mode}_traces" if mode.startswith("jax") else f"{mode}_graphs"
                row[key] += count() - before
    for mode, values in times.items():
        row[f"{mode}_s"] = statistics.median(values)


def train(
    L: int,
    steps: int,
    rounds: int,
    modes: list[str],
    limit: float = 1e9,
    save: Callable[[], None] = lambda: None,
    row: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A training step (forward, the mean square of the output as loss, backward) of the
    attention layer with a causal FastRPB over one sequence of ``L`` tokens: eager,
    ``torch.compile`` and (flax) ``jax.jit``; mean over ``steps`` calls, median over
    ``rounds`` (eager and ``torch.compile`` alternate round by round); the compiled
    modes also give the first call and the graphs compiled."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, L, HEADS * FEATURES)).astype(np.float32)
    row = {} if row is None else row
    row["L"] = L

    def mean(call: Any, sync: Any, rounds: int = rounds) -> float:
        means = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(steps):
                out = call()
            sync(out)
            means.append((time.perf_counter() - start) / steps)
        return statistics.median(means)

    if any(m.startswith("torch") for m in modes):
        import torch

        from fastrpb.torch import LinearAttention

        torch.manual_seed(0)
        layer = LinearAttention(HEADS * FEATURES, HEADS, feature_map="elu", rpb=L, causal=True)
        tx = torch.from_numpy(x)

        def loss_and_grads(model: Any) -> Any:
            layer.zero_grad(set_to_none=True)
            loss = model(tx).square().mean()
            loss.backward()
            return loss.detach()

        losses, calls = {}, {}
        if "torch" in modes:
            losses["torch"] = float(loss_and_grads(layer))  # also the warm-up
            calls["torch_eager"] = functools.partial(loss_and_grads, layer)
        if "torch_compile" in modes:
            from torch._dynamo.utils import counters

            torch._dynamo.reset()
            counters.clear()
            compiled = torch.compile(layer, fullgraph=True)
            if _first_call(row, "torch_compile", limit, lambda: loss_and_grads(compiled), lambda o: None):
                losses["torch_compile"] = float(loss_and_grads(compiled))
                calls["torch_compile"] = functools.partial(loss_and_grads, compiled)
            save()
        times: dict[str, list[float]] = {mode: [] for mode in calls}
        for _ in range(rounds):  # the modes alternate round by round, as the decode rows'
            for mode, call in calls.items():
                times[mode].append(mean(call, lambda o: None, 1))
        for mode, values in times.items():
            row[f"{mode}_s"] = statistics.median(values)
        if "torch_compile" in modes:
            row["torch_compile_graphs"] = int(counters["stats"]["unique_graphs"])
        save()
        if len(losses) == 2:  # the compiled step computes what the eager one does
            row["torch_compile_loss_rel_diff"] = abs(losses["torch_compile"] / losses["torch"] - 1)
    if "jax_jit" in modes:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from fastrpb.flax import LinearAttention as FlaxLinearAttention

        model = FlaxLinearAttention(HEADS * FEATURES, HEADS, feature_map="elu", rpb=L, causal=True, rngs=nnx.Rngs(0))
        jx = jnp.asarray(x)
        traces: list[None] = []

        @nnx.jit
        def step(m: Any, inputs: Any) -> Any:
            traces.append(None)
            return nnx.value_and_grad(lambda m: jnp.mean(jnp.square(m(inputs))))(m)

        if _first_call(row, "jax_jit", limit, lambda: step(model, jx), jax.block_until_ready):
            row["jax_jit_s"] = mean(lambda: step(model, jx), jax.block_until_ready)
        row["jax_jit_traces"] = len(traces)
        save()
    return row


def jax_after_prompt(L: int, steps: int = 50) -> dict[str, Any]:
    """Mean of the first ``steps`` eager steps after an ``L``-token prompt (first included):
    JAX against NumPy (4 heads, d = 32, sikf)."""
    import jax.numpy as jnp

    import fastrpb

    rng = np.random.default_rng(1)
    H, d, M = 4, 32, L + steps
    q, k, v = (rng.standard_normal((H, L + steps, d)).astype(np.float32) for _ in range(3))
    w = (rng.standard_normal((H, 2 * M - 1)) / 8).astype(np.float32)
    row: dict[str, Any] = {"prompt": L, "steps": steps}
    for name, conv in (("numpy", np.asarray), ("jax", jnp.asarray)):
        a, b, c, tw = (conv(x) for x in (q, k, v, w))
        _, state = fastrpb.linear_attention(
            a[:, :L], b[:, :L], c[:, :L], feature_map="sikf", causal=True, rpb=tw, return_state=True
        )
        start = time.perf_counter()
        for i in range(L, L + steps):
            out, state = fastrpb.linear_attention_step(state, a[:, i], b[:, i], c[:, i], feature_map="sikf", rpb=tw)
        np.asarray(out)
        row[f"{name}_s"] = (time.perf_counter() - start) / steps
    row["ratio"] = row["jax_s"] / row["numpy_s"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ts", default="1024,16384", help="prompt lengths t (comma separated)")
    parser.add_argument("--steps", type=int, default=64, help="decoding steps timed after each prompt's warm-up")
    parser.add_argument("--warmup", type=int, default=8, help="untimed decoding steps after each prompt (at least 1)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--modes",
        default="torch,torch_compile,torch_compile_copy,jax,jax_jit",
        help="of torch, torch_compile (donating), torch_compile_copy (the state copied per step), jax, jax_jit",
    )
    parser.add_argument("--train", type=int, default=4096, help="L of the training-step row (0: skip it)")
    parser.add_argument("--train-steps", type=int, default=3, help="training steps timed per round")
    parser.add_argument("--jax-prompt", type=int, default=4096, help="0: skip the eager JAX row")
    parser.add_argument(
        "--compile-limit", type=float, default=300, help="seconds a compiled mode's first call may take"
    )
    parser.add_argument("--json", default=None, help="write the numbers here (after every measurement)")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the first step after a prompt builds the levels)")
    # compile times from scratch: Inductor's on-disk caches (kept between runs under
    # /tmp/torchinductor_$USER) made a first call 8 s where a cold one took 96-203 s
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastrpb-inductor-"))
    import torch

    torch.set_num_threads(1)
    modes = args.modes.split(",")
    result: dict[str, Any] = {
        "decode": [],
        "machine": {
            "torch": torch.__version__,
            "threads": 1,
            "heads": HEADS,
            "features": FEATURES,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "train_steps": args.train_steps,
            "load_average_start": os.getloadavg(),
        },
    }

    def save() -> None:
        result["machine"]["load_average_now"] = os.getloadavg()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    if args.jax_prompt:
        result["jax_after_prompt"] = jax_after_prompt(args.jax_prompt)
        print(json.dumps(result["jax_after_prompt"]), flush=True)
        save()
    if args.train:
        result["train"] = {}
        train(args.train, args.train_steps, args.rounds, modes, args.compile_limit, save, result["train"])
        print(json.dumps(result["train"]), flush=True)
        save()
    for t in (int(x) for x in args.ts.split(",")):
        result["decode"].append(row := {})
        decode(t, args.steps, args.rounds, args.warmup, modes, args.compile_limit, save, row)
        print(json.dumps(row), flush=True)
        save()


if __name__ == "__main__":
    main()
