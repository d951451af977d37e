"""Every example in docs/examples runs, at tiny size, so none can rot.

Each script runs in a subprocess (as a user would run it) with ``--tiny``. The
framework examples run when their backend is selected by ``FASTRPB_BACKENDS`` (and
can run here: the ``uses_backend`` marker); the
training examples must print a falling loss.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


def _run(script: str, timeout: float = 300) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--tiny"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _losses(output: str) -> list[float]:
    losses = [float(m) for m in re.findall(r"^epoch\s+\d+\s+loss\s+([0-9.]+)", output, flags=re.M)]
    assert len(losses) >= 2, f"no per-epoch loss in the output:\n{output}"
    return losses


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.uses_backend("numpy")
def test_numpy_pipeline():
    out = _run("numpy_pipeline.py")
    assert "numpy.ndarray" in out, out
    error = float(re.search(r"dense Toeplitz bias\| on \d+ tokens: (\S+)", out).group(1))
    assert error < 1e-4, out
    before, after = map(float, re.search(r"input ([0-9.]+) -> pipeline ([0-9.]+)", out).groups())
    assert after < before, out


def test_cupy_pipeline_is_the_numpy_one_with_one_import_changed():
    def body(name: str) -> list[str]:  # the file below its docstring
        lines = (EXAMPLES / name).read_text().splitlines()
        return lines[next(i for i, line in enumerate(lines) if line.startswith("from __future__")) :]

    numpy_body, cupy_body = body("numpy_pipeline.py"), body("cupy_pipeline.py")
    changes = [
        op
        for op in difflib.SequenceMatcher(a=numpy_body, b=cupy_body, autojunk=False).get_opcodes()
        if op[0] != "equal"
    ]
    assert len(changes) == 1, changes
    _, i1, i2, j1, j2 = changes[0]
    assert [line.split("#")[0].strip() for line in numpy_body[i1:i2]] == ["import numpy as xp"]
    assert "    import cupy as xp" in cupy_body[j1:j2], cupy_body[j1:j2]
    assert j2 - j1 <= 8, cupy_body[j1:j2]


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.uses_backend("cupy")
def test_cupy_pipeline():
    out = _run("cupy_pipeline.py")
    # the marker ran this test because CuPy loads here with a GPU: the example must not skip
    assert not out.startswith("SKIP:"), f"CuPy runs in the test process but the example skipped: {out}"
    assert "cupy.ndarray" in out, out


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.uses_backend("torch")
def test_torch_classifier_learns():
    losses = _losses(_run("torch_classifier.py"))
    assert losses[-1] < losses[0], losses


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.uses_backend("jax")
def test_flax_classifier_learns():
    losses = _losses(_run("flax_classifier.py"))
    assert losses[-1] < losses[0], losses


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.uses_backend("torch")
def test_onnx_deploy_matches_eager():
    pytest.importorskip("onnxruntime", reason="the export extra (pip install 'fastrpb[export]') is not installed")
    out = _run("onnx_deploy.py")
    assert "DFT in the graph: True" in out, out
    assert "also loaded: nothing else" in out, out  # the runtime process had no PyTorch, no fastrpb
    error = float(re.search(r"max \|ONNX Runtime - eager\| / max \|eager\| = (\S+)", out).group(1))
    assert error < 1e-4, out
