"""Alerts that fire once, repeat rarely and resolve once.

Health checks run often (every 30 s, say) and each one reports every
`Condition` that is true right now. `AlertManager.update` turns that stream into
a few `AlertEvent`s: ``fired`` when a condition starts, ``repeated`` at most
every ``repeat_interval`` seconds while it lasts, ``escalated`` or
``de-escalated`` at once when its severity changes, and ``resolved`` when a
check no longer reports it. A condition lasting an hour therefore gives 7 log
lines with the default interval of 10 minutes, not 120. A condition that comes
and goes between checks fires and resolves each time: a rule that should not
flap says so itself (for example "exhausted for 60 s" rather than "exhausted").

Events go to sinks: any callable taking an `AlertEvent`. `LogSink` writes one
line per event to the ``pgwarden.health`` logger; `WebhookSink` POSTs the event
as JSON from a background thread. A sink that raises is logged and skipped.

The webhook body (``AlertEvent.to_dict()``) is one JSON object::

    version            1 (the version of this format)
    kind               "fired" | "repeated" | "escalated" | "de-escalated"
                       | "resolved"
    text               one line for a person, the one `LogSink` writes
    key                stable identifier, e.g. "server.idle_in_transaction"
    severity           "warning" | "critical" (the latest, for "resolved" too)
    previous_severity  the severity before an (de-)escalation, else null
    message            the latest description, e.g. "2 sessions idle in ..."
    details            object with the latest figures, as the rule gave them
    since              when the condition started (ISO 8601, UTC)
    at                 when this event happened (ISO 8601, UTC)
    duration_seconds   at - since: how long the condition has lasted
    notifications      events sent for this alert so far, this one included
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import Any
from urllib.error import HTTPError
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import HTTPRedirectHandler, Request, build_opener

from ..errors import ConfigError

__all__ = [
    "DEFAULT_REPEAT_INTERVAL",
    "Alert",
    "AlertEvent",
    "AlertManager",
    "Condition",
    "EventKind",
    "LogSink",
    "Severity",
    "Sink",
    "WebhookSink",
]

DEFAULT_REPEAT_INTERVAL = 600.0
logger = logging.getLogger("pgwarden.health")


@functools.total_ordering
class Severity(Enum):
    """How bad a condition is; ``WARNING < CRITICAL``."""

    WARNING = "warning"
    CRITICAL = "critical"

    def __str__(self) -> str:
        return self.value

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return _RANK[self] < _RANK[other]


_RANK = {severity: rank for rank, severity in enumerate(Severity)}


class EventKind(StrEnum):
    """What happened to an alert."""

    FIRED = "fired"
    REPEATED = "repeated"
    ESCALATED = "escalated"
    DEESCALATED = "de-escalated"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class Condition:
    """Something a health rule finds wrong right now.

    `key` must stay the same while the problem lasts (it identifies the alert);
    `message` is a sentence for a person and may change from check to check;
    `details` holds JSON-ready figures (it is copied and made read-only).
    """

    key: str
    severity: Severity
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("a condition needs a non-empty key")
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))


@dataclass(frozen=True)
class Alert:
    """An active alert: a condition that has held since `since`.

    `severity`, `message` and `details` are those of the latest check;
    `last_notified` and `notifications` are the time and the number of the
    events sent for it so far.
    """

    key: str
    severity: Severity
    message: str
    details: Mapping[str, Any]
    since: datetime
    last_notified: datetime
    notifications: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, for reports and ``/readyz``."""
        return {
            "key": self.key,
            "severity": self.severity.value,
            "message": self.message,
            "details": dict(self.details),
            "since": self.since.isoformat(),
            "last_notified": self.last_notified.isoformat(),
            "notifications": self.notifications,
        }


@dataclass(frozen=True)
class AlertEvent:
    """What a sink receives: `alert` as it is after the event, at `at`."""

    kind: EventKind
    alert: Alert
    at: datetime
    previous_severity: Severity | None = None

    @property
    def duration(self) -> float:
        """Seconds from the onset of the condition to this event."""
        return (self.at - self.alert.since).total_seconds()

    def describe(self) -> str:
        """One line for a person, e.g. for a log or a chat message."""
        a, kind, lasted = self.alert, self.kind, _human_duration(self.duration)
        if kind is EventKind.RESOLVED:
            return f"RESOLVED {a.key} after {lasted} (was {a.severity}: {a.message})"
        if kind is EventKind.FIRED:
            what = f"({a.severity})"
        elif kind is EventKind.REPEATED:
            what = f"({a.severity}) still active after {lasted}"
        else:
            what = f"{kind} to {a.severity} after {lasted}"
        return f"ALERT {a.key} {what}: {a.message}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready body of a webhook (see the module's documentation)."""
        prev = self.previous_severity
        body: dict[str, Any] = {"version": 1, "kind": self.kind.value}
        body["text"] = self.describe()
        body |= self.alert.to_dict()
        del body["last_notified"]  # the same as "at"
        body["previous_severity"] = None if prev is None else prev.value
        body["at"] = self.at.isoformat()
        body["duration_seconds"] = self.duration
        return body


