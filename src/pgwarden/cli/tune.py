"""`pgwarden tune`: the server's connection settings against the pools' needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import psycopg
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pgwarden.config import PoolConfig
from pgwarden.ops import tune as ops

from ._common import (
    confirmed,
    connect,
    dsn_option,
    echo_json,
    human_duration,
    json_option,
    make_console,
    stdin_is_terminal,
)
from ._confirm import writable_audit_log
from ._group import CliError

__all__ = ["tune"]

EXIT_OK = 0
EXIT_DRIFT = 1  # recommendations not applied, or a change waits for a restart


def _memory(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> int | None:
    if value is None:
        return None
    try:
        return ops.parse_memory(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


# PostgreSQL's largest max_connections.
MAX_BACKENDS = 262_143


@click.command()
@click.option(
    "--pool-size",
    type=click.IntRange(min=1, max=MAX_BACKENDS),
    metavar="N",
    help="Connections in one application instance's pool."
    " Default: DB_MAX_CONNECTIONS, as the pool reads it (40 if unset).",
)
@click.option(
    "--instances",
    type=click.IntRange(min=1, max=MAX_BACKENDS),
    default=1,
    show_default=True,
    metavar="N",
    help="Application processes or hosts that each open such a pool.",
)
@click.option(
    "--memory",
    metavar="SIZE",
    callback=_memory,
    help="The database server's memory (e.g. 8GB), for the work_mem check."
    " Default: this machine's, when the server is local (127.0.0.1, localhost"
    " or a Unix socket); otherwise the check is skipped.",
)
@click.option(
    "--only",
    multiple=True,
    type=click.Choice(ops.SETTINGS),
    metavar="NAME",
    help="Look at this setting only (repeat for more): the others are neither"
    " shown nor changed.",
)
@click.option(
    "--apply",
    "do_apply",
    is_flag=True,
    help="Set the recommended values with ALTER SYSTEM and reload the"
    " configuration (needs a superuser). Shows the statements and asks first.",
)
@click.option(
    "--yes", "-y", is_flag=True, help="Apply without asking; needed off a terminal."
)
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    metavar="FILE",
    help="Append one JSON line to FILE for each setting changed.",
)
@json_option
@dsn_option
def tune(
    pool_size: int | None,
    instances: int,
    memory: int | None,
    only: tuple[str, ...],
    do_apply: bool,
    yes: bool,
    audit_log: Path | None,
    as_json: bool,
    dsn: str | None,
) -> None:
    """Check the server's connection settings against the applications' pools.

    Reads max_connections, the reserved connections, the idle and statement
    timeouts, TCP keepalives, work_mem and shared_buffers, and shows each with
    the value recommended for --instances pools of --pool-size connections,
    and why. max_connections is never lowered. See docs/tune.md for the rules.

    With --apply, the recommendations are set with ALTER SYSTEM and the
    configuration is reloaded; the command then says which are live and which
    wait for a server restart (max_connections always does).

    Exit status: 0 when nothing needs changing or --apply applied the
    changes; 1 when changes are recommended but not applied (or refused, or
    a change waits for a restart); 2 for usage and connection errors.
    """
    if pool_size is None:
        pool_size = PoolConfig.from_env().max_size
    console = make_console()
    with connect(dsn) as conn:
        report = _survey(conn, pool_size, instances, memory, only)
        if not as_json:
            report.show(console)
        if do_apply and report.changes:
            code = _apply(conn, report, console, yes, as_json, audit_log)
        else:
            report.done(console, as_json)
            code = EXIT_DRIFT if report.drifts and not do_apply else EXIT_OK
    click.get_current_context().exit(code)


def _survey(
    conn: psycopg.Connection[Any],
    pool_size: int,
    instances: int,
    memory: int | None,
    only: tuple[str, ...],
) -> _Report:
    """Read the settings and recommend values for them."""
    server = ops.read_settings(conn)
    memory_source = None if memory is None else "option"
    if memory is None:
        memory = ops.local_memory(conn.info.host)
        memory_source = None if memory is None else "local"
    recs = ops.recommend(server, pool_size, instances, memory)
    recs = [rec for rec in recs if not only or rec.name in only]
    return _Report(server, recs, pool_size, instances, memory, memory_source)


def _apply(
    conn: psycopg.Connection[Any],
    report: _Report,
    console: Console,
    yes: bool,
    as_json: bool,
    audit_log: Path | None,
) -> int:
    """--apply: refuse, or show the statements, ask, apply; the exit status."""
    changes = report.changes
    if refusal := ops.apply_refusal(report.server, changes):
        report.refused = refusal
        report.done(console, as_json)
        return EXIT_DRIFT
    statements = [q.as_string(conn) + ";" for q in ops.alter_statements(changes)]
    statements.append("SELECT pg_reload_conf();")
    preview = "Will run:\n" + "".join(f"  {line}\n" for line in statements)
    if not as_json:
        console.print(preview, soft_wrap=True)
    if not yes:
        if not stdin_is_terminal():
            if as_json:
                report.done(console, as_json)
            raise CliError(
                "refusing to apply without --yes (not a terminal); nothing changed"
            )
        if as_json:
            click.echo(preview, err=True)
        if not confirmed(f"Apply these {len(changes)} changes?"):
            click.echo("Not confirmed: nothing changed.", err=True)
            return EXIT_DRIFT
    log = writable_audit_log(audit_log)
    try:
        report.applied = ops.apply(conn, report.server, changes, log)
    except ops.ApplyFailed as exc:
        click.echo(f"Error: {exc}", err=True)
        return EXIT_DRIFT
    report.done(console, as_json)
    return EXIT_OK


@dataclass
class _Report:
    """What tune found and did, as a table and sentences or as JSON."""

    server: ops.ServerSettings
    recs: list[ops.Recommendation]
    pool_size: int
    instances: int
    memory: int | None
    memory_source: str | None
    refused: str | None = None
    applied: list[ops.Applied] | None = None

    @property
    def changes(self) -> list[ops.Recommendation]:
        return [rec for rec in self.recs if rec.is_change]

    @property
    def drifts(self) -> bool:
        """Changes are recommended, or one waits for a restart."""
        return any(rec.is_change or rec.pending_restart for rec in self.recs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "server_version": self.server.server_version,
            "role": self.server.role,
            "superuser": self.server.superuser,
            "pool_size": self.pool_size,
            "instances": self.instances,
            "pool_total": self.pool_size * self.instances,
            "memory": self.memory,
            "memory_source": self.memory_source,
            "recommendations": [rec.to_dict() for rec in self.recs],
            "warnings": [rec.warning for rec in self.recs if rec.warning],
            "postgresql_conf": ops.config_snippet(self.changes),
            "refused": self.refused,
            "applied": (
                None if self.applied is None else [a.to_dict() for a in self.applied]
            ),
        }

    def show(self, console: Console) -> None:
        """The header line, the table and the warnings."""
        server = self.server
        version = f"{server.server_version // 10000}.{server.server_version % 100}"
        who = f"{server.role} (superuser)" if server.superuser else server.role
        instances = "instance" if self.instances == 1 else "instances"
        if self.memory is None:
            memory = "unknown (give --memory SIZE for the work_mem check)"
        elif self.memory_source == "local":
            memory = (
                f"{ops.size_text(self.memory)} (this machine's: the server is local)"
            )
        else:
            memory = ops.size_text(self.memory)
        console.print(
            f"PostgreSQL {version} as {who}; pool {self.pool_size} x"
            f" {self.instances} {instances} = {self.pool_size * self.instances}"
            f" connections; server memory {memory}",
            soft_wrap=True,
        )
        console.print(_table(self.recs))
        for rec in self.recs:
            if rec.warning:
                console.print(
                    Text.assemble(("warning: ", "bold yellow"), rec.warning),
                    soft_wrap=True,
                )

    def done(self, console: Console, as_json: bool) -> None:
        """The outcome: JSON, or what to do next."""
        if as_json:
            echo_json(self.to_dict())
        elif self.applied is not None:
            _show_applied(console, self.applied)
        elif self.refused is not None:
            console.print(f"Cannot apply: {self.refused}.", soft_wrap=True)
            console.print(
                "Nothing was changed. Put these lines in postgresql.conf (or the"
                " service's parameters) and reload instead"
                + _restart_note(self.changes)
                + ":",
                soft_wrap=True,
            )
            console.print(_indented(ops.config_snippet(self.changes)), soft_wrap=True)
        elif not self.changes:
            pending = [rec.name for rec in self.recs if rec.pending_restart]
            waiting = f"; {', '.join(pending)} waits for a restart" if pending else ""
            console.print(f"Nothing to change{waiting}.")
        else:
            count = len(self.changes)
            console.print(
                f"{count} change{'s' if count != 1 else ''} recommended. Apply with"
                " `pgwarden tune --apply` (as a superuser), or put these lines in"
                " postgresql.conf and reload" + _restart_note(self.changes) + ":",
                soft_wrap=True,
            )
            console.print(_indented(ops.config_snippet(self.changes)), soft_wrap=True)


def _table(recs: list[ops.Recommendation]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("setting", no_wrap=True)
    table.add_column("current", justify="right", no_wrap=True)
    table.add_column("recommended", justify="right", no_wrap=True)
    table.add_column("restart", no_wrap=True)
    table.add_column("why")
    for rec in recs:
        recommended = (
            Text("keep", style="dim")
            if rec.recommended is None
            else Text(_value_text(rec.name, rec.recommended, rec.unit), style="bold")
        )
        restart = (
            "pending" if rec.pending_restart else "yes" if rec.needs_restart else ""
        )
        table.add_row(
            rec.name,
            _value_text(rec.name, rec.current, rec.unit),
            recommended,
            restart,
            rec.reason,
        )
    return table


def _value_text(name: str, value: int | None, unit: str | None) -> str:
    """A value for reading: ``4m12s``, ``128MB``, ``0 (off)``, ``unknown``."""
    if value is None:
        return "unknown"
    if value == 0 and name in ops.ZERO_MEANS:
        return f"0 ({ops.ZERO_MEANS[name]})"
    kind, base = ops.to_base(value, unit)
    if kind == "time":
        return human_duration(base / 1000)
    return ops.setting_text(value, unit)


def _restart_note(changes: list[ops.Recommendation]) -> str:
    names = [rec.name for rec in changes if rec.needs_restart]
    if not names:
        return ""
    return (
        f" ({', '.join(names)} also {'needs' if len(names) == 1 else 'need'} a restart)"
    )


def _indented(snippet: str) -> str:
    return "".join(f"    {line}\n" for line in snippet.splitlines())


def _show_applied(console: Console, applied: list[ops.Applied]) -> None:
    for item in applied:
        value = f"{item.name} = {ops.setting_text(item.value, item.unit)}"
        if item.live:
            console.print(Text.assemble(("live: ", "bold green"), value))
        elif item.pending_restart:
            console.print(
                Text.assemble(
                    ("restart needed: ", "bold yellow"),
                    f"{value} is set but needs a server restart to take effect:"
                    " run `pg_ctl restart` or restart the service.",
                ),
                soft_wrap=True,
            )
        else:
            console.print(
                Text.assemble(
                    ("not seen yet: ", "bold yellow"),
                    f"{value} is written to postgresql.auto.conf, but this session"
                    f" does not show it yet; check with SHOW {item.name}.",
                ),
                soft_wrap=True,
            )
