"""The command group class: errors a user can cause end as one line, never a trace."""

from __future__ import annotations

from typing import Any, NoReturn

import click
import psycopg

from pgwarden.errors import PgwardenError

__all__ = ["EXIT_INTERRUPTED", "CliError", "Group", "one_line"]

EXIT_INTERRUPTED = 130  # as a shell reports a process ended by SIGINT


class CliError(click.ClickException):
    """A problem the user can fix: shown as ``Error: <message>``, exit status 2."""

    exit_code = 2


def one_line(error: BaseException) -> str:
    """The first line of an error's message (the rest is detail, such as a log)."""
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


class Group(click.Group):
    """A click group whose commands report pgwarden and connection errors briefly.

    `PgwardenError` and `psycopg.OperationalError` (a server that can't be
    reached, for one) become `CliError`; Ctrl-C prints ``Interrupted.`` and
    exits with status 130, after the command's own cleanup ran.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (PgwardenError, psycopg.OperationalError) as exc:
            raise CliError(one_line(exc)) from None
        except KeyboardInterrupt:
            _interrupted(ctx)


def _interrupted(ctx: click.Context) -> NoReturn:
    click.echo("\nInterrupted.", err=True)  # the newline ends the terminal's ^C
    ctx.exit(EXIT_INTERRUPTED)
