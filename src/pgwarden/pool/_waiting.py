"""How a pooled asyncio connection waits for its socket.

psycopg's `wait_async()` arms a timer for every wait, to wake up at its
interrupt interval, and a query makes two or three waits (BEGIN, the query,
COMMIT). Creating, scheduling and cancelling a timer costs more than the rest
of a wait; under load, the cancelled timers also crowd the event loop's heap.
An asyncio wait needs no interrupt interval (Ctrl-C reaches the task through
the event loop), so the only timer left is the one enforcing a timeout, and one
per connection serves all of its waits: see `Alarm`.

Measured with 64 tasks over 4 connections (`bench/run.py`): 14 % less client
CPU per `SELECT 1` (189 against 219 µs) and 1.2x the throughput of the same
pool waiting with psycopg's function.

Registering the socket with the loop for one wait and removing it afterwards
costs two system calls and the loop's bookkeeping, again on every wait. While
other connections of the pool are on loan, a connection's socket stays
registered between waits instead: see `Reader`.
"""

from __future__ import annotations

import os
from asyncio import AbstractEventLoop, Future, TimerHandle, get_running_loop, sleep
from time import monotonic

from psycopg import errors as e
from psycopg import waiting
from psycopg.abc import RV, PQGen
from psycopg.waiting import READY_NONE, READY_R, READY_W, WAIT_R, WAIT_W

# As psycopg: how long waits that never block (a socket always writable, a
# generator done at once) may keep the event loop busy before yielding to it.
MAX_BUSY_TIME = 0.005

_last_yield = 0.0

# How early a timeout may fire (see Alarm._ring).
_EARLY = 0.001


# psycopg's zero-timeout readiness test (in C), as its wait_async() uses.
_ready = waiting._ready


class Alarm:
    """The timeout of one connection's waits, with one timer for all of them.

    The timer is armed for the first wait's deadline and left armed when the
    wait ends. A later wait, due later, keeps it: when the timer goes off early
    it re-arms itself for the deadline of the wait in progress, if any. So a
    connection busy with short queries schedules about one timer per timeout
    period instead of one per wait; a wait due sooner than the armed timer
    (a shorter timeout) replaces it.

    One wait at a time: psycopg's connection lock sees to that.
    """

    __slots__ = ("_deadline", "_fut", "_loop", "_timer", "_timer_at")

    def __init__(self) -> None:
        self._fut: Future[int] | None = None  # the wait in progress
        self._deadline = 0.0  # its deadline, in the loop's time
        self._loop: AbstractEventLoop | None = None
        self._timer: TimerHandle | None = None
        self._timer_at = 0.0

    def set(self, loop: AbstractEventLoop, fut: Future[int], deadline: float) -> None:
        """Resolve `fut` with READY_NONE at `deadline` unless it is done first."""
        self._fut = fut
        self._deadline = deadline
        if self._timer is None or self._timer_at > deadline or self._loop is not loop:
            if self._timer is not None:
                self._timer.cancel()
            self._loop = loop
            self._timer_at = deadline
            self._timer = loop.call_at(deadline, self._ring)

    def clear(self) -> None:
        """The wait is over (its timer stays armed for the next one)."""
        self._fut = None

    def _ring(self) -> None:
        self._timer = None
        fut = self._fut
        if fut is None or fut.done():
            return
        loop = self._loop
        assert loop is not None
        # A timer may go off a hair early (uvloop rounds to milliseconds):
        # that is not worth another round.
        if loop.time() + _EARLY >= self._deadline:
            fut.set_result(READY_NONE)
        else:  # armed for an earlier wait: now for this one
            self._timer_at = self._deadline
            self._timer = loop.call_at(self._deadline, self._ring)


