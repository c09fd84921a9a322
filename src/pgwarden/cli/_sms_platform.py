"""The demo's SMS platform: its tables, and what each workload does on a connection.

Every operation holds its connection for a while (pg_sleep), as a real
handler does while it works.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgwarden.config import PoolConfig
from pgwarden.errors import PgwardenError
from pgwarden.pool import PooledConnection

from ._group import one_line

__all__ = [
    "DemoError",
    "Operation",
    "Tables",
    "call_events",
    "campaign_batch",
    "dashboard",
    "demo_tables",
    "mark_delivered",
    "send_sms",
    "slow_search",
]

logger = logging.getLogger("pgwarden.demo")


class DemoError(PgwardenError):
    """The demo cannot run against the server it was given."""

    __module__ = "pgwarden"


@dataclass(frozen=True, slots=True)
class Tables:
    """The demo's two tables, named ``pgwarden_demo_<random>_{sms,calls}``."""

    prefix: str

    @property
    def sms(self) -> sql.Identifier:
        return sql.Identifier(f"{self.prefix}_sms")

    @property
    def calls(self) -> sql.Identifier:
        return sql.Identifier(f"{self.prefix}_calls")


Operation = Callable[[PooledConnection, Tables], None]


@contextmanager
def demo_tables(config: PoolConfig) -> Iterator[tuple[Tables, str]]:
    """Create the tables; yield them and a line about the server; drop them.

    Raises `psycopg.OperationalError` if the server can't be reached and
    `DemoError` if the tables can't be created.
    """
    tables = Tables(f"pgwarden_demo_{secrets.token_hex(3)}")
    conninfo = config.session_conninfo()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        info = conn.info
        try:
            with conn.transaction():
                conn.execute(_CREATE.format(sms=tables.sms, calls=tables.calls))
        except psycopg.Error as exc:
            raise DemoError(
                f"cannot create the demo's tables in database {info.dbname!r}:"
                f" {one_line(exc)}"
            ) from None
        version = f"{info.server_version // 10000}.{info.server_version % 10000}"
        server = (
            f"PostgreSQL {version} at {info.host}:{info.port}, database"
            f" {info.dbname!r}; demo tables {tables.prefix}_sms and"
            f" {tables.prefix}_calls"
        )
    try:
        yield tables, server
    finally:
        drop = sql.SQL("DROP TABLE IF EXISTS {}, {}").format(tables.sms, tables.calls)
        try:
            with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
                conn.execute("SET lock_timeout = '5s'")
                conn.execute(drop)
        except psycopg.Error as exc:
            logger.warning(
                "could not drop the demo tables %s_*: %s", tables.prefix, one_line(exc)
            )


_CREATE = sql.SQL("""
    CREATE UNLOGGED TABLE {sms} (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        recipient text NOT NULL,
        body text NOT NULL,
        status text NOT NULL DEFAULT 'queued',
        created_at timestamptz NOT NULL DEFAULT now(),
        sent_at timestamptz
    );
    CREATE UNLOGGED TABLE {calls} (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        call_id text NOT NULL,
        event text NOT NULL,
        at timestamptz NOT NULL DEFAULT now()
    )
""")


def send_sms(conn: PooledConnection, tables: Tables) -> None:
    """Backend API: queue a one-time code, hand it to the gateway, mark it sent."""
    row = conn.execute(
        sql.SQL("INSERT INTO {} (recipient, body) VALUES (%s, %s) RETURNING id").format(
            tables.sms
        ),
        [_phone(), f"Your code is {random.randrange(10**6):06d}"],
    ).fetchone()
    assert row is not None
    _work(conn, 0.01, 0.04)
    conn.execute(
        sql.SQL("UPDATE {} SET status = 'sent', sent_at = now() WHERE id = %s").format(
            tables.sms
        ),
        [row[0]],
    )


def campaign_batch(conn: PooledConnection, tables: Tables) -> None:
    """Backend API, during a campaign: queue ten messages at once."""
    conn.cursor().executemany(
        sql.SQL("INSERT INTO {} (recipient, body) VALUES (%s, %s)").format(tables.sms),
        [(_phone(), "Spring sale: 20% off today") for _ in range(10)],
    )
    _work(conn, 0.04, 0.08)


def mark_delivered(conn: PooledConnection, tables: Tables) -> None:
    """Backend API: a delivery report for the oldest message sent."""
    conn.execute(
        sql.SQL(
            "UPDATE {0} SET status = 'delivered'"
            " WHERE id = (SELECT min(id) FROM {0} WHERE status = 'sent')"
        ).format(tables.sms)
    )


def dashboard(conn: PooledConnection, tables: Tables) -> None:
    """Frontend: the messages by status."""
    conn.execute(
        sql.SQL("SELECT status, count(*) FROM {} GROUP BY status").format(tables.sms)
    ).fetchall()
    _work(conn, 0.02, 0.05)


def slow_search(conn: PooledConnection, tables: Tables) -> None:
    """Frontend, buggy: an unindexed search that takes 0.3 s."""
    conn.execute(
        sql.SQL("SELECT count(*), pg_sleep(0.3) FROM {} WHERE body ILIKE %s").format(
            tables.sms
        ),
        ["%code%"],
    ).fetchall()


def call_events(conn: PooledConnection, tables: Tables) -> None:
    """Asterisk: log a call's ring, answer and hangup."""
    call_id = secrets.token_hex(4)
    conn.cursor().executemany(
        sql.SQL("INSERT INTO {} (call_id, event) VALUES (%s, %s)").format(tables.calls),
        [(call_id, event) for event in ("ring", "answer", "hangup")],
    )
    _work(conn, 0.005, 0.015)


def _work(conn: PooledConnection, low: float, high: float) -> None:
    conn.execute("SELECT pg_sleep(%s)", [random.uniform(low, high)])


def _phone() -> str:
    return f"+4479{random.randrange(10**8):08d}"
