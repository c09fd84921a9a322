"""`pgwarden status`: the server's connections, as one snapshot sees them.

The model is `pgwarden.monitor.snapshot.ServerSnapshot`, the one the health
monitor serves on ``/status``; ``pgwarden status --json`` prints its
`ServerSnapshot.to_dict`. This module adds what the human view shows on top.
"""

from __future__ import annotations

from typing import Any, Final

import psycopg

from pgwarden.monitor.snapshot import ServerSnapshot, take_snapshot

__all__ = ["STATE_GROUPS", "headroom_percent", "read_status", "state_counts"]

STATE_GROUPS: Final = (
    "active",
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
    "others",
)


def read_status(
    conn: psycopg.Connection[Any], *, all_databases: bool = False
) -> ServerSnapshot:
    """One snapshot of the current database's sessions, or of all databases."""
    return take_snapshot(conn, all_databases=all_databases)


def state_counts(snapshot: ServerSnapshot) -> dict[str, int]:
    """Sessions per state, in `STATE_GROUPS` order, zeros included.

    ``others`` counts the rest: fastpath calls, disabled tracking, and
    sessions hidden from the role (state ``unknown``).
    """
    counts = dict.fromkeys(STATE_GROUPS, 0)
    for state, n in snapshot.by_state.items():
        counts[state if state in counts else "others"] += n
    return counts


def headroom_percent(snapshot: ServerSnapshot) -> float:
    """Usable connection slots still free, in % of the usable ones."""
    usable = snapshot.usable_connections
    return 100.0 * snapshot.available_connections / usable if usable > 0 else 0.0
