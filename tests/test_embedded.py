"""The test harness itself: the embedded server and the per-test databases."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgwarden import embedded as embedded_mod
from pgwarden.embedded import EmbeddedError, EmbeddedPostgres
from tests._util import await_until, wait_until
from tests.conftest import PgServer

Conn = psycopg.Connection[tuple[Any, ...]]


def _embedded(pg_server: PgServer) -> EmbeddedPostgres:
    if pg_server.embedded is None:
        pytest.skip("checks the embedded server; PGWARDEN_TEST_DSN is set")
    return pg_server.embedded


def test_server_answers_over_tcp_on_localhost(pg_server: PgServer, admin: Conn) -> None:
    pg = _embedded(pg_server)
    addr, port = admin.execute(
        "SELECT inet_server_addr()::text, inet_server_port()"
    ).fetchone()  # type: ignore[misc]
    assert (addr, port) == ("127.0.0.1/32", pg.port)
    assert (pg_server.host, pg_server.port) == ("127.0.0.1", pg.port)
    assert admin.execute("SHOW max_connections").fetchone() == ("300",)
    assert admin.execute("SHOW fsync").fetchone() == ("off",)
    is_super = "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
    assert admin.execute(is_super).fetchone() == (True,)


_seen_databases: list[str] = []


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_its_own_empty_database(admin: Conn, run: int) -> None:
    (name,) = admin.execute("SELECT current_database()").fetchone()  # type: ignore[misc]
    assert name.startswith("pgw_") and name not in _seen_databases
    _seen_databases.append(name)
    tables = admin.execute(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
    ).fetchone()
    assert tables == (0,)
    admin.execute("CREATE TABLE same_name_in_every_test (run int)")
    admin.execute("INSERT INTO same_name_in_every_test VALUES (%s)", [run])


def test_database_is_dropped_after_the_test(pg_server: PgServer) -> None:
    with psycopg.connect(pg_server.admin_dsn) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname = ANY(%s)", [_seen_databases]
        ).fetchall()
    assert rows == []


def test_restart_keeps_port_and_drops_sessions(pg_server: PgServer, dsn: str) -> None:
    pg = _embedded(pg_server)
    port = pg.port
    for mode in ("fast", "immediate"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT 1")
            pg_server.restart(mode)
            assert pg.is_running() and pg.port == port
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        with psycopg.connect(dsn) as conn:
            assert conn.info.port == port
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_stop_and_start(pg_server: PgServer, dsn: str) -> None:
    pg = _embedded(pg_server)
    pg_server.stop()
    assert not pg.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)
    pg_server.start()
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT 1")


async def test_async_connection_and_await_until(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(42)")

        async def lock_is_held() -> bool:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            )
            return (await cur.fetchone()) == (1,)

        assert await await_until(lock_is_held, message="advisory lock") is True


def test_wait_until_fails_with_the_message() -> None:
    assert wait_until(lambda: 7) == 7
    with pytest.raises(AssertionError, match="the impossible"):
        wait_until(lambda: False, timeout=0.05, message="the impossible")


def _postmaster_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # Dead postmasters can linger as zombies (when pid 1 does not reap): no cmdline.
    cmdline = Path(f"/proc/{pid}/cmdline")
    return not cmdline.parent.exists() or bool(cmdline.read_bytes())


def test_cleanup_stops_the_server_and_deletes_its_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first port offered is taken: start must retry with another one.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        monkeypatch.setattr(
            embedded_mod, "_free_port", lambda: next(ports, 0) or _free()
        )
        pg = EmbeddedPostgres(auth="scram-sha-256", settings={"max_connections": 20})
        try:
            pg.start()
            assert pg.port != taken.getsockname()[1]
            run_dir, data_dir = pg.data_dir.parent, pg.data_dir
            pid = int((data_dir / "postmaster.pid").read_text().split()[0])
            with psycopg.connect(pg.dsn()) as conn:
                assert conn.execute("SHOW max_connections").fetchone() == ("20",)
            with pytest.raises(psycopg.OperationalError, match="password"):
                psycopg.connect(pg.dsn(password=""))
        finally:
            pg.cleanup()
    assert not run_dir.exists()
    wait_until(lambda: not _postmaster_alive(pid), message="postmaster exit")
    assert not pg.is_running()
    pg.cleanup()  # idempotent


def _free() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_start_failure_shows_the_server_log() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        pg = EmbeddedPostgres(port=taken.getsockname()[1])
        try:
            with pytest.raises(
                EmbeddedError, match=r"(?s)last lines of.*Address already in use"
            ):
                pg.start()
        finally:
            pg.cleanup()


def test_start_reaps_clusters_whose_owner_died() -> None:
    base = Path(tempfile.gettempdir())
    # Kept: a cluster directory whose owner (this process) lives, and one that
    # is not named like ours.
    alive = Path(tempfile.mkdtemp(prefix=f"pgwarden-pg-{os.getpid()}-", dir=base))
    unrelated = Path(tempfile.mkdtemp(prefix="pgwarden-pg-other-", dir=base))
    # A child process starts a cluster and dies without cleaning up.
    code = (
        "import os; from pgwarden.embedded import EmbeddedPostgres as E;"
        "e = E(); e.start(); pid = (e.data_dir / 'postmaster.pid').read_text();"
        "print(e.data_dir, pid.split()[0], flush=True); os._exit(0)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    data_dir: Path | None = None
    try:
        child = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert child.returncode == 0, child.stderr
        path, pid = child.stdout.split()
        data_dir = Path(path)
        assert _postmaster_alive(int(pid))
        with EmbeddedPostgres() as pg:
            assert pg.is_running()
        assert not data_dir.parent.exists()
        assert not _postmaster_alive(int(pid))
        assert alive.exists() and unrelated.exists()
    finally:
        if data_dir is not None:
            embedded_mod._kill_postmaster(data_dir)
            shutil.rmtree(data_dir.parent, ignore_errors=True)
        shutil.rmtree(alive, ignore_errors=True)
        shutil.rmtree(unrelated, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs postgres as another user")
def test_root_copies_binaries_the_server_user_cannot_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if pip had installed pgserver under a private directory such as /root.
    spec = importlib.util.find_spec("pgserver")
    assert spec is not None and spec.submodule_search_locations
    site = Path(next(iter(spec.submodule_search_locations))).parent
    private = tmp_path / "site-packages"
    private.parent.chmod(0o700)
    skip = shutil.ignore_patterns("include", "__pycache__")
    shutil.copytree(site / "pgserver", private / "pgserver", ignore=skip)
    if (site / "pgserver.libs").is_dir():
        shutil.copytree(site / "pgserver.libs", private / "pgserver.libs")
    monkeypatch.syspath_prepend(str(private))
    monkeypatch.delitem(sys.modules, "pgserver", raising=False)
    shared = Path(tempfile.mkdtemp(prefix="pgwarden-test-"))
    shared.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    try:
        with EmbeddedPostgres() as pg, psycopg.connect(pg.dsn()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            pid = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
            postmaster = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert postmaster.startswith(f"{shared}/pgwarden-bin-")
            assert os.stat(pid_owner := f"/proc/{pid}").st_uid != 0, pid_owner
    finally:
        shutil.rmtree(shared)
        shutil.rmtree(private)
