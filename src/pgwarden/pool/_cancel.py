"""Asking the server to stop a query after its connection was given up.

When a query times out on the client or its task is cancelled, the pool closes
the connection at once (the caller must not wait on a server that may not
answer) and sends the cancel request from a short-lived background thread,
bounded by a timeout, so the server does not keep running a query nobody waits
for.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from time import monotonic
from typing import Any

from psycopg import capabilities
from psycopg.pq import PollingStatus

logger = logging.getLogger("pgwarden.pool")

_OK = PollingStatus.OK
_READING = PollingStatus.READING
_WRITING = PollingStatus.WRITING


def abandon(pgconn: Any, timeout: float) -> None:
    """Close `pgconn` now; cancel its running query in the background."""
    cancel = _prepare(pgconn)
    pgconn.finish()
    _send_later(cancel, timeout)


def interrupt(pgconn: Any, timeout: float) -> None:
    """Cut `pgconn` off while someone else may be inside libpq with it.

    The TCP session is shut down (whoever waits on it sees the end of the
    stream and fails cleanly) and its query cancelled in the background, but
    `pgconn` is not freed under its user: it is finished when it is garbage
    collected.
    """
    cancel = _prepare(pgconn)
    shutdown_socket(pgconn)
    _send_later(cancel, timeout)


def shutdown_socket(pgconn: Any) -> None:
    """End a connection's TCP session without touching its libpq state."""
    try:
        with socket.socket(fileno=pgconn.socket) as s:
            try:
                s.shutdown(socket.SHUT_RDWR)
            finally:
                s.detach()
    except Exception:
        pass  # already closed


def _prepare(pgconn: Any) -> Any:
    try:
        if capabilities.has_cancel_safe():
            cancel = pgconn.cancel_conn()
            cancel.start()
            return cancel
        return pgconn.get_cancel()
    except Exception as ex:
        logger.debug("could not prepare a cancel request: %s", ex)
        return None


def _send_later(cancel: Any, timeout: float) -> None:
    if cancel is not None:
        threading.Thread(
            target=_send, args=(cancel, timeout), name="pgwarden cancel", daemon=True
        ).start()


def _send(cancel: Any, timeout: float) -> None:
    try:
        if not hasattr(cancel, "poll"):  # libpq < 17: blocking, no timeout
            cancel.cancel()
            return
        deadline = monotonic() + timeout
        while (status := cancel.poll()) != _OK:
            if status not in (_READING, _WRITING):
                raise OSError(cancel.get_error_message())
            fd = [cancel.socket]
            wait = deadline - monotonic()
            if wait <= 0:
                raise TimeoutError(f"no answer in {timeout:g} s")
            if status == _READING:
                ready = select.select(fd, [], [], wait)[0]
            else:
                ready = select.select([], fd, [], wait)[1]
            if not ready:
                raise TimeoutError(f"no answer in {timeout:g} s")
    except Exception as ex:
        logger.debug("cancel request not delivered: %s", ex)
    finally:
        if hasattr(cancel, "finish"):
            cancel.finish()
