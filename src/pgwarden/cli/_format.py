"""Numbers as the command line shows them."""

from __future__ import annotations

__all__ = ["duration_text"]


def duration_text(seconds: float) -> str:
    """``0 ms``, ``0.4 ms``, ``12 ms``, ``1.25 s``."""
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds == 0.0 or seconds >= 0.01:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds * 1000:.1f} ms"