Sink = Callable[[AlertEvent], object]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _notified(alert: Alert, now: datetime) -> Alert:
    return replace(alert, last_notified=now, notifications=alert.notifications + 1)


class AlertManager:
    """Turns the conditions each check finds into alert events for the sinks.

    `sinks` default to a single `LogSink`; `clock` returns the current time as
    an aware datetime (tests pass a fake one). Call `update` from one checker
    thread; `active` can be read from any thread.
    """

    def __init__(
        self,
        sinks: Iterable[Sink] | None = None,
        *,
        repeat_interval: float = DEFAULT_REPEAT_INTERVAL,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if not repeat_interval > 0:  # also rejects NaN; math.inf never repeats
            raise ConfigError(
                f"alert repeat interval must be > 0 seconds, got {repeat_interval!r}"
            )
        self.sinks: list[Sink] = [LogSink()] if sinks is None else list(sinks)
        self.repeat_interval = repeat_interval
        self._clock = clock
        self._lock = threading.Lock()
        # Replaced, never mutated, so that readers need no lock.
        self._active: dict[str, Alert] = {}

    @property
    def active(self) -> Mapping[str, Alert]:
        """The active alerts by key: a read-only snapshot."""
        return MappingProxyType(self._active)

    def update(self, conditions: Iterable[Condition]) -> list[AlertEvent]:
        """Record the conditions true now; notify the sinks and return the events.

        Give every condition currently true: an active alert whose key is
        missing is resolved. If a key appears twice, the most severe wins.
        """
        with self._lock:
            now = self._clock()
            if now.tzinfo is None:
                raise ValueError("the alert clock must return an aware datetime")
            now = now.astimezone(UTC)
            latest: dict[str, Condition] = {}
            for cond in conditions:
                seen = latest.get(cond.key)
                if seen is None or cond.severity >= seen.severity:
                    latest[cond.key] = cond
            events: list[AlertEvent] = []
            active: dict[str, Alert] = {}
            for key, cond in latest.items():
                active[key], event = self._advance(self._active.get(key), cond, now)
                if event is not None:
                    events.append(event)
            for key, old in self._active.items():
                if key not in latest:
                    events.append(
                        AlertEvent(EventKind.RESOLVED, _notified(old, now), now)
                    )
            self._active = active
            for event in events:
                self._dispatch(event)
            return events

    def _advance(
        self, old: Alert | None, cond: Condition, now: datetime
    ) -> tuple[Alert, AlertEvent | None]:
        """The alert for `cond` after this check, and the event to send if any."""
        latest: dict[str, Any] = {
            "severity": cond.severity,
            "message": cond.message,
            "details": cond.details,
        }
        if old is None:
            alert = Alert(
                cond.key, **latest, since=now, last_notified=now, notifications=1
            )
            return alert, AlertEvent(EventKind.FIRED, alert, now)
        previous = old.severity if cond.severity != old.severity else None
        if previous is not None:
            up = cond.severity > previous
            kind = EventKind.ESCALATED if up else EventKind.DEESCALATED
        elif (now - old.last_notified).total_seconds() >= self.repeat_interval:
            kind = EventKind.REPEATED
        else:
            return replace(old, **latest), None
        alert = replace(_notified(old, now), **latest)
        return alert, AlertEvent(kind, alert, now, previous)

    def _dispatch(self, event: AlertEvent) -> None:
        for sink in self.sinks:
            try:
                sink(event)
            except Exception:
                kind, key = event.kind, event.alert.key
                logger.exception("alert sink %r failed on %s %s", sink, kind, key)


class LogSink:
    """Writes one line per event: WARNING or ERROR (critical), INFO when resolved.

    The record carries the event's `AlertEvent.to_dict()` as ``alert_event``,
    for handlers that write structured logs.
    """

    def __init__(self, logger: logging.Logger | str = "pgwarden.health") -> None:
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger

    def __call__(self, event: AlertEvent) -> None:
        if event.kind is EventKind.RESOLVED:
            level = logging.INFO
        elif event.alert.severity is Severity.CRITICAL:
            level = logging.ERROR
        else:
            level = logging.WARNING
        self.logger.log(
            level, "%s", event.describe(), extra={"alert_event": event.to_dict()}
        )

    def __repr__(self) -> str:
        return f"LogSink({self.logger.name!r})"


class _NoRedirect(HTTPRedirectHandler):
    # Following a redirect would turn the POST into a GET: a lost alert that
    # looks delivered. A 3xx is reported as a failure instead.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class WebhookSink:
    """POSTs each event as JSON to `url`, from one background thread.

    Calling the sink only queues the event (up to `queue_size`; beyond that
    events are dropped, with one warning per burst), so checks never wait on
    the network. Each event is tried ``1 + retries`` times, `timeout` seconds
    each, waiting ``backoff * 2**n`` seconds between tries; connection errors,
    timeouts, 408, 429 and 5xx responses are retried, other 4xx and 3xx are
    not. Credentials in the URL (``https://user:token@host/...``) are sent as
    HTTP basic auth; `headers` are added to (or replace) ``Content-Type`` and
    ``User-Agent``. Logs name the scheme and host only, never the path, query
    or credentials. Call `close` to deliver what is queued and stop the thread.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 1.0,
        headers: Mapping[str, str] | None = None,
        queue_size: int = 100,
    ) -> None:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        if parts.scheme not in ("http", "https") or not parts.hostname:
            got = f"{parts.scheme}://{host}..."
            raise ConfigError(f"alert webhook URL must be http(s)://host/...: {got}")
        if not (timeout > 0 and retries >= 0 and backoff >= 0 and queue_size > 0):
            raise ConfigError(
                "alert webhook needs timeout > 0, retries >= 0, backoff >= 0 and"
                f" queue_size > 0; got {timeout}, {retries}, {backoff}, {queue_size}"
            )
        self.safe_url = f"{parts.scheme}://{host}"
        self._headers = {"Content-Type": "application/json", "User-Agent": "pgwarden"}
        if parts.username is not None or parts.password is not None:
            creds = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
            token = base64.b64encode(creds.encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
            url = urlunsplit(parts._replace(netloc=host))
        self._headers.update(headers or {})
        self._url = url
        self._timeout, self._retries, self._backoff = timeout, retries, backoff
        self._opener = build_opener(_NoRedirect)
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(queue_size)
        self._lock = threading.Lock()
        self._closed = False
        self._dropping = False
        self._abandon = threading.Event()
        self.delivered = 0
        """Events the server accepted (2xx)."""
        self.failed = 0
        """Events given up on after the last try."""
        self.dropped = 0
        """Events not queued: the queue was full or the sink closed."""
        self._thread = threading.Thread(
            target=self._run, name=f"pgwarden-webhook {self.safe_url}", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"WebhookSink({self.safe_url!r})"

    def __call__(self, event: AlertEvent) -> None:
        label = f"{event.kind} {event.alert.key}"
        body = json.dumps(event.to_dict(), default=str).encode()
        with self._lock:  # events enter the queue only here: full() can't go stale
            accepted = not self._closed and not self._queue.full()
            if accepted:
                self._queue.put_nowait((label, body))
            else:
                self.dropped += 1
            warn, self._dropping = not accepted and not self._dropping, not accepted
        if warn and self._closed:
            msg = "alert webhook %s is closed; dropping %s and any later event"
            logger.warning(msg, self.safe_url, label)
        elif warn:
            msg = "alert webhook %s: %d queued; dropping %s and more until it drains"
            logger.warning(msg, self.safe_url, self._queue.maxsize, label)

    def close(self, timeout: float = 5.0) -> bool:
        """Stop taking events, deliver the queued ones for up to `timeout` seconds.

        Returns whether the thread has stopped. If not, it gives up the rest and
        stops once the request in flight ends (within the sink's timeout).
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closed = True
        try:
            if self._thread.is_alive():
                self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if not self._thread.is_alive():
            return True
        if not self._abandon.is_set():
            self._abandon.set()
            msg = "alert webhook %s: still busy after %.1f s; dropping what is queued"
            logger.warning(msg, self.safe_url, timeout)
        return False

    def _run(self) -> None:
        while (item := self._queue.get()) is not None and not self._abandon.is_set():
            label, body = item
            try:
                self._deliver(label, body)
            except Exception:
                self.failed += 1
                logger.exception("alert webhook %s: failed on %s", self.safe_url, label)

    def _deliver(self, label: str, body: bytes) -> None:
        tries, error = 0, ""
        while tries <= self._retries:
            if tries and self._abandon.wait(self._backoff * 2 ** (tries - 1)):
                break
            tries += 1
            request = Request(
                self._url, data=body, headers=self._headers, method="POST"
            )
            try:
                self._opener.open(request, timeout=self._timeout).close()
            except HTTPError as exc:
                exc.close()
                error = f"HTTP {exc.code} {exc.reason}"
                if exc.code < 500 and exc.code not in (408, 429):
                    break
            except (OSError, http.client.HTTPException) as exc:
                error = str(exc) or type(exc).__name__
            else:
                self.delivered += 1
                return
        self.failed += 1
        msg = "alert webhook %s: gave up on %s after %d attempt(s): %s"
        logger.warning(msg, self.safe_url, label, tries, error)


def _human_duration(seconds: float) -> str:
    total = max(0, math.floor(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{secs} s"
