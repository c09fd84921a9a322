"""The ``pgwarden`` command line: a click group, with each command in its module."""

from __future__ import annotations

import click

from pgwarden import __version__

from ._group import Group
from .demo import demo
from .kill import kill_idle
from .monitor import monitor
from .queries import queries
from .status import status
from .tune import tune

__all__ = ["main"]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    __version__, "-V", "--version", prog_name="pgwarden", message="%(prog)s %(version)s"
)
def main() -> None:
    """Keep PostgreSQL connections healthy when workloads share a database.

    pgwarden is a psycopg 3 connection pool with lanes (a reserved share and a
    limit per workload), health checks and leak detection, plus commands to
    look after the server. Start with `pgwarden demo`.
    """


main.add_command(demo)
main.add_command(status)
main.add_command(kill_idle)
main.add_command(queries)
main.add_command(monitor)
main.add_command(tune)
