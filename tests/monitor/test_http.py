"""The monitor's ASGI app: /healthz, /readyz, /metrics and /status through
httpx's ASGI transport, alone and mounted in a parent Starlette app, against the
real server."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import make_conninfo
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp

from pgwarden import HealthMonitor, MonitorSettings, Pool, PooledConnection

from .._util import await_until, wait_until

PASSWORD = "S3cret-http-5d1c"
ENDPOINTS = ("/healthz", "/readyz", "/metrics", "/status")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def pool(dsn: str) -> Iterator[Pool]:
    pool = Pool(dsn, name="app", min_size=1, max_size=1)
    pool.open(wait=True)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def monitor(dsn: str, pool: Pool) -> Iterator[HealthMonitor]:
    # A password in the conninfo (the test server trusts us and ignores it).
    conninfo = make_conninfo(dsn, password=PASSWORD)
    monitor = HealthMonitor(conninfo, pools=[pool], settings=MonitorSettings())
    try:
        yield monitor
    finally:
        monitor.stop()


def client_for(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://monitor"
    )


@pytest.fixture
async def client(monitor: HealthMonitor) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(monitor.asgi_app()) as client:
        yield client


async def get_json(client: httpx.AsyncClient, path: str) -> tuple[int, Any]:
    response = await client.get(path)
    assert response.headers["content-type"] == "application/json"
    return response.status_code, response.json()


async def test_before_the_first_check(client: httpx.AsyncClient) -> None:
    not_yet = {"ready": False, "reason": "no check has run yet"}
    assert await get_json(client, "/readyz") == (503, not_yet)
    assert await get_json(client, "/status") == (503, not_yet)
    status, body = await get_json(client, "/healthz")
    assert status == 503
    assert body == {
        "ok": False,
        "running": False,
        "checks_total": 0,
        "last_check_seconds_ago": None,
    }


async def test_healthz(client: httpx.AsyncClient, monitor: HealthMonitor) -> None:
    monitor.check()
    status, body = await get_json(client, "/healthz")
    assert (status, body["ok"], body["running"]) == (200, True, False)
    assert body["checks_total"] == 1
    assert 0 <= body["last_check_seconds_ago"] < 5

    monitor.start()
    wait_until(lambda: monitor.checks_total >= 2, message="a background check")
    status, body = await get_json(client, "/healthz")
    assert (status, body["ok"], body["running"]) == (200, True, True)


async def test_readyz_turns_503_while_a_pool_is_exhausted(
    client: httpx.AsyncClient, monitor: HealthMonitor, pool: Pool
) -> None:
    monitor.check()
    assert await get_json(client, "/readyz") == (200, {"ready": True, "reason": "ok"})

    held = pool.getconn()
    served: list[PooledConnection] = []
    waiter = threading.Thread(target=lambda: served.append(pool.getconn(timeout=5)))
    waiter.start()
    try:
        wait_until(lambda: pool.stats().waiting == 1, message="a waiting caller")
        monitor.check()
        exhausted = {"ready": False, "reason": "pool exhausted: app"}
        assert await get_json(client, "/readyz") == (503, exhausted)
    finally:
        pool.putconn(held)
        waiter.join(5)
        for conn in served:
            pool.putconn(conn)

    monitor.check()
    assert await get_json(client, "/readyz") == (200, {"ready": True, "reason": "ok"})


async def test_readyz_turns_503_when_the_checks_stop(dsn: str, pool: Pool) -> None:
    settings = MonitorSettings(health_check_interval=0.05)
    monitor = HealthMonitor(dsn, pools=[pool], settings=settings)
    try:
        async with client_for(monitor.asgi_app()) as client:
            monitor.check()

            async def stale() -> bool:
                return (await client.get("/readyz")).status_code == 503

            await await_until(stale, message="/readyz to see a stale check")
            status, body = await get_json(client, "/readyz")
            assert status == 503
            assert "the monitor is not checking" in body["reason"]
            assert (await client.get("/healthz")).status_code == 503
    finally:
        monitor.stop()


async def test_status_is_the_latest_report(
    client: httpx.AsyncClient, monitor: HealthMonitor
) -> None:
    report = monitor.check()
    status, body = await get_json(client, "/status")
    assert status == 200
    assert body == json.loads(json.dumps(report.to_dict()))
    assert body["ready"] is True
    assert [p["name"] for p in body["pools"]] == ["app"]


async def test_metrics(client: httpx.AsyncClient, monitor: HealthMonitor) -> None:
    monitor.check()
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    names = {f.name for f in text_string_to_metric_families(response.text)}
    assert {"pgwarden_server_up", "pgwarden_pool_connections"} <= names


async def test_index_and_unknown_paths(client: httpx.AsyncClient) -> None:
    index = await client.get("/")
    assert index.status_code == 200
    assert all(path.lstrip("/") in index.text for path in ENDPOINTS)
    assert (await client.get("/nope")).status_code == 404


async def test_mounted_under_a_prefix(monitor: HealthMonitor) -> None:
    parent = Starlette(routes=[Mount("/db", app=monitor.asgi_app())])
    monitor.check()
    async with client_for(parent) as client:
        for path in ENDPOINTS:
            response = await client.get(f"/db{path}")
            assert response.status_code == 200, path
        assert (await client.get("/healthz")).status_code == 404
        assert (await client.get("/db/readyz")).json()["ready"] is True


async def test_no_password_in_any_answer_or_log(
    dsn: str,
    monitor: HealthMonitor,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    conninfo = make_conninfo(
        dsn, host="127.0.0.1", port=closed_port(), password=PASSWORD
    )
    down = HealthMonitor(conninfo, settings=MonitorSettings())
    with caplog.at_level(logging.DEBUG, "pgwarden"):
        down.check()
        monitor.check()
    bodies = []
    try:
        async with client_for(down.asgi_app()) as down_client:
            status, body = await get_json(down_client, "/readyz")
            assert status == 503
            assert body["reason"].startswith("database unreachable: ")
            for path in ENDPOINTS:
                bodies.append((await down_client.get(path)).text)
        for path in ENDPOINTS:
            bodies.append((await client.get(path)).text)
    finally:
        down.stop()

    assert any("unreachable" in b for b in bodies)
    assert all(PASSWORD not in body for body in bodies)
    assert caplog.records  # the unreachable server was alerted on
    assert all(PASSWORD not in r.getMessage() for r in caplog.records)
    assert PASSWORD not in repr(down) + repr(monitor)
