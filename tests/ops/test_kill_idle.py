"""`pgwarden kill-idle` against the real server: it ends what it listed, only that."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from psycopg import sql

from pgwarden.cli import _confirm
from pgwarden.cli._common import connect
from pgwarden.ops.kill import find_idle_sessions, idle_criteria, terminate_sessions
from pgwarden.ops.sessions import Outcome
from tests.conftest import PgServer

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
    wait_gone,
    wait_older,
)

REPORT_KEYS = {
    "action", "dry_run", "taken_at", "database", "all_databases", "criteria",
    "selected", "superusers_left_out", "visibility_note", "results",
}  # fmt: skip
CRITERIA_KEYS = {
    "states", "older_than_seconds", "clock", "applications", "users", "pids",
    "all_databases", "include_superusers",
}  # fmt: skip


@pytest.fixture
def roles(admin: Conn, sessions: Sessions) -> Iterator[Roles]:
    r = Roles(admin)
    try:
        yield r
    finally:
        sessions.close()  # a role with sessions cannot be dropped cleanly
        r.drop()


@pytest.fixture
def app_user(roles: Roles) -> str:
    """An ordinary role: kill-idle acts on its sessions by default."""
    return roles.make()


@pytest.fixture
def other_db(pg_server: PgServer) -> Iterator[str]:
    name = f"pgw_other_{uuid.uuid4().hex[:8]}"
    pg_server.create_database(name)
    try:
        yield name
    finally:
        pg_server.drop_database(name)


def test_terminates_exactly_what_it_listed(
    dsn: str,
    admin: Conn,
    sessions: Sessions,
    roles: Roles,
    app_user: str,
    other_db: str,
) -> None:
    other_user = sessions.in_transaction("worker", user=roles.make())
    in_tx = sessions.in_transaction("worker", user=app_user)
    aborted = sessions.aborted("worker", user=app_user)
    idle = sessions.idle("worker", user=app_user)
    active = sessions.open("worker", user=app_user)
    sessions.start(active, "SELECT pg_sleep(60)")
    superuser = sessions.in_transaction("worker")
    elsewhere = sessions.in_transaction("worker", user=app_user, dbname=other_db)
    wait_for_state(admin, active, "active")
    untouched = [idle, active, superuser, elsewhere, other_user, admin]

    data = invoke_json(
        "kill-idle", "--dsn", dsn, "--older-than", "0", "--user", app_user, "--yes"
    )

    assert selected(data) == {pid(in_tx), pid(aborted)}
    assert outcomes(data) == {pid(in_tx): "terminated", pid(aborted): "terminated"}
    assert data["superusers_left_out"] == []  # postgres is not app_user
    assert not alive(admin, in_tx) and not alive(admin, aborted)
    assert all(alive(admin, c) for c in untouched)
    assert state_of(admin, active) == "active"


def test_filters_select_exactly_the_right_sessions(
    dsn: str, admin: Conn, sessions: Sessions, roles: Roles, other_db: str
) -> None:
    alice, bob = roles.make(), roles.make()
    billing_a = sessions.in_transaction("billing-api", user=alice)
    billing_b = sessions.in_transaction("billing-worker", user=bob)
    reports = sessions.in_transaction("reports", user=alice)
    plain_idle = sessions.idle("billing-api", user=alice)
    elsewhere = sessions.in_transaction("billing-api", user=alice, dbname=other_db)
    wait_older(admin, [billing_a, billing_b, reports, plain_idle], 0.3)
    young = sessions.in_transaction("billing-api", user=alice)

    def pick(*args: str) -> set[int]:
        return selected(invoke_json("kill-idle", "--dsn", dsn, "--dry-run", *args))

    assert pick("--older-than", "0") == {
        pid(c) for c in (billing_a, billing_b, reports, young)
    }
    assert pick("--older-than", "250ms") == {
        pid(c) for c in (billing_a, billing_b, reports)
    }
    assert pick("--older-than", "0", "--application", "billing-*") == {
        pid(billing_a),
        pid(billing_b),
        pid(young),
    }
    assert pick("--older-than", "0.25", "--user", alice) == {
        pid(billing_a),
        pid(reports),
    }
    assert pick(
        "--older-than", "0", "--application", "reports", "--application", "billing-w*"
    ) == {pid(reports), pid(billing_b)}
    assert pick("--older-than", "0", "--pid", str(pid(reports))) == {pid(reports)}
    assert pick("--older-than", "0", "--state", "idle") == {pid(plain_idle)}
    assert pid(elsewhere) in pick("--older-than", "0", "--all-databases")
    assert all(alive(admin, c) for c in (billing_a, billing_b, reports, elsewhere))


def test_superusers_are_left_alone_unless_included(
    dsn: str, admin: Conn, sessions: Sessions
) -> None:
    superuser = sessions.in_transaction("su-worker")
    args = ("kill-idle", "--dsn", dsn, "--older-than", "0", "--yes")

    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "Nothing to terminate" in result.stdout
    assert f"(pid {pid(superuser)})" in result.stdout
    assert "--include-superusers" in result.stdout
    assert alive(admin, superuser)

    data = invoke_json(*args, "--include-superusers")
    assert outcomes(data) == {pid(superuser): "terminated"}
    assert not alive(admin, superuser)


def test_dry_run_terminates_nothing(
    dsn: str, admin: Conn, sessions: Sessions, app_user: str, tmp_path: Path
) -> None:
    victim = sessions.in_transaction("worker", user=app_user)
    audit = tmp_path / "audit.jsonl"

    result = invoke(
        "kill-idle", "--dsn", dsn, "--older-than", "0", "--dry-run",
        "--audit-log", str(audit),
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert str(pid(victim)) in result.stdout
    assert "idle in transaction" in result.stdout
    assert result.stdout.rstrip().endswith("dry run: nothing terminated.")
    assert alive(admin, victim)
    assert not audit.exists()


def test_without_a_terminal_it_refuses_without_yes(
    dsn: str, admin: Conn, sessions: Sessions, app_user: str
) -> None:
    victim = sessions.in_transaction("worker", user=app_user)

    result = invoke("kill-idle", "--dsn", dsn, "--older-than", "0")

    assert result.exit_code == 2
    assert str(pid(victim)) in result.stdout  # the listing came first
    assert result.stderr == (
        "Error: refusing to terminate 1 session without --yes (not a terminal)\n"
    )
    assert alive(admin, victim)

    result = invoke("kill-idle", "--dsn", dsn, "--older-than", "0", "--json")
    assert result.exit_code == 2
    assert selected(json.loads(result.stdout)) == {pid(victim)}
    assert result.stderr.startswith("Error: refusing to terminate 1 session")
    assert alive(admin, victim)


def test_on_a_terminal_it_asks_and_no_means_no(
    dsn: str,
    admin: Conn,
    sessions: Sessions,
    app_user: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_confirm, "stdin_is_terminal", lambda: True)
    victim = sessions.in_transaction("worker", user=app_user)
    args = ("kill-idle", "--dsn", dsn, "--older-than", "0")

    declined = invoke(*args, input="n\n")
    assert declined.exit_code == 1
    assert "Terminate 1 session? [y/N]" in declined.stderr
    assert "not confirmed: nothing terminated." in declined.stdout
    assert alive(admin, victim)

    accepted = invoke(*args, input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert f"pid {pid(victim):>7}  terminated" in accepted.stdout
    assert "done: 1 terminated." in accepted.stdout
    assert not alive(admin, victim)


def test_with_json_on_a_terminal_the_listing_and_question_go_to_stderr(
    dsn: str,
    admin: Conn,
    sessions: Sessions,
    app_user: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_confirm, "stdin_is_terminal", lambda: True)
    victim = sessions.in_transaction("worker", user=app_user)

    result = invoke(
        "kill-idle", "--dsn", dsn, "--older-than", "0", "--json", input="y\n"
    )

    assert result.exit_code == 0, result.output
    assert outcomes(json.loads(result.stdout)) == {pid(victim): "terminated"}
    assert str(pid(victim)) in result.stderr
    assert "Terminate 1 session? [y/N]" in result.stderr


def test_a_session_that_turns_active_after_the_listing_survives(
    dsn: str,
    admin: Conn,
    sessions: Sessions,
    app_user: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    victim = sessions.in_transaction("worker", user=app_user)
    other = sessions.in_transaction("worker", user=app_user)

    def wake_up_then_confirm(question: str) -> bool:
        sessions.start(victim, "SELECT pg_sleep(60)")
        wait_for_state(admin, victim, "active")
        return True

    monkeypatch.setattr(_confirm, "stdin_is_terminal", lambda: True)
    monkeypatch.setattr(_confirm, "confirmed", wake_up_then_confirm)

    data = invoke_json("kill-idle", "--dsn", dsn, "--older-than", "0")

    assert selected(data) == {pid(victim), pid(other)}
    assert outcomes(data) == {pid(victim): "changed", pid(other): "terminated"}
    changed = next(r for r in data["results"] if r["pid"] == pid(victim))
    assert changed["detail"] == "it is now active: left alone"
    assert state_of(admin, victim) == "active"


def _ran_another_query(conn: Conn) -> None:
    conn.execute("SELECT 2")


def _started_another_transaction(conn: Conn) -> None:
    conn.execute("COMMIT")
    conn.execute("BEGIN")
    conn.execute("SELECT 3")


@pytest.mark.parametrize(
    ("change", "outcome", "detail"),
    [
        (_ran_another_query, Outcome.CHANGED, "it ran another query: left alone"),
        (
            _started_another_transaction,
            Outcome.CHANGED,
            "it started another transaction: left alone",
        ),
        (Conn.close, Outcome.GONE, "the session had already ended"),
    ],
)
def test_what_changed_since_the_listing_is_left_alone(
    dsn: str,
    admin: Conn,
    sessions: Sessions,
    app_user: str,
    change: Callable[[Conn], None],
    outcome: Outcome,
    detail: str,
) -> None:
    victim = sessions.in_transaction("worker", user=app_user)
    victim_pid = pid(victim)
    with connect(dsn) as conn:
        selection = find_idle_sessions(conn, idle_criteria(older_than=0))
        assert [s.pid for s in selection.sessions] == [victim_pid]
        change(victim)
        if outcome is Outcome.GONE:
            wait_gone(admin, victim_pid)
        [result] = terminate_sessions(conn, selection)
    assert (result.outcome, result.detail) == (outcome, detail)
    if outcome is Outcome.CHANGED:
        assert state_of(admin, victim) == "idle in transaction"


def test_a_refused_pid_is_explained_and_the_others_still_handled(
    dsn: str, admin: Conn, sessions: Sessions, roles: Roles
) -> None:
    operator = roles.make("pg_read_all_stats")  # sees all, may signal only its own
    stranger = roles.make()
    theirs = sessions.in_transaction("worker", user=stranger)
    wait_older(admin, [theirs], 0.05)  # listed first: oldest first
    mine = sessions.in_transaction("worker", user=operator)

    result = invoke(
        "kill-idle", "--dsn", f"{dsn} user={operator}", "--older-than", "0",
        "--yes", "--json",
    )  # fmt: skip

    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert [r["pid"] for r in data["results"]] == [pid(theirs), pid(mine)]
    assert outcomes(data) == {pid(theirs): "refused", pid(mine): "terminated"}
    refusal = data["results"][0]["detail"]
    assert "pg_signal_backend" in refusal and "superuser" in refusal
    assert result.stderr == "Error: 1 of 2 sessions not terminated: 1 refused\n"
    assert alive(admin, theirs) and not alive(admin, mine)


def test_every_attempt_goes_to_the_audit_log(
    dsn: str, admin: Conn, sessions: Sessions, app_user: str, tmp_path: Path
) -> None:
    victim = sessions.in_transaction("worker", user=app_user)
    audit = tmp_path / "audit.jsonl"

    invoke_json(
        "kill-idle", "--dsn", dsn, "--older-than", "0", "--yes",
        "--audit-log", str(audit),
    )  # fmt: skip

    [line] = audit.read_text().splitlines()
    record = json.loads(line)
    assert record["action"] == "terminate"
    assert record["command"] == "kill-idle"
    assert record["pid"] == pid(victim)
    assert record["user"] == app_user
    assert record["application_name"] == "worker"
    assert record["state"] == "idle in transaction"
    assert record["outcome"] == "terminated"
    assert record["criteria"]["older_than_seconds"] == 0.0
    assert {"at", "os_user", "host", "server", "connected_as", "query"} <= set(record)


def test_json_keeps_its_documented_fields(
    dsn: str, sessions: Sessions, app_user: str
) -> None:
    sessions.in_transaction("worker", user=app_user)

    data = invoke_json("kill-idle", "--dsn", dsn, "--older-than", "1s", "--dry-run")
    assert set(data) == REPORT_KEYS
    assert set(data["criteria"]) == CRITERIA_KEYS
    assert data["action"] == "terminate" and data["dry_run"] is True
    assert data["criteria"]["older_than_seconds"] == 1.0
    assert data["results"] == []

    data = invoke_json("kill-idle", "--dsn", dsn, "--older-than", "0", "--yes")
    assert set(data) == REPORT_KEYS
    assert set(data["results"][0]) == {"pid", "outcome", "detail"}


HOSTILE = "x'; DROP TABLE t; --"


@pytest.mark.parametrize(
    "value", [HOSTILE, '"; SELECT pg_terminate_backend(pg_backend_pid()); --', "'"]
)
def test_hostile_filter_values_are_harmless(
    dsn: str, admin: Conn, sessions: Sessions, app_user: str, value: str
) -> None:
    admin.execute("CREATE TABLE t (id int)")
    bystander = sessions.in_transaction("worker", user=app_user)
    for option in ("--application", "--user"):
        data = invoke_json(
            "kill-idle", "--dsn", dsn, "--older-than", "0", "--yes", option, value
        )
        assert data["selected"] == [] and data["results"] == []
    assert alive(admin, bystander)
    admin.execute("SELECT count(*) FROM t")  # still there


def test_a_hostile_application_name_is_matched_and_bound(
    dsn: str, admin: Conn, sessions: Sessions, app_user: str
) -> None:
    admin.execute("CREATE TABLE t (id int)")
    victim = sessions.in_transaction(HOSTILE, user=app_user)
    bystander = sessions.in_transaction("worker", user=app_user)

    data = invoke_json(
        "kill-idle", "--dsn", dsn, "--older-than", "0", "--yes",
        "--application", HOSTILE,
    )  # fmt: skip

    assert outcomes(data) == {pid(victim): "terminated"}
    assert alive(admin, bystander)
    admin.execute("SELECT count(*) FROM t")


@pytest.mark.parametrize("value", ["soon", "-5m", "5 minutes"])
def test_a_bad_duration_is_a_usage_error(value: str) -> None:
    result = invoke("kill-idle", "--older-than", value)
    assert result.exit_code == 2
    assert "Invalid value for '--older-than'" in result.stderr
    assert "Traceback" not in result.output


def test_a_user_name_that_looks_like_a_pattern_means_that_user(
    dsn: str, admin: Conn, sessions: Sessions, roles: Roles
) -> None:
    tag = uuid.uuid4().hex[:8]
    literal, lookalike = f"pgw_rep{tag}[1]", f"pgw_rep{tag}1"
    for name in (literal, lookalike):
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
        roles.names.append(name)
    mine = sessions.in_transaction("worker", user=literal)
    theirs = sessions.in_transaction("worker", user=lookalike)

    def pick(user: str) -> set[int]:
        args = ("--dry-run", "--older-than", "0", "--user", user)
        return selected(invoke_json("kill-idle", "--dsn", dsn, *args))

    assert pick(literal) == {pid(mine)}
    assert pick(f"pgw_rep{tag}[1x]") == {pid(theirs)}  # no such user: a pattern


def test_an_audit_log_that_cannot_be_written_stops_everything_first(
    dsn: str, admin: Conn, sessions: Sessions, app_user: str, tmp_path: Path
) -> None:
    victim = sessions.in_transaction("worker", user=app_user)
    result = invoke(
        "kill-idle", "--dsn", dsn, "--older-than", "0", "--yes",
        "--audit-log", str(tmp_path / "missing" / "audit.jsonl"),
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "cannot write the audit log" in result.stderr
    assert "Traceback" not in result.output
    assert alive(admin, victim)


def test_a_timeout_over_an_hour_is_a_usage_error() -> None:
    result = invoke("kill-idle", "--timeout", "2h")
    assert result.exit_code == 2
    assert "longer than 3600 s" in result.stderr


def test_a_malformed_dsn_is_one_line_without_the_password() -> None:
    result = invoke("kill-idle", "--dsn", "postgresql://app:s3cret pw@127.0.0.1/db")
    assert result.exit_code == 2
    assert "is not a valid connection string" in result.stderr
    assert "s3cret" not in result.output and "Traceback" not in result.output


def test_its_own_session_is_never_listed(
    dsn: str, admin: Conn, sessions: Sessions
) -> None:
    idle = sessions.idle("worker")

    data = invoke_json(
        "kill-idle", "--dsn", dsn, "--state", "idle", "--older-than", "0",
        "--include-superusers", "--dry-run",
    )  # fmt: skip

    assert selected(data) == {pid(admin), pid(idle)}  # and not kill-idle's own


def test_a_missing_privilege_to_see_sessions_is_explained(
    dsn: str, sessions: Sessions, roles: Roles
) -> None:
    blind = roles.make()
    sessions.in_transaction("worker", user=roles.make())

    result = invoke("kill-idle", "--dsn", f"{dsn} user={blind}", "--older-than", "0")

    assert result.exit_code == 0, result.output
    assert "Nothing to terminate" in result.stdout
    assert f"GRANT pg_monitor TO {blind};" in result.stdout
