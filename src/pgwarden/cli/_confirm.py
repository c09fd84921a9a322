"""What `kill-idle` and `queries` share: options, listings, the rules to act.

The rules, in order, once the listing is printed: nothing listed, or
``--dry-run``: stop, exit 0. Without ``--yes``: on a terminal, ask (default
no; declining exits 1); without a terminal (cron), refuse with one line on
stderr and exit 2. Then act, print one line per session as it is handled, and
exit 1 if any was refused, timed out or failed.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import click
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from pgwarden.monitor.snapshot import Session
from pgwarden.ops.audit import AuditLog
from pgwarden.ops.sessions import (
    DEFAULT_TIMEOUT,
    MAX_TIMEOUT,
    Action,
    Criteria,
    Outcome,
    ResultCallback,
    Selection,
    SignalReport,
    SignalResult,
)

from ._common import (
    confirmed,
    duration,
    echo_json,
    human_duration,
    make_console,
    plural,
    stdin_is_terminal,
)
from ._group import CliError

__all__ = [
    "ActionOptions",
    "action_options",
    "carry_out",
    "describe_criteria",
    "duration",
    "filter_options",
    "fitted_table",
    "make_console",
    "plural",
    "selection_notes",
    "session_style",
    "sessions_table",
    "stdin_is_terminal",
]

F = TypeVar("F", bound=Callable[..., Any])

_DONE = {Action.TERMINATE: "terminated", Action.CANCEL: "cancelled"}
_OUTCOME_STYLE = {
    Outcome.TERMINATED: "green",
    Outcome.CANCELLED: "green",
    Outcome.GONE: "dim",
    Outcome.CHANGED: "dim",
    Outcome.REFUSED: "bold red",
    Outcome.TIMEOUT: "bold red",
    Outcome.FAILED: "bold red",
}


def filter_options(f: F) -> F:
    """``--application``, ``--user``, ``--pid``, ``--all-databases``,
    ``--include-superusers``."""
    options = [
        click.option(
            "--application",
            "applications",
            multiple=True,
            metavar="NAME",
            help="Only sessions of this application_name (a glob such as"
            " 'billing-*' works; repeat for several).",
        ),
        click.option(
            "--user",
            "users",
            multiple=True,
            metavar="ROLE",
            help="Only sessions of this role (a glob works; repeat for several).",
        ),
        click.option(
            "--pid",
            "pids",
            multiple=True,
            type=click.IntRange(min=1),
            metavar="PID",
            help="Only this backend pid (repeat for several).",
        ),
        click.option(
            "--all-databases",
            is_flag=True,
            help="Consider every database of the server, not just the current one.",
        ),
        click.option(
            "--include-superusers",
            is_flag=True,
            help="Also act on superusers' sessions (left alone by default).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@dataclass(frozen=True, slots=True)
class ActionOptions:
    """``--dry-run``, ``--yes``, ``--timeout`` and ``--audit-log``."""

    dry_run: bool = False
    yes: bool = False
    timeout: float = DEFAULT_TIMEOUT
    audit_log: str | None = None


def action_options(done: str) -> Callable[[F], F]:
    """The options that govern acting on the listing (``done``: for the help)."""

    def decorate(f: F) -> F:
        options = [
            click.option(
                "--dry-run",
                is_flag=True,
                help=f"List what would be {done}, and stop there.",
            ),
            click.option(
                "--yes",
                "-y",
                is_flag=True,
                help="Do not ask for confirmation (needed without a terminal).",
            ),
            click.option(
                "--timeout",
                callback=duration(allow_zero=False, at_most=MAX_TIMEOUT),
                default=f"{DEFAULT_TIMEOUT:g}s",
                show_default=True,
                metavar="DURATION",
                help="How long to wait for each session to react before"
                " reporting a timeout.",
            ),
            click.option(
                "--audit-log",
                type=click.Path(dir_okay=False, writable=True),
                metavar="FILE",
                help="Append one JSON line per session acted on to FILE.",
            ),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def describe_criteria(criteria: Criteria, what: str, database: str) -> str:
    """``sessions idle in transaction for more than 5m00s in db (user bob)``."""
    where = "all databases" if criteria.all_databases else database
    text = f"{what} for more than {human_duration(criteria.older_than)} in {where}"
    filters = [
        f"{label} {' or '.join(values)}"
        for label, values in (
            ("application", criteria.applications),
            ("user", criteria.users),
            ("pid", [str(p) for p in criteria.pids]),
        )
        if values
    ]
    return f"{text} ({'; '.join(filters)})" if filters else text


def session_style(session: Session, long_query_seconds: float) -> str:
    """Idle in a transaction: yellow; a query running too long: red."""
    if session.idle_in_transaction:
        return "yellow"
    if (
        session.visible
        and not session.state.startswith("idle")
        and (session.query_seconds or 0.0) > long_query_seconds
    ):
        return "red"
    return ""


_CAP = 32  # widest a name column gets, before its ellipsis
_LAST_MIN = 20  # narrowest the last column (the query) gets
_GAP = 2
_SESSION_COLUMNS = (
    ("pid", True),
    ("database", False),
    ("user", False),
    ("application", False),
    ("client", False),
    ("state", False),
    ("in state", True),
    ("xact age", True),
    ("query age", True),
    ("wait", False),
    ("query", False),
)
_SESSION_PRIORITY = (
    "pid", "state", "in state", "xact age", "query age", "application", "user",
    "wait", "database", "client",
)  # fmt: skip


def fitted_table(
    columns: Sequence[tuple[str, bool]],
    rows: Sequence[tuple[Sequence[str], str]],
    *,
    width: int | None,
    priority: Sequence[str],
) -> Table:
    """A plain table that fits ``width`` by leaving columns out.

    ``columns`` are (heading, right-aligned); ``rows`` (cells, style). The
    last column takes the width left and ends in an ellipsis; the others are
    kept in ``priority`` order while they fit (all of them if ``width`` is
    None) and shown in their own order.
    """
    natural = {
        heading: min(_CAP, max([len(heading)] + [len(cells[i]) for cells, _ in rows]))
        for i, (heading, _) in enumerate(columns[:-1])
    }
    room = None if width is None else width - _LAST_MIN
    kept: set[str] = set()
    for heading in priority:
        if heading in natural and (room is None or natural[heading] + _GAP <= room):
            kept.add(heading)
            room = None if room is None else room - natural[heading] - _GAP
    last, shown = columns[-1][0], [i for i, (h, _) in enumerate(columns) if h in kept]
    table = Table(
        box=None, pad_edge=False, padding=(0, _GAP, 0, 0), header_style="bold"
    )
    for i in shown:
        heading, right = columns[i]
        table.add_column(
            heading,
            justify="right" if right else "left",
            max_width=_CAP,
            overflow="ellipsis",
            no_wrap=True,
        )
    table.add_column(
        last,
        max_width=None if room is None else room + _LAST_MIN,
        overflow="ellipsis",
        no_wrap=True,
    )
    for cells, style in rows:
        table.add_row(*[cells[i] for i in shown], cells[-1], style=style)
    return table


def sessions_table(
    sessions: Iterable[Session],
    *,
    long_query_seconds: float,
    show_database: bool = False,
    width: int | None = None,
) -> Table:
    """One row per session: who, where from, state, the three clocks, query.

    On a narrow console, columns are left out from the least useful: client,
    database, wait, user, application.
    """
    rows = []
    for s in sessions:
        wait = f"{s.wait_event_type}:{s.wait_event}" if s.wait_event_type else ""
        cells = [
            str(s.pid),
            s.database or "-",
            s.user or "-",
            s.application_name,
            _client(s),
            s.state,
            human_duration(s.state_seconds),
            human_duration(s.xact_seconds),
            human_duration(s.query_seconds),
            wait,
            s.query or "",
        ]
        rows.append((cells, session_style(s, long_query_seconds)))
    priority = [p for p in _SESSION_PRIORITY if show_database or p != "database"]
    return fitted_table(_SESSION_COLUMNS, rows, width=width, priority=priority)


def _client(s: Session) -> str:
    if s.client_addr is None:
        return "local" if s.visible else "-"
    return f"{s.client_addr}:{s.client_port}" if s.client_port else s.client_addr


def selection_notes(selection: Selection, *, superusers_hint: bool = True) -> Text:
    """Superusers' sessions left out, and sessions hidden from the role."""
    lines = []
    left_out = selection.superusers_left_out
    if left_out and superusers_hint:
        pids = ", ".join(str(s.pid) for s in left_out)
        lines.append(
            f"{plural(len(left_out), 'superuser session')} also matched and"
            f" will be left alone (pid {pids}); --include-superusers includes them."
        )
    if selection.visibility_note:
        lines.append(selection.visibility_note)
    return Text("\n".join(lines), style="dim")


