"""The experiments' rule for a claim "a beats b", shared by every section's report."""

from __future__ import annotations


def two_se_verdict(diff: float, se: float, seeds: int) -> str:
    """``diff`` (a's advantage over b) against its standard error ``se``, ``seeds`` the
    fewer seeds of the two: the claim held beyond two standard errors, the opposite
    was seen beyond them, or it is not resolved (within them, or one seed only)."""
    if seeds < 2:
        return "not resolved (one seed: no spread to judge by)"
    if diff > 2 * se:
        return "held"
    if diff < -2 * se:
        return "did not hold (the opposite was seen)"
    return "not resolved (difference within 2 standard errors)"
