"""Choosing sessions to act on, and terminating or cancelling them safely.

`find_sessions` takes one `ServerSnapshot` and keeps the sessions that match a
`Criteria`: the listing a person (or a cron job) approves. `signal_sessions`
then terminates or cancels each listed session with one statement per pid, so
that a pid the role may not signal (SQLSTATE 42501) is reported and the others
are still handled.

That statement re-checks, at the moment it signals, that the pid is still the
session listed and that nothing happened to it since the snapshot: the same
``backend_start`` (not a recycled pid), the same ``xact_start`` (the same
transaction, or still none), the same state, no state change since the
snapshot was taken (so it is still the same query, or the same idle spell, and
so still older than the bound), the same ``application_name``, still a client
backend, still in the current database (unless all databases were listed),
still not a superuser's (unless allowed) and never the caller's own session. A
session that fails any of these is left alone and reported as ``changed``.

Only client backends are ever listed: background workers, autovacuum and
replication connections are not sessions in the snapshot. Sessions hidden
from the role (without ``pg_read_all_stats``) cannot be listed either: their
state is unknown, and `Selection.visibility_note` says so.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgwarden.monitor.snapshot import ServerSnapshot, Session, take_snapshot

from .audit import AuditLog

__all__ = [
    "HANDLED",
    "Action",
    "Clock",
    "Criteria",
    "Outcome",
    "Selection",
    "SignalReport",
    "SignalResult",
    "find_sessions",
    "select_sessions",
    "signal_sessions",
]

Clock = Literal["state", "query"]
"""Which age `Criteria.older_than` bounds: time in state, or the query's age."""

DEFAULT_TIMEOUT = 5.0
MAX_TIMEOUT = 3600.0  # longer is a slip (statement_timeout itself stops at ~24 days)
_POLL_INTERVAL = 0.05
_STATEMENT_MARGIN_MS = 5_000  # over the wait, for the signalling statement


class Action(StrEnum):
    """What is done to a listed session."""

    TERMINATE = "terminate"  # pg_terminate_backend: the session ends
    CANCEL = "cancel"  # pg_cancel_backend: its current query is cancelled


class Outcome(StrEnum):
    """What happened to one listed session."""

    TERMINATED = "terminated"  # it ended
    CANCELLED = "cancelled"  # its query stopped
    GONE = "gone"  # it had already ended
    CHANGED = "changed"  # it no longer matched the listing: left alone
    REFUSED = "refused"  # the role may not signal it (SQLSTATE 42501)
    TIMEOUT = "timeout"  # signalled, but still there when the wait ran out
    FAILED = "failed"  # another error; the detail has the server's message


HANDLED = frozenset(
    {Outcome.TERMINATED, Outcome.CANCELLED, Outcome.GONE, Outcome.CHANGED}
)
"""Outcomes that need nothing more from anyone; the others are failures."""