def writable_audit_log(path: str | os.PathLike[str] | None) -> AuditLog:
    """The audit log at `path`, opened once to be sure it can be written before
    anything changes: a log that fails midway would leave changes unrecorded."""
    if path is not None:
        try:
            open(path, "a").close()
        except OSError as exc:
            raise CliError(f"cannot write the audit log: {exc}") from None
    return AuditLog(path)


def carry_out(
    report: SignalReport,
    options: ActionOptions,
    *,
    noun: str,
    as_json: bool,
    listing: RenderableType,
    signal: Callable[[AuditLog, ResultCallback | None], tuple[SignalResult, ...]],
    json_of: Callable[[SignalReport], dict[str, Any]] = SignalReport.to_dict,
) -> int:
    """Print the listing, apply the confirmation rules, act, report; the exit code.

    ``report`` holds the listing and its ``action``; ``noun`` names what is
    listed (``session``, ``query``); ``signal`` acts, given the audit log
    and a callback for each result.
    """
    assert report.action is not None
    console = make_console()
    selected = report.selection.sessions
    verb, done = report.action.value, _DONE[report.action]
    if not as_json:
        console.print(listing)
    if not selected or options.dry_run:
        if as_json:
            echo_json(json_of(report))
        elif selected:
            console.print(f"dry run: nothing {done}.")
        return 0
    if not options.yes:
        if not stdin_is_terminal():
            if as_json:
                echo_json(json_of(report))
            raise CliError(
                f"refusing to {verb} {plural(len(selected), noun)} without --yes"
                " (not a terminal)"
            )
        if as_json:
            make_console(stderr=True).print(listing)
        if not confirmed(f"{verb.capitalize()} {plural(len(selected), noun)}?"):
            if as_json:
                echo_json(json_of(report))
            else:
                console.print(f"not confirmed: nothing {done}.")
            return 1

    def show(session: Session, result: SignalResult) -> None:
        console.print(_result_line(result))

    results = signal(writable_audit_log(options.audit_log), None if as_json else show)
    report = replace(report, results=results)
    if as_json:
        echo_json(json_of(report))
    else:
        console.print(Text(_summary(results), style="bold"))
    failures = report.failures
    if failures:
        click.echo(
            f"Error: {len(failures)} of {plural(len(results), noun)} not {done}:"
            f" {_counts(failures)}",
            err=True,
        )
        return 1
    return 0


def _result_line(result: SignalResult) -> Text:
    return Text.assemble(
        (f"pid {result.pid:>7}  ", ""),
        (f"{result.outcome.value:<10}", _OUTCOME_STYLE[result.outcome]),
        ("  " + result.detail, "dim"),
    )


def _counts(results: Iterable[SignalResult]) -> str:
    counts = Counter(r.outcome.value for r in results)
    return ", ".join(f"{n} {outcome}" for outcome, n in counts.items())


def _summary(results: tuple[SignalResult, ...]) -> str:
    return f"done: {_counts(results)}." if results else "done: nothing to do."
