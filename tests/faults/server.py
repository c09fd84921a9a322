"""Server-side faults: kill backends, stop the server, refuse connections, slow logins.

The functions work on any server the tests can reach as superuser; stopping and
restarting need the embedded server (`PgServer.embedded`) and skip the test
otherwise. `ServerControls` bundles them for one test, with cleanup: it is
what the `server` fixture gives.

SQLSTATE 53300 ("too many connections") is provoked with a role's
``CONNECTION LIMIT`` (`role_connection_limit`), not by filling
``max_connections``: the session's server is shared by every test, and a full
server would fail the fixtures' own connections (and the superuser's reserved
slots would not be exercised anyway).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests._util import wait_until

if TYPE_CHECKING:
    from tests.conftest import PgServer

__all__ = [
    "Outage",
    "ServerControls",
    "pre_auth_delay",
    "role_connection_limit",
    "stop_for",
    "terminate",
]

Admin = psycopg.Connection[tuple[Any, ...]]


def terminate(admin: Admin, pids: Iterable[int], *, wait: bool = True) -> list[int]:
    """Terminate the backends `pids` with ``pg_terminate_backend``.

    With `wait`, return once each one has exited (up to 5 s each), so its end
    has been sent to its client. Return the pids that were terminated.
    """
    rows = admin.execute(
        "SELECT pid FROM unnest(%s::int[]) AS pid"
        " WHERE pg_catalog.pg_terminate_backend(pid, %s)",
        [list(pids), 5000 if wait else 0],
    ).fetchall()
    return [row[0] for row in rows]


class Outage:
    """The server stopped now and started again `seconds` later, by a thread.

    A context manager: entering stops the server; leaving waits until it is
    back (and raises if starting it failed). `back` is set once it accepts
    connections again.
    """

    def __init__(self, pg_server: PgServer, seconds: float, mode: str) -> None:
        self.pg_server = pg_server
        self.seconds = seconds
        self.mode = mode
        self.back = threading.Event()
        self.stopped_at = 0.0
        self.back_at = 0.0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._restart, name="fault outage")

    def __enter__(self) -> Self:
        self.pg_server.stop(self.mode)
        self.stopped_at = time.monotonic()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self._thread.join()
        if self._error is not None and exc_val is None:
            raise self._error

    def is_back(self) -> bool:
        return self.back.is_set()

    def _restart(self) -> None:
        try:
            time.sleep(max(0.0, self.stopped_at + self.seconds - time.monotonic()))
            self.pg_server.start()
            self.back_at = time.monotonic()
        except BaseException as ex:
            self._error = ex
        finally:
            self.back.set()


def stop_for(pg_server: PgServer, seconds: float, mode: str = "fast") -> Outage:
    """An outage of `seconds` (``with stop_for(pg_server, 2.0) as outage:``).

    `mode` is how the server stops: ``fast`` (sessions are told and end) or
    ``immediate`` (every process is killed, crash recovery at start).
    """
    return Outage(pg_server, seconds, mode)


@contextlib.contextmanager
def role_connection_limit(admin: Admin, dsn: str, limit: int) -> Iterator[str]:
    """A new login role allowed `limit` connections at once; yield its dsn.

    Its connections beyond the limit fail with SQLSTATE 53300 ("too many
    connections for role"). The role is not a superuser (superusers are not
    limited) and uses the database through PUBLIC's default privileges. On exit
    its sessions are terminated and the role is dropped.
    """
    role, role_dsn = _create_limited_role(admin, dsn, limit)
    try:
        yield role_dsn
    finally:
        _drop_role(admin, role)


def _create_limited_role(admin: Admin, dsn: str, limit: int) -> tuple[str, str]:
    role = f"pgw_limited_{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    admin.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} CONNECTION LIMIT {}").format(
            sql.Identifier(role), sql.Literal(password), sql.Literal(limit)
        )
    )
    return role, make_conninfo(dsn, user=role, password=password)


def _drop_role(admin: Admin, role: str) -> None:
    admin.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(role)))
    admin.execute(
        "SELECT pg_catalog.pg_terminate_backend(pid, 5000)"
        " FROM pg_catalog.pg_stat_activity WHERE usename = %s",
        [role],
    )
    admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@contextlib.contextmanager
def pre_auth_delay(admin: Admin, seconds: int) -> Iterator[None]:
    """Make every new connection's handshake wait `seconds` (whole seconds).

    Sets ``pre_auth_delay`` with ALTER SYSTEM and reloads the configuration
    (so it needs a superuser `admin`); it applies to connections started after
    the reload, on the whole server, until the block ends. The server then
    accepts TCP at once but answers the startup packet only after the delay.
    """
    _set_pre_auth_delay(admin, f"{int(seconds)}s")
    try:
        yield
    finally:
        _set_pre_auth_delay(admin, None)


def _set_pre_auth_delay(admin: Admin, value: str | None) -> None:
    if value is None:
        admin.execute("ALTER SYSTEM RESET pre_auth_delay")
        value = "0"
    else:
        admin.execute(
            sql.SQL("ALTER SYSTEM SET pre_auth_delay = {}").format(sql.Literal(value))
        )
    admin.execute("SELECT pg_catalog.pg_reload_conf()")

    # The postmaster reloads, then signals the backends: once this session
    # sees the value, new backends (forked by the postmaster) have it too.
    def applied() -> bool:
        row = admin.execute("SHOW pre_auth_delay").fetchone()
        return row is not None and row[0] == value

    wait_until(applied, timeout=10, message=f"pre_auth_delay = {value}")


class ServerControls:
    """The server faults of one test, undone at its end (the `server` fixture).

    `admin` is a superuser connection to the test's database that survives
    restarts and outages caused through these controls: it reconnects on the
    first use after one.
    """

    def __init__(self, pg_server: PgServer, dsn: str) -> None:
        self.pg_server = pg_server
        self.dsn = dsn
        self._admin: Admin | None = None
        self._cleanup = contextlib.ExitStack()

    @property
    def admin(self) -> Admin:
        """A live autocommit superuser connection to the test's database."""
        if self._admin is None or self._admin.closed:
            self._admin = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
        return self._admin

    def _forget_admin(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    def terminate(self, pids: Iterable[int], *, wait: bool = True) -> list[int]:
        """`terminate` with this test's admin connection."""
        return terminate(self.admin, pids, wait=wait)

    def restart(self, mode: str = "fast") -> None:
        """Restart the server (``fast`` or ``immediate``); blocks until it is up."""
        self._forget_admin()
        self.pg_server.restart(mode)

    def stop_for(self, seconds: float, mode: str = "fast") -> Outage:
        """`stop_for` this server; the controls' admin reconnects afterwards."""
        self._forget_admin()
        return stop_for(self.pg_server, seconds, mode)

    def role_connection_limit(self, limit: int) -> str:
        """The dsn of a role limited to `limit` connections (dropped at the end)."""
        role, role_dsn = _create_limited_role(self.admin, self.dsn, limit)
        self._cleanup.callback(lambda: _drop_role(self.admin, role))
        return role_dsn

    @contextlib.contextmanager
    def pre_auth_delay(self, seconds: int) -> Iterator[None]:
        """`pre_auth_delay` for a block (undone at the end of the test at worst)."""
        _set_pre_auth_delay(self.admin, f"{int(seconds)}s")
        undone = False

        def undo() -> None:
            nonlocal undone
            if not undone:
                undone = True
                _set_pre_auth_delay(self.admin, None)

        self._cleanup.callback(undo)
        try:
            yield
        finally:
            undo()

    def cleanup(self) -> None:
        """Start the server if it is down, undo every change, close `admin`."""
        if self.pg_server.embedded is not None:
            self.pg_server.start()
        try:
            self._cleanup.close()
        finally:
            self._forget_admin()
