"""The benchmark suite never rots: run the harness on tiny sizes and read its outputs.

Also checks the FFT blocking of long inputs (normally above 32 MiB of spectrum, far
too big for a unit test) by shrinking the block budget: results must still match the
float64 dense oracle on every backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

import fastrpb
import fastrpb.bias
import oracles
from backends_tests.backends import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_harness(tmp_path, *args: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "src"), ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "benchmarks", "--out", str(tmp_path), "--no-progress", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "results.json") as fh:
        return json.load(fh)


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
def test_harness_smoke(tmp_path):
    payload = _run_harness(
        tmp_path,
        "--quick",
        "--backends",
        "numpy",
        "--sizes",
        "64,128",
        "--memory-sizes",
        "128",
        "--budget",
        "0.05",
        "--threads",
        "1",
    )
    results = payload["results"]
    if hasattr(os, "sched_getaffinity"):  # --threads 1 pins the process (JAX obeys nothing else)
        assert payload["machine"]["usable_cpus"] == 1
    cases = {r["case"] for r in results}
    assert "rpb" in cases
    have_attention = hasattr(fastrpb, "linear_attention")
    if have_attention:
        assert {"attention", "causal", "decode"} <= cases
    for r in results:
        if r["case"] != "rpb" and not have_attention:
            continue
        assert "error" not in r, r
        assert not r["check"], f"a reference disagrees with fastrpb: {r['check']}"
        assert r["rounds"] >= 3
        assert all(len(s) == (1 if n in r["sampled_once"] else r["rounds"]) for n, s in r["samples_s"].items())
        assert set(r["speedup"]) == set(r["median_s"]) - {r["ours"]}
    rpb128 = next(r for r in results if r["case"] == "rpb" and r["L"] == 128)
    assert {"fastrpb", "native", "paper_2L-1", "fft_floor", "dense"} <= set(rpb128["median_s"])
    assert rpb128["memory"]["fastrpb"]["extra_bytes"] >= 0
    assert payload["machine"]["logical_cpus"] >= 1
    assert "numpy" in payload["versions"]
    assert any(t["id"] == "rpb-paper" for t in payload["targets"]) is False  # torch-only targets
    md = (tmp_path / "results.md").read_text()
    assert "## Targets" in md
    assert "paper_2L-1" in md
    assert "| 128 |" in md
    assert (tmp_path / "rpb_time.png").stat().st_size > 0
    assert (tmp_path / "rpb_memory.png").stat().st_size > 0
    # as after --no-memory: the memory figures have no curve, and matplotlib no legend to warn about
    from benchmarks.report import plots

    bare = {**payload, "results": [{k: x for k, x in r.items() if k != "memory"} for r in results]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drawn = plots(bare, str(tmp_path))
    assert drawn
    assert not any(p.endswith("_memory.png") for p in drawn)


def test_blocked_fft_path_matches_dense_oracle(backend, monkeypatch, rng):
    """Long inputs go through blocks; shrink the budget so small ones do too."""
    monkeypatch.setattr(fastrpb.bias, "_BLOCK_BYTES", 3000)
    dtype = "float64" if "float64" in backend.dtypes else "float32"
    L, D, H = 37, 20, 3
    v = rng.standard_normal((2, H, L, D))
    w = rng.standard_normal((H, 2 * L + 5))
    for causal in (False, True):
        got = fastrpb.rpb(backend.asarray(v, dtype), backend.asarray(w, dtype), causal=causal)
        assert_close(backend, got, oracles.rpb(v, w, causal), dtype)


# name -> (the run's targets, machine, phrases the summary must hold, phrases it must not)
_MISSED = dict(
    id="rpb-dense",
    text="FastRPB >= 20x faster than the dense product (PyTorch)",
    backend="torch",
    L=4096,
    met=False,
    shown="18.4x",
)
_MET = dict(_MISSED, id="causal-naive", text="Causal linear attention >= 10x faster", met=True, shown="62x", L=16384)
SUMMARIES = {
    "miss-on-a-busy-machine": (
        [_MET, _MISSED],
        dict(usable_cpus=2, load_average_start=[13.96, 12.0, 9.0], load_average_end=[14.48, 13.0, 9.5]),
        [
            "targets: 1 met, 1 missed",
            "the load average went 14.0 -> 14.5 on 2 usable cores during the run (a busy machine)",
            "python -m benchmarks --cases rpb --backends torch --sizes 4096 --repeats 11 --threads 1",
        ],
        [],
    ),
    "miss-on-a-quiet-machine": (
        [_MISSED],
        dict(usable_cpus=2, load_average_start=[0.1, 0.1, 0.1], load_average_end=[0.4, 0.2, 0.1]),
        ["how to read a miss: the load average went 0.1 -> 0.4 on 2 usable cores", "--cases rpb --backends torch"],
        ["busy machine"],
    ),
    "all-met": (
        [_MET],
        dict(usable_cpus=2, load_average_start=[9.0], load_average_end=[9.0]),
        ["1 met, 0 missed"],
        ["how to read"],
    ),
}


@pytest.mark.parametrize("case", list(SUMMARIES))
def test_summary_says_how_to_read_a_miss(case):
    from benchmarks import report

    targets, machine, present, absent = SUMMARIES[case]
    text = report.summary(dict(targets=targets, machine=machine, results=[]))
    for phrase in present:
        assert phrase in text, text
    for phrase in absent:
        assert phrase not in text, text
