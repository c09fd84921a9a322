"""What every ops command shares: where the database is, JSON, durations."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import psycopg
from rich.console import Console

from pgwarden._conninfo import conninfo_problem, with_session
from pgwarden.config import PoolConfig, parse_duration
from pgwarden.errors import ConfigError

from ._group import CliError

__all__ = [
    "confirmed",
    "connect",
    "dsn_option",
    "duration",
    "duration_text",
    "echo_json",
    "human_duration",
    "json_option",
    "make_console",
    "plural",
    "stdin_is_terminal",
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
    if dsn is None:
        conninfo = PoolConfig.from_env().conninfo
    elif problem := conninfo_problem(dsn):  # libpq's words, without the password
        raise CliError(f"--dsn is not a valid connection string: {problem}")
    else:
        conninfo = dsn
    conninfo = with_session(
        conninfo,
        application_name=APPLICATION_NAME,
        force_name=True,
        settings={
            "statement_timeout": STATEMENT_TIMEOUT_MS,
            "lock_timeout": LOCK_TIMEOUT_MS,
        },
        connect_timeout=5,
    )
    return psycopg.connect(conninfo, autocommit=True)


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


_PLAIN_WIDTH = 200  # off a terminal: rows stay on one line for logs and grep


def stdin_is_terminal() -> bool:
    """Whether someone can answer a prompt (tests replace this)."""
    return sys.stdin.isatty()


def make_console(*, stderr: bool = False) -> Console:
    """Colour and live updates on a terminal only; wide lines elsewhere."""
    console = Console(highlight=False, stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = _PLAIN_WIDTH
    return console


def duration(
    *, allow_zero: bool = True, at_most: float | None = None
) -> Callable[[click.Context, click.Parameter, str | None], float | None]:
    """An option callback reading ``5m``, ``30s``, ``500ms``, ``1.5h`` or
    seconds; with `at_most`, longer durations are refused."""

    def convert(
        ctx: click.Context, param: click.Parameter, value: str | None
    ) -> float | None:
        if value is None:
            return None
        source = param.opts[0] if param.opts else "duration"
        try:
            seconds = parse_duration(value, source, allow_zero=allow_zero)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
        if at_most is not None and seconds > at_most:
            raise click.BadParameter(
                f"{value!r} is longer than {at_most:g} s", ctx, param
            )
        return seconds

    return convert


def plural(count: int | None, noun: str) -> str:
    """``1 query``, ``2 queries``; ``queries`` when ``count`` is None."""
    if count == 1:
        return f"1 {noun}"
    many = f"{noun[:-1]}ies" if noun.endswith("y") else f"{noun}s"
    return many if count is None else f"{count} {many}"


def confirmed(question: str) -> bool:
    """Ask a yes/no question on stderr; no (the default) on end of input."""
    try:
        return click.confirm(question, default=False, err=True)
    except click.Abort:  # end of input, or Ctrl-C at the prompt
        click.echo(err=True)
        return False


def duration_text(seconds: float) -> str:
    """A short wait: ``0 ms``, ``0.4 ms``, ``12 ms``, ``1.25 s``."""
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds == 0.0 or seconds >= 0.01:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds * 1000:.1f} ms"
