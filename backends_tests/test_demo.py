"""The demo (`python -m fastrpb`) runs, checks itself and prints its table, on every
backend the command line knows; its errors are one line each (exit code 2)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastrpb.__main__ import _fmt_ratio, main


def test_demo_runs_and_prints_the_comparison(capsys):
    assert (
        main(["demo", "--length", "2048", "--heads", "2", "--features", "8", "--repeats", "1", "--check-length", "64"])
        == 0
    )
    out = capsys.readouterr().out
    assert "[OK]" in out
    assert "FastRPB time" in out
    assert "dense time" in out
    assert "2,048" in out
    assert "1,024" in out


# --------------------------------------------------------------------------- the command line, in subprocesses
ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    "OMP_NUM_THREADS": "1",
}
# backend of the matrix -> (--backend, --device)
CLI = {
    "numpy": ("numpy", "cpu"),
    "torch": ("torch", "cpu"),
    "torch_cuda": ("torch", "cuda"),
    "jax": ("jax", "cpu"),
    "jax_gpu": ("jax", "gpu"),
    "cupy": ("cupy", "0"),
}


def _cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fastrpb", *args] if code is None else [sys.executable, "-c", code, *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300, check=False)


@pytest.mark.only_backends(*CLI, reason="the command line runs NumPy, PyTorch, JAX and CuPy")
def test_cli_runs_on_every_backend(backend):
    name, device = CLI[backend.name]
    run = _cli(
        "--backend",
        name,
        "--device",
        device,
        "--length",
        "1500",
        "--heads",
        "2",
        "--features",
        "4",
        "--check-length",
        "48",
        "--repeats",
        "1",
    )
    assert run.returncode == 0, run.stderr
    assert f"demo on {name} " in run.stdout
    assert "[OK]" in run.stdout
    assert "1,500" in run.stdout
    assert re.search(r"\s0x\b", run.stdout) is None  # a ratio below 1 is never rounded to 0x


def test_ratios_below_one_print_as_decimals():
    assert [_fmt_ratio(r) for r in (0.48, 0.004, 3.46, 1234.4, None)] == ["0.48x", "4.0e-03x", "3.5x", "1,234x", "n/a"]


# torch unimportable (as where it is not installed), then the command line
NO_TORCH = "import sys; sys.modules['torch'] = None; from fastrpb.__main__ import main; sys.exit(main())"
# name -> (arguments, a phrase of the one-line error)
CLI_ERRORS = {
    "unknown-option": (("--backnd", "torch"), "unknown option --backnd (did you mean --backend?)"),
    "unknown-backend": (
        ("--backend", "tensorflow"),
        "--backend tensorflow: unknown backend; choose one of numpy, torch, jax, cupy",
    ),
    "backend-not-installed": (("--backend", "torch"), "--backend torch: torch is not installed here"),
    "numpy-device": (("--device", "cuda"), "--device cuda: NumPy runs on the CPU only"),
    "check-too-large": (
        ("--check-length", "1000000"),
        "--check-length 1000000 (the dense float64 check) needs about 14.6 TiB",
    ),
    "length-too-large": (("--length", "10000000000"), "--length 10000000000 with 8 heads x 64 features needs about"),
    "below-one": (("--heads", "0"), "--heads must be >= 1, got 0"),
    "unknown-command": (("bench",), "unknown command 'bench'"),
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_errors_are_one_line(case):
    args, phrase = CLI_ERRORS[case]
    run = _cli(*args, code=NO_TORCH if case == "backend-not-installed" else None)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert phrase in lines[0]
    if "too-large" in case:
        assert "available on" in lines[0]  # the figure beside what there is


def test_cli_help_gives_every_default_and_no_markup():
    run = _cli("--help")
    assert run.returncode == 0
    for option in (
        "--backend",
        "--device",
        "--length",
        "--heads",
        "--features",
        "--check-length",
        "--repeats",
        "--seed",
    ):
        assert option in run.stdout
    options = run.stdout.split("options:")[1]
    helps = re.split(r"\n  (?=-)", options)[2:]  # the entries after -h
    assert len(helps) == 8
    for entry in helps:
        assert "(default:" in entry, entry
    assert "``" not in run.stdout
