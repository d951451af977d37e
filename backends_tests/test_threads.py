"""Eight threads calling fastrpb at once, from a fresh process, give the serial results.

The library keeps small caches (namespaces, promoted dtypes, lazy imports, the JAX
pytree registration of the decoding state) that are filled on first use: a race there
shows only in the first calls of a process. So the test starts a new interpreter whose
very first fastrpb calls come from 8 threads released together, on a mix of backends,
dtypes and functions; the same jobs are then run one by one, and every threaded
result must equal its serial twin exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backends_tests.backends import CPU_BACKENDS, requested

HERE = Path(__file__).resolve().parent

SCRIPT = r"""
import json, sys, threading
import numpy as np
from backends_tests.backends import load
import fastrpb
from fastrpb import feature_maps as fm

names = sys.argv[1].split(",")
backends = [load(name, False)[0] for name in names]
backends = [b for b in backends if b is not None]


def job(backend, dtype, kind, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (backend.asarray(rng.standard_normal((2, 37, 8)), dtype) for _ in range(3))
    w = backend.asarray(rng.standard_normal((2, 2 * 37 - 1)) * 0.1, dtype)
    mask = backend.asarray(rng.random((2, 37)) > 0.2, None)
    if kind == "rpb":
        return fastrpb.rpb(v, w, causal=True)
    if kind == "elu":
        return fastrpb.linear_attention(q, k, v, causal=True, chunk_size=8, rpb=w)
    if kind == "sikf":
        return fastrpb.linear_attention(q, k, v, feature_map="sikf", causal=True, key_mask=mask, chunk_size=8)
    if kind == "dpfp":
        return fastrpb.linear_attention(q, k, v, feature_map="dpfp", key_mask=mask)
    if kind == "softmax":
        return fastrpb.softmax_attention(q, k, v, causal=True, key_mask=mask, rpb=w)
    if kind == "favor":
        proj = fastrpb.random_projection(16, 8, seed=seed, like=q)
        return fastrpb.linear_attention(q, k, v, feature_map=fm.favor(proj), causal=True, chunk_size=8)
    if kind == "step":
        out, state = fastrpb.linear_attention(
            q[:, :30, :], k[:, :30, :], v[:, :30, :], feature_map="sikf", causal=True, return_state=True
        )
        for t in range(30, 37):
            out, state = fastrpb.linear_attention_step(state, q[:, t, :], k[:, t, :], v[:, t, :], feature_map="sikf")
        return out
    raise AssertionError(kind)


kinds = ["rpb", "elu", "sikf", "dpfp", "softmax", "favor", "step"]
# JAX compiles every eager operation per shape and dtype (seconds a job): bfloat16 only
# there, whose half precision is computed in float32 (the promoted-dtype cache is filled
# for both); the other backends run every dtype they have
dtypes = {"jax": ("bfloat16",)}
jobs = [(b, d, kind) for b in backends for d in dtypes.get(b.name, b.dtypes) for kind in kinds]
order = np.random.default_rng(0).permutation(len(jobs))
threads_n = 8
barrier = threading.Barrier(threads_n)
threaded = {}
errors = []


def worker(start):
    barrier.wait()
    for i in order[start::threads_n]:
        b, d, kind = jobs[i]
        try:
            threaded[i] = b.to_numpy(job(b, d, kind, int(i)))
        except Exception as exc:  # reported to the test, with the job
            errors.append(f"{b.name} {d} {kind}: {type(exc).__name__}: {exc}")


workers = [threading.Thread(target=worker, args=(s,)) for s in range(threads_n)]
for t in workers:
    t.start()
for t in workers:
    t.join()
mismatches = []
for i, (b, d, kind) in enumerate(jobs):
    serial = b.to_numpy(job(b, d, kind, i))
    if i in threaded and not np.array_equal(threaded[i], serial, equal_nan=True):
        mismatches.append(f"{b.name} {d} {kind}: max |diff| {np.nanmax(np.abs(threaded[i] - serial))}")
print(json.dumps({"jobs": len(jobs), "backends": [b.name for b in backends], "errors": errors, "mismatches": mismatches}))
"""


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
def test_eight_threads_first_calls_equal_serial_results():
    names, _ = requested()
    cpu = [n for n in names if n in CPU_BACKENDS]
    if not cpu:
        pytest.skip("FASTRPB_BACKENDS names no CPU backend")
    env = dict(os.environ)
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, ",".join(cpu)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["jobs"] > 0, report
    assert set(report["backends"]) == set(cpu), report
    assert not report["errors"], "\n".join(report["errors"])
    assert not report["mismatches"], "\n".join(report["mismatches"])
