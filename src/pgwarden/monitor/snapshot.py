"""What the server looks like now: one query, one frozen model.

`take_snapshot` (or `atake_snapshot`) reads ``pg_stat_activity`` and the
connection settings in a single short query and returns a `ServerSnapshot`.
The health monitor, ``/status``, ``pgwarden status --json`` and the dashboard
all render that model; rendering never queries.

Choices that shape the numbers:

* Only client backends (``backend_type = 'client backend'``) are sessions:
  autovacuum, WAL senders, parallel and other background workers are left out.
  The session taking the snapshot is left out of everything, ``total`` included.
* ``total`` counts client backends server-wide, since all of them compete for
  ``max_connections``; the sessions and the counts by state, application and
  user cover the scope: the current database, or every database with
  ``all_databases=True``.
* Three clocks are kept apart, all measured against one server instant
  (`ServerSnapshot.taken_at`): time in the current state (``state_change``),
  transaction age (``xact_start``) and query age (``query_start``, the current
  query, or the last one for an idle session).
* Without ``pg_read_all_stats`` (granted by ``pg_monitor``), the server hides
  other roles' sessions: they still count in ``total`` with state ``unknown``,
  and `ServerSnapshot.visibility_note` says what is missing and how to fix it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

__all__ = [
    "Attribution",
    "LockNode",
    "LockWait",
    "ServerSnapshot",
    "Session",
    "atake_snapshot",
    "preview",
    "take_snapshot",
]

IDLE_IN_TRANSACTION = frozenset(
    {"idle in transaction", "idle in transaction (aborted)"}
)
UNKNOWN = "unknown"
PREVIEW_CHARS = 100

_SQL = """\
WITH clients AS (
    SELECT a.pid, a.datname, a.usename, r.rolsuper,
           a.application_name, pg_catalog.host(a.client_addr) AS client_addr,
           a.client_port, a.backend_type, a.state, a.wait_event_type, a.wait_event,
           a.query, a.backend_start, a.xact_start, a.query_start, a.state_change
    FROM pg_catalog.pg_stat_activity AS a
    LEFT JOIN pg_catalog.pg_roles AS r ON r.oid = a.usesysid
    WHERE a.pid <> pg_catalog.pg_backend_pid()
      -- a hidden row has no backend_type: keep those attached to a database
      AND (a.backend_type = 'client backend'
           OR (a.backend_type IS NULL AND a.datid IS NOT NULL))
), header AS MATERIALIZED (
    SELECT pg_catalog.clock_timestamp() AS now,
           pg_catalog.current_setting('server_version_num')::pg_catalog.int4
               AS server_version,
           pg_catalog.pg_is_in_recovery() AS in_recovery,
           pg_catalog.pg_backend_pid() AS own_pid,
           pg_catalog.current_database() AS current_db,
           CURRENT_USER AS role,
           pg_catalog.quote_ident(CURRENT_USER) AS role_ident,
           pg_catalog.pg_has_role('pg_read_all_stats', 'USAGE') AS sees_all,
           pg_catalog.current_setting('max_connections')::pg_catalog.int4
               AS max_connections,
           pg_catalog.current_setting('superuser_reserved_connections')
               ::pg_catalog.int4 AS superuser_reserved,
           COALESCE(pg_catalog.current_setting('reserved_connections', true)
               ::pg_catalog.int4, 0) AS reserved,
           (SELECT pg_catalog.count(*) FROM clients) AS total
)
SELECT h.*, c.*,
       CASE WHEN c.wait_event_type = 'Lock'
            THEN pg_catalog.pg_blocking_pids(c.pid) END AS blocked_by,
       {wait_start} AS wait_start
FROM header AS h
LEFT JOIN clients AS c
    ON %(all)s OR c.datname = pg_catalog.current_database()
