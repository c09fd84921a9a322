"""Client sessions in each state, for tests that look at pg_stat_activity.

The `sessions` fixture (tests/conftest.py) gives each test one `Sessions`,
closed at its end.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

Conn = psycopg.Connection[Any]


class Sessions:
    """Client sessions for a test; statements that block run in threads."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conns: list[Conn] = []
        self._jobs: list[tuple[Conn, threading.Thread]] = []

    def open(self, app: str = "pgw-test", **params: Any) -> Conn:
        """A session as ``params`` say (``user``, ``dbname``), autocommit."""
        conninfo = make_conninfo(self.dsn, application_name=app, **params)
        conn = psycopg.connect(conninfo, autocommit=True)
        self._conns.append(conn)
        return conn

    def idle(self, app: str = "pgw-test", **params: Any) -> Conn:
        conn = self.open(app, **params)
        conn.execute("SELECT 1")
        return conn

    def in_transaction(self, app: str = "pgw-test", **params: Any) -> Conn:
        conn = self.open(app, **params)
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
        return conn

    def aborted(self, app: str = "pgw-test", **params: Any) -> Conn:
        conn = self.in_transaction(app, **params)
        try:
            conn.execute("SELECT 1/0")
        except psycopg.errors.DivisionByZero:
            pass
        return conn

    def start(self, conn: Conn, query: str) -> threading.Thread:
        """Run ``query`` on ``conn`` in a thread (cancelled at the end if still on)."""

        def run() -> None:
            try:
                conn.execute(query.encode())
            except psycopg.Error:
                pass  # cancelled or terminated: what several tests do to it

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._jobs.append((conn, thread))
        return thread

    def close(self) -> None:
        for conn, thread in self._jobs:
            if thread.is_alive() and not conn.closed:
                conn.cancel_safe()
        for _, thread in self._jobs:
            thread.join(10)
        for conn in self._conns:
            conn.close()
