"""What every ops command shares: where the database is, JSON, durations."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgwarden.config import PoolConfig

__all__ = [
    "connect",
    "dsn_option",
    "echo_json",
    "human_duration",
    "json_option",
]

F = TypeVar("F", bound=Callable[..., Any])

APPLICATION_NAME = "pgwarden-cli"
# The CLI's own session gives up rather than queue behind a struggling server.
STATEMENT_TIMEOUT_MS = 10_000
LOCK_TIMEOUT_MS = 2_000


def dsn_option(f: F) -> F:
    """`--dsn`; without it, the same environment as `PoolConfig.from_env()`."""
    return click.option(
        "--dsn",
        metavar="CONNINFO",
        help=(
            "Database to connect to (key=value string or postgresql:// URI)."
            " Default: DATABASE_URL, DB_HOST/DB_PORT/DB_NAME/DB_USER/DB_PASSWORD,"
            " libpq's PG* variables, or a .env file."
        ),
    )(f)


def json_option(f: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print machine-readable JSON."
    )(f)


def connect(dsn: str | None) -> psycopg.Connection[Any]:
    """An autocommit connection for a command, with short server-side timeouts.

    Raises `ConfigError` for bad settings and `psycopg.OperationalError` when
    the server can't be reached: the command group turns both into one line
    on stderr and exit status 2.
    """
    conninfo = PoolConfig.from_env().conninfo if dsn is None else dsn
    params = conninfo_to_dict(conninfo)
    options = " ".join(
        filter(
            None,
            [
                str(params.get("options", "")).strip(),
                f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                f"-c lock_timeout={LOCK_TIMEOUT_MS}",
            ],
        )
    )
    extra = {"application_name": APPLICATION_NAME, "options": options}
    if "connect_timeout" not in params:
        extra["connect_timeout"] = "5"
    return psycopg.connect(make_conninfo(conninfo, **extra), autocommit=True)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def human_duration(seconds: float | None) -> str:
    """``-``, ``0.4s``, ``12s``, ``4m12s``, ``2h03m``, ``3d04h``."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
