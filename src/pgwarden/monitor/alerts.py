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
line per event to the ``pgwarden.health`` logger; `WebhookSink` (in
`pgwarden.monitor.webhook`) POSTs the event as JSON from a background
thread. A sink that raises is logged and skipped.

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

import functools
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import Any

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


def _human_duration(seconds: float) -> str:
    total = max(0, math.floor(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{secs} s"
