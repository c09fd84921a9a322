"""`create_app`: a `HealthMonitor`'s endpoints as a Starlette application.

Mount it as it is in a FastAPI or Starlette service
(``app.mount("/db", monitor.asgi_app())``) or serve it alone
(``pgwarden monitor``). It answers from what the monitor already knows: no
request queries the database.

    GET /healthz  200 while the monitor runs (or checked within 3 intervals)
    GET /readyz   200 if the database answered the last check and no pool is
                  exhausted, else 503; the body says why:
                  {"ready": false, "reason": "pool exhausted: api"}
    GET /metrics  Prometheus text exposition (docs/metrics.md)
    GET /status   the last report as JSON (`HealthReport.to_dict`), whose
                  ``server`` object is what ``pgwarden status --json`` prints;
                  503 before the first check

`/status` shows the sessions' query previews: serve it to operators only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from ..monitor.monitor import HealthMonitor
    from ..monitor.report import HealthReport

__all__ = ["STALE_CHECKS", "create_app"]

STALE_CHECKS = 3
"""A report older than this many check intervals no longer counts."""

NO_CHECK_YET = "no check has run yet"

_INDEX = """\
pgwarden health monitor
  healthz  the monitor runs
  readyz   the database answers and no pool is exhausted (else 503)
  metrics  Prometheus metrics
  status   the last report as JSON
"""


def create_app(monitor: HealthMonitor) -> Starlette:
    """An ASGI app serving `monitor`'s /healthz, /readyz, /metrics and /status.

    The endpoints are plain functions, which Starlette runs in its thread
    pool: reading the pools' stats takes their locks, never the event loop.
    """

    def index(request: Request) -> Response:
        return PlainTextResponse(_INDEX)

    def healthz(request: Request) -> Response:
        report = monitor.latest
        age = None if report is None else _age(report)
        ok = monitor.running or (age is not None and not _stale(monitor, age))
        body = {
            "ok": ok,
            "running": monitor.running,
            "checks_total": monitor.checks_total,
            "last_check_seconds_ago": None if age is None else round(age, 3),
        }
        return _json(body, 200 if ok else 503)

    def readyz(request: Request) -> Response:
        ready, reason = _readiness(monitor)
        return _json({"ready": ready, "reason": reason}, 200 if ready else 503)

    def metrics(request: Request) -> Response:
        return Response(
            generate_latest(monitor.registry), media_type=CONTENT_TYPE_LATEST
        )

    def status(request: Request) -> Response:
        report = monitor.latest
        if report is None:
            return _json({"ready": False, "reason": NO_CHECK_YET}, 503)
        return _json(report.to_dict(), 200)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/status", status),
        ]
    )


def _readiness(monitor: HealthMonitor) -> tuple[bool, str]:
    report = monitor.latest
    if report is None:
        return False, NO_CHECK_YET
    age = _age(report)
    if _stale(monitor, age):
        return False, f"the last check is {age:.0f} s old: the monitor is not checking"
    return report.readiness()


def _age(report: HealthReport) -> float:
    return max((datetime.now(UTC) - report.taken_at).total_seconds(), 0.0)


def _stale(monitor: HealthMonitor, age: float) -> bool:
    return age > STALE_CHECKS * monitor.settings.health_check_interval


def _json(body: dict[str, Any], status_code: int) -> Response:
    return JSONResponse(body, status_code, headers={"Cache-Control": "no-store"})
