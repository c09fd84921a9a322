"""`pgwarden queries` against the real server: long queries, lock trees, cancelling."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from psycopg import sql

from pgwarden.cli._common import connect
from pgwarden.ops.queries import find_long_queries, long_query_criteria, stop_queries
from pgwarden.ops.sessions import Action, Outcome
from tests._util import wait_until

from . import (
    Conn,
    Roles,
    Sessions,
    alive,
    invoke,
    invoke_json,
    outcomes,
    pid,
    selected,
    state_of,
    wait_for_state,
)

REPORT_KEYS = {
    "action", "dry_run", "taken_at", "database", "all_databases", "criteria",
    "selected", "superusers_left_out", "visibility_note", "results",
    "lock_waits", "lock_sessions",
}  # fmt: skip


@pytest.fixture
def app_user(admin: Conn, sessions: Sessions) -> Iterator[str]:
    roles = Roles(admin)
    name = roles.make()
    try:
        yield name
    finally:
        sessions.close()
        admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        roles.drop()


def sleeping(admin: Conn, conn: Conn) -> None:
    def asleep() -> bool:
        row = admin.execute(
            "SELECT wait_event FROM pg_stat_activity WHERE pid = %s", [pid(conn)]
        ).fetchone()
        return row is not None and row[0] == "PgSleep"

    wait_until(asleep, message="pg_sleep to start")


def waiting_on_lock(admin: Conn, conn: Conn) -> None:
    def waits() -> bool:
        row = admin.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid(conn)]
        ).fetchone()
        return row is not None and row[0] == "Lock"

    wait_until(waits, message="a lock wait")


def test_lists_long_queries_and_the_lock_tree(
    dsn: str, admin: Conn, sessions: Sessions, app_user: str
) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    admin.execute("INSERT INTO t VALUES (1, 0)")
    admin.execute(sql.SQL("GRANT ALL ON t TO {}").format(sql.Identifier(app_user)))
    blocker = sessions.in_transaction("holder", user=app_user)
    blocker.execute("UPDATE t SET v = 1 WHERE id = 1")
    waiter = sessions.open("waiter", user=app_user)
    sessions.start(waiter, "UPDATE t SET v = 2 WHERE id = 1")
    sleeper = sessions.open("sleeper", user=app_user)
    sessions.start(sleeper, "SELECT pg_sleep(60)")
    waiting_on_lock(admin, waiter)
    sleeping(admin, sleeper)
    args = ("queries", "--dsn", dsn, "--longer-than", "0")

    data = invoke_json(*args, code=1)

    assert set(data) == REPORT_KEYS
    assert data["action"] is None and data["results"] == []
    assert selected(data) == {pid(waiter), pid(sleeper)}
    [wait] = data["lock_waits"]
    assert wait["pid"] == pid(waiter)
    assert wait["blocked_by"] == wait["root_blockers"] == [pid(blocker)]
    assert {s["pid"] for s in data["lock_sessions"]} == {pid(blocker), pid(waiter)}

    human = invoke(*args)
    assert human.exit_code == 1
    assert "Lock waits: 1 session waiting" in human.stdout
    assert f"└ {pid(waiter)}" in human.stdout
    assert f"pgwarden kill-idle --pid {pid(blocker)} --older-than 0" in human.stdout


def test_the_bound_selects_only_older_queries(
    dsn: str, admin: Conn, sessions: Sessions
) -> None:
    old = sessions.open("old")
    sessions.start(old, "SELECT pg_sleep(60)")
    sleeping(admin, old)
    admin.execute("SELECT pg_sleep(0.4)")
    young = sessions.open("young")
    sessions.start(young, "SELECT pg_sleep(60)")
    sleeping(admin, young)

    def pick(bound: str) -> set[int]:
        args = ("queries", "--dsn", dsn, "--longer-than", bound)
        return selected(invoke_json(*args, code=1))

    assert pick("0.3") == {pid(old)}
    assert pick("0") == {pid(old), pid(young)}


def test_nothing_found_is_exit_0(dsn: str, sessions: Sessions) -> None:
    sessions.in_transaction()
    result = invoke("queries", "--dsn", dsn)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("No queries running for more than 30s in pgw_")
    assert "Lock waits" not in result.stdout


def test_cancel_stops_the_query_and_keeps_the_session(
    dsn: str, admin: Conn, sessions: Sessions, app_user: str
) -> None:
    sleeper = sessions.open("sleeper", user=app_user)
    sessions.start(sleeper, "SELECT pg_sleep(60)")
    bystander = sessions.open("bystander", user=app_user)
    sessions.start(bystander, "SELECT pg_sleep(60)")
    sleeping(admin, sleeper)
    sleeping(admin, bystander)

    data = invoke_json(
        "queries", "--dsn", dsn, "--longer-than", "0", "--cancel", "--yes",
        "--application", "sleeper",
    )  # fmt: skip

    assert data["action"] == "cancel"
    assert outcomes(data) == {pid(sleeper): "cancelled"}
    wait_for_state(admin, sleeper, "idle")
    assert state_of(admin, bystander) == "active"


def test_terminate_ends_the_session(
    dsn: str, admin: Conn, sessions: Sessions, app_user: str
) -> None:
    sleeper = sessions.open("sleeper", user=app_user)
    sessions.start(sleeper, "SELECT pg_sleep(60)")
    sleeping(admin, sleeper)
    sleeper_pid = pid(sleeper)

    result = invoke(
        "queries", "--dsn", dsn, "--longer-than", "0", "--terminate", "--yes"
    )

    assert result.exit_code == 0, result.output
    assert f"pid {sleeper_pid:>7}  terminated" in result.stdout
    assert not alive(admin, sleeper_pid)


def test_a_superusers_query_is_listed_but_left_alone(
    dsn: str, admin: Conn, sessions: Sessions
) -> None:
    su = sessions.open("su")
    sessions.start(su, "SELECT pg_sleep(60)")
    sleeping(admin, su)

    listing = invoke_json("queries", "--dsn", dsn, "--longer-than", "0", code=1)
    assert selected(listing) == {pid(su)}

    data = invoke_json("queries", "--dsn", dsn, "--longer-than", "0", "--cancel", "-y")
    assert data["selected"] == [] and data["results"] == []
    assert data["superusers_left_out"] == [pid(su)]
    assert state_of(admin, su) == "active"


def test_without_a_terminal_it_refuses_without_yes(
    dsn: str, admin: Conn, sessions: Sessions, app_user: str
) -> None:
    sleeper = sessions.open("sleeper", user=app_user)
    sessions.start(sleeper, "SELECT pg_sleep(60)")
    sleeping(admin, sleeper)

    result = invoke("queries", "--dsn", dsn, "--longer-than", "0", "--cancel")

    assert result.exit_code == 2
    assert result.stderr == (
        "Error: refusing to cancel 1 query without --yes (not a terminal)\n"
    )
    assert state_of(admin, sleeper) == "active"


def test_dry_run_cancels_nothing(
    dsn: str, admin: Conn, sessions: Sessions, app_user: str
) -> None:
    sleeper = sessions.open("sleeper", user=app_user)
    sessions.start(sleeper, "SELECT pg_sleep(60)")
    sleeping(admin, sleeper)

    result = invoke(
        "queries", "--dsn", dsn, "--longer-than", "0", "--cancel", "--dry-run"
    )

    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip().endswith("dry run: nothing cancelled.")
    assert state_of(admin, sleeper) == "active"


def test_a_query_that_finished_since_the_listing_is_left_alone(
    dsn: str, admin: Conn, sessions: Sessions, app_user: str
) -> None:
    sleeper = sessions.open("sleeper", user=app_user)
    first = sessions.start(sleeper, "SELECT pg_sleep(60)")
    sleeping(admin, sleeper)
    with connect(dsn) as conn:
        selection = find_long_queries(conn, long_query_criteria(longer_than=0))
        assert [s.pid for s in selection.sessions] == [pid(sleeper)]
        sleeper.cancel_safe()
        first.join(5)
        sessions.start(sleeper, "SELECT pg_sleep(60)")  # the next query
        sleeping(admin, sleeper)
        [result] = stop_queries(conn, selection, Action.CANCEL)
    assert result.outcome is Outcome.CHANGED
    assert result.detail == "it is running another query: left alone"
    assert state_of(admin, sleeper) == "active"


def test_cancel_and_terminate_exclude_each_other() -> None:
    result = invoke("queries", "--cancel", "--terminate")
    assert result.exit_code == 2
    assert "--cancel and --terminate exclude each other" in result.stderr
