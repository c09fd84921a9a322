"""`WebhookSink`: alert events POSTed as JSON, never holding up a check.

Imported only when a webhook is configured: it brings in the standard
library's HTTP client. The body is `AlertEvent.to_dict()` (see
`pgwarden.monitor.alerts`).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.error import HTTPError
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import HTTPRedirectHandler, Request, build_opener

from ..errors import ConfigError
from .alerts import AlertEvent

__all__ = ["WebhookSink"]

logger = logging.getLogger("pgwarden.health")


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
