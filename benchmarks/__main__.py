import os
import sys

# ``--threads N`` must reach the BLAS / OpenMP runtimes before NumPy or PyTorch load.
for i, arg in enumerate(sys.argv):
    value = (
        arg.split("=", 1)[1]
        if arg.startswith("--threads=")
        else (sys.argv[i + 1] if arg == "--threads" and i + 1 < len(sys.argv) else None)
    )
    if value:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = value
        # JAX's CPU runtime reads none of these, and jaxlib 0.10 ignores XLA's
        # --xla_cpu_multi_thread_eigen=false (a 2,048^2 matmul: 40.7 ms with and without
        # it, 77 ms on one core), so the process and the memory processes it starts are
        # also pinned to the first N usable cores: the one limit every runtime obeys.
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: max(1, int(value))])

from .environment import keep_freed_memory  # noqa: E402  (the standard library only)

keep_freed_memory()  # before any library starts a thread: each would get its own arena

from .run import main  # noqa: E402

raise SystemExit(main())
