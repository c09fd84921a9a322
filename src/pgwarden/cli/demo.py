"""`pgwarden demo`: the SMS platform's story, told on the terminal.

The story itself (workload, scenes, result) is `_demo_story.run_demo`; this
module starts the server, and renders what happens: a live table on a
terminal, a plain line per second elsewhere, the pool's warnings, a summary.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from time import monotonic
from types import FrameType, TracebackType

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pgwarden.embedded import EmbeddedPostgres, EmbeddedUnavailable

from ._common import duration_text
from ._demo_story import (
    DEFAULT_DURATION,
    MIN_DURATION,
    DemoResult,
    Tick,
    run_demo,
)
from ._group import CliError, one_line
from ._stats_view import stats_line, stats_view

__all__ = ["demo"]


@click.command()
@click.option(
    "--duration",
    type=click.FloatRange(min=MIN_DURATION),
    default=DEFAULT_DURATION,
    show_default=True,
    metavar="SECONDS",
    help="How long the workload runs.",
)
@click.option(
    "--dsn",
    metavar="CONNINFO",
    help=(
        "Use this PostgreSQL server (key=value string or postgresql:// URI)"
        " instead of a throwaway one. The demo opens up to 40 connections there,"
        " creates two tables with a random name and drops them at the end."
    ),
)
def demo(duration: float, dsn: str | None) -> None:
    """Watch a pool with lanes keep an SMS platform's connections healthy.

    The platform's backend API, frontend and Asterisk call processing share
    one pool of 40 connections, split into lanes (reserved-limit): backend
    15-20, frontend 10-15, asterisk 5-10. The demo starts a throwaway
    PostgreSQL on 127.0.0.1 (from the pgserver package, unless --dsn is
    given) and runs the three workloads, with the pool's stats shown as they
    change. On the way, a backend handler leaks a connection inside a
    transaction, and at rush hour a frontend bug floods its lane just as
    Asterisk gets a call storm.
    """
    console = Console(highlight=False)
    with _Show(console) as show, _pgwarden_logs_to(show):
        if dsn is not None:
            result = run_demo(dsn, duration, on_event=show.event, on_tick=show.tick)
        else:
            show.note("starting a throwaway PostgreSQL on 127.0.0.1...")
            with _embedded_postgres() as server_dsn:
                result = run_demo(
                    server_dsn, duration, on_event=show.event, on_tick=show.tick
                )
    # Off a terminal, sentences stay on one line each: nothing to re-wrap.
    console.print(_summary(result), soft_wrap=not console.is_terminal)
    if result.errors:
        raise click.ClickException(
            f"{result.errors} operations failed; the first: {result.first_error}"
        )


@contextmanager
def _embedded_postgres() -> Iterator[str]:
    """A throwaway server's conninfo; the server is removed whatever happens."""
    server = EmbeddedPostgres()
    try:
        server.start()
        yield server.dsn()
    except EmbeddedUnavailable as exc:
        hint = "or give the demo a server with --dsn"
        raise CliError(f"{one_line(exc)}; {hint}") from None
    finally:
        with _sigint_deferred():
            server.cleanup()


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C back until the block is done, so cleanup is never cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        pressed.append(signum)

    previous = signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


class _Show:
    """Renders the story: a live table on a terminal, plain lines elsewhere."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live: Live | None = None
        self.started = monotonic()  # the story's time 0, as told by the ticks
        self.next_line = 0.0  # plain output: when the next stats line is due

    def __enter__(self) -> _Show:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.live is not None:
            self.live.stop()

    def note(self, text: str) -> None:
        self.console.print(Text(text, style="dim"), soft_wrap=True)

    def event(self, elapsed: float, text: str) -> None:
        self._line(elapsed, Text(text, style="bold cyan"))

    def tick(self, tick: Tick) -> None:
        self.started = monotonic() - tick.elapsed
        if self.console.is_terminal:
            title = (
                f"pool {tick.stats.name!r}  ·  {tick.elapsed:5.1f} s  ·  {tick.scene}"
            )
            view = stats_view(tick.stats, title)
            if self.live is None:
                self.live = Live(view, console=self.console, refresh_per_second=4)
                self.live.start()
            else:
                self.live.update(view)
        elif tick.elapsed >= self.next_line:
            self.next_line = math.floor(tick.elapsed) + 1.0
            self._line(tick.elapsed, Text(f"{tick.scene:<14} {stats_line(tick.stats)}"))

    def log(self, record: logging.LogRecord) -> None:
        """A pgwarden log record, first line only (a leak report adds a stack)."""
        headline = record.getMessage().splitlines()[0]
        headline = headline.removesuffix(" The holder is now at:")
        warning = record.levelno >= logging.WARNING
        label = "WARNING" if warning else "info"
        text = Text.assemble(
            (f"{label:<8}", "bold yellow" if warning else "dim"),
            (headline, "yellow" if warning else "dim"),
        )
        self._line(monotonic() - self.started, text)

    def _line(self, elapsed: float, text: Text) -> None:
        stamp = Text(f"{elapsed:6.1f}s  ", style="dim")
        self.console.print(stamp + text, soft_wrap=True)


class _ShowHandler(logging.Handler):
    def __init__(self, show: _Show) -> None:
        super().__init__(logging.INFO)
        self.show = show

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.show.log(record)
        except Exception:
            self.handleError(record)


@contextmanager
def _pgwarden_logs_to(show: _Show) -> Iterator[None]:
    """Send pgwarden's warnings and info to the show, and only there."""
    logger = logging.getLogger("pgwarden")
    handler = _ShowHandler(show)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _summary(result: DemoResult) -> Group:
    stats = result.stats
    title = Text(
        f"Summary: {result.elapsed:.1f} s, {result.operations:,} operations,"
        f" {result.errors} errors",
        style="bold",
    )
    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0))
    table.add_column("lane")
    for heading in ("operations", "errors", "worst wait", "peak in use", "reserved"):
        table.add_column(heading, justify="right")
    for lane in result.lanes.values():
        table.add_row(
            lane.name,
            f"{lane.operations:,}",
            str(lane.errors),
            duration_text(lane.worst_wait),
            f"{lane.peak_in_use}/{lane.limit}",
            str(lane.reserved),
            style="red" if lane.errors else None,
        )
    front, star = result.storm["frontend"], result.storm["asterisk"]
    storm = (
        f"Call storm ({result.storm_seconds:.1f} s): frontend sat at"
        f" {front.peak_in_use}/{front.limit} with up to {front.peak_waiting} callers"
        f" queued (worst wait {duration_text(front.worst_wait)}), while asterisk's"
        f" {star.reserved} reserved connections served {star.operations:,} borrows,"
        f" none waiting more than {duration_text(star.worst_wait)}."
    )
    leak = (
        f"Leak detection: the stuck handler held its connection"
        f" {result.leak_held:.1f} s; the pool reported it with the line that"
        " borrowed it, and rolled the open transaction back when it came back."
        if result.leak_reported
        else "Leak detection: no leak was reported."
    )
    pool = (
        f"Pool: {stats.borrowed_total:,} borrows, {stats.timeouts_total} timeouts,"
        f" {stats.connections_opened_total} connections opened; wait p50"
        f" {duration_text(stats.wait_p50_seconds)}, p99"
        f" {duration_text(stats.wait_p99_seconds)}."
    )
    return Group(Text(), title, table, Text(), Text(storm), Text(leak), Text(pool))