class Reader:
    """Keeps a connection's socket registered for reading between its waits.

    The pool uses it while other connections of the pool are on loan too,
    when other tasks most likely keep the event loop busy: with 64 tasks over
    4 connections, it measured 1.4x the throughput of registering for each
    wait (`bench/run.py`). With one connection on loan the pool does not use
    it: a lone task's loop would go to sleep sooner after each send, and on a
    VM waking it up costs more than the calls saved (0.8x `direct` instead of
    0.97x).

    The registration is of a duplicate of libpq's socket (`os.dup()`): libpq
    may close its own (a lost connection, `close()`), and asyncio, still
    registered for that number, would then miss a new socket that reuses it.
    The duplicate is closed by `stop()`, which the pool calls before it closes
    the connection; when the loop sees the socket's end (the server closed
    it); or when the reader is garbage collected with its connection (a pool
    never closed, its loop gone).

    One wait at a time: psycopg's connection lock sees to that.
    """

    __slots__ = ("_fd", "_fut", "_loop", "_stale")

    def __init__(self) -> None:
        self._loop: AbstractEventLoop | None = None  # registered with
        self._fd = -1  # the duplicate
        self._fut: Future[int] | None = None  # the wait in progress
        self._stale = False  # the next event may be the last wait's

    @property
    def registered(self) -> bool:
        return self._loop is not None

    def watch(self, loop: AbstractEventLoop, fileno: int, fut: Future[int]) -> bool:
        """Resolve `fut` with READY_R once the socket `fileno` is readable.

        Return False if no duplicate could be made (no file descriptor left,
        or libpq closed its socket): the caller registers `fileno` as usual.
        """
        if self._loop is not loop:
            self.stop()
            try:
                fd = os.dup(fileno)
            except OSError:
                return False
            try:
                loop.add_reader(fd, self._readable)
            except BaseException:
                os.close(fd)
                raise
            self._loop = loop
            self._fd = fd
            self._stale = False
        self._fut = fut
        return True

    def done(self) -> None:
        """The wait is over; the socket stays registered."""
        self._fut = None

    def stop(self) -> None:
        """Stop watching the socket. A wait in progress is woken up, to look
        at the socket itself (which is how it learns that it was shut down)."""
        loop = self._loop
        if loop is None:
            return
        fd, fut = self._fd, self._fut
        self._loop = self._fut = None
        self._fd = -1
        try:
            loop.remove_reader(fd)  # nothing to do on a closed loop
        finally:
            os.close(fd)
        if fut is not None and not fut.done():
            fut.set_result(READY_R)

    def __del__(self) -> None:
        if self._fd >= 0:  # its loop is closed, or gone
            os.close(self._fd)

    def _readable(self) -> None:
        fut = self._fut
        if fut is not None and fut.done():
            return  # woken already; its task has yet to read
        if self._stale:
            # asyncio's own loop looks at the socket again before it runs the
            # task it woke, so the event after a wake-up may be that one's
            # again (about half of them); uvloop runs the task first.
            self._stale = False
            if not _ready(self._fd, WAIT_R):
                return
        if fut is None:
            # Something came while nobody waits (a notification, the end of
            # the session): stop watching rather than be told on every turn
            # of the loop. The next wait looks for itself.
            self.stop()
            return
        self._stale = True
        fut.set_result(READY_R)


def _wake(fut: Future[int], ready: int) -> None:
    if not fut.done():
        fut.set_result(ready)


async def wait_async(
    gen: PQGen[RV],
    fileno: int,
    alarm: Alarm,
    timeout: float | None,
    reader: Reader | None = None,
) -> RV:
    """Run psycopg's generator `gen` to completion on the socket `fileno`.

    Raise psycopg's `_WaitTimeout` if it takes longer than `timeout` seconds
    (None: no limit), as `psycopg.waiting.wait_async()` does. With `reader`,
    waits for reading go through it and leave the socket registered.
    """
    global _last_yield
    try:
        s = next(gen)
    except StopIteration as ex:
        if monotonic() - _last_yield >= MAX_BUSY_TIME:
            await sleep(0)
            _last_yield = monotonic()
        rv: RV = ex.value
        return rv

    loop = get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    try:
        while True:
            if s & WAIT_W:
                # A socket asked for writing is nearly always writable: a poll
                # costs less than a round of the event loop.
                if monotonic() - _last_yield >= MAX_BUSY_TIME:
                    await sleep(0)
                    _last_yield = monotonic()
                ready = _ready(fileno, s)
                if ready:
                    s = gen.send(ready)
                    if deadline is not None and loop.time() >= deadline:
                        raise e._WaitTimeout("wait timeout expired")
                    continue

            if not s & (WAIT_R | WAIT_W):
                raise e.InternalError(f"bad poll status: {s}")
            fut: Future[int] = loop.create_future()
            reading = writing = False
            try:
                if s & WAIT_R:
                    watched = reader is not None and reader.watch(loop, fileno, fut)
                    if not watched:
                        loop.add_reader(fileno, _wake, fut, READY_R)
                        reading = True
                if s & WAIT_W:
                    loop.add_writer(fileno, _wake, fut, READY_W)
                    writing = True
                if deadline is not None:
                    alarm.set(loop, fut, deadline)
                ready = await fut
            finally:
                alarm.clear()
                if reader is not None:
                    reader.done()
                if reading:
                    loop.remove_reader(fileno)
                if writing:
                    loop.remove_writer(fileno)
                _last_yield = monotonic()
            if not ready:
                raise e._WaitTimeout("wait timeout expired")
            s = gen.send(ready)
            if deadline is not None and loop.time() >= deadline:
                raise e._WaitTimeout("wait timeout expired")
    except OSError as ex:
        # add_reader() on a socket libpq has closed: the connection is gone.
        raise e.OperationalError("connection socket closed") from ex
    except StopIteration as ex:
        rv = ex.value
        return rv
