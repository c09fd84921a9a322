"""Fairness of a run, from each worker's count of completed operations."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["STARVED_FRACTION", "jain", "starved"]

# A worker is starved if it completed less than this fraction of the mean.
STARVED_FRACTION = 0.10


def jain(counts: Sequence[int]) -> float | None:
    """Jain's fairness index, (Σx)² / (n·Σx²): 1 when all are equal, 1/n at worst.

    None when nobody completed anything.
    """
    squares = sum(c * c for c in counts)
    if not counts or not squares:
        return None
    return sum(counts) ** 2 / (len(counts) * squares)


def starved(counts: Sequence[int]) -> int:
    """How many workers completed less than `STARVED_FRACTION` of the mean."""
    if not counts:
        return 0
    floor = STARVED_FRACTION * sum(counts) / len(counts)
    return sum(1 for c in counts if c < floor)
