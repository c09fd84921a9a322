"""`pgwarden kill-idle`: terminate sessions left idle in a transaction too long.

Exit status: 0 when there was nothing to do, for a dry run, and when every
listed session was handled (terminated, already gone, or changed since the
listing and so left alone); 1 when some were refused, timed out or failed
(stderr says how many), or the prompt was answered no; 2 for usage and
connection errors, and for a refusal to act without ``--yes`` off a terminal.

``--json`` prints `SignalReport.to_dict`: ``action`` (``"terminate"``),
``dry_run``, ``taken_at``, ``database``, ``all_databases``, ``criteria``,
``selected`` (session objects as in ``status --json``),
``superusers_left_out``, ``visibility_note`` and ``results`` (``pid``,
``outcome``: terminated, gone, changed, refused, timeout or failed;
``detail``). See docs/commands.md.
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import Group, RenderableType
from rich.text import Text

from pgwarden.ops.kill import (
    IDLE_STATES,
    IdleState,
    find_idle_sessions,
    idle_criteria,
    terminate_sessions,
)
from pgwarden.ops.sessions import Action, Selection, SignalReport

from ._common import (
    connect,
    dsn_option,
    duration,
    json_option,
    make_console,
    plural,
)
from ._confirm import (
    ActionOptions,
    action_options,
    carry_out,
    describe_criteria,
    filter_options,
    selection_notes,
    sessions_table,
)

__all__ = ["kill_idle"]

_WHAT: dict[IdleState, tuple[str, str]] = {  # (noun, qualifier)
    "idle-in-transaction": ("session", " idle in transaction"),
    "idle": ("idle session", ""),
}


@click.command("kill-idle")
@click.option(
    "--older-than",
    callback=duration(),
    default="5m",
    show_default=True,
    metavar="DURATION",
    help="Only sessions in their state for longer than this (500ms, 30s, 5m, 1h).",
)
@click.option(
    "--state",
    type=click.Choice(list(IDLE_STATES)),
    default="idle-in-transaction",
    show_default=True,
    help="idle-in-transaction (aborted ones too), or plain idle sessions.",
)
@filter_options
@action_options("terminated")
@dsn_option
@json_option
@click.pass_context
def kill_idle(
    ctx: click.Context,
    older_than: float,
    state: IdleState,
    applications: tuple[str, ...],
    users: tuple[str, ...],
    pids: tuple[int, ...],
    all_databases: bool,
    include_superusers: bool,
    dry_run: bool,
    yes: bool,
    timeout: float,
    audit_log: str | None,
    dsn: str | None,
    as_json: bool,
) -> None:
    """Terminate sessions idle in a transaction for too long.

    Such a session holds its locks and keeps vacuum from cleaning up until
    its client comes back. kill-idle lists the current database's sessions
    idle in transaction for longer than --older-than, then terminates exactly
    those with pg_terminate_backend, after asking on a terminal. Without a
    terminal (cron) it needs --yes, and otherwise refuses with exit status 2.

    It never touches its own session, background workers, replication
    connections or, unless --include-superusers, superusers' sessions. Each
    session is re-checked as it is terminated: one that ran a query or
    started another transaction since the listing is left alone.

    Exit status: 0 nothing to do or all handled, 1 some refused, timed out or
    failed (or not confirmed), 2 usage or connection error, or no --yes off a
    terminal. Terminating other roles' sessions takes superuser or the
    pg_signal_backend role.

    \b
    Examples:
      pgwarden kill-idle --dry-run
      pgwarden kill-idle --older-than 10m --application 'billing-*'
      pgwarden kill-idle --state idle --older-than 1h --user reports
      pgwarden kill-idle --yes --json --audit-log /var/log/pgwarden-audit.jsonl
    """
    criteria = idle_criteria(
        older_than=older_than,
        state=state,
        applications=applications,
        users=users,
        pids=pids,
        all_databases=all_databases,
        include_superusers=include_superusers,
    )
    options = ActionOptions(dry_run, yes, timeout, audit_log)
    with connect(dsn) as conn:
        selection = find_idle_sessions(conn, criteria)
        code = carry_out(
            SignalReport(selection, Action.TERMINATE, dry_run),
            options,
            noun="session",
            as_json=as_json,
            listing=_listing(selection, *_WHAT[state], make_console().width),
            signal=lambda audit, on_result: terminate_sessions(
                conn, selection, timeout=timeout, audit=audit, on_result=on_result
            ),
        )
    ctx.exit(code)


def _listing(
    selection: Selection, noun: str, qualifier: str, width: int
) -> RenderableType:
    count = len(selection.sessions)
    database = selection.snapshot.database
    what = plural(count or None, noun) + qualifier
    described = describe_criteria(selection.criteria, what, database)
    parts: list[Any] = []
    if count:
        parts.append(Text(f"To terminate: {described}", style="bold"))
        parts.append(
            sessions_table(
                selection.sessions,
                long_query_seconds=float("inf"),
                show_database=selection.criteria.all_databases,
                width=width,
            )
        )
    else:
        parts.append(Text(f"Nothing to terminate: no {described}.", style="bold"))
    notes = selection_notes(selection)
    if notes.plain:
        parts.append(notes)
    return Group(*parts)
