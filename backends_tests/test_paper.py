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

from benchmarks.paper import data as paper_data  # the repository root is on pytest's pythonpath

ROOT = Path(__file__).resolve().parents[1]


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
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
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
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.paper.report",
            str(out / "results.json"),
            "--page",
            str(page),
            "--extra",
            str(out / "results.json"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
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


# ----------------------------------------------------------------------------- autoregressive
def test_ar_quantise_levels_and_pooling():
    from benchmarks.paper.autoregressive import decode_samples, encode_samples, quantise

    img = np.zeros((1, 784), dtype=np.uint8)
    img[0, :28] = 255  # first row white
    img[0, 28 * 27 :] = 128
    q = quantise(img, 28, 16)
    assert q.shape == (1, 784)
    assert q.dtype == np.int64
    assert (q[0, :28] == 15).all()
    assert (q[0, 28:56] == 0).all()
    assert (q[0, 28 * 27 :] == 8).all()
    pooled = quantise(img, 7, 4)  # 4 x 4 blocks: the top blocks hold one white row of four
    assert pooled.shape == (1, 49)
    assert (pooled[0, :7] == 0).all()
    assert (quantise(np.full((2, 784), 255, np.uint8), 14, 256) == 255).all()
    with pytest.raises(ValueError, match="side"):
        quantise(img, 5, 16)
    for levels in (4, 16, 256):
        x = np.random.default_rng(levels).integers(0, levels, size=(3, 49))
        assert np.array_equal(decode_samples(encode_samples(x, levels), levels), x)


@pytest.mark.uses_backend("torch", reason="the paper models are PyTorch modules")
def test_ar_decoding_reproduces_the_causal_forward_pass():
    """The sampling path (layer ``step`` / KV cache) computes the same logits as training's forward pass."""
    import torch

    from benchmarks.paper.armodel import PixelTransformer, default_variants

    torch.manual_seed(0)
    for v in default_variants():
        m = PixelTransformer(levels=5, grid=(3, 4), d=16, heads=2, layers=2, d_ff=16, variant=v, chunk_size=4, seed=1)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "table" in name:  # FastRPB tables start near zero; make the bias matter
                    p.normal_(0.0, 0.5)
            px = torch.randint(0, 5, (3, 12))
            full = m(px)
            # a changed future pixel must not change earlier logits (causality)
            later = px.clone()
            later[:, 7:] = (later[:, 7:] + 1) % 5
            torch.testing.assert_close(m(later)[:, :8], full[:, :8], rtol=1e-5, atol=1e-5)
            caches, tok, steps = None, torch.full((3,), m.bos), []
            for t in range(12):
                logits, caches = m.step(tok, t, caches)
                steps.append(logits)
                tok = px[:, t]
        torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-4, atol=1e-5, msg=lambda s, v=v: f"{v}: {s}")


@pytest.mark.slow
@pytest.mark.uses_backend("torch", reason="the autoregressive benchmark trains PyTorch models")
def test_ar_quick_run_end_to_end(tmp_path: Path):
    import math

    from benchmarks.paper.armodel import default_variants
    from benchmarks.paper.autoregressive import QUICK

    out = tmp_path / "ar"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.paper.autoregressive", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"--quick failed:\nSTDERR:\n{proc.stderr[-6000:]}"
    runs = json.loads((out / "results.json").read_text())
    assert isinstance(runs, list)
    assert sorted((r["variant"], r["seed"]) for r in runs) == sorted((v, s) for v in default_variants() for s in (0, 1))
    bound = math.log2(QUICK.levels)
    for r in runs:
        for field in ("variant", "seed", "bits_per_dim", "train_s_per_step", "generate_tokens_per_s"):
            assert field in r, field
        assert math.isfinite(r["bits_per_dim"]), (r["variant"], r["bits_per_dim"])
        assert 0 < r["bits_per_dim"] < bound, (r["variant"], r["bits_per_dim"])
        assert r["train_s_per_step"] > 0
        assert r["generate_tokens_per_s"] > 0
        assert r["loss_finite"]
        assert len(r["samples_hex"]) == QUICK.gen_images
        assert all(len(h) == QUICK.side**2 for h in r["samples_hex"])
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["generation_timing"]["per_variant"].keys() == set(default_variants())
    assert (out / "samples.png").stat().st_size > 5_000
    md = (out / "results.md").read_text()
    for claim in (
        "FastRPB improves causal linear attention's bits/dim",
        "SIKF vs elu+1 in the causal setting",
        "Linear decoding vs softmax decoding at 49 tokens",
    ):
        assert claim in md, claim
    if any(v.endswith("rpb2d") for v in default_variants()):  # the 2-d rows decode through the streaming step
        assert meta["decode_bias_2d"] == "streaming"
        assert "`rpb_nd_step`" in md
    # the Experiments page takes the section
    page = tmp_path / "experiments.md"
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.paper.report",
            str(ROOT / "docs/experiments/results.json"),
            "--page",
            str(page),
            "--autoregressive",
            str(out),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert gen.returncode == 0, gen.stderr
    text = page.read_text()
    assert "## Autoregressive Fashion-MNIST" in text
    assert meta["config_hash"] in text
    assert "--autoregressive" in text


