"""`pgwarden status`: the server's connections and the sessions behind them.

Exit status: 0, also when ``--watch`` is stopped with Ctrl-C; 2 for usage and
connection errors. (While watching, a lost connection is shown and retried.)

``--json`` prints `ServerSnapshot.to_dict`, the ``server`` object of the
health monitor's ``/status``; with ``--watch``, one such object per line. See
docs/commands.md for the fields.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import click
import psycopg
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pgwarden.monitor.snapshot import ServerSnapshot, Session
from pgwarden.ops.status import headroom_percent, read_status, state_counts

from ._common import (
    connect,
    dsn_option,
    duration,
    echo_json,
    human_duration,
    json_option,
    make_console,
    plural,
)
from ._confirm import (
    session_style,
    sessions_table,
)
from ._group import one_line

__all__ = ["status", "status_view"]

_TOP = 8  # applications and users shown by name; the rest are counted
_sleep: Callable[[float], None] = time.sleep  # tests stop the watch through it


@click.command()
@click.option(
    "--all-databases",
    is_flag=True,
    help="Show the sessions of every database, not just the current one.",
)
@click.option(
    "--watch",
    type=click.FloatRange(min=0.5),
    metavar="SECONDS",
    help="Refresh every SECONDS (in place on a terminal) until Ctrl-C.",
)
@click.option(
    "--long-query",
    callback=duration(),
    default="30s",
    show_default=True,
    envvar="DB_LONG_QUERY_THRESHOLD",
    show_envvar=True,
    metavar="DURATION",
    help="Queries running longer are highlighted (and listed in long_queries).",
)
@dsn_option
@json_option
def status(
    all_databases: bool,
    watch: float | None,
    long_query: float,
    dsn: str | None,
    as_json: bool,
) -> None:
    """Show the database's connections and the session behind each.

    The header counts the server's connections against max_connections less
    the reserved slots, with the headroom left, then the current database's
    sessions by state, application and user. One row per session follows:
    pid, user, application, client, state, time in state, transaction age,
    query age, wait event and the start of the query. Sessions idle in a
    transaction are yellow, queries running longer than --long-query red.

    --json prints the same server view as the health monitor's /status.
    Exit status: 0, or 2 for a usage or connection error.

    \b
    Examples:
      pgwarden status
      pgwarden status --all-databases --watch 2
      pgwarden status --json | jq '.sessions[] | select(.state != "idle")'
    """
    server = _Server(dsn)
    try:
        if watch is None:
            snapshot = server.snapshot(all_databases)
            if as_json:
                echo_json(snapshot.to_dict(long_query))
            else:
                console = make_console()
                view = status_view(snapshot, server.where, long_query, console.width)
                console.print(view)
            return
        with _until_interrupted():
            _watch(server, all_databases, watch, long_query, as_json)
    finally:
        server.close()


class _Server:
    """The command's connection; once lost, opened again on the next snapshot."""

    def __init__(self, dsn: str | None) -> None:
        self.dsn = dsn
        self.conn = connect(dsn)

    @property
    def where(self) -> str:
        return f"{self.conn.info.host}:{self.conn.info.port}"

    def snapshot(self, all_databases: bool) -> ServerSnapshot:
        if self.conn.closed or self.conn.broken:
            self.conn.close()
            self.conn = connect(self.dsn)
        return read_status(self.conn, all_databases=all_databases)

    def close(self) -> None:
        self.conn.close()


@contextmanager
def _until_interrupted() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        pass  # the way to stop --watch: exit status 0


def _watch(
    server: _Server,
    all_databases: bool,
    interval: float,
    long_query: float,
    as_json: bool,
) -> None:
    """Refresh until interrupted; a lost connection is shown, then retried."""
    console = make_console()
    live = None
    if console.is_terminal and not as_json:
        live = Live(console=console, auto_refresh=False)
    every = f"every {interval:g}s, Ctrl-C to stop"
    with live or nullcontext():
        while True:
            view: RenderableType
            try:
                snapshot = server.snapshot(all_databases)
            except psycopg.OperationalError as exc:
                error = f"{one_line(exc)} (retrying {every})"
                if live is None:
                    click.echo(f"Error: {error}", err=True)
                view = Text(error, style="bold red")
            else:
                view = status_view(
                    snapshot, server.where, long_query, console.width, every
                )
                if as_json:
                    click.echo(json.dumps(snapshot.to_dict(long_query), default=str))
                elif live is None:
                    console.print(view)
                    console.print()
            if live is not None:
                live.update(view, refresh=True)
            _sleep(interval)