@dataclass(frozen=True, slots=True)
class Criteria:
    """Which sessions to list.

    A session matches when it is a visible client backend in one of
    ``states``, older than ``older_than`` seconds on ``clock`` (``"state"``:
    time in its current state; ``"query"``: age of its query), and passes each
    filter given: ``applications`` and ``users`` are exact names or glob
    patterns (``*``, ``?``, ``[...]``), ``pids`` exact pids. Sessions of other
    databases match only with ``all_databases``; superusers' sessions are
    listed only with ``include_superusers``.
    """

    states: frozenset[str]
    older_than: float
    clock: Clock = "state"
    applications: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    pids: tuple[int, ...] = ()
    all_databases: bool = False
    include_superusers: bool = False

    def age(self, session: Session) -> float | None:
        """The session's age on this criteria's clock."""
        return session.state_seconds if self.clock == "state" else session.query_seconds

    def matches(self, session: Session, database: str) -> bool:
        """Every rule but the superuser one (see `select_sessions`)."""
        age = self.age(session)
        return (
            session.visible
            and session.backend_type == "client backend"
            and (self.all_databases or session.database == database)
            and session.state in self.states
            and age is not None
            and age > self.older_than
            and _any_match(session.application_name, self.applications)
            and _any_match(session.user or "", self.users)
            and (not self.pids or session.pid in self.pids)
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with lists sorted: the ``criteria`` of a report."""
        return {
            "states": sorted(self.states),
            "older_than_seconds": self.older_than,
            "clock": self.clock,
            "applications": list(self.applications),
            "users": list(self.users),
            "pids": list(self.pids),
            "all_databases": self.all_databases,
            "include_superusers": self.include_superusers,
        }


def _any_match(value: str, patterns: Iterable[str]) -> bool:
    patterns = tuple(patterns)
    return not patterns or any(fnmatchcase(value, p) for p in patterns)


@dataclass(frozen=True, slots=True)
class Selection:
    """The sessions a `Criteria` picked from one snapshot, oldest first.

    ``superusers_left_out`` matched everything but the superuser rule.
    """

    snapshot: ServerSnapshot
    criteria: Criteria
    sessions: tuple[Session, ...]
    superusers_left_out: tuple[Session, ...] = ()

    @property
    def visibility_note(self) -> str | None:
        """Why some sessions could not be considered, if any were hidden."""
        return self.snapshot.visibility_note


def select_sessions(snapshot: ServerSnapshot, criteria: Criteria) -> Selection:
    """The sessions of ``snapshot`` that match ``criteria``, oldest first."""
    rules = _names_taken_literally(criteria, snapshot)
    matching = [s for s in snapshot.sessions if rules.matches(s, snapshot.database)]
    matching.sort(key=lambda s: (-(criteria.age(s) or 0.0), s.pid))
    allowed = criteria.include_superusers
    return Selection(
        snapshot=snapshot,
        criteria=criteria,
        sessions=tuple(s for s in matching if allowed or not s.superuser),
        superusers_left_out=tuple(s for s in matching if not allowed and s.superuser),
    )


def _names_taken_literally(criteria: Criteria, snapshot: ServerSnapshot) -> Criteria:
    """``criteria`` with each pattern that is also the name of a listed role or
    application taken as that name: ``--user 'rep[1]'`` means the role
    ``rep[1]``, not ``rep1``."""
    users = {s.user for s in snapshot.sessions}
    apps = {s.application_name for s in snapshot.sessions}
    return replace(
        criteria,
        users=tuple(_literal(p) if p in users else p for p in criteria.users),
        applications=tuple(
            _literal(p) if p in apps else p for p in criteria.applications
        ),
    )


def _literal(name: str) -> str:
    """A glob pattern matching only `name`: fnmatch has no escape, but a
    bracketed character stands for itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def find_sessions(conn: psycopg.Connection[Any], criteria: Criteria) -> Selection:
    """Take a snapshot on ``conn`` (outside a transaction) and select from it."""
    snapshot = take_snapshot(conn, all_databases=criteria.all_databases)
    return select_sessions(snapshot, criteria)


@dataclass(frozen=True, slots=True)
class SignalResult:
    """What happened to one listed session; ``detail`` says why, for people."""

    pid: int
    outcome: Outcome
    detail: str

    @property
    def handled(self) -> bool:
        return self.outcome in HANDLED

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "outcome": self.outcome.value, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class SignalReport:
    """A listing and what was done about it: the JSON of the ops commands.

    ``action`` is None when nothing was asked (a listing); ``results`` is
    empty for a listing, a dry run, or when the action was not confirmed.
    """

    selection: Selection
    action: Action | None
    dry_run: bool
    results: tuple[SignalResult, ...] = ()

    @property
    def failures(self) -> tuple[SignalResult, ...]:
        return tuple(r for r in self.results if not r.handled)

    def to_dict(self) -> dict[str, Any]:
        """Fields: ``action``, ``dry_run``, ``taken_at``, ``database``,
        ``all_databases``, ``criteria`` (`Criteria.to_dict`), ``selected``
        (session dicts, as in ``status --json``), ``superusers_left_out``
        (pids), ``visibility_note`` and ``results`` (``pid``, ``outcome``,
        ``detail``).
        """
        selection, snapshot = self.selection, self.selection.snapshot
        return {
            "action": self.action.value if self.action else None,
            "dry_run": self.dry_run,
            "taken_at": snapshot.taken_at.isoformat(),
            "database": snapshot.database,
            "all_databases": snapshot.all_databases,
            "criteria": selection.criteria.to_dict(),
            "selected": [s.to_dict() for s in selection.sessions],
            "superusers_left_out": [s.pid for s in selection.superusers_left_out],
            "visibility_note": selection.visibility_note,
            "results": [r.to_dict() for r in self.results],
        }


_SIGNAL_SQL = """\
SELECT a.backend_start = %(backend_start)s AS same_session,
       a.state,
       a.xact_start IS NOT DISTINCT FROM %(xact_start)s AS same_transaction,
       a.state_change <= %(seen_at)s AS unchanged,
       a.application_name,
       COALESCE(r.rolsuper, true) AS superuser,
       CASE WHEN a.backend_start = %(backend_start)s
             AND a.xact_start IS NOT DISTINCT FROM %(xact_start)s
             AND a.state = %(state)s
             AND a.state_change <= %(seen_at)s
             AND a.application_name = %(application)s
             AND a.backend_type = 'client backend'
             AND a.pid <> pg_catalog.pg_backend_pid()
             AND (%(all_databases)s OR a.datname = pg_catalog.current_database())
             AND (%(superusers)s OR NOT COALESCE(r.rolsuper, true))
            THEN {signal} END AS signalled
FROM pg_catalog.pg_stat_activity AS a
LEFT JOIN pg_catalog.pg_roles AS r ON r.oid = a.usesysid
WHERE a.pid = %(pid)s
"""
_TERMINATE_WAITING = sql.SQL(_SIGNAL_SQL).format(
    signal=sql.SQL("pg_catalog.pg_terminate_backend(a.pid, %(timeout_ms)s)")
)  # PostgreSQL 14+: the server waits for the session to end
_TERMINATE = sql.SQL(_SIGNAL_SQL).format(
    signal=sql.SQL("pg_catalog.pg_terminate_backend(a.pid)")
)
_CANCEL = sql.SQL(_SIGNAL_SQL).format(
    signal=sql.SQL("pg_catalog.pg_cancel_backend(a.pid)")
)
_STILL_THERE = """\
SELECT a.state, a.state_change <= %(seen_at)s AS unchanged
FROM pg_catalog.pg_stat_activity AS a
WHERE a.pid = %(pid)s AND a.backend_start = %(backend_start)s
"""
_GONE = "the session had already ended"
_REFUSED = (
    "permission denied: signalling another role's session needs the privileges"
    " of that role or of pg_signal_backend, and a superuser's session needs"
    " superuser"
)

ResultCallback = Callable[[Session, SignalResult], None]


def signal_sessions(
    conn: psycopg.Connection[Any],
    selection: Selection,
    action: Action,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    audit: AuditLog | None = None,
    command: str | None = None,
    on_result: ResultCallback | None = None,
) -> tuple[SignalResult, ...]:
    """Terminate or cancel each session of ``selection``, one statement per pid.

    ``conn`` must be outside a transaction; it is left outside. Each session
    is re-checked as it is signalled (see the module doc). Termination waits
    up to ``timeout`` seconds for the session to end, cancellation for its
    query to stop; past that the outcome is ``timeout``. Every attempt is
    appended to ``audit`` (with ``command`` naming the caller) and passed to
    ``on_result`` as it completes. Only a broken connection raises.
    """
    results = []
    for session in selection.sessions:
        result = _signal_one(conn, selection, session, action, timeout)
        results.append(result)
        if audit:
            audit.record(
                action.value, **_audit_fields(conn, selection, session, result, command)
            )
        if on_result is not None:
            on_result(session, result)
    return tuple(results)


def _signal_one(
    conn: psycopg.Connection[Any],
    selection: Selection,
    session: Session,
    action: Action,
    timeout: float,
) -> SignalResult:
    server_waits = action is Action.TERMINATE and conn.info.server_version >= 140000
    try:
        row = _signal(conn, selection, session, action, timeout, server_waits)
    except psycopg.errors.InsufficientPrivilege as exc:
        return SignalResult(session.pid, Outcome.REFUSED, _refusal(exc))
    except psycopg.Error as exc:
        if conn.closed or conn.broken:
            raise
        return SignalResult(session.pid, Outcome.FAILED, _first_line(exc))

    if row is None or not row["same_session"]:
        return SignalResult(session.pid, Outcome.GONE, _GONE)
    if row["signalled"] is None:
        reason = _what_changed(session, selection.criteria, row)
        return SignalResult(session.pid, Outcome.CHANGED, reason)
    if not row["signalled"]:  # no such process any more, or it outlived the wait
        if server_waits and _still_there(conn, selection, session, whole=True):
            return _timed_out(session, action, timeout)
        return SignalResult(session.pid, Outcome.GONE, _GONE)
    if not server_waits:
        deadline = time.monotonic() + timeout
        whole = action is Action.TERMINATE
        while _still_there(conn, selection, session, whole=whole):
            if time.monotonic() >= deadline:
                return _timed_out(session, action, timeout)
            time.sleep(_POLL_INTERVAL)
    if action is Action.TERMINATE:
        return SignalResult(session.pid, Outcome.TERMINATED, "the session ended")
    return SignalResult(session.pid, Outcome.CANCELLED, "the query stopped")


def _signal(
    conn: psycopg.Connection[Any],
    selection: Selection,
    session: Session,
    action: Action,
    timeout: float,
    server_waits: bool,
) -> dict[str, Any] | None:
    """Run the re-checking statement for one session: its row, if the pid is on."""
    if action is Action.CANCEL:
        query = _CANCEL
    else:
        query = _TERMINATE_WAITING if server_waits else _TERMINATE
    timeout_ms = max(round(timeout * 1000), 1)
    params = {
        "pid": session.pid,
        "backend_start": session.backend_start,
        "xact_start": session.xact_start,
        "state": session.state,
        "seen_at": selection.snapshot.taken_at,
        "application": session.application_name,
        "all_databases": selection.criteria.all_databases,
        "superusers": selection.criteria.include_superusers,
        "timeout_ms": timeout_ms,
    }
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(  # long enough for the server to wait timeout_ms
            "SELECT pg_catalog.set_config('statement_timeout', %s, true)",
            [f"{timeout_ms + _STATEMENT_MARGIN_MS}ms"],
        )
        return cur.execute(query, params).fetchone()


def _still_there(
    conn: psycopg.Connection[Any],
    selection: Selection,
    session: Session,
    *,
    whole: bool,
) -> bool:
    """Whether the session goes on (``whole``) or, else, still runs its query."""
    params = {
        "pid": session.pid,
        "backend_start": session.backend_start,
        "seen_at": selection.snapshot.taken_at,
    }
    # a fresh transaction: pg_stat_activity does not change inside one
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(_STILL_THERE, params).fetchone()
    if row is None:
        return False
    return whole or (row["state"] == session.state and bool(row["unchanged"]))


def _timed_out(session: Session, action: Action, timeout: float) -> SignalResult:
    what = "the session" if action is Action.TERMINATE else "its query"
    return SignalResult(
        session.pid,
        Outcome.TIMEOUT,
        f"signalled, but {what} was still running after {timeout:g}s",
    )


def _what_changed(session: Session, criteria: Criteria, row: dict[str, Any]) -> str:
    running = not session.state.startswith("idle")
    if row["state"] != session.state:
        reason = f"it is now {row['state'] or 'gone'}"
    elif running and not (row["same_transaction"] and row["unchanged"]):
        reason = "it is running another query"
    elif not row["same_transaction"]:
        reason = "it started another transaction"
    elif not row["unchanged"]:
        reason = "it ran another query"
    elif row["application_name"] != session.application_name:
        reason = f"its application is now {row['application_name']!r}"
    elif row["superuser"] and not criteria.include_superusers:
        reason = "its role is now a superuser"
    else:
        reason = "it no longer matches the listing"
    return f"{reason}: left alone"


def _refusal(exc: psycopg.Error) -> str:
    detail = exc.diag.message_detail
    return f"{_REFUSED} ({detail})" if detail else _REFUSED


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _audit_fields(
    conn: psycopg.Connection[Any],
    selection: Selection,
    session: Session,
    result: SignalResult,
    command: str | None,
) -> dict[str, Any]:
    info = conn.info
    return {
        "command": command,
        "server": f"{info.host}:{info.port}",
        "connected_as": info.user,
        "pid": session.pid,
        "database": session.database,
        "user": session.user,
        "application_name": session.application_name,
        "client_addr": session.client_addr,
        "state": session.state,
        "state_seconds": _rounded(session.state_seconds),
        "xact_seconds": _rounded(session.xact_seconds),
        "query_seconds": _rounded(session.query_seconds),
        "query": session.query,
        "listed_at": selection.snapshot.taken_at.isoformat(),
        "criteria": selection.criteria.to_dict(),
        "outcome": result.outcome.value,
        "detail": result.detail,
    }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)