def test_presets_on_the_command_line():
    from benchmarks.paper.__main__ import parse
    from benchmarks.paper.settings import PRESETS

    a = parse(["--preset", "listops-short"])
    assert a.preset == "listops-short"
    assert a.tasks == ["listops"]
    assert PRESETS["listops-short"].listops_max_len <= 512
    assert parse(["--quick"]).preset == "quick"
    assert parse([]).preset == "full"
    assert parse([]).tasks == ["fmnist", "listops"]
    with pytest.raises(SystemExit):
        parse(["--quick", "--preset", "listops-short"])


@pytest.mark.uses_backend("torch", reason="the paper models are PyTorch modules")
def test_ar_decoding_cost_measurement_runs():
    """``ardecode`` times both decoding paths from a real prefilled state (smoke test of the measurement)."""
    from benchmarks.paper.ardecode import measure, table

    res = measure(widths=((8, 2),), positions=(5, 9), batch=2, reps=2, rounds=1)
    assert [r["position"] for r in res["rows"]] == [5, 9]
    for r in res["rows"]:
        assert r["linear_ms_per_token"] > 0
        assert r["softmax_ms_per_token"] > 0
        assert r["speedup"] == pytest.approx(r["softmax_ms_per_token"] / r["linear_ms_per_token"])
    assert table(res).count("\n") == 3


# ----------------------------------------------------------------------------- MQAR
def _mqar_answers_by_reading(tokens: np.ndarray, num_kv_pairs: int) -> dict[int, int]:
    """Oracle: for every token after the context, the value that followed the same key in the context."""
    context = {int(tokens[2 * i]): int(tokens[2 * i + 1]) for i in range(num_kv_pairs)}
    return {t: context[int(tokens[t])] for t in range(2 * num_kv_pairs, len(tokens)) if int(tokens[t]) in context}


def test_mqar_generator_answers_are_recoverable_from_the_sequence():
    from benchmarks.paper import mqar

    n, L, kv, vocab = 50, 40, 6, 20
    tokens, targets = mqar.generate(n, L, kv, vocab, np.random.default_rng(5))
    again = mqar.generate(n, L, kv, vocab, np.random.default_rng(5))
    assert np.array_equal(tokens, again[0])
    assert np.array_equal(targets, again[1])
    assert tokens.shape == targets.shape == (n, L)
    half = vocab // 2
    for x, y in zip(tokens, targets, strict=True):
        keys, values = x[0 : 2 * kv : 2], x[1 : 2 * kv : 2]
        assert len(set(keys.tolist())) == kv  # distinct keys, each from the key range
        assert ((keys >= 1) & (keys < half)).all()
        assert ((values >= half) & (values < vocab)).all()
        asked = np.flatnonzero(y >= 0)
        assert len(asked) == kv  # one query per pair
        assert asked.min() >= 2 * kv  # all after the context
        assert sorted(x[asked].tolist()) == sorted(keys.tolist())  # every key is asked once
        oracle = _mqar_answers_by_reading(x, kv)
        assert set(oracle) == set(asked.tolist())  # after the context, only queries carry keys (the rest is filler)
        for t in asked:
            assert y[t] == oracle[int(t)]
        rest = np.ones(L, dtype=bool)
        rest[: 2 * kv] = False
        rest[asked] = False
        assert (x[rest] == mqar.FILLER).all()
    other = mqar.generate(n, L, kv, vocab, np.random.default_rng(6))[0]
    assert not np.array_equal(tokens, other)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        mqar.generate(1, L, 10, 20, np.random.default_rng(0))  # only 9 keys in a vocabulary of 20
    with pytest.raises(ValueError, match="seq_len"):
        mqar.generate(1, 17, 6, 20, np.random.default_rng(0))  # 12 context tokens + 6 queries do not fit


@pytest.mark.uses_backend("torch", reason="the MQAR models are PyTorch modules")
def test_mqar_models_are_causal():
    """Every variant's prediction at token t ignores the tokens after t (the recall is not read off the future)."""
    import torch

    from benchmarks.paper import mqar

    s = mqar.QUICK
    L = 24
    x, _ = mqar.generate(2, L, s.num_kv_pairs, s.vocab, np.random.default_rng(0))
    x = torch.from_numpy(x)
    y = x.clone()
    y[:, 15:] = (y[:, 15:] + 1) % s.vocab
    for v in mqar.MQAR_VARIANTS:
        model = mqar.build(v, L, 0, s).eval()
        with torch.no_grad():
            a, b = model(x), model(y)
        torch.testing.assert_close(a[:, :15], b[:, :15], msg=lambda m, v=v: f"{v}: {m}")
        assert not torch.allclose(a[:, 15:], b[:, 15:]), v


