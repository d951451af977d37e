"""Non-causal linear attention, ``phi(Q) (phi(K)^T V)``: O(L F Dv) time, O(F Dv) memory."""

from __future__ import annotations

from typing import Any

__all__ = ["noncausal_attention"]


def noncausal_attention(xp: Any, fq: Any, fk: Any, v: Any) -> tuple[Any, Any]:
    """``phi(Q) (phi(K)^T V)`` and ``phi(Q) sum_j phi(k_j)``: O(L F Dv) time, O(F Dv) memory.

    The normaliser is a separate matrix-vector product here, not a ones column on
    ``V``: that column costs a copy of ``V`` and an odd-width (Dv + 1) product, about
    20 % of the whole call on CPU (measured with PyTorch, L = 1024, F = Dv = 64).
    """
    num = xp.matmul(fq, xp.matmul(xp.matrix_transpose(fk), v))
    den = xp.matmul(fq, xp.matrix_transpose(xp.sum(fk, axis=-2, keepdims=True)))
    return num, den
