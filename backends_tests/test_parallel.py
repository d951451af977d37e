"""Sequence parallelism (``fastrpb.parallel``) equals the single-device call.

Each framework runs in a subprocess, as a user's job would: JAX needs its device count
(8 emulated CPU devices) set before it is imported, and torch.distributed needs one
process per rank. The scripts assert (forward and gradients against the float64
dense oracle and the single-device call) and print ``OK``:

- ``parallel_jax.py``: ``jax.shard_map`` with P = 2, 4, 8, causal and not, the maps
  elu, sikf, favor and dpfp, with the FastRPB term, skip and key masks; ``jax.grad``
  through ``shard_map``; the compiled program exchanges one state-sized all-gather.
- ``parallel_torch.py``: gloo on 127.0.0.1 with 2 and 4 processes.

Plus the argument checks, in this process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backends_tests.backends import requested

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _selected(name: str) -> bool:
    names, _ = requested()
    return name in names


def _run(*args: str, ok: bool = True) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE)])}
    proc = subprocess.run(
        [sys.executable, *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    if ok:
        assert proc.stdout.rstrip().endswith("OK"), proc.stdout
    return proc.stdout


def _docs_examples() -> list[str]:
    """The python blocks of docs/scaling.md: the shard_map and the torchrun example."""
    text = (ROOT / "docs" / "scaling.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.skipif(not _selected("jax"), reason="jax is not in FASTRPB_BACKENDS")
def test_jax_shard_map_equals_single_device():
    out = _run(str(HERE / "parallel_jax.py"))
    for P in (2, 4, 8):
        assert f"P={P} " in out


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.skipif(not _selected("torch"), reason="torch is not in FASTRPB_BACKENDS")
def test_torch_distributed_gloo_equals_one_process():
    out = _run(str(HERE / "parallel_torch.py"), "2", "4")
    for P in (2, 4):
        assert f"rpb P={P}: forward and gradients equal" in out


@pytest.mark.skipif(not _selected("numpy"), reason="numpy is not in FASTRPB_BACKENDS")
def test_argument_errors_name_the_argument():
    from fastrpb import parallel

    class Two(parallel.Communicator):
        """Two ranks that never communicate: the checks must fail before any collective."""

        def size(self):
            return 2

    x = np.zeros((8, 4))
    with pytest.raises(TypeError, match=r"comm must come from fastrpb\.parallel\.jax_axis"):
        parallel.linear_attention(x, x, x, comm=object())
    with pytest.raises(TypeError, match="comm must come from"):
        parallel.rpb(x, np.zeros(15), comm=None)
    with pytest.raises(TypeError, match="name must be a mesh axis name"):
        parallel.jax_axis(3)
    with pytest.raises(ValueError, match=r"longer than the bias table w: L = 16 tokens .* M = 8"):
        parallel.rpb(x, np.zeros(15), comm=Two())
    with pytest.raises(ValueError, match=r"skip = \(9, 8\) skips 17 tokens but the sequence has only L = 2 x 8 = 16"):
        parallel.rpb(x, np.zeros(31), comm=Two(), skip=(9, 8))
    with pytest.raises(ValueError, match="causal=True needs blocks of as many queries as keys"):
        parallel.linear_attention(x[:4], x, x, comm=Two(), causal=True)
    with pytest.raises(ValueError, match="in the FastRPB term"):
        parallel.linear_attention(x, x, x, comm=Two(), rpb=np.zeros(15))


@pytest.mark.skipif(not _selected("torch"), reason="torch is not in FASTRPB_BACKENDS")
def test_torch_group_needs_an_initialised_group():
    from fastrpb import parallel

    with pytest.raises(ValueError, match=r"needs an initialised torch\.distributed process group"):
        parallel.rpb(np.zeros((8, 4)), np.zeros(31), comm=parallel.torch_group())


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.skipif(not _selected("jax"), reason="jax is not in FASTRPB_BACKENDS")
def test_docs_shard_map_example_runs(tmp_path):
    script = tmp_path / "shard_map_example.py"
    script.write_text(_docs_examples()[0])
    last = _run(str(script), ok=False).strip().splitlines()[-1]
    assert "None, 'seq', None)" in last, last
    assert float(last.split()[-1]) < 1e-4, last


@pytest.mark.slow  # a subprocess or a compiler: out of the inner loop (-m "not slow")
@pytest.mark.skipif(not _selected("torch"), reason="torch is not in FASTRPB_BACKENDS")
def test_docs_torchrun_example_runs(tmp_path):
    script = tmp_path / "sp.py"
    script.write_text(_docs_examples()[1])
    logs = tmp_path / "logs"
    _run(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--log-dir",
        str(logs),
        "--redirects",
        "1",
        str(script),
        ok=False,
    )
    # each rank prints "rank error" to its own stdout file: on the shared stdout the two
    # ranks' writes interleaved once ("01  0.0" in a clean CI run)
    out = "".join(f.read_text() for f in sorted(logs.rglob("stdout.log")))
    errors = {int(m[1]): float(m[2]) for m in re.finditer(r"^(\d+) ([-+0-9.eE]+|nan|inf)$", out, re.MULTILINE)}
    assert sorted(errors) == [0, 1], out
    assert max(errors.values()) < 1e-4, out
