"""One training run: (task, variant, seed) -> a dict of raw numbers.

Runs inside a forked worker process (see ``runner.py``) so that its peak memory can be
measured on its own: at the start the worker resets the kernel's resident-set
high-water mark (``/proc/self/clear_refs``, Linux >= 4.0) and reads ``VmHWM`` from
``/proc/self/status`` after training. Peak memory is therefore *peak RSS of the
process*, and "extra" is that peak minus the RSS just before the model was built
(data already loaded): the memory the training of this model needed.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..memory import reset_peak_rss, status_kb
from .settings import Settings


@dataclass
class TaskData:
    """Arrays for one task, NumPy, shared with forked workers copy-on-write."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    len_train: np.ndarray | None = None  # ListOps: token counts incl. the class token
    len_test: np.ndarray | None = None


def _listops_cached(spec, cache: Path | None):
    """Generate (or load from ``cache``) encoded ListOps for ``spec``: ids, lengths, labels."""
    from . import data

    key = None
    if cache is not None:
        h = hashlib.sha256(repr(spec).encode() + Path(data.__file__).read_bytes()).hexdigest()[:12]
        key = cache / f"listops-{h}.npz"
        if key.exists():
            z = np.load(key)
            return z["ids"], z["lengths"], z["labels"]
    seqs, labels = data.generate_listops(spec)
    ids, lengths = data.encode_listops(seqs)
    if key is not None:
        key.parent.mkdir(parents=True, exist_ok=True)
        tmp = key.with_name(key.stem + f".tmp{os.getpid()}.npz")
        np.savez_compressed(tmp, ids=ids, lengths=lengths, labels=labels)
        os.replace(tmp, key)
    return ids, lengths, labels


def load_task(task: str, s: Settings, cache: Path | None = None) -> TaskData:
    """The arrays of one task; generated ListOps is cached under ``cache`` (keyed by spec and generator code)."""
    from . import data

    if task == "fmnist":
        xtr, ytr = data.fashion_mnist_subset("train", s.fmnist_train, seed=s.data_seed)
        xte, yte = data.fashion_mnist_subset("test", s.fmnist_test, seed=s.data_seed + 1)
        return TaskData(task, xtr, ytr, xte, yte)
    if task == "listops":
        common = dict(
            min_len=s.listops_min_len,
            max_len=s.listops_max_len,
            max_depth=s.listops_max_depth,
            max_args=s.listops_max_args,
        )
        xtr, ltr, ytr = _listops_cached(data.ListOpsSpec(s.listops_train, seed=s.data_seed, **common), cache)
        xte, lte, yte = _listops_cached(data.ListOpsSpec(s.listops_test, seed=s.data_seed + 1, **common), cache)
        return TaskData(task, xtr, ytr, xte, yte, ltr, lte)
    raise ValueError(f"unknown task {task!r}")


def task_stats(d: TaskData) -> dict:
    out: dict[str, Any] = {
        "n_train": len(d.y_train),
        "n_test": len(d.y_test),
        "test_label_counts": np.bincount(d.y_test, minlength=10).tolist(),
    }
    counts = np.bincount(d.y_test, minlength=10)
    out["majority_class_test_acc"] = float(counts.max() / counts.sum())
    if d.len_train is not None:
        lens = d.len_train - 1
        out["len_min"], out["len_max"], out["len_mean"] = int(lens.min()), int(lens.max()), float(lens.mean())
    return out


# ----------------------------------------------------------------------------- training
def warm_imports() -> None:
    """Import, in the parent, what every worker would otherwise import again after fork.

    (Building the first AdamW imports ``torch._dynamo``: about 2 s per process.) No
    tensor maths runs here, so no thread pool exists yet when the workers fork.
    """
    import torch
    import tqdm  # noqa: F401

    import fastrpb  # noqa: F401

    from . import model  # noqa: F401

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)


def _batch(d: TaskData, idx: np.ndarray, train: bool):
    import torch

    x = d.x_train if train else d.x_test
    lens = d.len_train if train else d.len_test
    if lens is None:  # pixels: scale to [0, 1] then standardise (Fashion-MNIST mean/std)
        xb = torch.from_numpy(x[idx].astype(np.float32) / 255.0)
        return (xb - 0.2860) / 0.3530, None
    L = int(lens[idx].max())
    xb = torch.from_numpy(x[idx, :L])
    mask = torch.arange(L)[None, :] < torch.from_numpy(lens[idx])[:, None]
    return xb, mask


