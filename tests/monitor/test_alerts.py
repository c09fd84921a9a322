"""Alerts: onset, repeat and resolution with a fake clock; the webhook sink
against a local HTTP server that answers, fails or hangs. No database needed."""

from __future__ import annotations

import base64
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgwarden.errors import ConfigError
from pgwarden.monitor.alerts import (
    AlertEvent,
    AlertManager,
    Condition,
    EventKind,
    LogSink,
    Severity,
)
from pgwarden.monitor.webhook import WebhookSink
from tests._util import wait_until

FIRED, REPEATED, RESOLVED = EventKind.FIRED, EventKind.REPEATED, EventKind.RESOLVED
WARNING, CRITICAL = Severity.WARNING, Severity.CRITICAL
KEY = "server.idle_in_transaction"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Recorder:
    """A sink that keeps the events it receives."""

    def __init__(self) -> None:
        self.events: list[AlertEvent] = []

    def __call__(self, event: AlertEvent) -> None:
        self.events.append(event)

    def timeline(self) -> list[tuple[float, EventKind]]:
        """(minutes after T0, kind) of each event."""
        return [((e.at - T0).total_seconds() / 60, e.kind) for e in self.events]


def condition(
    severity: Severity = WARNING, message: str = "2 sessions idle", key: str = KEY
) -> Condition:
    return Condition(key, severity, message, {"sessions": 2})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def manager(clock: FakeClock, recorder: Recorder) -> AlertManager:
    return AlertManager([recorder], clock=clock)


def check_every_30s(
    manager: AlertManager, clock: FakeClock, minutes: float, *conditions: Condition
) -> None:
    """Run the checks of `minutes` minutes, each finding `conditions`."""
    for _ in range(round(minutes * 2)):
        manager.update(conditions)
        clock.advance(30)


# -- timing -------------------------------------------------------------------


def test_an_hour_long_condition_gives_a_handful_of_events(
    manager: AlertManager, clock: FakeClock, recorder: Recorder
) -> None:
    check_every_30s(manager, clock, 60, condition())  # 120 checks
    manager.update([])

    assert recorder.timeline() == [
        (0, FIRED),
        (10, REPEATED),
        (20, REPEATED),
        (30, REPEATED),
        (40, REPEATED),
        (50, REPEATED),
        (60, RESOLVED),
    ]
    assert {e.alert.since for e in recorder.events} == {T0}
    assert [e.alert.notifications for e in recorder.events] == [1, 2, 3, 4, 5, 6, 7]
    resolved = recorder.events[-1]
    assert resolved.duration == 3600
    assert (
        resolved.describe()
        == f"RESOLVED {KEY} after 1 h (was warning: 2 sessions idle)"
    )
    assert manager.active == {}


