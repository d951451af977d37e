"""Fixtures of the shared cross-backend matrix: ``backend``, ``dtype``, ``rng``.

Every test that takes ``backend`` runs once per backend of ``FASTRPB_BACKENDS``
(default: all that can run here). A GPU backend not named there and without a GPU on
this machine is left out of the matrix, not skipped test by test: the report header
says once which backends were left out and why.

What a test needs from a backend is said by a marker, never by a skip in its body
(in the spirit of array-api-extra's conftest and SciPy's ``xp_capabilities``); the
``backend`` fixture skips, with the reason, where the backend lacks it:

- ``@pytest.mark.jit``, ``grad``, ``fft``, ``gpu``, ``two_devices``: a capability
  declared in ``backends.py`` (``CAPABILITIES`` below);
- ``@pytest.mark.needs_dtype("bfloat16", ...)``: dtypes the test uses itself;
- ``@pytest.mark.skip_backends("numpy", ..., reason=...)`` /
  ``@pytest.mark.only_backends("torch", ..., reason=...)``: named backends;
- ``@pytest.mark.uses_backend("torch", reason=...)`` on a test without the ``backend`` fixture
  (an example script, a training run): skipped unless that backend is selected.

The full combinatorics of a parametrised test run where they are cheap, on NumPy and
array-api-strict (``FULL_MATRIX``). ``@pytest.mark.subset(keep)`` on a test says which
cases the other backends run: those whose parameters satisfy ``keep(**params)`` (the
cases each of their code paths needs); the rest are deselected there, not skipped. Tests
parametrised by ``dtype`` run every dtype of a backend but those of ``SWEEP_SKIPS``
(float64 on JAX, which its tests without the parameter run).

The tests marked ``slow`` are collected first, so that under ``-n`` (with ``--dist
worksteal``, in ``pyproject.toml``) none of them is left to run alone at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


def _jaxlib_version() -> tuple[int, ...]:
    """The installed jaxlib's version, read without importing it (``()`` if absent)."""
    from importlib import metadata

    try:
        return tuple(int(part) for part in metadata.version("jaxlib").split(".")[:3] if part.isdigit())
    except metadata.PackageNotFoundError:
        return ()


