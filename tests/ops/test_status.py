"""`pgwarden status` against the real server, and how every ops command fails.

The failures (wrong password, unreachable host) are checked for `status`,
`kill-idle` and `queries` alike: exit status 2, one line on stderr, no
password anywhere.
"""

from __future__ import annotations

import importlib
import json
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from psycopg.conninfo import make_conninfo

from pgwarden.cli._common import connect
from pgwarden.embedded import EmbeddedPostgres, EmbeddedUnavailable
from pgwarden.ops.status import (
    STATE_GROUPS,
    headroom_percent,
    read_status,
    state_counts,
)
from tests.conftest import PgServer

from . import Conn, Sessions, invoke, invoke_json, pid, wait_for_state

# The documented fields of `status --json` (docs/commands.md), as /status has them.
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
SECRET = "pgw-Secret-7f3a"
status_module = importlib.import_module("pgwarden.cli.status")  # not the command
COMMANDS = [("status",), ("kill-idle", "--dry-run"), ("queries", "--longer-than", "0")]
ANSI = re.compile(r"\x1b\[")


@pytest.fixture
def states(admin: Conn, sessions: Sessions) -> dict[str, Conn]:
    """A session in each state, by state."""
    made = {
        "idle": sessions.idle("app-idle"),
        "idle in transaction": sessions.in_transaction("app-tx"),
        "idle in transaction (aborted)": sessions.aborted("app-tx"),
        "active": sessions.open("app-sleep"),
    }
    sessions.start(made["active"], "SELECT pg_sleep(60)")
    wait_for_state(admin, made["active"], "active")
    return made


def test_json_is_the_monitors_server_view(
    dsn: str, admin: Conn, states: dict[str, Conn]
) -> None:
    data = invoke_json("status", "--dsn", dsn, "--long-query", "0")

    assert set(data) == SNAPSHOT_KEYS
    assert all(set(s) == SESSION_KEYS for s in data["sessions"])
    by_pid = {s["pid"]: s["state"] for s in data["sessions"]}
    assert by_pid == {pid(c): state for state, c in states.items()} | {
        pid(admin): "idle"
    }
    assert data["by_state"] == {
        "idle": 2,
        "idle in transaction": 1,
        "idle in transaction (aborted)": 1,
        "active": 1,
    }
    assert data["by_application"]["app-tx"] == 2
    assert sorted(data["idle_in_transaction"]) == sorted(
        pid(states[s]) for s in ("idle in transaction", "idle in transaction (aborted)")
    )
    assert data["long_query_seconds"] == 0.0
    assert data["long_queries"] == [pid(states["active"])]
    with connect(dsn) as conn:  # the same model the monitor serves
        expected = read_status(conn).to_dict(0.0)
    assert set(expected) == set(data)
    assert data["max_connections"] == expected["max_connections"]


def test_all_databases_widens_the_view(
    dsn: str, pg_server: PgServer, sessions: Sessions
) -> None:
    other = f"pgw_other_{uuid.uuid4().hex[:8]}"
    pg_server.create_database(other)
    try:
        elsewhere = pid(sessions.idle("elsewhere", dbname=other))
        here = invoke_json("status", "--dsn", dsn)
        everywhere = invoke_json("status", "--dsn", dsn, "--all-databases")
        sessions.close()
    finally:
        pg_server.drop_database(other)

    assert elsewhere not in {s["pid"] for s in here["sessions"]}
    assert elsewhere in {s["pid"] for s in everywhere["sessions"]}
    assert everywhere["all_databases"] is True


