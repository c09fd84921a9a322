"""The fault proxy does what each mode says, against the real server."""

from __future__ import annotations

import select
import socket
import time
from typing import Any

import psycopg
import pytest
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

from tests._util import wait_until
from tests.faults.proxy import Proxy
from tests.pool._helpers import backend_pids

_OK = pq.PollingStatus.OK
_READING = pq.PollingStatus.READING
_FAILED = pq.PollingStatus.FAILED


def handshake(pgconn: pq.abc.PGconn, timeout: float) -> bool:
    """Drive a connection started with `connect_start` for up to `timeout` s.

    True once connected, False if still connecting; raise if it failed.
    """
    deadline = time.monotonic() + timeout
    status: int = pq.PollingStatus.WRITING
    while True:
        wait = deadline - time.monotonic()
        if wait <= 0:
            return False
        fd = [pgconn.socket]
        if status == _READING:
            ready = select.select(fd, [], [], wait)[0]
        else:
            ready = select.select([], fd, [], wait)[1]
        if not ready:
            return False
        status = pgconn.connect_poll()
        if status == _OK:
            return True
        if status == _FAILED:
            raise psycopg.OperationalError(pgconn.get_error_message())


def start(conninfo: str) -> pq.abc.PGconn:
    pgconn = pq.PGconn.connect_start(conninfo.encode())
    assert pgconn.status != pq.ConnStatus.BAD, pgconn.get_error_message()
    return pgconn


def connected(conninfo: str) -> pq.abc.PGconn:
    pgconn = start(conninfo)
    assert handshake(pgconn, 5.0)
    pgconn.nonblocking = 1
    return pgconn


def answered(pgconn: pq.abc.PGconn, timeout: float) -> list[pq.abc.PGresult] | None:
    """The results of the query sent on `pgconn`, or None after `timeout` s."""
    deadline = time.monotonic() + timeout
    while pgconn.flush():
        select.select([], [pgconn.socket], [], 0.1)
    while True:
        pgconn.consume_input()
        if not pgconn.is_busy():
            results = []
            while (res := pgconn.get_result()) is not None:
                results.append(res)
            return results
        wait = deadline - time.monotonic()
        if wait <= 0 or not select.select([pgconn.socket], [], [], wait)[0]:
            return None


def timed_query(conn: psycopg.Connection[Any], query: str) -> float:
    t0 = time.monotonic()
    conn.execute(query).fetchall()
    return time.monotonic() - t0


def test_pass_forwards_both_ways(dsn: str, proxy: Proxy) -> None:
    assert proxy.mode == "pass" and proxy.connections == 0
    with psycopg.connect(proxy.dsn(dsn)) as conn:
        assert conn.info.port == proxy.port
        assert proxy.connections == 1
        # Many chunks each way.
        big = "x" * 300_000
        row = conn.execute("SELECT length(%s::text), repeat('y', 500000)", [big])
        assert row.fetchone() == (300_000, "y" * 500_000)
    wait_until(lambda: proxy.connections == 0, message="the pair closed")
    assert proxy.accepted == 1


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
def test_close_ends_live_connections_and_refuses_new_ones(
    dsn: str, admin: Any, proxy: Proxy, rst: bool
) -> None:
    conn = psycopg.connect(proxy.dsn(dsn))
    pid = conn.info.backend_pid
    raw = socket.create_connection(("127.0.0.1", proxy.port))
    wait_until(lambda: proxy.connections == 2, message="both pairs up")
    proxy.close_all(rst=rst)
    assert proxy.mode == "close" and proxy.connections == 0
    # libpq words a FIN and a reset alike; the socket tells them apart.
    raw.settimeout(5)
    if rst:
        with pytest.raises(ConnectionResetError):
            raw.recv(1)
    else:
        assert raw.recv(1) == b""
    raw.close()
    with pytest.raises(psycopg.OperationalError, match="closed the connection"):
        conn.execute("SELECT 1")
    conn.close()
    # The server side was closed too: its backend ends.
    wait_until(lambda: pid not in backend_pids(admin, None), message="backend gone")
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(dsn), connect_timeout=5)
    assert time.monotonic() - t0 < 1.0
    proxy.pass_()
    with psycopg.connect(proxy.dsn(dsn)) as conn:
        conn.execute("SELECT 1")


def test_blackhole_forwards_nothing_until_resumed(dsn: str, proxy: Proxy) -> None:
    live = connected(proxy.dsn(dsn))
    proxy.blackhole()
    assert proxy.connections == 1
    live.send_query(b"SELECT 42")
    assert answered(live, 0.3) is None  # a client-side timeout is all that helps
    late = start(proxy.dsn(dsn))  # accepted, but the handshake goes nowhere
    assert not handshake(late, 0.3)
    assert proxy.connections == 2
    proxy.pass_()
    # Nothing was dropped: what waited flows now.
    results = answered(live, 5.0)
    assert results is not None and results[0].get_value(0, 0) == b"42"
    assert handshake(late, 5.0)
    live.finish()
    late.finish()
    wait_until(lambda: proxy.connections == 0, message="the pairs closed")


def test_blackhole_holds_closes_too(dsn: str, admin: Any, proxy: Proxy) -> None:
    conn = psycopg.connect(proxy.dsn(dsn))
    pid = conn.info.backend_pid
    proxy.blackhole()
    conn.close()  # the goodbye is held, so the backend lives on: half-open
    assert proxy.connections == 1
    assert pid in backend_pids(admin, None)
    proxy.pass_()
    wait_until(lambda: pid not in backend_pids(admin, None), message="backend gone")
    wait_until(lambda: proxy.connections == 0, message="the pair closed")


def test_deaf_accepts_nothing_new_but_keeps_live_connections(
    dsn: str, proxy: Proxy
) -> None:
    with psycopg.connect(proxy.dsn(dsn)) as live:
        proxy.deaf()
        assert live.execute("SELECT 1").fetchone() == (1,)
        accepted = proxy.accepted
        late = start(proxy.dsn(dsn))
        assert not handshake(late, 0.5)
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="timeout"):
            psycopg.connect(proxy.dsn(dsn), connect_timeout=2)
        assert 1.5 < time.monotonic() - t0 < 3.5
        assert proxy.accepted == accepted and proxy.connections == 1
        proxy.pass_()
        # The attempt queued in the backlog is served late.
        assert handshake(late, 5.0)
        late.finish()
        with psycopg.connect(proxy.dsn(dsn)) as conn:
            conn.execute("SELECT 1")


def test_latency_delays_every_chunk(dsn: str, proxy: Proxy) -> None:
    with psycopg.connect(proxy.dsn(dsn), autocommit=True) as conn:
        assert timed_query(conn, "SELECT 1") < 0.2
        proxy.latency(0.2)
        assert proxy.mode == "latency"
        # One chunk each way: at least two delays per round trip.
        assert 0.4 <= timed_query(conn, "SELECT 1") < 1.5
        proxy.pass_()
        assert timed_query(conn, "SELECT 1") < 0.2


def test_stop_closes_everything_and_joins(dsn: str) -> None:
    params = conninfo_to_dict(dsn)
    proxy = Proxy(str(params["host"]), int(str(params["port"]))).start()
    conn = psycopg.connect(proxy.dsn(dsn))
    proxy.stop()
    assert not proxy._thread.is_alive()
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(dsn), connect_timeout=2)
    proxy.stop()  # idempotent
    with pytest.raises(RuntimeError, match="stopped"):
        proxy.blackhole()