def status_view(
    snapshot: ServerSnapshot,
    where: str,
    long_query: float,
    width: int | None = None,
    subtitle: str | None = None,
) -> Group:
    """The header (counts, limits, headroom), then one row per session."""
    title = Text.assemble(
        (f"{snapshot.database} on {where}", "bold"),
        f"  ·  PostgreSQL {_version(snapshot.server_version)}",
        " (standby)" if snapshot.in_recovery else "",
        f"  ·  {snapshot.taken_at.astimezone():%Y-%m-%d %H:%M:%S %Z}",
        (f"  ·  {subtitle}" if subtitle else "", "dim"),
    )
    parts: list[RenderableType] = [title, _header(snapshot, long_query), Text()]
    scope = "all databases" if snapshot.all_databases else snapshot.database
    if snapshot.sessions:
        parts.append(
            Text(
                f"{plural(len(snapshot.sessions), 'session')} in {scope}", style="bold"
            )
        )
        parts.append(
            sessions_table(
                sorted(snapshot.sessions, key=lambda s: _attention(s, long_query)),
                long_query_seconds=long_query,
                show_database=snapshot.all_databases,
                width=width,
            )
        )
    else:
        parts.append(Text(f"No other sessions in {scope}.", style="bold"))
    if snapshot.visibility_note:
        parts.append(Text(snapshot.visibility_note, style="dim"))
    return Group(*parts)


def _header(snapshot: ServerSnapshot, long_query: float) -> Table:
    headroom = headroom_percent(snapshot)
    colour = "red" if headroom < 10 else "yellow" if headroom < 25 else "green"
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column()
    grid.add_row(
        "connections",
        Text.assemble(
            f"{snapshot.total} of {snapshot.usable_connections} usable in use"
            " (all databases)  ·  headroom ",
            (f"{headroom:.1f}%", f"bold {colour}"),
            f" ({snapshot.available_connections} free)",
        ),
    )
    grid.add_row(
        "limits",
        f"max_connections {snapshot.max_connections}  ·  superuser_reserved_connections"
        f" {snapshot.superuser_reserved_connections}  ·  reserved_connections"
        f" {snapshot.reserved_connections}",
    )
    states = Text()
    for i, (state, n) in enumerate(state_counts(snapshot).items()):
        if i:
            states.append("  ·  ")
        busy = n and state.startswith("idle in transaction")
        states.append(f"{state} {n}", style="yellow" if busy else "")
    grid.add_row("by state", states)
    grid.add_row("by application", _top(snapshot.by_application))
    grid.add_row("by user", _top(snapshot.by_user))
    oldest = snapshot.oldest_xact_seconds
    long_queries = len(snapshot.long_queries(long_query))
    grid.add_row(
        "attention",
        Text.assemble(
            (
                f"{len(snapshot.idle_in_transaction)} idle in transaction",
                "yellow" if snapshot.idle_in_transaction else "",
            ),
            "  ·  ",
            (
                f"{long_queries} queries over {human_duration(long_query)}",
                "red" if long_queries else "",
            ),
            "  ·  ",
            (f"{len(snapshot.lock_waits)} waiting on a lock", ""),
            "  ·  oldest transaction ",
            human_duration(oldest),
        ),
    )
    return grid


def _top(counts: dict[str, int]) -> str:
    if not counts:
        return "-"
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = [f"{name or '(none)'} {n}" for name, n in ranked[:_TOP]]
    rest = len(ranked) - _TOP
    return "  ·  ".join(shown + ([f"{rest} more"] if rest > 0 else []))


def _attention(s: Session, long_query: float) -> tuple[int, float, int]:
    """Highlighted rows first, then running ones, idle last; oldest first."""
    rank = (
        0
        if session_style(s, long_query)
        else 2
        if s.state == "idle"
        else 3
        if not s.visible
        else 1
    )
    age = s.xact_seconds or s.state_seconds or 0.0
    return rank, -age, s.pid


def _version(number: int) -> str:
    return f"{number // 10000}.{number % 10000}"