ORDER BY c.pid
"""
# pg_locks.waitstart (PostgreSQL 14+), read only for sessions waiting on a lock
_WAIT_START = """CASE WHEN c.wait_event_type = 'Lock' THEN (
           SELECT pg_catalog.min(l.waitstart) FROM pg_catalog.pg_locks AS l
           WHERE l.pid = c.pid AND NOT l.granted) END"""
SNAPSHOT_SQL = _SQL.format(wait_start=_WAIT_START)
SNAPSHOT_SQL_PRE_14 = _SQL.format(wait_start="NULL::pg_catalog.timestamptz")

# PASSWORD 'x' (also E'', $$ and cut-off literals), and password=x in a
# connection string.
_SECRETS = (
    re.compile(
        r"(\bpassword\b\s*=?\s*)(E?'(?:[^']|'')*'?|\$\$.*?(?:\$\$|$))",
        re.IGNORECASE | re.DOTALL,
    ),
    re.compile(r"""(\bpassword\s*=\s*)([^\s,;)'"*]+)""", re.IGNORECASE),
)
_UNPRINTABLE = re.compile(
    r"[\s\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]+"
)


@dataclass(frozen=True, slots=True)
class Attribution:
    """The pgwarden pool a session belongs to; the monitor fills it in by pid.

    ``lane``, ``held_seconds`` and ``acquired_at`` (the borrower's call site,
    "file:line in function") are None while the connection is idle in the pool.
    """

    pool: str
    lane: str | None = None
    held_seconds: float | None = None
    acquired_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields by name, JSON-ready (see `ServerSnapshot.to_dict`)."""
        result: dict[str, Any] = _json(self)
        return result


@dataclass(frozen=True, slots=True)
class Session:
    """One client session as the snapshot saw it.

    ``visible`` is False for another role's session hidden from us: its state is
    ``unknown`` and its clocks, waits, query and client address are None.
    ``backend_start`` and ``xact_start`` let an operation re-check, when it acts,
    that it still targets the same session and the same transaction.
    """

    pid: int
    database: str | None
    user: str | None
    superuser: bool
    application_name: str
    client_addr: str | None  # None for a Unix socket or when hidden
    client_port: int | None
    backend_type: str | None  # None when hidden
    visible: bool
    state: str
    state_seconds: float | None
    xact_seconds: float | None  # None: no open transaction
    query_seconds: float | None  # the current query, or the last one when idle
    wait_event_type: str | None
    wait_event: str | None
    query: str | None  # one-line preview of at most 100 characters
    backend_start: datetime | None
    xact_start: datetime | None
    blocked_by: tuple[int, ...] = ()  # filled for sessions waiting on a lock
    attribution: Attribution | None = None

    @property
    def idle_in_transaction(self) -> bool:
        """Idle in a transaction, aborted or not."""
        return self.state in IDLE_IN_TRANSACTION

    def to_dict(self) -> dict[str, Any]:
        """The fields by name, JSON-ready (see `ServerSnapshot.to_dict`)."""
        result: dict[str, Any] = _json(self)
        return result


@dataclass(frozen=True, slots=True)
class LockWait:
    """A session waiting on a lock, and who blocks it.

    ``blocked_by`` are the pids ``pg_blocking_pids()`` names: the holders of a
    conflicting lock and the sessions queued ahead with a conflicting request
    (0 stands for a prepared transaction). ``root_blockers`` end every chain
    from this session: blockers that are not waiting themselves or, in a
    deadlock not yet broken, the sessions of the cycle. ``waiting_seconds``
    counts from the start of the wait (PostgreSQL 14+) or else of the query.
    """

    pid: int
    blocked_by: tuple[int, ...]
    root_blockers: tuple[int, ...]
    waiting_seconds: float | None

    def to_dict(self) -> dict[str, Any]:
        """The fields by name, JSON-ready (see `ServerSnapshot.to_dict`)."""
        result: dict[str, Any] = _json(self)
        return result


@dataclass(frozen=True, slots=True)
class LockNode:
    """A node of the lock tree: a pid and the sessions waiting on it.

    A waiter blocked by several sessions appears under each; its own waiters are
    listed the first time only, later appearances have ``repeated`` set and no
    children. That also ends the walk around a deadlock cycle.
    """

    pid: int
    session: Session | None  # None: out of scope, or a prepared transaction (pid 0)
    wait: LockWait | None  # None for a root that does not wait
    children: tuple[LockNode, ...] = ()
    repeated: bool = False

    def walk(self, depth: int = 0) -> Iterator[tuple[int, LockNode]]:
        """Yield ``(depth, node)`` depth-first, this node first: ready to indent."""
        yield depth, self
        for child in self.children:
            yield from child.walk(depth + 1)


@dataclass(frozen=True, slots=True)
class ServerSnapshot:
    """The server at one instant (`taken_at`, server clock), as one role sees it.

    ``total`` counts client backends server-wide except the snapshotting one;
    ``sessions`` and the ``by_*`` counts cover ``database`` only, or every
    database when ``all_databases`` is set.
    """

    taken_at: datetime
    server_version: int
    in_recovery: bool
    database: str
    all_databases: bool
    role: str
    own_pid: int
    max_connections: int
    superuser_reserved_connections: int
    reserved_connections: int  # PostgreSQL 16+; 0 before
    total: int
    sessions: tuple[Session, ...]
    lock_waits: tuple[LockWait, ...] = ()
    visibility_note: str | None = None

    @property
    def usable_connections(self) -> int:
        """The slots ordinary roles may use: max_connections less both reserves."""
        return (
            self.max_connections
            - self.superuser_reserved_connections
            - self.reserved_connections
        )

    @property
    def available_connections(self) -> int:
        """Usable slots still free (0 when superusers dig into their reserve)."""
        return max(self.usable_connections - self.total, 0)

    @property
    def usage_ratio(self) -> float:
        """``total / usable_connections``: above 1.0 only from reserved slots."""
        return self.total / max(self.usable_connections, 1)

    @property
    def by_state(self) -> dict[str, int]:
        return dict(Counter(s.state for s in self.sessions))

    @property
    def by_application(self) -> dict[str, int]:
        return dict(Counter(s.application_name for s in self.sessions))

    @property
    def by_user(self) -> dict[str, int]:
        return dict(Counter(s.user or "" for s in self.sessions))

    @property
    def hidden_sessions(self) -> int:
        return sum(not s.visible for s in self.sessions)

    @property
    def idle_in_transaction(self) -> tuple[Session, ...]:
        """Sessions idle in a transaction, aborted ones included."""
        return tuple(s for s in self.sessions if s.idle_in_transaction)

    @property
    def oldest_xact_seconds(self) -> float | None:
        """Age of the oldest open transaction among the sessions, None if none."""
        ages = [s.xact_seconds for s in self.sessions if s.xact_seconds is not None]
        return max(ages, default=None)

    def session(self, pid: int) -> Session | None:
        """The session with this pid, if it is in the snapshot."""
        return next((s for s in self.sessions if s.pid == pid), None)

    def long_queries(self, threshold: float = 30.0) -> tuple[Session, ...]:
        """Sessions running (not idle) one query for more than ``threshold`` s."""
        return tuple(
            s
            for s in self.sessions
            if s.visible
            and not s.state.startswith("idle")
            and s.query_seconds is not None
            and s.query_seconds > threshold
        )

    def lock_tree(self) -> tuple[LockNode, ...]:
        """The lock waits as trees rooted at the root blockers, sorted by pid."""
        sessions = {s.pid: s for s in self.sessions}
        waits = {w.pid: w for w in self.lock_waits}
        waiters: dict[int, list[int]] = {}
        for w in self.lock_waits:
            for blocker in w.blocked_by:
                waiters.setdefault(blocker, []).append(w.pid)
        expanded: set[int] = set()

        def node(pid: int) -> LockNode:
            if pid in expanded:
                return LockNode(pid, sessions.get(pid), waits.get(pid), repeated=True)
            expanded.add(pid)
            children = tuple(node(p) for p in sorted(waiters.get(pid, ())))
            return LockNode(pid, sessions.get(pid), waits.get(pid), children)

        roots = sorted({r for w in self.lock_waits for r in w.root_blockers})
        return tuple(node(pid) for pid in roots)

    def with_attributions(self, by_pid: Mapping[int, Attribution]) -> ServerSnapshot:
        """A copy whose sessions carry the pool attribution found for their pid."""
        sessions = tuple(
            replace(s, attribution=by_pid[s.pid]) if s.pid in by_pid else s
            for s in self.sessions
        )
        return replace(self, sessions=sessions)

    def to_dict(self, long_query_seconds: float = 30.0) -> dict[str, Any]:
        """The JSON contract of ``/status`` and ``pgwarden status --json``.

        Sessions are listed once, in ``sessions``; ``idle_in_transaction`` and
        ``long_queries`` (over ``long_query_seconds``) list pids.
        """
        return {
            "taken_at": _json(self.taken_at),
            "server_version": self.server_version,
            "in_recovery": self.in_recovery,
            "database": self.database,
            "all_databases": self.all_databases,
            "role": self.role,
            "own_pid": self.own_pid,
            "max_connections": self.max_connections,
            "superuser_reserved_connections": self.superuser_reserved_connections,
            "reserved_connections": self.reserved_connections,
            "usable_connections": self.usable_connections,
            "total": self.total,
            "available_connections": self.available_connections,
            "usage_ratio": round(self.usage_ratio, 4),
            "by_state": self.by_state,
            "by_application": self.by_application,
            "by_user": self.by_user,
            "hidden_sessions": self.hidden_sessions,
            "visibility_note": self.visibility_note,
            "oldest_xact_seconds": _json(self.oldest_xact_seconds),
            "idle_in_transaction": [s.pid for s in self.idle_in_transaction],
            "long_query_seconds": long_query_seconds,
            "long_queries": [s.pid for s in self.long_queries(long_query_seconds)],
            "lock_waits": _json(self.lock_waits),
            "sessions": _json(self.sessions),
        }


def take_snapshot(
    conn: psycopg.Connection[Any], *, all_databases: bool = False
) -> ServerSnapshot:
    """Read the server's state with one query on ``conn`` (see the module doc).

    ``conn`` may be in autocommit mode or not, but not inside a transaction:
    PostgreSQL freezes ``pg_stat_activity`` for the length of a transaction. No
    transaction is left open. Timeouts are the caller's settings on ``conn``.
    """
    query, params = _query(conn, all_databases)
    with conn.cursor(row_factory=dict_row) as cur:
        if conn.autocommit:
            rows = cur.execute(query, params).fetchall()
        else:
            with conn.transaction():
                rows = cur.execute(query, params).fetchall()
    return _build(rows, all_databases)


async def atake_snapshot(
    conn: psycopg.AsyncConnection[Any], *, all_databases: bool = False
) -> ServerSnapshot:
    """The asyncio twin of `take_snapshot`."""
    query, params = _query(conn, all_databases)
    async with conn.cursor(row_factory=dict_row) as cur:
        if conn.autocommit:
            await cur.execute(query, params)
            rows = await cur.fetchall()
        else:
            async with conn.transaction():
                await cur.execute(query, params)
                rows = await cur.fetchall()
    return _build(rows, all_databases)


_Row = dict[str, Any]  # the header columns, then a session's (NULL if none)


def _query(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], all_databases: bool
) -> tuple[str, dict[str, bool]]:
    """The query and its parameters; refuse a connection inside a transaction."""
    status = conn.info.transaction_status
    if status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        raise psycopg.ProgrammingError(
            "take_snapshot needs a connection outside any transaction:"
            " pg_stat_activity does not change inside one"
        )
    new = conn.info.server_version >= 140000
    return SNAPSHOT_SQL if new else SNAPSHOT_SQL_PRE_14, {"all": all_databases}


def _build(rows: list[_Row], all_databases: bool) -> ServerSnapshot:
    head = rows[0]
    now: datetime = head["now"]
    sessions = tuple(_session(r, now) for r in rows if r["pid"] is not None)
    note = None
    if not head["sees_all"]:
        hidden = sum(not s.visible for s in sessions)
        note = (
            f"role {head['role']} cannot see other roles' sessions ({hidden} hidden"
            " here): their state, query, clocks and lock waits are unknown, and"
            " background processes cannot be told from clients, so total may"
            f" count a few. Fix: GRANT pg_monitor TO {head['role_ident']};"
        )
    return ServerSnapshot(
        taken_at=now,
        server_version=head["server_version"],
        in_recovery=head["in_recovery"],
        database=head["current_db"],
        all_databases=all_databases,
        role=head["role"],
        own_pid=head["own_pid"],
        max_connections=head["max_connections"],
        superuser_reserved_connections=head["superuser_reserved"],
        reserved_connections=head["reserved"],
        total=head["total"],
        sessions=sessions,
        lock_waits=_lock_waits(rows, now),
        visibility_note=note,
    )


def _session(r: _Row, now: datetime) -> Session:
    visible = r["backend_type"] is not None
    port = r["client_port"]
    return Session(
        pid=r["pid"],
        database=r["datname"],
        user=r["usename"],
        superuser=bool(r["rolsuper"]),
        application_name=r["application_name"] or "",
        client_addr=r["client_addr"],
        client_port=port if port and port > 0 else None,
        backend_type=r["backend_type"],
        visible=visible,
        state=(r["state"] or UNKNOWN) if visible else UNKNOWN,
        state_seconds=_age(now, r["state_change"]),
        xact_seconds=_age(now, r["xact_start"]),
        query_seconds=_age(now, r["query_start"]),
        wait_event_type=r["wait_event_type"],
        wait_event=r["wait_event"],
        query=preview(r["query"]) if visible else None,
        backend_start=r["backend_start"],
        xact_start=r["xact_start"],
        blocked_by=tuple(sorted(set(r["blocked_by"] or ()))),
    )


def _lock_waits(rows: list[_Row], now: datetime) -> tuple[LockWait, ...]:
    # sets: pg_blocking_pids names a blocker once per parallel worker of it
    edges = {r["pid"]: set(r["blocked_by"]) for r in rows if r["blocked_by"]}
    started = {
        r["pid"]: r["wait_start"] or r["query_start"] for r in rows if r["blocked_by"]
    }

    def reach(pid: int) -> set[int]:
        seen: set[int] = set()
        todo = list(edges[pid])
        while todo:
            p = todo.pop()
            if p not in seen:
                seen.add(p)
                todo.extend(edges.get(p, ()))
        return seen

    reachable = {pid: reach(pid) for pid in edges}
    return tuple(
        LockWait(
            pid=pid,
            blocked_by=tuple(sorted(blockers)),
            root_blockers=tuple(
                sorted(
                    p
                    for p in reachable[pid]
                    if p not in edges or p in reachable[p]  # not waiting, or a cycle
                )
            ),
            waiting_seconds=_age(now, started[pid]),
        )
        for pid, blockers in sorted(edges.items())
    )


def preview(query: str | None) -> str | None:
    """``query`` on one printable line of at most 100 characters.

    Passwords in it (``PASSWORD '...'``, ``password=...`` in a connection
    string) are replaced by ``***``.
    """
    if query is None:
        return None
    text = query
    for secret in _SECRETS:
        text = secret.sub(r"\1***", text)
    text = _UNPRINTABLE.sub(" ", text).strip()
    if len(text) > PREVIEW_CHARS:
        text = text[: PREVIEW_CHARS - 1].rstrip() + "…"
    return text


def _age(now: datetime, since: datetime | None) -> float | None:
    # the activity rows and the clock are read a few microseconds apart
    return None if since is None else max((now - since).total_seconds(), 0.0)


def _json(value: Any) -> Any:
    """Models as dicts, durations rounded to the ms, times in ISO 8601 UTC."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, tuple):
        return [_json(v) for v in value]
    if isinstance(value, Attribution | Session | LockWait):
        return {f.name: _json(getattr(value, f.name)) for f in fields(value)}
    return value
