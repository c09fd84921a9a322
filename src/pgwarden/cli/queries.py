"""`pgwarden queries`: long-running queries, lock waits and their root blockers.

Exit status, listing only: 0 when no query runs longer than the bound and no
session waits on a lock, 1 when some do. With ``--cancel`` or
``--terminate``: as `kill-idle` (0 nothing to do, a dry run, or all handled;
1 some refused, timed out or failed, or not confirmed; 2 usage or connection
errors, or no ``--yes`` off a terminal).

``--json`` prints `pgwarden.ops.queries.report_dict`: the fields of
``kill-idle --json`` (``action`` is null for a listing, ``"cancel"`` or
``"terminate"``; outcomes include ``cancelled``) plus ``lock_waits`` (``pid``,
``blocked_by``, ``root_blockers``, ``waiting_seconds``) and ``lock_sessions``
(the sessions those name). See docs/commands.md.
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import Group, RenderableType
from rich.text import Text

from pgwarden.monitor.snapshot import LockNode, ServerSnapshot
from pgwarden.ops.queries import (
    find_long_queries,
    long_query_criteria,
    report_dict,
    stop_queries,
)
from pgwarden.ops.sessions import Action, Selection, SignalReport

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
    ActionOptions,
    action_options,
    carry_out,
    describe_criteria,
    filter_options,
    fitted_table,
    selection_notes,
    session_style,
    sessions_table,
)

__all__ = ["queries"]


@click.command()
@click.option(
    "--longer-than",
    callback=duration(),
    default="30s",
    show_default=True,
    metavar="DURATION",
    help="Only queries running for longer than this (500ms, 30s, 5m, 1h).",
)
@click.option(
    "--cancel",
    is_flag=True,
    help="Cancel the listed queries (pg_cancel_backend); the sessions stay.",
)
@click.option(
    "--terminate",
    is_flag=True,
    help="End the listed queries' sessions (pg_terminate_backend).",
)
@filter_options
@action_options("cancelled or terminated")
@dsn_option
@json_option
@click.pass_context
def queries(
    ctx: click.Context,
    longer_than: float,
    cancel: bool,
    terminate: bool,
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
    """List long-running queries and lock waits; cancel or terminate them.

    Lists the queries of the current database running for longer than
    --longer-than, then every lock wait as a tree under its root blockers:
    the sessions that block others without waiting themselves. With --cancel
    (the query stops, the session stays) or --terminate (the session ends),
    it acts on exactly the listed queries with the rules of kill-idle: it
    asks on a terminal, needs --yes without one, leaves superusers' sessions
    alone unless --include-superusers, and leaves a session alone if its
    query has finished since the listing.

    Exit status: 0 nothing found (or, with an action, all handled), 1 long
    queries or lock waits found (with an action: some refused, timed out or
    failed, or not confirmed), 2 usage or connection error, or no --yes off
    a terminal.

    \b
    Examples:
      pgwarden queries
      pgwarden queries --longer-than 5m --all-databases --json
      pgwarden queries --cancel --application 'reports-*' --longer-than 10m
      pgwarden queries --terminate --pid 4242 --longer-than 0 --yes
    """
    if cancel and terminate:
        raise click.UsageError("--cancel and --terminate exclude each other")
    action = Action.CANCEL if cancel else Action.TERMINATE if terminate else None
    criteria = long_query_criteria(
        longer_than=longer_than,
        applications=applications,
        users=users,
        pids=pids,
        all_databases=all_databases,
        # a listing shows every long query; only acting leaves superusers out
        include_superusers=include_superusers or action is None,
    )
    with connect(dsn) as conn:
        selection = find_long_queries(conn, criteria)
        report = SignalReport(selection, action, dry_run)
        listing = _listing(selection, action, make_console().width)
        if action is None:
            if as_json:
                echo_json(report_dict(report))
            else:
                make_console().print(listing)
            found = selection.sessions or selection.snapshot.lock_waits
            ctx.exit(1 if found else 0)
        code = carry_out(
            report,
            ActionOptions(dry_run, yes, timeout, audit_log),
            noun="query",
            as_json=as_json,
            listing=listing,
            signal=lambda audit, on_result: stop_queries(
                conn,
                selection,
                action,
                timeout=timeout,
                audit=audit,
                on_result=on_result,
            ),
            json_of=report_dict,
        )
    ctx.exit(code)


def _listing(selection: Selection, action: Action | None, width: int) -> RenderableType:
    snapshot = selection.snapshot
    count = len(selection.sessions)
    what = plural(count or None, "query") + " running"
    described = describe_criteria(selection.criteria, what, snapshot.database)
    parts: list[Any] = []
    if count:
        verb = f"To {action.value}" if action else "Long-running"
        parts.append(Text(f"{verb}: {described}", style="bold"))
        parts.append(
            sessions_table(
                selection.sessions,
                long_query_seconds=selection.criteria.older_than,
                show_database=snapshot.all_databases,
                width=width,
            )
        )
    else:
        parts.append(Text(f"No {described}.", style="bold"))
    if snapshot.lock_waits:
        parts.append(Text())
        parts.append(_lock_tree(snapshot, selection.criteria.older_than, width))
        hints = _hints(snapshot)
        if hints.plain:
            parts.append(hints)
    notes = selection_notes(selection, superusers_hint=action is not None)
    if notes.plain:
        parts.append(notes)
    return Group(*parts)


_TREE_COLUMNS = (
    ("pid", False),
    ("user", False),
    ("application", False),
    ("state", False),
    ("waiting", True),
    ("xact age", True),
    ("query", False),
)
_TREE_PRIORITY = ("pid", "state", "waiting", "xact age", "application", "user")


def _lock_tree(
    snapshot: ServerSnapshot, long_query_seconds: float, width: int
) -> Group:
    waiting = len(snapshot.lock_waits)
    title = Text(
        f"Lock waits: {plural(waiting, 'session')} waiting, under their root blockers",
        style="bold",
    )
    rows = [
        (_node_row(depth, node), _node_style(node, long_query_seconds))
        for root in snapshot.lock_tree()
        for depth, node in root.walk()
    ]
    table = fitted_table(_TREE_COLUMNS, rows, width=width, priority=_TREE_PRIORITY)
    return Group(title, table)


def _node_row(depth: int, node: LockNode) -> list[str]:
    indent = "  " * (depth - 1) + "└ " if depth else ""
    label = f"{indent}{node.pid}"
    if node.pid == 0:
        return [f"{label} (prepared transaction)", "", "", "", "", "", ""]
    s = node.session
    if node.repeated:
        return [f"{label} (see above)", "", "", "", "", "", ""]
    if s is None:
        return [f"{label} (not in scope)", "", "", "", "", "", ""]
    waited = human_duration(node.wait.waiting_seconds) if node.wait else "root"
    return [
        label,
        s.user or "-",
        s.application_name,
        s.state,
        waited,
        human_duration(s.xact_seconds),
        s.query or "",
    ]


def _node_style(node: LockNode, long_query_seconds: float) -> str:
    if node.session is None or node.repeated:
        return "dim"
    style = session_style(node.session, long_query_seconds)
    return f"bold {style}".strip() if node.wait is None else style


def _hints(snapshot: ServerSnapshot) -> Text:
    """How to release each root blocker, with the command that does it."""
    lines = []
    for root in snapshot.lock_tree():
        s = root.session
        if s is None or root.wait is not None:
            continue
        flags = f"--pid {s.pid}"
        if s.database != snapshot.database:
            flags += " --all-databases"
        if s.superuser:
            flags += " --include-superusers"
        if s.idle_in_transaction:
            lines.append(
                f"root blocker {s.pid} is idle in transaction; to end it:"
                f" pgwarden kill-idle {flags} --older-than 0"
            )
        elif s.visible and not s.state.startswith("idle"):
            lines.append(
                f"root blocker {s.pid} is running a query; to cancel it:"
                f" pgwarden queries --cancel {flags} --longer-than 0"
            )
    return Text("\n".join(lines), style="dim")
