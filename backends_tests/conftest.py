"""Fixtures of the shared cross-backend matrix: ``backend``, ``dtype``, ``rng``.

Every test that takes ``backend`` runs once per backend of ``FASTRPB_BACKENDS``
(default: all; GPU backends skip with their reason where there is no GPU).
"""

from __future__ import annotations

import numpy as np
import pytest

from backends import DTYPES, load, requested

_LOADED: dict[str, object] = {}
_SKIPPED: dict[str, str] = {}


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
    lines += [f"  skipped backend {reason}" for reason in _SKIPPED.values()]
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        names, _ = requested()
        metafunc.parametrize("backend", list(names), indirect=True, ids=list(names))
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", list(DTYPES), indirect=True, ids=list(DTYPES))


@pytest.fixture
def backend(request: pytest.FixtureRequest):
    name = request.param
    if name in _SKIPPED:
        pytest.skip(_SKIPPED[name])
    return _LOADED[name]


@pytest.fixture
def dtype(request: pytest.FixtureRequest, backend) -> str:
    name = request.param
    if name not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {name}")
    return name


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20220223)
