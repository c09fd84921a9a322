"""Tests of the ops commands against the real server, and what they share.

`Sessions` (from `tests/_sessions.py`, as the `sessions` fixture) makes client
sessions in each state (as any role, in any database); `Roles` makes throwaway
login roles; `invoke` runs a command as a cron job would see it: no terminal,
no colour.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
from click.testing import CliRunner, Result
from psycopg import sql

from pgwarden.cli import main
from tests._sessions import Sessions as Sessions  # shared with tests/monitor
from tests._util import wait_until

Conn = psycopg.Connection[Any]

# Rich would draw colour and live views for these, as on a terminal.
PLAIN = {"FORCE_COLOR": None, "TTY_COMPATIBLE": None, "TTY_INTERACTIVE": None}


def invoke(*args: str, input: str | None = None, **env: str | None) -> Result:
    return CliRunner(env={**PLAIN, **env}).invoke(main, list(args), input=input)


def invoke_json(*args: str, code: int = 0) -> dict[str, Any]:
    """Run a command with ``--json``; check its exit status; the parsed output."""
    result = invoke(*args, "--json")
    assert result.exit_code == code, (result.output, result.stderr)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def pid(conn: Conn | int) -> int:
    """The backend pid of a session (given as a connection or a pid)."""
    return conn if isinstance(conn, int) else conn.info.backend_pid


class Roles:
    """Login roles made for one test, dropped at its end."""

    def __init__(self, admin: Conn) -> None:
        self.admin = admin
        self.names: list[str] = []

    def make(self, *member_of: str) -> str:
        name = f"pgw_role_{uuid.uuid4().hex[:8]}"
        self.admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
        for granted in member_of:
            self.admin.execute(
                sql.SQL("GRANT {} TO {}").format(
                    sql.Identifier(granted), sql.Identifier(name)
                )
            )
        self.names.append(name)
        return name

    def drop(self) -> None:
        for name in self.names:
            self.admin.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                " WHERE usename = %s",
                [name],
            )
            self.admin.execute(
                sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name))
            )


def state_of(admin: Conn, conn: Conn | int) -> str | None:
    """The session's state now, or None once it has ended."""
    row = admin.execute(
        "SELECT state FROM pg_stat_activity WHERE pid = %s", [pid(conn)]
    ).fetchone()
    return None if row is None else str(row[0])


def alive(admin: Conn, conn: Conn | int) -> bool:
    return state_of(admin, conn) is not None


def wait_for_state(admin: Conn, conn: Conn, state: str) -> None:
    wait_until(lambda: state_of(admin, conn) == state, message=f"state {state!r}")


def wait_gone(admin: Conn, conn: Conn | int) -> None:
    wait_until(lambda: not alive(admin, conn), message="the session to end")


def wait_older(admin: Conn, conns: list[Conn], seconds: float) -> None:
    """Until each session has been in its state for more than ``seconds``."""
    pids = [pid(c) for c in conns]

    def old_enough() -> bool:
        row = admin.execute(
            "SELECT bool_and(clock_timestamp() - state_change > %s * interval '1s')"
            " FROM pg_stat_activity WHERE pid = ANY(%s)",
            [seconds, pids],
        ).fetchone()
        return bool(row and row[0])

    wait_until(old_enough, message=f"sessions older than {seconds}s")


def selected(data: dict[str, Any]) -> set[int]:
    return {s["pid"] for s in data["selected"]}


def outcomes(data: dict[str, Any]) -> dict[int, str]:
    return {r["pid"]: r["outcome"] for r in data["results"]}
