"""fastrpb on the engines users scale out with: sharded JAX, Dask, ``torch.compile``.

- JAX data parallel (``sharded_jax.py``, in a subprocess: 8 emulated CPU devices must
  be set before JAX is imported): under ``jax.jit`` with values sharded over batch,
  heads or both, ``rpb``, ``rpb_nd`` and ``linear_attention(rpb=)`` equal the oracle
  and the unsharded call (gradients too), compile without a value-sized all-gather or
  all-to-all, and keep the input's sharding; eager calls on sharded arrays work.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from backends import requested

import oracles

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _selected(name: str) -> bool:
    names, _ = requested()
    return name in names


@pytest.mark.skipif(not _selected("jax"), reason="jax is not in FASTRPB_BACKENDS")
def test_jax_sharded_jit_keeps_the_work_local():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE)])}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharded_jax.py")], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-6000:]}"
    assert proc.stdout.rstrip().endswith("OK"), proc.stdout
    for layout in ("batch", "heads", "batch+heads"):
        assert f"{layout}: eager calls equal" in proc.stdout