def _lr(step: int, s: Settings) -> float:
    warm = max(1, int(s.warmup * s.steps))
    if step < warm:
        return s.lr * (step + 1) / warm
    return s.lr * max(0.0, (s.steps - step) / max(1, s.steps - warm))


def evaluate(model, d: TaskData, n: int, s: Settings) -> float:
    import torch

    n = min(n, len(d.y_test))
    correct = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, n, s.eval_batch):
            idx = np.arange(i, min(n, i + s.eval_batch))
            xb, mask = _batch(d, idx, train=False)
            pred = model(xb, mask).argmax(-1).numpy()
            correct += int((pred == d.y_test[idx]).sum())
    model.train()
    return correct / n


def geometry(task: str, s: Settings):
    from .model import Geometry

    if task == "fmnist":
        return Geometry("grid", 784, (28, 28))
    return Geometry("seq", s.listops_max_len)


def train_one(d: TaskData, variant: str, seed: int, s: Settings, *, progress: Any = None) -> dict:
    """Train one model and return its raw numbers (accuracies, losses, timings, memory)."""
    import torch

    from . import data as data_mod
    from .model import Classifier, n_params

    torch.set_num_threads(s.threads)
    reset_ok = reset_peak_rss()
    rss0 = status_kb("VmRSS")
    torch.manual_seed(seed)
    vocab = None if d.name == "fmnist" else len(data_mod.VOCAB)
    model = Classifier(
        vocab=vocab,
        n_classes=10,
        d=s.d_model,
        heads=s.heads,
        layers=s.layers,
        d_ff=s.d_ff,
        variant=variant,
        geom=geometry(d.name, s),
        seed=seed,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(d.y_train))
    pos = 0
    curve_at = sorted({max(1, round(s.steps * (i + 1) / s.eval_points)) for i in range(s.eval_points)})
    losses: list[float] = []
    train_correct: list[int] = []  # per batch: a free learning curve (training accuracy)
    step_times: list[float] = []
    curve: list[dict] = []
    eval_time = 0.0
    finite = True
    t_start = time.perf_counter()
    for step in range(s.steps):
        if pos + s.batch > len(order):
            order, pos = rng.permutation(len(d.y_train)), 0
        idx = order[pos : pos + s.batch]
        pos += s.batch
        xb, mask = _batch(d, idx, train=True)
        yb = torch.from_numpy(d.y_train[idx])
        for g in opt.param_groups:
            g["lr"] = _lr(step, s)
        t0 = time.perf_counter()
        logits = model(xb, mask)
        loss = torch.nn.functional.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip)
        opt.step()
        step_times.append(time.perf_counter() - t0)
        lv = float(loss.detach())
        finite = finite and math.isfinite(lv)
        losses.append(lv)
        train_correct.append(int((logits.detach().argmax(-1) == yb).sum()))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{lv:.3f}", refresh=False)
        if step + 1 in curve_at and step + 1 != s.steps:
            t0 = time.perf_counter()
            curve.append(
                {
                    "step": step + 1,
                    "acc": evaluate(model, d, s.curve_examples, s),
                    "n": min(s.curve_examples, len(d.y_test)),
                }
            )
            eval_time += time.perf_counter() - t0
    train_time = time.perf_counter() - t_start - eval_time
    hwm = status_kb("VmHWM")
    t0 = time.perf_counter()
    final = evaluate(model, d, len(d.y_test), s)
    eval_time += time.perf_counter() - t0
    curve.append({"step": s.steps, "acc": final, "n": len(d.y_test)})
    warm = min(5, max(0, len(step_times) - 1))  # the first steps include one-off allocations
    timed = step_times[warm:]
    return {
        "task": d.name,
        "variant": variant,
        "seed": seed,
        "test_acc": final,
        "n_test": len(d.y_test),
        "curve": curve,
        "loss": losses,
        "train_correct": train_correct,
        "batch": s.batch,
        "loss_finite": finite,
        "step_time_median_s": float(np.median(timed)),
        "step_time_mean_s": float(np.mean(timed)),
        "step_times_skipped": warm,
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "peak_rss_mb": hwm / 1024 if hwm is not None else None,
        "rss_before_mb": rss0 / 1024 if rss0 is not None else None,
        "peak_extra_mb": (hwm - rss0) / 1024 if (hwm is not None and rss0 is not None and reset_ok) else None,
        "peak_reset_ok": reset_ok,
        "n_params": n_params(model),
        "threads": s.threads,
        "pid": os.getpid(),
    }
