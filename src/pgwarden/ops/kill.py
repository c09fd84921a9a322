"""`pgwarden kill-idle`: end sessions left idle, in a transaction or not, too long.

A session idle in a transaction holds its locks and its snapshot (so vacuum
cannot clean up behind it) until its client comes back, which may be never.
`idle_criteria` describes the sessions to end, `find_idle_sessions` lists them
from one snapshot, and `terminate_sessions` ends exactly those, re-checking
each one as it goes (see `pgwarden.ops.sessions`). The server-side cure is
``idle_in_transaction_session_timeout``; this is for the night it was not set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal

import psycopg

from pgwarden.monitor.snapshot import IDLE_IN_TRANSACTION

from .audit import AuditLog
from .sessions import (
    DEFAULT_TIMEOUT,
    Action,
    Criteria,
    ResultCallback,
    Selection,
    SignalResult,
    find_sessions,
    signal_sessions,
)

__all__ = [
    "DEFAULT_OLDER_THAN",
    "IDLE_STATES",
    "IdleState",
    "find_idle_sessions",
    "idle_criteria",
    "terminate_sessions",
]

IdleState = Literal["idle-in-transaction", "idle"]
IDLE_STATES: Final[dict[IdleState, frozenset[str]]] = {
    "idle-in-transaction": IDLE_IN_TRANSACTION,  # aborted transactions included
    "idle": frozenset({"idle"}),
}
DEFAULT_OLDER_THAN: Final = 300.0


def idle_criteria(
    *,
    older_than: float = DEFAULT_OLDER_THAN,
    state: IdleState = "idle-in-transaction",
    applications: Sequence[str] = (),
    users: Sequence[str] = (),
    pids: Sequence[int] = (),
    all_databases: bool = False,
    include_superusers: bool = False,
) -> Criteria:
    """Sessions in ``state`` for more than ``older_than`` seconds (time in state)."""
    return Criteria(
        states=IDLE_STATES[state],
        older_than=older_than,
        clock="state",
        applications=tuple(applications),
        users=tuple(users),
        pids=tuple(pids),
        all_databases=all_databases,
        include_superusers=include_superusers,
    )


def find_idle_sessions(conn: psycopg.Connection[Any], criteria: Criteria) -> Selection:
    """The sessions ``criteria`` picks, from one snapshot, longest idle first."""
    return find_sessions(conn, criteria)


def terminate_sessions(
    conn: psycopg.Connection[Any],
    selection: Selection,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    audit: AuditLog | None = None,
    on_result: ResultCallback | None = None,
) -> tuple[SignalResult, ...]:
    """End each listed session that is still as listed; see `signal_sessions`."""
    return signal_sessions(
        conn,
        selection,
        Action.TERMINATE,
        timeout=timeout,
        audit=audit,
        command="kill-idle",
        on_result=on_result,
    )