def _jax_compiles_for_tests() -> None:
    """How JAX compiles in this suite, set before anything imports JAX (the xdist workers
    and the subprocesses of the tests inherit it); a setting the caller gave is kept.

    Eager JAX compiles one small XLA program per operation and shape (a causal call has
    about 150), and compiling, not running, is most of a JAX test's time:

    - ``--xla_backend_optimization_level=0``: LLVM's optimisation passes off. The
      programs are tiny, so their code runs as fast either way, and they compile about
      a third faster (the results do not change: fast-math stays off);
    - ``--xla_cpu_use_fusion_emitters=false`` (jaxlib 0.10, where it was measured; XLA
      aborts on a flag it does not know, so other versions keep their default): the
      CPU fusions through XLA's older LLVM emitters, not the MLIR fusion emitters,
      whose compiler pipeline is most of a tiny program's compile time (the JAX cases
      of the state, streaming and pieces tests: 63 s -> 41 s from an empty cache);
    - a persistent compilation cache in ``.pytest_cache/jax`` for every program
      (no minimum compile time or size): the two xdist workers share what either
      compiled, and a second run of the suite on this checkout reuses it all.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        flags = f"{flags} --xla_backend_optimization_level=0".strip()
    if "xla_cpu_use_fusion_emitters" not in flags and _jaxlib_version()[:2] == (0, 10):
        flags = f"{flags} --xla_cpu_use_fusion_emitters=false"
    os.environ["XLA_FLAGS"] = flags
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax")
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_jax_compiles_for_tests()

from backends_tests.backends import DTYPES, Backend, load, requested  # noqa: E402

_LOADED: dict[str, Backend] = {}
_SKIPPED: dict[str, str] = {}

# the backends that run every case of a test marked ``subset`` (see the module docstring)
FULL_MATRIX = ("numpy", "array_api_strict")

# dtypes a backend leaves out of the tests parametrised by ``dtype``: JAX compiles each
# eager operation for every new shape and dtype (seconds a case), and its float64 path
# runs in every test without the parameter (float64 is the default there); the other
# backends, and JAX's float32 and half precision, run every dtype they have
SWEEP_SKIPS = {"jax": ("float64",), "jax_gpu": ("float64",)}

# marker -> (what the backend must have, why a backend without it skips)
CAPABILITIES = {
    "jit": (lambda b: b.jit is not None, "{name} has no jit"),
    "grad": (lambda b: b.grad is not None, "{name} has no automatic differentiation"),
    "fft": (lambda b: b.fft, "{name} has no FFT extension"),
    "gpu": (lambda b: b.gpu, "{name} is not a GPU backend"),
    "two_devices": (lambda b: b.other_device is not None, "{name} offers a single device here"),
}


def pytest_configure(config: pytest.Config) -> None:
    try:
        names, explicit = requested()
        for name in names:
            backend, reason = load(name, explicit)
            if backend is None:
                _SKIPPED[name] = reason
            else:
                _LOADED[name] = backend
    except (RuntimeError, ValueError) as exc:
        raise pytest.UsageError(str(exc)) from exc


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"fastrpb backends: {', '.join(_LOADED) or 'none'}"]
    lines += [f"  left out of the matrix: {reason}" for reason in _SKIPPED.values()]
    full = [name for name in FULL_MATRIX if name in _LOADED]
    if full and len(full) < len(_LOADED):
        lines.append(f"  tests marked subset: every case on {', '.join(full)}, the marked subset on the others")
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # only the backends that can run here: a GPU backend without a GPU gives no ids (the
    # header says why it is left out), and a dtype a backend lacks gives no id either
    names = list(_LOADED)
    if "backend" in metafunc.fixturenames and "dtype" in metafunc.fixturenames:
        pairs = [
            (name, d)
            for name in names
            for d in DTYPES
            if d in _LOADED[name].dtypes and d not in SWEEP_SKIPS.get(name, ())
        ]
        metafunc.parametrize(("backend", "dtype"), pairs, indirect=True, ids=[f"{n}-{d}" for n, d in pairs])
    elif "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", names, indirect=True, ids=names)
    elif "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", list(DTYPES), indirect=True, ids=list(DTYPES))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the cases of a ``subset`` test that a backend outside FULL_MATRIX skips;
    put the tests marked ``slow`` first."""
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("subset")
        params = getattr(getattr(item, "callspec", None), "params", {})
        if marker is None or params.get("backend", FULL_MATRIX[0]) in FULL_MATRIX:
            kept.append(item)
            continue
        keep = marker.args[0]
        (kept if keep(**{k: v for k, v in params.items() if k != "backend"}) else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    # the long cases first (a stable sort keeps the order of the rest): under xdist each
    # starts while there is other work left to share, so none of them ends the run alone
    items[:] = sorted(kept, key=lambda item: item.get_closest_marker("slow") is None)


def _unmet(node: pytest.Item, backend) -> str | None:
    """Why ``backend`` cannot run the test ``node`` (from its markers), or None."""
    for marker, (has, why) in CAPABILITIES.items():
        if node.get_closest_marker(marker) is not None and not has(backend):
            return why.format(name=backend.name)
    for marker in node.iter_markers("needs_dtype"):
        missing = [d for d in marker.args if d not in backend.dtypes]
        if missing:
            return f"{backend.name} has no {', '.join(missing)}"
    for marker in node.iter_markers("skip_backends"):
        if backend.name in marker.args:
            return f"{backend.name}: {marker.kwargs['reason']}"
    for marker in node.iter_markers("only_backends"):
        if backend.name not in marker.args:
            return f"{backend.name}: {marker.kwargs['reason']}"
    return None


@pytest.fixture
def backend(request: pytest.FixtureRequest):
    loaded = _LOADED[request.param]
    reason = _unmet(request.node, loaded)
    if reason is not None:
        pytest.skip(reason)
    return loaded


@pytest.fixture
def dtype(request: pytest.FixtureRequest, backend) -> str:
    name = request.param
    if name not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {name}")
    return name


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20220223)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("skip_backends"):
        if "reason" not in marker.kwargs:
            raise pytest.UsageError(f"{item.nodeid}: skip_backends needs reason=")
    for marker in item.iter_markers("only_backends"):
        if "reason" not in marker.kwargs:
            raise pytest.UsageError(f"{item.nodeid}: only_backends needs reason=")
    for marker in item.iter_markers("uses_backend"):
        why = f" ({marker.kwargs['reason']})" if "reason" in marker.kwargs else ""
        for name in marker.args:
            if name in _SKIPPED:
                pytest.skip(_SKIPPED[name] + why)
            if name not in _LOADED:
                pytest.skip(f"{name} is not in FASTRPB_BACKENDS{why}")