@pytest.mark.uses_backend("torch", reason="the MQAR benchmark trains PyTorch models")
def test_mqar_tiny_sweep_appends_resumes_and_reports(tmp_path: Path):
    import dataclasses

    from benchmarks.paper import mqar, mqarreport

    s = dataclasses.replace(mqar.QUICK, steps=2, long_steps=2)
    out = tmp_path / "mqar"
    kw = dict(s=s, variants=["softmax", "sikf+rpb"], seeds=[0, 1], out=out, command="test", log=lambda m: None)
    # a deadline already past: nothing trains, the report says every run is missing
    mqar.sweep(**kw, deadline=0.0)
    assert not (out / "results.json").exists()
    first = mqar.sweep(**{**kw, "seeds": [0]})
    runs = json.loads((out / "results.json").read_text())
    assert runs == first["runs"]
    assert [(r["variant"], r["seq_len"], r["seed"]) for r in runs] == [
        ("softmax", 24, 0),
        ("softmax", 40, 0),
        ("sikf+rpb", 24, 0),
        ("sikf+rpb", 40, 0),
    ]
    for r in runs:
        for field in ("variant", "seed", "seq_len", "num_kv_pairs", "accuracy", "train_s_per_step"):
            assert field in r, field
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["train_s_per_step"] > 0
        assert r["loss_finite"]
        assert len(r["loss"]) == 2
        assert r["n_test_queries"] == (16 if r["seq_len"] == 24 else 8) * 3
    assert runs[1]["accuracy"] == runs[1]["accuracy_after_phase"]  # the last phase's model is the final one
    md = (out / "results.md").read_text()
    assert "PARTIAL" not in md
    # another seed: the finished runs are kept, only the new ones train, and the section says a cell is short
    second = mqar.sweep(**kw)
    assert second["runs"][:4] == runs
    assert len(second["runs"]) == 8
    assert mqar.sweep(**kw)["runs"] == second["runs"]  # nothing left to train
    rows = mqar.summarise(second["runs"])
    assert {(r["variant"], r["seq_len"]): r["seeds"] for r in rows} == {
        (v, L): [0, 1] for v in ("softmax", "sikf+rpb") for L in (24, 40)
    }
    meta = json.loads((out / "sweep.json").read_text())
    short = mqarreport.section(second["runs"][:6], meta, plot_rel="p.png", results_arg="r.json")
    assert "PARTIAL RESULTS" in short
    assert "sikf+rpb/L = 24/seed 1, sikf+rpb/L = 40/seed 1" in short
    assert "(1 of 2 seeds)" in short
    # other settings into the same file: refused
    with pytest.raises(ValueError, match="another configuration"):
        mqar.sweep(**{**kw, "s": dataclasses.replace(s, steps=3)})
    assert (out / "accuracy.png").stat().st_size > 5_000
    # the experiments page takes the section
    page = tmp_path / "experiments.md"
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.paper.report",
            str(ROOT / "docs/experiments/results.json"),
            "--page",
            str(page),
            "--mqar",
            str(out),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert gen.returncode == 0, gen.stderr
    text = page.read_text()
    assert "## Which feature map? Multi-query associative recall (MQAR)" in text
    mq = text.split("## Which feature map?")[1]
    assert "SIKF is more accurate than elu+1" not in mq  # no elu run in this sweep: no such verdict
    assert "the best linear map (linear, SIKF + FastRPB) is more accurate than softmax" in mq
    assert meta["config_hash"] in text
    assert "--mqar" in text


def test_mqar_verdicts_follow_the_two_standard_error_rule():
    from benchmarks.paper import mqarreport

    def row(v, accs):
        a = np.array(accs)
        return {
            "variant": v,
            "seq_len": 64,
            "seeds": list(range(len(a))),
            "accuracy_mean": float(a.mean()),
            "accuracy_se": float(a.std(ddof=1) / np.sqrt(len(a))),
            "train_s_per_step": 1.0,
        }

    rows = [
        row("softmax", [0.9, 0.92, 0.94]),
        row("elu", [0.5, 0.52, 0.54]),
        row("sikf", [0.6, 0.62, 0.64]),
        row("elu+rpb", [0.4, 0.6, 0.5]),
    ]
    c = {(x["a"], x["b"]): x for x in mqarreport.claims(rows, [64])}
    assert c[("sikf", "elu")]["verdict"] == "held"  # +0.10, s.e. 0.016
    assert c[("elu+rpb", "elu")]["verdict"].startswith("not resolved")  # +-0.02 within 2 s.e. (0.06)
    assert c[("sikf", "softmax")]["verdict"].startswith("did not hold")  # the best linear map is sikf
    assert c[("sikf", "softmax")]["claim"] == "the best linear map (linear, SIKF) is more accurate than softmax"


def test_mqar_report_names_diverged_models():
    from benchmarks.paper import mqarreport

    def rec(v, seed, L, loss):
        return {"variant": v, "seed": seed, "seq_len": L, "loss": loss, "loss_finite": bool(np.isfinite(loss).all())}

    runs = [
        rec("favor", 0, 64, [2.0, 1.5]),
        rec("favor", 0, 1024, [1.4]),
        rec("favor", 1, 64, [2.0, 1.9, float("nan")]),
        rec("favor", 1, 1024, [float("nan")]),
    ]
    (line,) = mqarreport.non_finite(runs)
    assert "linear, FAVOR+, seed 1 (from step 3 of 4)" in line
    assert mqarreport.non_finite(runs[:2]) == []
