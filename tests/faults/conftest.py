"""Fixtures of the fault tests: a TCP proxy in front of the test's database, and
server controls that are undone at the end of the test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.conftest import PgServer
from tests.faults.proxy import Proxy
from tests.faults.server import ServerControls


@pytest.fixture
def proxy(dsn: str) -> Iterator[Proxy]:
    """A `Proxy` to the test's server, in pass mode: use `proxy.dsn(dsn)`."""
    params = conninfo_to_dict(dsn)
    host = str(params.get("hostaddr") or params.get("host") or "127.0.0.1")
    with Proxy(host, int(str(params.get("port") or 5432))) as p:
        yield p


@pytest.fixture
def server(pg_server: PgServer, dsn: str) -> Iterator[ServerControls]:
    """`ServerControls` for the test's database; the server is left running and
    every change undone when the test ends."""
    controls = ServerControls(pg_server, dsn)
    try:
        yield controls
    finally:
        controls.cleanup()