def test_the_human_view_is_aligned_and_plain_off_a_terminal(
    dsn: str, states: dict[str, Conn]
) -> None:
    result = invoke("status", "--dsn", dsn)

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert not ANSI.search(out)
    assert re.search(r"headroom \d+\.\d%", out)
    assert "idle in transaction (aborted) 1" in out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("pid"))
    for column in ("user", "application", "client", "state", "in state", "xact age"):
        assert column in header
    for state, conn in states.items():
        row = next(line for line in out.splitlines() if f"{pid(conn)}  " in line)
        assert state in row
        assert re.search(r"\b\d+\.\ds\b", row)  # durations as 0.4s, 4m12s, ...
    rows = [line for line in out.splitlines() if re.match(r" *\d+  ", line)]
    assert len(rows) == len(states) + 1  # and the admin session
    assert len({line.index("127.0.0.1") for line in rows}) == 1  # aligned


def test_idle_in_transaction_is_highlighted_on_a_terminal(
    dsn: str, states: dict[str, Conn]
) -> None:
    result = invoke("status", "--dsn", dsn, FORCE_COLOR="1")

    assert result.exit_code == 0, result.output
    row = next(
        line
        for line in result.stdout.splitlines()
        if str(pid(states["idle in transaction"])) in line
    )
    assert "\x1b[33m" in row  # yellow


def test_watch_refreshes_until_interrupted(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks: list[float] = []

    def sleep(seconds: float) -> None:
        ticks.append(seconds)
        if len(ticks) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(status_module, "_sleep", sleep)

    result = invoke("status", "--dsn", dsn, "--watch", "0.5")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("headroom") == 2
    assert "every 0.5s, Ctrl-C to stop" in result.stdout

    ticks.clear()
    result = invoke("status", "--dsn", dsn, "--watch", "1", "--json")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert all(set(json.loads(line)) == SNAPSHOT_KEYS for line in lines)


def test_state_counts_and_headroom(dsn: str, states: dict[str, Conn]) -> None:
    with connect(dsn) as conn:
        snapshot = read_status(conn)

    counts = state_counts(snapshot)
    assert tuple(counts) == STATE_GROUPS
    assert counts == {
        "active": 1,
        "idle": 2,
        "idle in transaction": 1,
        "idle in transaction (aborted)": 1,
        "others": 0,
    }
    expected = 100 * snapshot.available_connections / snapshot.usable_connections
    assert headroom_percent(snapshot) == pytest.approx(expected)
    assert 0 < headroom_percent(snapshot) < 100


# -- failures: the same for every ops command ---------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_an_unreachable_host_is_one_line_and_exit_2() -> None:
    port = closed_port()
    conninfo = f"host=127.0.0.1 port={port} user=nobody password={SECRET}"
    done = subprocess.run(  # a real process: no traceback, whatever happens
        [sys.executable, "-m", "pgwarden", "status", "--dsn", conninfo],
        capture_output=True,
        text=True,
        timeout=30,
    )
    outputs = [(done.returncode, done.stdout, done.stderr)]
    for command in COMMANDS[1:]:
        result = invoke(*command, "--dsn", conninfo)
        outputs.append((result.exit_code, result.stdout, result.stderr))

    for code, stdout, stderr in outputs:
        assert code == 2
        assert stdout == ""
        [line] = stderr.splitlines()
        assert line.startswith("Error: ") and f"port {port}" in line
        assert SECRET not in stderr


@pytest.fixture(scope="module")
def password_server() -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(auth="scram-sha-256")
    try:
        server.start()
    except EmbeddedUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.cleanup()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_wrong_password_is_one_line_and_exit_2(
    password_server: EmbeddedPostgres, command: tuple[str, ...]
) -> None:
    conninfo = make_conninfo(password_server.dsn(), password=SECRET)

    result = invoke(*command, "--dsn", conninfo)

    assert result.exit_code == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: ") and "password authentication failed" in line
    assert SECRET not in result.output + result.stderr


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_no_password_in_any_output(
    dsn: str, states: dict[str, Conn], command: tuple[str, ...]
) -> None:
    conninfo = make_conninfo(dsn, password=SECRET)  # trusted: the server ignores it
    for output in ((), ("--json",)):
        result = invoke(*command, "--dsn", conninfo, *output)
        assert result.exit_code in (0, 1), result.output
        assert SECRET not in result.stdout + result.stderr
