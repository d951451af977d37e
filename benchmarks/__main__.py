import os
import sys

# ``--threads N`` must reach the BLAS / OpenMP runtimes before NumPy or PyTorch load.
for i, arg in enumerate(sys.argv):
    value = arg.split("=", 1)[1] if arg.startswith("--threads=") else (
        sys.argv[i + 1] if arg == "--threads" and i + 1 < len(sys.argv) else None)
    if value:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = value

from .run import main  # noqa: E402

raise SystemExit(main())
