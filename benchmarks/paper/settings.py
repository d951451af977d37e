"""Experiment settings, the two presets (full and ``--quick``) and the config hash.

Every number that changes what a run computes lives in ``Settings``; its hash (with
a hash of the code that trains the models and of the library) names the directory
that per-run results are stored in, so runs of different settings or code are never
mixed: a restart reuses only the runs whose hash matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

TASKS = ("fmnist", "listops")


@dataclass(frozen=True)
class Settings:
    # --- data
    fmnist_train: int = 10_000
    fmnist_test: int = 400
    listops_train: int = 5_000
    listops_test: int = 400
    listops_min_len: int = 500
    listops_max_len: int = 600
    listops_max_depth: int = 10
    listops_max_args: int = 10
    data_seed: int = 1234
    # --- model (identical for every variant)
    d_model: int = 32
    heads: int = 2
    layers: int = 2
    d_ff: int = 64
    # --- optimisation (identical for every variant)
    steps: int = 100
    batch: int = 8
    lr: float = 5e-3
    warmup: float = 0.1  # fraction of the steps
    weight_decay: float = 0.01
    clip: float = 1.0
    # --- evaluation
    eval_points: int = 1  # test evaluations along training (the last is the final test); 1 = final only,
    # the learning curves then show training loss and training accuracy (free, from the batches)
    curve_examples: int = 100  # test examples at the intermediate curve points
    eval_batch: int = 50
    # --- interleaved step timing after training (see timing.py); 0 = none
    timing_rounds: int = 5
    # --- execution (does not change results, so not hashed)
    threads: int = 1

    UNHASHED = ("threads",)

    def hashed(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.UNHASHED}


FULL = Settings()

QUICK = Settings(
    fmnist_train=200,
    fmnist_test=48,
    listops_train=200,
    listops_test=48,
    listops_min_len=40,
    listops_max_len=80,
    d_model=16,
    heads=2,
    layers=1,
    d_ff=32,
    steps=4,
    batch=4,
    eval_points=2,  # exercises the intermediate evaluation too
    curve_examples=16,
    eval_batch=16,
    timing_rounds=2,
)


# ListOps that a small model learns on a CPU: short expressions (10-64 tokens, the LRA
# generator otherwise unchanged), a wider model, larger batches and more steps.
LISTOPS_SHORT = Settings(
    listops_train=5_000,
    listops_test=400,
    listops_min_len=10,
    listops_max_len=64,
    d_model=64,
    heads=4,
    layers=2,
    d_ff=128,
    steps=600,
    batch=32,
    lr=3e-3,
    eval_batch=100,
)

PRESETS = {"full": FULL, "quick": QUICK, "listops-short": LISTOPS_SHORT}


def code_digest() -> str:
    """Hash of the library source and of the experiment code that runs the models."""
    here = Path(__file__).resolve().parent
    lib = Path(__import__("fastrpb").__file__).resolve().parent
    files = sorted(lib.glob("*.py")) + sorted(
        here / n for n in ("data.py", "model.py", "train.py", "settings.py", "timing.py")
    )
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def config_hash(settings: Settings, code: str | None = None) -> str:
    payload = {"settings": settings.hashed(), "code": code if code is not None else code_digest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
