"""`pgwarden queries`: long-running queries, lock waits and their root blockers.

`long_query_criteria` describes the queries to list (running for more than a
bound, by query age), `find_long_queries` lists them from one snapshot, whose
lock waits come along, and `stop_queries` cancels or terminates exactly the
listed sessions, re-checking each one as it goes (see `pgwarden.ops.sessions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import psycopg

from pgwarden.monitor.snapshot import ServerSnapshot, Session

from .audit import AuditLog
from .sessions import (
    DEFAULT_TIMEOUT,
    Action,
    Criteria,
    ResultCallback,
    Selection,
    SignalReport,
    SignalResult,
    find_sessions,
    signal_sessions,
)

__all__ = [
    "ACTIVE_STATES",
    "DEFAULT_LONGER_THAN",
    "find_long_queries",
    "lock_sessions",
    "long_query_criteria",
    "report_dict",
    "stop_queries",
]

ACTIVE_STATES: Final = frozenset({"active", "fastpath function call"})
DEFAULT_LONGER_THAN: Final = 30.0


def long_query_criteria(
    *,
    longer_than: float = DEFAULT_LONGER_THAN,
    applications: Sequence[str] = (),
    users: Sequence[str] = (),
    pids: Sequence[int] = (),
    all_databases: bool = False,
    include_superusers: bool = False,
) -> Criteria:
    """Queries running for more than ``longer_than`` seconds (query age)."""
    return Criteria(
        states=ACTIVE_STATES,
        older_than=longer_than,
        clock="query",
        applications=tuple(applications),
        users=tuple(users),
        pids=tuple(pids),
        all_databases=all_databases,
        include_superusers=include_superusers,
    )


def find_long_queries(conn: psycopg.Connection[Any], criteria: Criteria) -> Selection:
    """The queries ``criteria`` picks, oldest first; the snapshot has the locks."""
    return find_sessions(conn, criteria)


def lock_sessions(snapshot: ServerSnapshot) -> tuple[Session, ...]:
    """The sessions in the snapshot's lock waits, waiting or blocking, by pid."""
    pids = {w.pid for w in snapshot.lock_waits}
    pids.update(p for w in snapshot.lock_waits for p in w.blocked_by)
    return tuple(s for s in snapshot.sessions if s.pid in pids)


def report_dict(report: SignalReport) -> dict[str, Any]:
    """`SignalReport.to_dict` plus ``lock_waits`` and ``lock_sessions``.

    ``lock_waits`` are the waits of the snapshot (``pid``, ``blocked_by``,
    ``root_blockers``, ``waiting_seconds``), whatever their age;
    ``lock_sessions`` the sessions they name, as session dicts.
    """
    snapshot = report.selection.snapshot
    return report.to_dict() | {
        "lock_waits": [w.to_dict() for w in snapshot.lock_waits],
        "lock_sessions": [s.to_dict() for s in lock_sessions(snapshot)],
    }


def stop_queries(
    conn: psycopg.Connection[Any],
    selection: Selection,
    action: Action,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    audit: AuditLog | None = None,
    on_result: ResultCallback | None = None,
) -> tuple[SignalResult, ...]:
    """Cancel (or terminate) each listed query still running as listed."""
    return signal_sessions(
        conn,
        selection,
        action,
        timeout=timeout,
        audit=audit,
        command="queries",
        on_result=on_result,
    )
