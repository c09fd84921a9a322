"""The server snapshot against a real server: every state, clock and lock shape."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from pgwarden.monitor import (
    Attribution,
    ServerSnapshot,
    atake_snapshot,
    preview,
    take_snapshot,
)
from pgwarden.monitor.snapshot import SNAPSHOT_SQL, SNAPSHOT_SQL_PRE_14

from .._sessions import Sessions
from .._util import wait_until

Conn = psycopg.Connection[Any]

SNAPSHOT_KEYS = {
    "taken_at", "server_version", "in_recovery", "database", "all_databases",
    "role", "own_pid", "max_connections", "superuser_reserved_connections",
    "reserved_connections", "usable_connections", "total", "available_connections",
    "usage_ratio", "by_state", "by_application", "by_user", "hidden_sessions",
    "visibility_note", "oldest_xact_seconds", "idle_in_transaction",
    "long_query_seconds", "long_queries", "lock_waits", "sessions",
}  # fmt: skip
SESSION_KEYS = {
    "pid", "database", "user", "superuser", "application_name", "client_addr",
    "client_port", "backend_type", "visible", "state", "state_seconds",
    "xact_seconds", "query_seconds", "wait_event_type", "wait_event", "query",
    "backend_start", "xact_start", "blocked_by", "attribution",
}  # fmt: skip
LOCK_WAIT_KEYS = {"pid", "blocked_by", "root_blockers", "waiting_seconds"}
ATTRIBUTION_KEYS = {"pool", "lane", "held_seconds", "acquired_at"}


@pytest.fixture
def table(admin: Conn) -> str:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    admin.execute("INSERT INTO t VALUES (1, 0), (2, 0)")
    return "t"


def snapshot_when(
    conn: Conn, predicate: Callable[[ServerSnapshot], bool], message: str
) -> ServerSnapshot:
    """Take snapshots on ``conn`` until one satisfies ``predicate``."""

    def attempt() -> ServerSnapshot | None:
        snap = take_snapshot(conn)
        return snap if predicate(snap) else None

    snap = wait_until(attempt, message=message)
    assert snap is not None
    return snap


def waiting(*pids: int) -> Callable[[ServerSnapshot], bool]:
    return lambda snap: {w.pid for w in snap.lock_waits} >= set(pids)


def sleeping(pid: int) -> Callable[[ServerSnapshot], bool]:
    """The session runs pg_sleep (active is not enough: the wait starts later)."""
    return lambda snap: getattr(snap.session(pid), "wait_event", None) == "PgSleep"


def pid(conn: Conn) -> int:
    return conn.info.backend_pid


def tree_of(snap: ServerSnapshot) -> list[tuple[int, int, bool]]:
    """The lock tree as (depth, pid, repeated), depth first."""
    return [
        (depth, node.pid, node.repeated)
        for root in snap.lock_tree()
        for depth, node in root.walk()
    ]


def test_each_state_is_classified_exactly(admin: Conn, sessions: Sessions) -> None:
    idle = sessions.open("s-idle")
    idle.execute("SELECT 1")
    in_tx = sessions.open("s-in-tx")
    in_tx.execute("BEGIN")
    in_tx.execute("SELECT 1")
    aborted = sessions.open("s-aborted")
    aborted.execute("BEGIN")
    with pytest.raises(psycopg.errors.DivisionByZero):
        aborted.execute("SELECT 1/0")
    active = sessions.open("s-active")
    sessions.start(active, "SELECT pg_sleep(60)")

    snap = snapshot_when(admin, sleeping(pid(active)), "the sleeper to sleep")

    assert {s.pid: s.state for s in snap.sessions} == {
        pid(idle): "idle",
        pid(in_tx): "idle in transaction",
        pid(aborted): "idle in transaction (aborted)",
        pid(active): "active",
    }  # and the snapshotting session is not there
    assert snap.own_pid == pid(admin)
    assert snap.by_state == {
        "idle": 1,
        "idle in transaction": 1,
        "idle in transaction (aborted)": 1,
        "active": 1,
    }
    assert snap.by_application == {
        "s-idle": 1,
        "s-in-tx": 1,
        "s-aborted": 1,
        "s-active": 1,
    }
    assert snap.by_user == {"postgres": 4}
    assert {s.pid for s in snap.idle_in_transaction} == {pid(in_tx), pid(aborted)}
    sleeper = snap.session(pid(active))
    assert sleeper is not None
    assert (sleeper.wait_event_type, sleeper.wait_event) == ("Timeout", "PgSleep")
    assert sleeper.query == "SELECT pg_sleep(60)"
    assert sleeper.superuser and sleeper.backend_type == "client backend"
    assert sleeper.client_addr == "127.0.0.1" and sleeper.client_port
    assert sleeper.backend_start is not None and sleeper.backend_start <= snap.taken_at
    assert snap.session(pid(idle)).xact_seconds is None  # type: ignore[union-attr]


def test_long_queries_are_running_ones_over_the_threshold(
    admin: Conn, sessions: Sessions
) -> None:
    sessions.open("old-idle").execute("SELECT 1")
    active = sessions.open("sleeper")
    sessions.start(active, "SELECT pg_sleep(60)")
    snap = snapshot_when(admin, sleeping(pid(active)), "the sleeper to sleep")
    age = snap.session(pid(active)).query_seconds  # type: ignore[union-attr]
    assert age is not None

    assert [s.pid for s in snap.long_queries(age / 2)] == [pid(active)]
    assert snap.long_queries(age + 60) == ()
    assert snap.to_dict(long_query_seconds=age / 2)["long_queries"] == [pid(active)]


def test_the_three_clocks_are_kept_apart(admin: Conn, sessions: Sessions) -> None:
    conn = sessions.open()
    conn.execute("BEGIN")
    conn.execute("SELECT pg_sleep(0.3)")  # transaction older than the query by this
    conn.execute("SELECT pg_sleep(0.4)")  # query older than the idle state by this

    snap = take_snapshot(admin)
    s = snap.session(pid(conn))
    assert s is not None and s.state == "idle in transaction"
    assert s.xact_seconds is not None and s.query_seconds is not None
    assert s.state_seconds is not None
    assert 0.3 <= s.xact_seconds - s.query_seconds < 0.3 + 0.5
    assert 0.4 <= s.query_seconds - s.state_seconds < 0.4 + 0.5
    assert s.xact_start == snap.taken_at - timedelta(seconds=s.xact_seconds)
    assert snap.oldest_xact_seconds == s.xact_seconds


def test_a_row_lock_wait_names_its_blocker(
    admin: Conn, sessions: Sessions, table: str
) -> None:
    holder = sessions.open("holder")
    holder.execute("BEGIN")
    holder.execute("UPDATE t SET v = 1 WHERE id = 1")
    waiter = sessions.open("waiter")
    done = sessions.start(waiter, "UPDATE t SET v = 2 WHERE id = 1")

    snap = snapshot_when(admin, waiting(pid(waiter)), "the waiter to wait")

    (wait,) = snap.lock_waits
    assert wait.pid == pid(waiter)
    assert wait.blocked_by == wait.root_blockers == (pid(holder),)
    blocked = snap.session(pid(waiter))
    assert blocked is not None and blocked.blocked_by == (pid(holder),)
    assert (blocked.wait_event_type, blocked.wait_event) == ("Lock", "transactionid")
    assert blocked.query_seconds is not None and wait.waiting_seconds is not None
    assert 0 <= wait.waiting_seconds <= blocked.query_seconds
    assert tree_of(snap) == [(0, pid(holder), False), (1, pid(waiter), False)]
    (root,) = snap.lock_tree()
    assert root.wait is None and root.session is not None
    assert root.session.state == "idle in transaction"

    holder.execute("ROLLBACK")
    done.join(5)
    assert take_snapshot(admin).lock_waits == ()


def test_a_chain_has_its_last_blocker_as_root(
    admin: Conn, sessions: Sessions, table: str
) -> None:
    c = sessions.open("c")
    c.execute("BEGIN")
    c.execute("UPDATE t SET v = 1 WHERE id = 1")
    b = sessions.open("b")
    b.execute("BEGIN")
    b.execute("UPDATE t SET v = 1 WHERE id = 2")
    sessions.start(b, "UPDATE t SET v = 2 WHERE id = 1")  # B waits on C
    a = sessions.open("a")
    sessions.start(a, "UPDATE t SET v = 3 WHERE id = 2")  # A waits on B

    snap = snapshot_when(admin, waiting(pid(a), pid(b)), "A and B to wait")

    waits = {w.pid: w for w in snap.lock_waits}
    assert waits[pid(b)].blocked_by == (pid(c),)
    assert waits[pid(a)].blocked_by == (pid(b),)
    assert waits[pid(a)].root_blockers == waits[pid(b)].root_blockers == (pid(c),)
    assert tree_of(snap) == [(0, pid(c), False), (1, pid(b), False), (2, pid(a), False)]


def test_a_session_blocked_by_two_sessions(
    admin: Conn, sessions: Sessions, table: str
) -> None:
    s1 = sessions.open("share-1")
    s1.execute("BEGIN")
    s1.execute("LOCK TABLE t IN ACCESS SHARE MODE")
    s2 = sessions.open("share-2")
    s2.execute("BEGIN")
    s2.execute("LOCK TABLE t IN ROW SHARE MODE")
    s3 = sessions.open("exclusive")
    s3.execute("BEGIN")
    sessions.start(s3, "LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
    snapshot_when(admin, waiting(pid(s3)), "the exclusive lock to wait")
    s4 = sessions.open("reader")  # queues behind the exclusive request
    sessions.start(s4, "SELECT count(*) FROM t")

    snap = snapshot_when(admin, waiting(pid(s3), pid(s4)), "the reader to wait")

    server_says = admin.execute(
        "SELECT pid, array(SELECT unnest(pg_blocking_pids(pid)) AS b ORDER BY b)"
        " FROM unnest(%s::int[]) AS pid",
        [[pid(s3), pid(s4)]],
    ).fetchall()
    assert dict(server_says) == {
        pid(s3): sorted([pid(s1), pid(s2)]),
        pid(s4): [pid(s3)],
    }
    waits = {w.pid: w for w in snap.lock_waits}
    # In pid order, which is not the order they were opened in once pids wrap.
    first, second = both = tuple(sorted([pid(s1), pid(s2)]))
    assert waits[pid(s3)].blocked_by == both
    assert waits[pid(s4)].blocked_by == (pid(s3),)
    assert waits[pid(s3)].root_blockers == waits[pid(s4)].root_blockers == both
    # the exclusive waiter shows under each blocker, its own waiter only once
    assert tree_of(snap) == [
        (0, first, False),
        (1, pid(s3), False),
        (2, pid(s4), False),
        (0, second, False),
        (1, pid(s3), True),
    ]


def test_a_deadlock_in_progress_does_not_loop(
    admin: Conn, sessions: Sessions, table: str
) -> None:
    slow_detector = "-c deadlock_timeout=1h"
    a = sessions.open("a", options=slow_detector)
    b = sessions.open("b", options=slow_detector)
    for conn, row in ((a, 1), (b, 2)):
        conn.execute("BEGIN")
        conn.execute(f"UPDATE t SET v = 1 WHERE id = {row}".encode())
    sessions.start(a, "UPDATE t SET v = 2 WHERE id = 2")
    sessions.start(b, "UPDATE t SET v = 2 WHERE id = 1")

    snap = snapshot_when(admin, waiting(pid(a), pid(b)), "the deadlock")

    waits = {w.pid: w for w in snap.lock_waits}
    cycle = tuple(sorted([pid(a), pid(b)]))
    assert waits[pid(a)].root_blockers == waits[pid(b)].root_blockers == cycle
    first, second = cycle
    assert tree_of(snap) == [
        (0, first, False),
        (1, second, False),
        (2, first, True),
        (0, second, True),
    ]


def test_background_processes_are_not_client_sessions(admin: Conn) -> None:
    others = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type <> 'client backend'"
    ).fetchall()
    assert others, "the server should have a checkpointer, a WAL writer..."

    snap = take_snapshot(admin, all_databases=True)

    assert {s.backend_type for s in snap.sessions} <= {"client backend"}
    assert not {p for (p,) in others} & {s.pid for s in snap.sessions}
    assert snap.total == len(snap.sessions)  # server-wide scope, self left out
    assert pid(admin) not in {s.pid for s in snap.sessions}


def test_headroom_subtracts_both_reserves(admin: Conn, sessions: Sessions) -> None:
    for _ in range(3):
        sessions.open()
    settings = dict(
        admin.execute(
            "SELECT name, setting::int FROM pg_settings WHERE name IN"
            " ('max_connections', 'superuser_reserved_connections',"
            " 'reserved_connections')"
        ).fetchall()
    )

    snap = take_snapshot(admin)

    if snap.server_version >= 160000:
        assert snap.reserved_connections == settings["reserved_connections"]
    else:
        assert snap.reserved_connections == 0
    assert snap.max_connections == settings["max_connections"]
    su_reserved = settings["superuser_reserved_connections"]
    assert snap.superuser_reserved_connections == su_reserved
    usable = snap.max_connections - su_reserved - snap.reserved_connections
    assert snap.usable_connections == usable
    assert snap.total >= 3
    assert snap.available_connections == usable - snap.total
    assert snap.usage_ratio == snap.total / usable
    reserving = dataclasses.replace(snap, reserved_connections=7)
    assert reserving.usable_connections == usable - 7
    assert reserving.usage_ratio == snap.total / (usable - 7)
    full = dataclasses.replace(snap, total=usable + 2)
    assert full.available_connections == 0 and full.usage_ratio > 1


def test_visibility_without_and_with_pg_monitor(
    admin: Conn, sessions: Sessions
) -> None:
    role = f"pgw Watcher-{uuid.uuid4().hex[:6]}"  # needs quoting in the advice
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        in_tx = sessions.open("superuser-app")
        in_tx.execute("BEGIN")
        in_tx.execute("SELECT 1")
        buddy = sessions.open("buddy", user=role)
        watcher = sessions.open("watcher", user=role)

        blind = take_snapshot(watcher)

        hidden = blind.session(pid(in_tx))
        assert hidden is not None and not hidden.visible
        assert hidden.state == "unknown" and hidden.query is None
        assert hidden.xact_seconds is None and hidden.backend_type is None
        assert hidden.user == "postgres" and hidden.superuser
        assert hidden.application_name == "superuser-app"
        assert blind.session(pid(buddy)).state == "idle"  # type: ignore[union-attr]
        assert blind.by_state == {"unknown": 2, "idle": 1}  # admin, in_tx; buddy
        assert blind.hidden_sessions == 2
        assert blind.visibility_note is not None and role in blind.visibility_note
        everywhere = take_snapshot(watcher, all_databases=True)
        assert everywhere.total == len(everywhere.sessions)  # hidden ones included
        fix = blind.visibility_note.split("Fix: ")[1]
        assert fix.startswith("GRANT pg_monitor TO ")

        admin.execute(fix.encode())  # the advice, as given, works
        clear = take_snapshot(watcher)

        assert clear.visibility_note is None and clear.hidden_sessions == 0
        assert clear.session(pid(in_tx)).state == "idle in transaction"  # type: ignore[union-attr]
        assert clear.session(pid(admin)).state == "idle"  # type: ignore[union-attr]
    finally:
        sessions.close()
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_all_databases_widens_the_scope(
    admin: Conn, sessions: Sessions, pg_server: Any
) -> None:
    mine = sessions.open("here")
    admin_db = conninfo_to_dict(pg_server.admin_dsn)["dbname"]
    elsewhere = sessions.open("elsewhere", dbname=admin_db)

    narrow = take_snapshot(admin)
    wide = take_snapshot(admin, all_databases=True)

    assert [s.pid for s in narrow.sessions] == [pid(mine)]
    assert not narrow.all_databases and wide.all_databases
    assert narrow.total > len(narrow.sessions)  # total is server-wide anyway
    far = wide.session(pid(elsewhere))
    assert far is not None and far.database == "postgres"
    assert wide.session(pid(mine)) is not None
    assert wide.total == len(wide.sessions)


def test_to_dict_is_the_documented_json(
    admin: Conn, sessions: Sessions, table: str
) -> None:
    holder = sessions.open("holder")
    holder.execute("BEGIN")
    holder.execute("UPDATE t SET v = 1 WHERE id = 1")
    waiter = sessions.open("waiter")
    sessions.start(waiter, "UPDATE t SET v = 2 WHERE id = 1")
    snap = snapshot_when(admin, waiting(pid(waiter)), "the waiter to wait")
    owned = Attribution("api", "default", 1.25, "app.py:10 in handler")

    data = json.loads(
        json.dumps(snap.with_attributions({pid(holder): owned}).to_dict())
    )

    assert set(data) == SNAPSHOT_KEYS
    by_pid = {s["pid"]: s for s in data["sessions"]}
    assert all(set(s) == SESSION_KEYS for s in data["sessions"])
    assert by_pid[pid(holder)]["attribution"] == {
        "pool": "api",
        "lane": "default",
        "held_seconds": 1.25,
        "acquired_at": "app.py:10 in handler",
    }
    assert set(by_pid[pid(holder)]["attribution"]) == ATTRIBUTION_KEYS
    assert by_pid[pid(waiter)]["attribution"] is None
    assert [set(w) for w in data["lock_waits"]] == [LOCK_WAIT_KEYS]
    assert data["lock_waits"][0]["root_blockers"] == [pid(holder)]
    assert data["idle_in_transaction"] == [pid(holder)]
    for stamp in (data["taken_at"], by_pid[pid(holder)]["xact_start"]):
        assert datetime.fromisoformat(stamp).utcoffset() == timedelta(0)
    assert data["by_state"] == {"idle in transaction": 1, "active": 1}
    assert data["usable_connections"] - data["total"] == data["available_connections"]


def test_previews_are_short_single_lines_whatever_the_text(
    admin: Conn, sessions: Sessions
) -> None:
    app = "x'); DROP TABLE t; -- \"<b>é\\"
    hostile = sessions.open(app)
    text = "SELECT 1 /* \n\t\x1b[2J\u202e\u2028 " + "y" * 300 + " */"
    hostile.execute(text.encode())

    snap = take_snapshot(admin)

    s = snap.session(pid(hostile))
    assert s is not None and s.query is not None
    assert len(s.query) <= 100 and s.query.isprintable()
    assert s.query.startswith("SELECT 1 /* [2J ") and s.query.endswith("y…")
    # the server escapes non-ASCII in application_name ("?" or "\\xc3\\xa9")
    assert s.application_name.startswith("x'); DROP TABLE t; -- \"<b>")
    assert s.application_name.isprintable()
    assert json.loads(json.dumps(snap.to_dict()))["by_application"] == {
        s.application_name: 1
    }
    assert preview(None) is None
    assert preview("  SELECT\n\n  1\t") == "SELECT 1"
    assert preview("x" * 100) == "x" * 100
    assert preview("x" * 101) == "x" * 99 + "…"


def test_connection_modes(dsn: str) -> None:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:  # not autocommit
        assert take_snapshot(conn).database == conn.info.dbname
        assert conn.info.transaction_status == TransactionStatus.IDLE
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.ProgrammingError, match="outside any transaction"):
            take_snapshot(conn)
        conn.rollback()


def test_the_query_for_servers_before_14_has_the_same_shape(admin: Conn) -> None:
    shapes = []
    for query in (SNAPSHOT_SQL, SNAPSHOT_SQL_PRE_14):
        cur = admin.execute(query.encode(), {"all": True})
        assert cur.description is not None
        shapes.append([(c.name, c.type_code) for c in cur.description])
    assert shapes[0] == shapes[1]


async def test_async_twin(dsn: str, sessions: Sessions) -> None:
    in_tx = sessions.open("async-seen")
    in_tx.execute("BEGIN")
    in_tx.execute("SELECT 1")
    for autocommit in (True, False):
        async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=autocommit
        ) as conn:
            snap = await atake_snapshot(conn)
            assert conn.info.transaction_status == TransactionStatus.IDLE
            assert [(s.pid, s.state) for s in snap.sessions] == [
                (pid(in_tx), "idle in transaction")
            ]
            assert snap.own_pid == conn.info.backend_pid


@pytest.mark.parametrize(
    "query",
    [
        "ALTER ROLE app PASSWORD 'Sn3aky''pw' VALID UNTIL 'infinity'",
        "CREATE USER app WITH PASSWORD $$Sn3aky$$",
        "SELECT dblink_connect('host=db password=Sn3aky dbname=x')",
        "ALTER ROLE app PASSWORD 'Sn3aky",  # cut off by track_activity_query_size
    ],
)
def test_preview_hides_passwords(query: str) -> None:
    shown = preview(query)
    assert shown is not None and "Sn3aky" not in shown and "***" in shown


def test_preview_keeps_the_word_password() -> None:
    assert preview("SELECT password FROM users") == "SELECT password FROM users"
