"""`HealthMonitor`: checks the pools and the server, raises alerts.

It reads the server over a connection of its own (application_name
`pgwarden-monitor`), never one borrowed from the application's pools, so an
exhausted pool can't blind it. Its session runs with a short
`statement_timeout` and `lock_timeout` so it never piles onto a struggling
server. One check costs the server one short query.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

import psycopg

from .._conninfo import redact, secrets_of, with_session
from ..config import PoolConfig
from ..pool.stats import ConnectionInfo, PoolStats
from . import rules
from .alerts import AlertEvent, AlertManager, LogSink
from .report import HealthReport, PoolReport
from .settings import MonitorSettings
from .snapshot import Attribution, ServerSnapshot, take_snapshot

if TYPE_CHECKING:
    from starlette.types import ASGIApp

logger = logging.getLogger("pgwarden.health")

APPLICATION_NAME = "pgwarden-monitor"
# The monitor's own session: it gives up rather than queue behind the server.
STATEMENT_TIMEOUT_MS = 5000
LOCK_TIMEOUT_MS = 1000
CONNECT_TIMEOUT = 5


class MonitoredPool(Protocol):
    """What the monitor needs from a pool: `Pool` and `AsyncPool` both fit."""

    name: str

    def stats(self) -> PoolStats: ...

    def describe(self) -> tuple[ConnectionInfo, ...]: ...


class HealthMonitor:
    """Checks the attached pools and the server, and raises alerts.

    `config` says where the database is: a `PoolConfig`, a conninfo string, or
    None for `PoolConfig.from_env()`. `pools` are the `Pool`s and `AsyncPool`s
    to watch. Thresholds come from `settings` or, by default, from the
    environment (`MonitorSettings.from_env()`), and keyword `thresholds`
    override any of them. Alert events go to the `pgwarden.health` logger, to
    the webhook in `alert_webhook_url` if set, and to `sinks`.

    `check()` runs one check; `start()` runs one every
    `health_check_interval` in a background thread until `stop()`; it is also
    a context manager.
    """

    def __init__(
        self,
        config: PoolConfig | str | None = None,
        *,
        pools: Iterable[MonitoredPool] = (),
        settings: MonitorSettings | None = None,
        sinks: Sequence[Callable[[AlertEvent], object]] = (),
        clock: Callable[[], datetime] | None = None,
        **thresholds: Any,
    ) -> None:
        if config is None:
            config = PoolConfig.from_env()
        self.config = PoolConfig.coerce(config)
        base = settings or MonitorSettings.from_env()
        self.settings = base.replace(**thresholds) if thresholds else base
        self.pools = list(pools)
        self._clock = clock or _utcnow
        all_sinks: list[Callable[[AlertEvent], object]] = [LogSink(), *sinks]
        self._webhook: Any = None
        if self.settings.alert_webhook_url:
            from .webhook import WebhookSink  # brings in an HTTP client: on demand

            self._webhook = WebhookSink(self.settings.alert_webhook_url)
            all_sinks.append(self._webhook)
        self.alerts = AlertManager(
            sinks=all_sinks,
            repeat_interval=self.settings.alert_repeat_interval,
            clock=self._clock,
        )
        self._conninfo = _monitor_conninfo(self.config.conninfo)
        self._secrets = secrets_of(self.config.conninfo)
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()  # one check at a time
        self._timeouts_seen: dict[str, int] = {}
        self._visibility_logged = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.latest: HealthReport | None = None
        self.checks_total = 0
        self.check_errors_total = 0
        self._registry: Any = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"<HealthMonitor {state} pools={[p.name for p in self.pools]}"
            f" conninfo={self.config.safe_conninfo!r}>"
        )

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- checking -----------------------------------------------------------

    def check(self) -> HealthReport:
        """Run one check now and return its report (alerts are dispatched)."""
        with self._lock:
            t0 = time.perf_counter()
            taken_at = self._clock()
            pools = tuple(
                PoolReport(p.name, p.stats(), p.describe()) for p in self.pools
            )
            server, error = self._read_server()
            if server is not None:
                server = _attribute(server, pools)
                if server.visibility_note and not self._visibility_logged:
                    self._visibility_logged = True
                    logger.warning("%s", server.visibility_note)
            draft = HealthReport(
                taken_at=taken_at,
                check_seconds=0.0,
                long_query_threshold=self.settings.long_query_threshold,
                pools=pools,
                server=server,
                server_error=error,
                alerts=(),
            )
            conditions = rules.evaluate(draft, self.settings, self._timeouts_seen)
            self._timeouts_seen = {p.name: p.stats.timeouts_total for p in pools}
            self.alerts.update(conditions)
            report = dataclasses.replace(
                draft,
                check_seconds=time.perf_counter() - t0,
                alerts=tuple(self.alerts.active.values()),
            )
            self.latest = report
            self.checks_total += 1
            return report

    def _read_server(self) -> tuple[ServerSnapshot | None, str | None]:
        """Take a snapshot, re-making the connection once if it was lost."""
        for attempt in (1, 2):
            fresh = self._conn is None
            try:
                if self._conn is None:
                    self._conn = psycopg.connect(self._conninfo, autocommit=True)
                return take_snapshot(self._conn), None
            except psycopg.Error as ex:
                self.check_errors_total += 1
                self._drop_connection()
                text = " ".join(str(ex).split()) or type(ex).__name__  # one line
                error = redact(text, self._secrets)
                if fresh or attempt == 2:
                    logger.debug("health check could not read the server: %s", error)
                    return None, error
        raise AssertionError("unreachable")

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    # -- running in the background ------------------------------------------

    def start(self) -> None:
        """Check now, then every `health_check_interval`, in a daemon thread."""
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="pgwarden health monitor", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.check()
            except Exception:
                self.check_errors_total += 1
                logger.exception("health check failed")
            if self._stop.wait(self.settings.health_check_interval):
                return

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the background checks and close the monitor's connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            self._drop_connection()
        if self._webhook is not None:
            self._webhook.close(timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- serving --------------------------------------------------------------

    @property
    def registry(self) -> Any:
        """The `prometheus_client` registry with this monitor's metrics."""
        if self._registry is None:
            from .metrics import build_registry

            self._registry = build_registry(self)
        return self._registry

    def asgi_app(self) -> ASGIApp:
        """An ASGI app serving /healthz, /readyz, /metrics and /status."""
        from ..http.app import create_app

        return create_app(self)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _monitor_conninfo(conninfo: str) -> str:
    """The user's conninfo, as the monitor's own short-fused session."""
    return with_session(
        conninfo,
        application_name=APPLICATION_NAME,
        force_name=True,
        settings={
            "statement_timeout": STATEMENT_TIMEOUT_MS,
            "lock_timeout": LOCK_TIMEOUT_MS,
            "idle_in_transaction_session_timeout": 10_000,
        },
        connect_timeout=CONNECT_TIMEOUT,
    )


def _attribute(server: ServerSnapshot, pools: Sequence[PoolReport]) -> ServerSnapshot:
    """Mark the server sessions that belong to the attached pools."""
    return server.with_attributions(
        {
            c.pid: Attribution(
                pool=p.name,
                lane=c.lane,
                held_seconds=c.held_seconds,
                acquired_at=c.acquired_at,
            )
            for p in pools
            for c in p.connections
        }
    )
