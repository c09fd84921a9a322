"""Shared fixtures: every test runs against a real PostgreSQL, never a mock.

With ``PGWARDEN_TEST_DSN`` set, the tests use that server (its user must be
allowed to create databases; tests that restart the server are skipped).
Otherwise a throwaway embedded server is started on 127.0.0.1 for the session
and removed at the end, whatever the outcome.

Each test that asks for `dsn` (or `admin`) gets its own empty database.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgwarden.embedded import EmbeddedPostgres
from tests._sessions import Sessions

# CREATE DATABASE from template0 takes ~60-100 ms with either strategy here;
# FILE_COPY writes almost no WAL (WAL_LOG writes the whole template each time).
_STRATEGY = "FILE_COPY"


class PgServer:
    """The server the test session uses."""

    def __init__(self, admin_dsn: str, embedded: EmbeddedPostgres | None) -> None:
        self.admin_dsn = admin_dsn
        """Superuser conninfo to the ``postgres`` database, or PGWARDEN_TEST_DSN."""
        self.embedded = embedded
        """The embedded server, or None when PGWARDEN_TEST_DSN is used."""
        with psycopg.connect(admin_dsn, connect_timeout=10) as conn:
            self.host: str = conn.info.host
            self.port: int = conn.info.port
            self.version: int = conn.info.server_version
            self.version_text: str = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]

    def dsn(self, dbname: str, **params: Any) -> str:
        """A connection string to ``dbname`` with the admin credentials."""
        return make_conninfo(self.admin_dsn, dbname=dbname, **params)

    def describe(self) -> str:
        kind = "embedded, pgserver binaries" if self.embedded else "PGWARDEN_TEST_DSN"
        return f"PostgreSQL {self.version_text} at {self.host}:{self.port} ({kind})"

    def _need_embedded(self, what: str) -> EmbeddedPostgres:
        if self.embedded is None:
            pytest.skip(f"cannot {what} the server given by PGWARDEN_TEST_DSN")
        return self.embedded

    def restart(self, mode: str = "fast") -> None:
        """Restart the server ('fast' or 'immediate'): every session is dropped."""
        self._need_embedded("restart").restart(mode)

    def stop(self, mode: str = "fast") -> None:
        self._need_embedded("stop").stop(mode)

    def start(self) -> None:
        self._need_embedded("start").start()

    def log_tail(self, lines: int = 40) -> str:
        """The end of the embedded server's log ('' for an external server)."""
        return self.embedded.log_tail(lines) if self.embedded else ""

    def create_database(self, name: str) -> None:
        query = sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(
            sql.Identifier(name)
        )
        if self.version >= 150000:
            query += sql.SQL(" STRATEGY {}").format(sql.SQL(_STRATEGY))
        self._admin_execute(query)

    def drop_database(self, name: str) -> None:
        if self.embedded is not None:
            self.embedded.start()  # in case the test left it stopped
        query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)
        )
        self._admin_execute(query)

    def _admin_execute(self, query: sql.Composed) -> None:
        with psycopg.connect(
            self.admin_dsn, autocommit=True, connect_timeout=10
        ) as conn:
            conn.execute(query)


_server: PgServer | None = None


def _get_server() -> PgServer:
    """Start (once) and return the session's server."""
    global _server
    if _server is None:
        external = os.environ.get("PGWARDEN_TEST_DSN")
        if external:
            _server = PgServer(external, None)
        else:
            # Prepared transactions: a test gives back a connection after one.
            embedded = EmbeddedPostgres(settings={"max_prepared_transactions": 4})
            try:
                embedded.start()
                _server = PgServer(embedded.dsn(), embedded)
            except BaseException:
                embedded.cleanup()
                raise
    return _server


def _stop_server() -> None:
    global _server
    server, _server = _server, None
    if server is not None and server.embedded is not None:
        server.embedded.cleanup()


def pytest_configure(config: pytest.Config) -> None:
    config.add_cleanup(_stop_server)  # in case the header started the server


def pytest_report_header(config: pytest.Config) -> str:
    if config.option.collectonly:
        return "PostgreSQL: not started (--collect-only)"
    try:
        return _get_server().describe()
    except Exception as exc:  # the pg_server fixture will raise it again, in a test
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"PostgreSQL: FAILED TO START: {first_line}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server (see `PgServer`)."""
    server = _get_server()
    try:
        yield server
    finally:
        _stop_server()


@pytest.fixture
def dsn(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """Connection string (superuser, TCP) to a new empty database for this test only."""
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:40]
    name = f"pgw_{slug}_{uuid.uuid4().hex[:8]}"
    pg_server.create_database(name)
    try:
        yield pg_server.dsn(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def admin(dsn: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """An autocommit superuser connection to this test's database."""
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        yield conn
    finally:
        conn.close()  # not `with`: its exit fails if the test restarted the server


@pytest.fixture
def sessions(dsn: str) -> Iterator[Sessions]:
    """Client sessions for one test (see tests/_sessions.py), closed at its end."""
    s = Sessions(dsn)
    try:
        yield s
    finally:
        s.close()
