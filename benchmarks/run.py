"""Command line of the benchmark suite: ``python -m benchmarks [options]``.

Defaults take about 10 minutes on 2 idle cores; ``--quick`` (L = 256 and 1,024, few
rounds) takes minutes too: 77 s to 6.3 minutes on a 2-core machine, depending on what
else runs on it. A missed target comes with how to read it: the load the machine had,
and the command that reruns that comparison alone.
Writes ``results.json`` (every raw sample, machine and versions), ``results.md`` and
``*_time.png`` / ``*_memory.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from backends_tests.backends import ALL_BACKENDS, Backend, Unavailable, make

from . import environment, report
from .cases import CASES
from .timing import measure, paired_ratio

# the test suite's registry (backends_tests/backends.py), less array-api-strict: a
# conformance check of the code, not a library anyone runs for speed
ALL = tuple(name for name in ALL_BACKENDS if name != "array_api_strict")

DEFAULT_SIZES = (256, 1024, 4096, 16384, 65536, 262144)
QUICK_SIZES = (256, 1024)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--backends",
        default=None,
        help=f"comma-separated, from {', '.join(ALL)} (default: the CPU ones and every GPU one that is present)",
    )
    p.add_argument("--cases", default=None, help=f"comma-separated, from {', '.join(CASES)} (default: all)")
    p.add_argument("--sizes", default=None, help="comma-separated sequence lengths L (default: 256 .. 262144 by 4x)")
    p.add_argument("--max-len", type=int, default=None, help="drop sizes above this L")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument(
        "--repeats", type=int, default=None, help="interleaved rounds per comparison (at most; default 7, quick 3)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timing per comparison before rounds are cut down to 3 (default 4, quick 0.5)",
    )
    p.add_argument(
        "--memory-sizes",
        default=None,
        help="sizes at which peak memory is measured (default: every size >= 1024; quick: 1024)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument(
        "--cap-gib",
        type=float,
        default=1.0,
        help="largest quadratic intermediate (dense matrix, naive cumsum) a reference may build",
    )
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="L = 256 and 1,024 with few rounds: minutes on 2 cores (77 s to 6.3 min measured, by the machine's load)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads of PyTorch, BLAS and OpenMP, and the process pinned to that many cores (which "
        "is what limits JAX); default: each library's own choice, one per core",
    )
    p.add_argument("--jobs", type=int, default=2, help="memory processes run at once (they measure RSS, not time)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--streaming",
        action="store_true",
        help="also time decoding and chunked prefill with FastRPB (benchmarks.streaming, torch CPU): "
        "streaming.json and streaming.png in --out",
    )
    return p.parse_args(argv)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def plan(args: argparse.Namespace) -> dict[str, Any]:
    sizes = _ints(args.sizes) if args.sizes else (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.max_len is not None:
        sizes = tuple(s for s in sizes if s <= args.max_len)
    if args.memory_sizes is not None:
        memory_sizes = _ints(args.memory_sizes)
    else:
        memory_sizes = tuple(s for s in sizes if s >= 1024)[:1] if args.quick else tuple(s for s in sizes if s >= 1024)
    cases = tuple(c.strip() for c in args.cases.split(",")) if args.cases else tuple(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    names = tuple(b.strip() for b in args.backends.split(",")) if args.backends else ALL
    explicit = args.backends is not None
    return dict(
        sizes=sizes,
        sizes_explicit=args.sizes is not None,
        memory_sizes=memory_sizes,
        cases=cases,
        backends=names,
        explicit=explicit,
        dtype=args.dtype,
        repeats=args.repeats or (3 if args.quick else 7),
        budget=args.budget if args.budget is not None else (0.5 if args.quick else 4.0),
        min_sample=0.002 if args.quick else 0.005,
        cap_bytes=int(args.cap_gib * 2**30),
        quick=bool(args.quick),
        memory=not args.no_memory,
        threads=args.threads,
        jobs=max(1, args.jobs),
    )


def available(names: tuple[str, ...], dtype: str) -> tuple[dict[str, Backend], dict[str, str]]:
    """Load the named backends; return (loaded, {name: reason skipped})."""
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise SystemExit(f"unknown backends {unknown}; known: {', '.join(ALL)}")
    loaded, skipped = {}, {}
    for name in names:
        try:
            loaded[name] = make(name, x64=dtype == "float64")
        except (Unavailable, ImportError) as exc:
            skipped[name] = str(exc) if isinstance(exc, Unavailable) else f"its library is not installed ({exc})"
    return loaded, skipped


def _progress(total: int, disable: bool, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the bench extra
        tqdm = None
    if tqdm is None or disable:

        class _Null:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

        return _Null()
    return tqdm(total=total, desc=desc, unit="cmp", dynamic_ncols=True)


def run_timing(cfg: dict, benches: dict, progress: bool) -> list[dict]:
    work = []
    for case_name in cfg["cases"]:
        case = CASES[case_name]
        for bname in benches:
            for L in case.sizes or cfg["sizes"]:
                if case.applies is not None and not case.applies(bname, L, cfg):
                    continue
                work.append((case, bname, L))
    bar = _progress(len(work), not progress, "timing")
    results = []
    for case, bname, L in work:
        bar.set_postfix_str(f"{case.name} {bname} L={L}")
        bench = benches[bname]
        record: dict[str, Any] = dict(case=case.name, backend=bname, L=L, dtype=cfg["dtype"])
        try:
            built = case.build(bench, L, cfg["dtype"], cap_bytes=cfg["cap_bytes"], quick=cfg["quick"])
            record["values_bytes"] = built.values_bytes
            record["skipped"] = built.skipped
            if not built.variants:
                raise RuntimeError("no variant to run")
            m = measure(
                bench,
                built.variants,
                dtype=cfg["dtype"],
                repeats=cfg["repeats"],
                min_sample=cfg["min_sample"],
                budget=cfg["budget"],
                heavy=0.3 if cfg["quick"] else 1.5,
            )
            record.update(m)
            ours = next(v.name for v in built.variants if v.ours)
            record["ours"] = ours
            record["speedup"] = {
                v.name: m["median_s"][v.name] / m["median_s"][ours] for v in built.variants if not v.ours
            }
            record["speedup_paired"] = {
                v.name: paired_ratio(m["samples_s"], ours, v.name) for v in built.variants if not v.ours
            }
            record["memory_variants"] = [v.name for v in built.variants if v.memory]
            del built
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
        results.append(record)
        bar.update()
    bar.close()
    return results


def run_memory(cfg: dict, results: list[dict], progress: bool, out_dir: str) -> None:
    groups: dict[tuple[str, str], dict] = {}
    for r in results:
        if "error" in r or (r["L"] not in cfg["memory_sizes"] and CASES[r["case"]].sizes is None):
            continue
        g = groups.setdefault((r["case"], r["backend"]), {"sizes": [], "variants": set()})
        g["sizes"].append(r["L"])
        g["variants"].update(r.get("memory_variants", []))
    bar = _progress(len(groups), not progress, "memory")
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # large buffers are mmapped and returned at free
    if cfg.get("threads"):
        env["FASTRPB_BENCH_THREADS"] = str(cfg["threads"])
    import fastrpb

    roots = [
        os.path.dirname(os.path.dirname(os.path.abspath(fastrpb.__file__))),
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ]
    env["PYTHONPATH"] = os.pathsep.join([*roots, env.get("PYTHONPATH", "")])
    by_key = {(r["case"], r["backend"], r["L"]): r for r in results}
    pending = list(groups.items())
    running: list[tuple[tuple[str, str], dict, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < cfg["jobs"]:
            (case, bname), g = pending.pop(0)
            spec = dict(
                case=case,
                backend=bname,
                dtype=cfg["dtype"],
                sizes=sorted(g["sizes"]),
                variants=sorted(g["variants"]),
                cap_bytes=cfg["cap_bytes"],
                quick=cfg["quick"],
            )
            proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            running.append(((case, bname), g, proc))
        (case, bname), g, proc = running.pop(0)
        bar.set_postfix_str(f"{case} {bname}")
        try:
            stdout, stderr = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        for line in stdout.splitlines():
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                continue
            rec = by_key.get((case, bname, m["L"]))
            if rec is not None:
                rec.setdefault("memory", {})[m["variant"]] = {
                    "extra_bytes": m["extra_bytes"],
                    "method": m["method"],
                    "x_values": m["extra_bytes"] / m["values_bytes"],
                }
        if proc.returncode != 0:
            for L in g["sizes"]:
                rec = by_key.get((case, bname, L))
                if rec is not None:
                    rec["memory_error"] = (stderr.strip().splitlines() or ["failed"])[-1]
        bar.update()
    bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg = plan(args)
    t0 = time.time()
    names = cfg["backends"]
    benches, skipped = available(names, cfg["dtype"])
    if cfg["explicit"]:
        missing = dict(skipped.items())
        if missing:
            raise SystemExit(f"requested backends cannot run here: {missing}")
    elif not benches:
        raise SystemExit(f"no backend can run here: {skipped}")
    for name, why in skipped.items():
        print(f"skipping backend {name}: {why}", file=sys.stderr)
    progress = not args.no_progress
    if cfg["threads"] and "torch" in " ".join(benches):
        import torch

        torch.set_num_threads(cfg["threads"])
    machine = environment.machine()
    results = run_timing(cfg, benches, progress)
    if cfg["memory"]:
        run_memory(cfg, results, progress, args.out)
    machine["load_average_end"] = environment.load_average()
    payload = dict(
        config=dict(cfg.items()),
        machine=machine,
        versions=environment.versions(),
        skipped_backends=skipped,
        results=results,
        wall_s=time.time() - t0,
    )
    payload["targets"] = report.evaluate_targets(results)
    payload["crossovers"] = report.crossovers(results)
    paths = report.write_all(payload, args.out)
    if args.streaming:  # per-token decode time against t, with and without the bias, and chunked prefill
        from . import streaming

        extra = [os.path.join(args.out, "streaming.json"), os.path.join(args.out, "streaming.png")]
        streaming.main(
            ["--json", extra[0], "--plot", extra[1]] + (["--ts", "256,1024", "--prefill", "4096"] if args.quick else [])
        )
        paths = [*paths, *extra]
    print(report.summary(payload))
    print("wrote " + ", ".join(paths))
    return 0
