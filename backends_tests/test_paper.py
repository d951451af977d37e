"""The paper benchmark (``python -m benchmarks.paper``): ListOps generator, and ``--quick`` end to end.

The end-to-end test trains every variant for a few steps through the library's torch
path, so it runs only when ``torch`` is among the selected backends
(``FASTRPB_BACKENDS``). It needs Debian's ``dataset-fashion-mnist`` package, tqdm and
matplotlib, and fails (does not skip) without them: CI must install them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.paper import data as paper_data  # noqa: E402


def test_listops_semantics():
    D = paper_data
    assert D.evaluate((D.MAX, [2, 9, (D.MIN, [4, 7]), 0])) == 9
    assert D.evaluate((D.MIN, [4, 7, 3])) == 3
    assert D.evaluate((D.SM, [8, 7, 9])) == 4  # 24 mod 10
    assert D.evaluate((D.MED, [1, 9, 4, 6])) == 5  # int(median) = int(5.0)
    assert D.evaluate((D.MED, [1, 2])) == 1  # int(1.5)
    assert D.to_tokens((D.MAX, [2, (D.SM, [1, 3])])) == ["[MAX", "2", "[SM", "1", "3", "]", "]"]


def test_listops_generator_reproducible_and_in_range():
    spec = paper_data.ListOpsSpec(40, min_len=60, max_len=120, seed=3)
    seqs, labels = paper_data.generate_listops(spec)
    again, labels2 = paper_data.generate_listops(spec)
    assert seqs == again
    assert np.array_equal(labels, labels2)
    assert all(60 <= len(s) <= 120 for s in seqs)
    assert labels.min() >= 0
    assert labels.max() <= 9
    # brackets balance and nesting depth stays within the limit
    for s in seqs:
        depth = worst = 0
        for t in s:
            depth += t.startswith("[") - (t == "]")
            worst = max(worst, depth)
            assert depth >= 0
        assert depth == 0
        assert worst <= spec.max_depth
    ids, lengths = paper_data.encode_listops(seqs)
    assert ids.shape == (40, 1 + max(map(len, seqs)))
    assert (ids[:, 0] == paper_data.CLS).all()
    assert np.array_equal(lengths, [1 + len(s) for s in seqs])
    other, _ = paper_data.generate_listops(paper_data.ListOpsSpec(40, min_len=60, max_len=120, seed=4))
    assert other != seqs


def _env() -> dict:
    paths = [str(ROOT / "src"), str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = _env()
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.paper", "--quick", "--out", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
@pytest.mark.uses_backend("torch", reason="the paper benchmark trains PyTorch models")
def test_quick_run_end_to_end(tmp_path: Path):
    out = tmp_path / "paper"
    proc = _run(out)
    assert proc.returncode == 0, f"--quick failed:\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    res = json.loads((out / "results.json").read_text())
    from benchmarks.paper.model import VARIANTS

    assert res["tasks"] == ["fmnist", "listops"]
    assert res["variants"] == list(VARIANTS)
    assert len(res["runs"]) == 2 * len(VARIANTS) * 2
    for r in res["runs"]:
        assert r["loss_finite"], (r["task"], r["variant"], r["seed"])
        assert 0.0 <= r["test_acc"] <= 1.0
        assert r["step_time_median_s"] > 0
        assert r["n_params"] > 0
        assert r["config_hash"] == res["config_hash"]
    assert {(s["task"], s["variant"]) for s in res["summary"]} == {(t, v) for t in res["tasks"] for v in VARIANTS}
    # FastRPB adds parameters (its tables), the variants without it do not
    p = {(r["task"], r["variant"]): r["n_params"] for r in res["runs"]}
    for t in res["tasks"]:
        assert p[(t, "elu")] == p[(t, "sikf")] == p[(t, "softmax")] < p[(t, "sikf+rpb")] == p[(t, "softmax+logits")]
    assert res["versions"]["torch"]
    assert res["machine"]["logical_cpus"]
    table = (out / "results.md").read_text()
    assert "| model | test accuracy" in table
    assert "linear, SIKF + FastRPB" in table
    assert (out / "curves.png").stat().st_size > 10_000
    assert (out / "runs" / res["config_hash"]).is_dir()

    # a restart with the same settings reuses every finished run instead of mixing or redoing
    again = _run(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing" in again.stderr
    assert json.loads((out / "results.json").read_text())["runs"] == res["runs"]

    # other settings into the same directory: refused, nothing overwritten
    other = _run(out, "--steps", "3", "--tasks", "listops")
    assert other.returncode == 2
    assert "another configuration" in other.stderr
    assert json.loads((out / "results.json").read_text())["config_hash"] == res["config_hash"]

    # the docs page is generated from the JSON
    page = tmp_path / "experiments.md"
    env = _env()
    gen = subprocess.run([sys.executable, "-m", "benchmarks.paper.report", str(out / "results.json"), "--page", str(page),
                          "--extra", str(out / "results.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    text = page.read_text()
    assert "GENERATED" in text
    assert res["config_hash"] in text
    assert "36.37" in text
    assert "## Further sweep" in text
    assert "## Summary" in text
    assert "identical test accuracies" in text


@pytest.mark.uses_backend("torch", reason="the paper models are PyTorch modules")
def test_logits_bias_is_the_same_table_as_fastrpb():
    """The softmax+logits variant's dense bias is the matrix that FastRPB applies to v."""
    import torch

    import fastrpb
    from benchmarks.paper.model import Attention, Geometry, Variant

    torch.manual_seed(0)
    for geom, L in ((Geometry("grid", 12, (3, 4)), 13), (Geometry("seq", 9), 8)):
        att = Attention(8, 2, Variant.parse("softmax+logits"), geom, seed=1)
        with torch.no_grad():
            for t in att.tables:
                t.normal_()
        dense = att._logits_bias(L).double()  # (H, L, L), class token row/column zero
        v = torch.randn(2, L, 3, dtype=torch.float64)
        tables = [t.double() for t in att.tables]
        if geom.kind == "grid":
            want = fastrpb.rpb_nd(v, tables, geom.grid, skip=(1, 0))
        else:
            want = fastrpb.rpb(v, tables[0], skip=(1, 0))
        torch.testing.assert_close(dense @ v, want, rtol=1e-5, atol=1e-5)  # dense summed in float32
