"""`pgwarden monitor`: the health monitor as a service, with its HTTP endpoints.

It checks the database every interval, logs alerts to stderr and serves
/healthz, /readyz, /metrics and /status (`pgwarden.http`) with uvicorn until
SIGINT or SIGTERM. An unreachable database is reported, not fatal.

Exit status: 0 after SIGINT or SIGTERM; 2 for usage errors, bad settings and
an address it can't listen on.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from pgwarden.config import PoolConfig
from pgwarden.monitor import HealthMonitor, MonitorSettings

from ._common import dsn_option
from ._group import CliError

if TYPE_CHECKING:
    import uvicorn
    from starlette.types import ASGIApp

__all__ = ["monitor"]

DEFAULT_LISTEN = "127.0.0.1:9187"
LOG_LEVELS = ("debug", "info", "warning", "error")
# Needed to serve, and not among pgwarden's own dependencies.
SERVING = ("uvicorn", "starlette", "prometheus_client")
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _parse_listen(
    ctx: click.Context, param: click.Parameter, value: str
) -> tuple[str, int]:
    host, colon, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise click.BadParameter(
            f"{value!r} is not HOST:PORT, e.g. 127.0.0.1:9187 or [::1]:9187"
        )
    return host, int(port)


@click.command()
@dsn_option
@click.option(
    "--listen",
    metavar="HOST:PORT",
    default=DEFAULT_LISTEN,
    show_default=True,
    callback=_parse_listen,
    help="Where to serve /healthz, /readyz, /metrics and /status.",
)
@click.option(
    "--interval",
    metavar="DURATION",
    help=(
        "Time between checks, e.g. 15s or 1m."
        " Default: DB_HEALTH_CHECK_INTERVAL, else 30s."
    ),
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="info",
    show_default=True,
    help="Least severe pgwarden log lines written to stderr.",
)
def monitor(
    dsn: str | None, listen: tuple[str, int], interval: str | None, log_level: str
) -> None:
    """Watch a database, log its alerts and serve health endpoints.

    Every interval the monitor reads pg_stat_activity over one connection of
    its own and applies the built-in rules (thresholds from DB_WARN_* and the
    other monitor settings in the environment). Alerts are logged to stderr.

    \b
    Endpoints, on --listen:
      /healthz  200 while the monitor runs
      /readyz   200 if the database answers, else 503 and the reason
      /metrics  Prometheus metrics
      /status   the last report as JSON

    An unreachable database is reported, not fatal: the monitor keeps serving
    and checking. Stop it with Ctrl-C or SIGTERM.
    """
    _check_dependencies()
    from pgwarden.http import create_app

    host, port = listen
    config = PoolConfig.from_env() if dsn is None else PoolConfig.coerce(dsn)
    settings = MonitorSettings.from_env()
    if interval is not None:
        settings = settings.replace(health_check_interval=interval)
    with (
        closing(_bind(host, port)) as listener,
        _logs_to_stderr(log_level.upper()),
        _Stopper() as stopper,
    ):
        health = HealthMonitor(config, settings=settings)
        stopper.server = server = _uvicorn_server(create_app(health), host, port)
        try:
            _first_check(health, host, port)
            if not stopper.stopped:
                health.start()
                # uvicorn handles SIGINT/SIGTERM while serving, then re-raises
                # them once done: our handlers are back by then.
                server.run(sockets=[listener])
        finally:
            health.stop()


def _check_dependencies() -> None:
    missing = [name for name in SERVING if importlib.util.find_spec(name) is None]
    if missing:
        names = " ".join(missing)
        raise CliError(f"pgwarden monitor needs {names}: pip install {names}")


def _uvicorn_server(app: ASGIApp, host: str, port: int) -> uvicorn.Server:
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        log_config=None,  # uvicorn's warnings go through our handler
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


def _first_check(health: HealthMonitor, host: str, port: int) -> None:
    """Say what is watched and where it is served, check, say if it failed."""
    interval = health.settings.health_check_interval
    where = f"[{host}]" if ":" in host else host
    target = health.config.safe_conninfo or "the libpq default database"
    click.echo(
        f"pgwarden monitor: checking {target} every {interval:g} s;"
        f" serving http://{where}:{port}/ (healthz, readyz, metrics, status)",
        err=True,
    )
    report = health.check()
    if report.server is None:
        lines = (report.server_error or "").strip().splitlines()
        reason = lines[0] if lines else "no reason given"
        click.echo(
            f"pgwarden monitor: the database is unreachable for now ({reason});"
            " serving anyway, /readyz answers 503 until it is back",
            err=True,
        )


def _bind(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, or a one-line error."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        # Lets a restarted monitor take the port back at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen()
        return sock
    except OSError as exc:
        if sock is not None:
            sock.close()
        where = f"[{host}]" if ":" in host else host
        reason = exc.strerror or str(exc)
        raise CliError(f"can't listen on {where}:{port}: {reason}") from None


class _Stopper:
    """Turns SIGINT and SIGTERM into a clean stop, whenever they come.

    While uvicorn serves, its own handlers stop it; these cover starting up
    and shutting down, and take the signals uvicorn re-raises when it is done,
    so that the command still ends normally (exit status 0).
    """

    def __init__(self) -> None:
        self.stopped = False
        self.server: uvicorn.Server | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stopper:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers; uvicorn agrees
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.stopped = True
        if self.server is not None:
            self.server.should_exit = True


@contextmanager
def _logs_to_stderr(level: str) -> Iterator[None]:
    """pgwarden's log at `level`, and others' warnings, on stderr, one per line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))
    root, ours = logging.getLogger(), logging.getLogger("pgwarden")
    saved = root.level, ours.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    ours.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        ours.setLevel(saved[1])
