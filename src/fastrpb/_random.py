"""Randomness: the one place where fastrpb draws random numbers.

The array API standard has no random number generation. Parameters that start random
(bias tables, feature-map projections) are drawn here with NumPy's
``default_rng(seed)`` from an explicit seed, so a seed gives the same numbers on every
backend, and the small result is moved to the requested namespace and device once.
Nothing here runs inside a forward pass; there is no global random state.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _validate

__all__ = ["seeded_normal", "seeded_projection"]


def seeded_normal(xp: Any, shape: tuple[int, ...], *, seed: int, dtype: Any, device: Any) -> Any:
    """Standard normal samples of ``shape`` from an explicit ``seed``, created on ``device``."""
    sample = np.random.default_rng(_validate.seed(seed)).standard_normal(shape)
    return xp.asarray(sample, dtype=dtype, device=device)


def seeded_projection(xp: Any, m: int, d: int, *, seed: int, orthogonal: bool, dtype: Any, device: Any) -> Any:
    """An ``(m, d)`` Gaussian random projection from an explicit ``seed``, on ``device``.

    ``orthogonal=True`` stacks ``ceil(m / d)`` independent Haar-random orthogonal
    ``d x d`` blocks (QR of a Gaussian block, signs fixed by ``diag(R)``) and gives
    each row the norm of an independent Gaussian ``d``-vector (chi-distributed), so
    every row is marginally ``N(0, I_d)`` but rows inside a block are exactly
    orthogonal (Choromanski et al. 2021, "orthogonal random features"). The
    standard's ``linalg`` extension is optional, so the QR is done once in NumPy
    (float64) and the small result is moved, as in ``seeded_normal``.
    """
    rng = np.random.default_rng(_validate.seed(seed))
    if orthogonal:
        blocks = []
        for _ in range(-(-m // d)):
            q, r = np.linalg.qr(rng.standard_normal((d, d)))
            signs = np.where(np.diag(r) < 0, -1.0, 1.0)
            blocks.append((q * signs).T)  # rows orthonormal, Haar distributed
        norms = np.linalg.norm(rng.standard_normal((m, d)), axis=1)
        sample = np.concatenate(blocks, axis=0)[:m] * norms[:, None]
    else:
        sample = rng.standard_normal((m, d))
    return xp.asarray(sample, dtype=dtype, device=device)