def test_an_hour_long_condition_logs_seven_lines(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgwarden.health")
    manager = AlertManager(clock=clock)  # the default sink: the pgwarden.health log
    check_every_30s(manager, clock, 60, condition())
    manager.update([])

    records = [r for r in caplog.records if r.name == "pgwarden.health"]
    assert [r.levelname for r in records] == ["WARNING"] * 6 + ["INFO"]
    assert [r.getMessage() for r in records[:2]] == [
        f"ALERT {KEY} (warning): 2 sessions idle",
        f"ALERT {KEY} (warning) still active after 10 min: 2 sessions idle",
    ]
    assert records[0].alert_event["kind"] == "fired"  # type: ignore[attr-defined]


def test_the_latest_figures_are_kept_without_notifying(
    manager: AlertManager, clock: FakeClock, recorder: Recorder
) -> None:
    manager.update([condition()])
    clock.advance(30)
    latest = Condition(KEY, WARNING, "5 sessions idle", {"sessions": 5})
    assert manager.update([latest]) == []

    alert = manager.active[KEY]
    assert (alert.message, dict(alert.details), alert.since) == (
        "5 sessions idle",
        {"sessions": 5},
        T0,
    )
    clock.advance(600)
    (repeated,) = manager.update([latest])
    assert repeated.alert.message == "5 sessions idle"


def test_a_severity_change_is_notified_at_once_and_restarts_the_interval(
    manager: AlertManager, clock: FakeClock, recorder: Recorder
) -> None:
    check_every_30s(manager, clock, 5, condition(WARNING))
    check_every_30s(manager, clock, 15, condition(CRITICAL))
    check_every_30s(manager, clock, 1, condition(WARNING))

    assert recorder.timeline() == [
        (0, FIRED),
        (5, EventKind.ESCALATED),
        (15, REPEATED),
        (20, EventKind.DEESCALATED),
    ]
    escalated = recorder.events[1]
    assert (escalated.previous_severity, escalated.alert.severity) == (
        WARNING,
        CRITICAL,
    )
    assert escalated.alert.since == T0
    assert escalated.describe() == (
        f"ALERT {KEY} escalated to critical after 5 min: 2 sessions idle"
    )
    assert recorder.events[2].previous_severity is None


def test_a_flapping_condition_fires_and_resolves_each_time(
    manager: AlertManager, clock: FakeClock, recorder: Recorder
) -> None:
    # By design: a rule that should not flap requires its condition to last.
    for present in (True, False, True):
        manager.update([condition()] if present else [])
        clock.advance(30)

    assert recorder.timeline() == [(0, FIRED), (0.5, RESOLVED), (1, FIRED)]
    assert recorder.events[2].alert.since == T0 + timedelta(seconds=60)


def test_alerts_are_independent_and_the_most_severe_duplicate_wins(
    manager: AlertManager, clock: FakeClock, recorder: Recorder
) -> None:
    other = condition(key="pool.api.exhausted")
    manager.update([condition(WARNING), condition(CRITICAL), other])
    clock.advance(30)
    manager.update([other])

    assert [(e.kind, e.alert.key) for e in recorder.events] == [
        (FIRED, KEY),
        (FIRED, "pool.api.exhausted"),
        (RESOLVED, KEY),
    ]
    assert recorder.events[0].alert.severity is CRITICAL
    assert list(manager.active) == ["pool.api.exhausted"]


def test_active_is_a_read_only_snapshot(manager: AlertManager) -> None:
    manager.update([condition()])
    snapshot = manager.active
    manager.update([])

    assert list(snapshot) == [KEY]
    assert manager.active == {}
    with pytest.raises(TypeError):
        snapshot["x"] = snapshot[KEY]  # type: ignore[index]


def test_an_infinite_interval_never_repeats(
    clock: FakeClock, recorder: Recorder
) -> None:
    manager = AlertManager([recorder], repeat_interval=math.inf, clock=clock)
    check_every_30s(manager, clock, 600, condition())
    assert recorder.timeline() == [(0, FIRED)]


@pytest.mark.parametrize("interval", [0, -1, math.nan])
def test_the_repeat_interval_must_be_positive(interval: float) -> None:
    with pytest.raises(ConfigError, match="repeat interval"):
        AlertManager(repeat_interval=interval)


def test_the_clock_must_be_timezone_aware() -> None:
    manager = AlertManager([], clock=lambda: datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="aware"):
        manager.update([condition()])


def test_a_sink_that_raises_is_logged_and_the_others_still_run(
    clock: FakeClock, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: AlertEvent) -> None:
        raise RuntimeError("sink down")

    manager = AlertManager([broken, recorder], clock=clock)
    events = manager.update([condition()])

    assert recorder.events == events
    (record,) = [r for r in caplog.records if r.name == "pgwarden.health"]
    assert record.levelname == "ERROR"
    assert f"failed on fired {KEY}" in record.getMessage()
    assert record.exc_info is not None


def test_the_log_sink_levels(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.alerts")
    manager = AlertManager([LogSink("app.alerts")], clock=clock)
    manager.update([condition(CRITICAL)])
    manager.update([condition(WARNING)])
    manager.update([])
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING", "INFO"]


@given(
    st.lists(
        st.tuples(st.sampled_from([None, WARNING, CRITICAL]), st.integers(1, 900)),
        max_size=40,
    )
)
def test_invariants_for_any_schedule(steps: list[tuple[Severity | None, int]]) -> None:
    clock, recorder = FakeClock(), Recorder()
    manager = AlertManager([recorder], repeat_interval=600, clock=clock)
    previous: AlertEvent | None = None  # the last event of the current alert
    for severity, gap in steps:
        clock.advance(gap)
        events = manager.update([] if severity is None else [condition(severity)])
        assert (KEY in manager.active) is (severity is not None)
        assert len(events) <= 1
        for event in events:
            assert event.at == clock.now
            if previous is None:
                assert (event.kind, event.alert.since) == (FIRED, clock.now)
            else:
                assert event.alert.since == previous.alert.since
                assert event.alert.notifications == previous.alert.notifications + 1
                if event.kind is REPEATED:
                    assert event.at - previous.at >= timedelta(seconds=600)
            previous = None if event.kind is RESOLVED else event


def test_the_event_dict_is_json_ready(manager: AlertManager, clock: FakeClock) -> None:
    manager.update([condition()])
    clock.advance(90)
    (event,) = manager.update([condition(CRITICAL)])

    assert json.loads(json.dumps(event.to_dict())) == {
        "version": 1,
        "kind": "escalated",
        "text": f"ALERT {KEY} escalated to critical after 1 min 30 s: 2 sessions idle",
        "key": KEY,
        "severity": "critical",
        "previous_severity": "warning",
        "message": "2 sessions idle",
        "details": {"sessions": 2},
        "since": "2025-03-01T12:00:00+00:00",
        "at": "2025-03-01T12:01:30+00:00",
        "duration_seconds": 90.0,
        "notifications": 2,
    }


# -- the webhook --------------------------------------------------------------

HANG = 0  # a scripted status: read the request and never answer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A local webhook endpoint answering the scripted `statuses`, then 200."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.received: list[Received] = []
        self.release = threading.Event()  # ends the hanging requests
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append(Received(self.path, dict(self.headers), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                if status == HANG:
                    receiver.release.wait(10)
                    return
                self.send_response(status)
                self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        serve = self.server.serve_forever
        kwargs = {"poll_interval": 0.02}  # shutdown() waits up to this long
        threading.Thread(target=serve, kwargs=kwargs, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.stop()


MakeSink = Callable[..., WebhookSink]


@pytest.fixture
def make_sink(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> Iterator[MakeSink]:
    """WebhookSink(receiver.url, short timeouts, **overrides), closed at the end."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    sinks: list[WebhookSink] = []

    def make(url: str = receiver.url, **options: Any) -> WebhookSink:
        options = {"timeout": 0.2, "retries": 2, "backoff": 0.05, **options}
        sinks.append(WebhookSink(url, **options))
        return sinks[-1]

    yield make
    receiver.release.set()
    for sink in sinks:
        assert sink.close(timeout=5)


def fire(sink: WebhookSink, key: str = KEY) -> AlertEvent:
    (event,) = AlertManager([sink]).update([condition(key=key)])
    return event


def test_the_webhook_posts_the_event_as_json(
    receiver: Receiver, make_sink: MakeSink
) -> None:
    sink = make_sink()
    event = fire(sink)
    wait_until(lambda: sink.delivered == 1, message="delivery")

    (request,) = receiver.received
    assert request.path == "/hook"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.body) == event.to_dict()
    assert (sink.failed, sink.dropped) == (0, 0)


def test_server_errors_are_retried(receiver: Receiver, make_sink: MakeSink) -> None:
    receiver.statuses = [500, 503]
    sink = make_sink()
    fire(sink)
    wait_until(lambda: sink.delivered == 1, message="delivery")

    assert len(receiver.received) == 3
    assert len({r.body for r in receiver.received}) == 1
    assert sink.failed == 0


@pytest.mark.parametrize("status", [404, 302])
def test_client_errors_and_redirects_are_not_retried(
    receiver: Receiver,
    make_sink: MakeSink,
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    receiver.statuses = [status]
    sink = make_sink()
    fire(sink)
    wait_until(lambda: sink.failed == 1, message="giving up")

    assert len(receiver.received) == 1
    assert sink.delivered == 0
    assert f"after 1 attempt(s): HTTP {status}" in caplog.text


def test_a_hanging_server_never_blocks_the_checks(
    receiver: Receiver, make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [HANG] * 3
    sink = make_sink()
    manager = AlertManager([sink])

    started = time.monotonic()
    manager.update([condition()])
    assert time.monotonic() - started < 0.05

    # 3 tries of 0.2 s with 0.05 + 0.1 s in between
    wait_until(lambda: sink.failed == 1, timeout=3, message="giving up")
    assert len(receiver.received) == 3
    assert "after 3 attempt(s): timed out" in caplog.text


def test_a_full_queue_drops_events_with_one_warning(
    receiver: Receiver, make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [HANG]
    sink = make_sink(retries=0, timeout=5, queue_size=2)
    fire(sink, "a")
    wait_until(lambda: receiver.received, message="the first request")
    for key in ("b", "c", "d", "e"):  # b and c are queued
        fire(sink, key)

    assert sink.dropped == 2
    drops = [r for r in caplog.records if "dropping" in r.getMessage()]
    assert [r.getMessage() for r in drops] == [
        f"alert webhook {sink.safe_url}: 2 queued; dropping fired d"
        " and more until it drains"
    ]
    receiver.release.set()
    wait_until(lambda: sink.delivered == 2, message="the queued events")
    assert [json.loads(r.body)["key"] for r in receiver.received] == ["a", "b", "c"]


def test_close_delivers_the_queued_events_then_stops(
    receiver: Receiver, make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    sink = make_sink()
    for key in ("a", "b", "c"):
        fire(sink, key)

    assert sink.close(timeout=5)
    assert sink.delivered == 3
    fire(sink, "late")
    assert sink.dropped == 1
    assert "is closed; dropping fired late" in caplog.text


def test_close_gives_up_on_a_hanging_server(
    receiver: Receiver, make_sink: MakeSink
) -> None:
    receiver.statuses = [HANG] * 10
    sink = make_sink(timeout=0.5, retries=10)
    fire(sink)
    fire(sink, "queued")
    wait_until(lambda: receiver.received, message="the first request")

    started = time.monotonic()
    assert not sink.close(timeout=0.1)
    assert time.monotonic() - started < 0.3
    # No more tries: the thread ends when the request in flight times out.
    assert sink.close(timeout=2)
    assert (sink.failed, len(receiver.received)) == (1, 1)


def test_url_credentials_are_sent_but_never_logged(
    receiver: Receiver, make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [403]
    url = receiver.url.replace("//", "//bot:s3cret@") + "?token=t0ken"
    sink = make_sink(url)
    fire(sink)
    wait_until(lambda: sink.failed == 1, message="giving up")

    (request,) = receiver.received
    assert request.path == "/hook?token=t0ken"
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(
        b"bot:s3cret"
    ).decode("ascii")
    assert (
        repr(sink) == f"WebhookSink('http://127.0.0.1:{receiver.server.server_port}')"
    )
    assert "HTTP 403" in caplog.text
    assert "s3cret" not in caplog.text
    assert "t0ken" not in caplog.text


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("ftp://bot:s3cret@example.com/hook", {}),
        ("example.com/hook", {}),
        ("https://example.com/hook", {"timeout": 0}),
        ("https://example.com/hook", {"queue_size": 0}),
    ],
)
def test_bad_webhook_settings_are_refused(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        WebhookSink(url, **options)
    assert "s3cret" not in str(excinfo.value)
