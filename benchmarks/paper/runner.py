"""Run every (task, variant, seed) in its own forked worker, resumable and never mixed.

Layout of ``--out``::

    runs/<config hash>/<task>/<variant>/seed<k>.json   one file per finished run
    results.json   everything: settings, hash, command, versions, machine, raw runs, summary
    results.md     the table
    curves.png     learning curves

A finished run's file is written atomically, so an interrupted sweep restarted with
the same settings and code reuses exactly the finished runs; a restart with other
settings (or changed code) gets another hash, hence another directory, and the
top-level files refuse to be overwritten by a different configuration unless
``--replace`` is given.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shlex
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..environment import machine, versions
from .settings import Settings, code_digest, config_hash
from .train import TaskData, load_task, task_stats, train_one, warm_imports


class ConfigMismatch(RuntimeError):
    pass


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_path(out: Path, h: str, task: str, variant: str, seed: int) -> Path:
    return out / "runs" / h / task / variant.replace("+", "_") / f"seed{seed}.json"


def _worker(d: TaskData, variant: str, seed: int, s: Settings, h: str, path: str, slot: int) -> None:
    from tqdm import tqdm

    try:
        with tqdm(
            total=s.steps,
            desc=f"{d.name:7s} {variant:14s} seed {seed}",
            position=slot,
            leave=True,
            dynamic_ncols=True,
            mininterval=1.0 if sys.stderr.isatty() else 15.0,
            file=sys.stderr,
        ) as bar:
            res = train_one(d, variant, seed, s, progress=bar)
        res["config_hash"] = h
        _atomic_write(Path(path), json.dumps(res))
    except BaseException:
        err = {"task": d.name, "variant": variant, "seed": seed, "config_hash": h, "error": traceback.format_exc()}
        _atomic_write(Path(path).with_suffix(".error.json"), json.dumps(err))
        os._exit(1)
    os._exit(0)


def _timing_worker(d: TaskData, variants: list[str], s: Settings, h: str, path: str) -> None:
    from .timing import interleaved_step_times

    try:
        res = interleaved_step_times(d, variants, s, rounds=s.timing_rounds)
        res["config_hash"] = h
        _atomic_write(Path(path), json.dumps(res))
    except BaseException:
        _atomic_write(Path(path).with_suffix(".error.json"), json.dumps({"error": traceback.format_exc()}))
        os._exit(1)
    os._exit(0)


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["task"], r["variant"]) for r in runs})
    for task, variant in keys:
        rs = [r for r in runs if r["task"] == task and r["variant"] == variant]
        acc = np.array([r["test_acc"] for r in rs])
        times = np.array([r["step_time_median_s"] for r in rs])
        extra = [r["peak_extra_mb"] for r in rs if r.get("peak_extra_mb") is not None]
        rows.append(
            {
                "task": task,
                "variant": variant,
                "seeds": sorted(r["seed"] for r in rs),
                "acc_mean": float(acc.mean()),
                "acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                "step_time_s": float(np.median(times)),
                "step_time_min_s": float(times.min()),
                "peak_extra_mb": float(max(extra)) if extra else None,
                "peak_rss_mb": float(max(r["peak_rss_mb"] for r in rs))
                if all(r.get("peak_rss_mb") for r in rs)
                else None,
                "n_params": rs[0]["n_params"],
                "all_finite": all(r["loss_finite"] for r in rs),
            }
        )
    return rows


def sweep(
    *,
    settings: Settings,
    tasks: list[str],
    variants: list[str],
    seeds: list[int],
    out: Path,
    jobs: int = 1,
    replace: bool = False,
    command: str | None = None,
    partial: bool = False,
    log=print,
) -> dict:
    """Run (or reuse) every (task, variant, seed); write results.json / .md / curves.png.

    ``partial=True`` trains nothing: it reports the runs of this configuration that have
    finished so far, marked ``"partial": true`` with the list of missing runs.
    """
    from . import report

    code = code_digest()
    h = config_hash(settings, code)
    out.mkdir(parents=True, exist_ok=True)
    top = out / "results.json"
    if top.exists() and not replace and not (partial and json.loads(top.read_text()).get("partial")):
        old = json.loads(top.read_text())
        same = (
            old.get("config_hash") == h
            and old.get("tasks") == tasks
            and old.get("variants") == variants
            and old.get("seeds") == seeds
        )
        if not same:
            raise ConfigMismatch(
                f"{top} holds results of another configuration (hash {old.get('config_hash')}, tasks "
                f"{old.get('tasks')}, variants {old.get('variants')}, seeds {old.get('seeds')}); this run is hash "
                f"{h}, tasks {tasks}, variants {variants}, seeds {seeds}. Use another --out, or --replace "
                "to write this configuration's results there (runs of both stay apart under runs/<hash>/)."
            )
    log(f"config hash {h} (settings + code {code}); per-run results in {out / 'runs' / h}")
    t_all = time.perf_counter()
    load_start = os.getloadavg()
    todo = []
    task_info = {}
    datas: dict[str, TaskData] = {}
    for task in tasks:
        need = [(v, sd) for v in variants for sd in seeds if not run_path(out, h, task, v, sd).exists()]
        reuse = len(variants) * len(seeds) - len(need)
        if reuse:
            log(f"{task}: reusing {reuse} finished run(s) of this configuration")
        t0 = time.perf_counter()
        data = load_task(task, settings, cache=out / "data")
        datas[task] = data
        task_info[task] = {**task_stats(data), "load_s": time.perf_counter() - t0}
        if not partial:
            todo += [(data, v, sd) for v, sd in need]
    warm_imports()
    # seed by seed (an interrupted sweep still has every model), the slowest models first
    cost = {"fmnist": 2, "listops": 1}
    todo.sort(key=lambda t: (t[2], not t[1].startswith("softmax"), -cost.get(t[0].name, 0)))
    ctx = mp.get_context("fork")
    running: dict[int, tuple] = {}
    free_slots = list(range(jobs))
    failures = []
    queue = list(todo)
    while queue or running:
        while queue and free_slots:
            d, v, sd = queue.pop(0)
            slot = free_slots.pop(0)
            path = run_path(out, h, d.name, v, sd)
            p = ctx.Process(target=_worker, args=(d, v, sd, settings, h, str(path), slot))
            p.start()
            running[p.pid] = (p, slot, d.name, v, sd, path)
        time.sleep(0.05)
        for pid, (p, slot, task, v, sd, path) in list(running.items()):
            if p.is_alive():
                continue
            p.join()
            del running[pid]
            free_slots.append(slot)
            if p.exitcode != 0 or not path.exists():
                err = path.with_suffix(".error.json")
                msg = json.loads(err.read_text())["error"] if err.exists() else f"exit code {p.exitcode}"
                failures.append((task, v, sd, msg))
                log(f"FAILED {task} {v} seed {sd}:\n{msg}")
    # interleaved step timing, alone on the machine (no training worker running)
    timing = {}
    for task in tasks:
        tpath = out / "runs" / h / task / ("timing-" + "_".join(v.replace("+", "_") for v in variants) + ".json")
        if not tpath.exists() and not partial and settings.timing_rounds > 0:
            log(f"{task}: interleaved step timing of {len(variants)} variants, {settings.timing_rounds} rounds")
            p = ctx.Process(target=_timing_worker, args=(datas[task], variants, settings, h, str(tpath)))
            p.start()
            p.join()
            if p.exitcode != 0 or not tpath.exists():
                err = tpath.with_suffix(".error.json")
                msg = json.loads(err.read_text())["error"] if err.exists() else f"exit code {p.exitcode}"
                failures.append((task, "timing", -1, msg))
        if tpath.exists():
            timing[task] = json.loads(tpath.read_text())
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed; first: {failures[0][:3]}\n{failures[0][3]}")
    runs, missing = [], []
    for task in tasks:
        for v in variants:
            for sd in seeds:
                path = run_path(out, h, task, v, sd)
                if not path.exists():
                    missing.append({"task": task, "variant": v, "seed": sd})
                    continue
                r = json.loads(path.read_text())
                assert r["config_hash"] == h
                runs.append(r)
    if missing and not partial:
        raise RuntimeError(f"{len(missing)} run(s) have no result: {missing[:3]}")
    if not runs:
        raise RuntimeError(f"no finished runs of configuration {h} in {out / 'runs' / h}")
    results = {
        "config_hash": h,
        "code_digest": code,
        "command": command,
        "settings": asdict(settings),
        "tasks": tasks,
        "variants": variants,
        "seeds": seeds,
        "jobs": jobs,
        "data": task_info,
        "versions": versions(),
        "machine": machine(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "sweep_wall_s": time.perf_counter() - t_all,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "memory_measure": "peak RSS of the forked worker process that trains one model (VmHWM from "
        "/proc/self/status after resetting it through /proc/self/clear_refs); "
        "'extra' = that peak minus the worker's RSS before the model was built",
        "time_measure": "median wall time of one optimiser step (forward, backward, clip, AdamW) "
        "over the steps after the first 5, per seed; the table shows the median over seeds",
        "partial": bool(missing),
        "missing_runs": missing,
        "timing_measure": "in one process per task, one optimiser step of each variant in "
        "turn on the same training batch, for several rounds after a warm-up step; "
        "the minimum over rounds",
        "timing": timing,
        "runs": runs,
        "summary": summarise(runs),
    }
    _atomic_write(top, json.dumps(results, indent=1))
    report.write_outputs(results, out)
    log(f"wrote {top}, {out / 'results.md'}, {out / 'curves.png'} in {results['sweep_wall_s']:.0f} s")
    return results


def default_command() -> str:
    return "python -m benchmarks.paper " + " ".join(shlex.quote(a) for a in sys.argv[1:])
