# WARNING: generated from pool_async.py by tools/async_to_sync.py.
# DO NOT CHANGE THIS FILE: change pool_async.py and run the tool.
"""`Pool`: the connection pool for threads.

`pool.py` (`Pool`, for threads) is generated from this file by
`tools/async_to_sync.py`: change this file, then run the tool.

The pool's decisions are made by `PoolCore` under `self._lock`; this file does
the I/O those decisions call for (connecting, checking, rolling back, closing),
outside the lock, and runs the background maintenance.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import weakref
from collections.abc import Callable
from sys import getrefcount
from time import monotonic
from types import TracebackType
from typing import Any
from weakref import getweakrefcount

import psycopg
from psycopg.pq import TransactionStatus

from .._conninfo import redact, secrets_of
from ..config import PoolConfig
from ..errors import (
    ConnectionReturned,
    PoolClosed,
    PoolOverloaded,
    PoolTimeout,
    UnknownLane,
)
from . import _core, _messages
from ._acompat import (
    Event,
    Lock,
    Waiter,
    current_holder,
    gather,
    prepare,
    spawn,
)
from ._cancel import interrupt, shutdown_socket
from ._core import Entry, Lane, PoolCore
from .connection import (
    CANCEL_TIMEOUT,
    PooledConnection,
    ReturnedConnection,
)
from .stats import ConnectionInfo, PoolStats, describe, snapshot

logger = logging.getLogger("pgwarden.pool")

_IDLE = TransactionStatus.IDLE
_INTRANS = TransactionStatus.INTRANS
_ACTIVE = TransactionStatus.ACTIVE
_RESETTABLE = (_IDLE, _INTRANS, TransactionStatus.INERROR)

# A reset query that drops the session's prepared statements.
_DROPS_PREPARED = re.compile(
    r"\b(DISCARD\s+ALL|DEALLOCATE\s+(PREPARE\s+)?ALL)\b", re.IGNORECASE
).search

# How long close() waits for background work to stop.
_STOP_TIMEOUT = 5.0


class Pool:
    """A pool of PostgreSQL connections for threads, with lanes and health checks.

    `config` is a `PoolConfig`, a conninfo string, or None (the defaults);
    keyword arguments override any `PoolConfig` field. Use it as
    `with Pool(...) as pool:`, or call `open()` and `close()`.

    `name` identifies the pool in logs, errors and metrics.
    """

    def __init__(
        self,
        config: PoolConfig | str | None = None,
        *,
        name: str | None = None,
        **overrides: Any,
    ) -> None:
        self.config = cfg = PoolConfig.coerce(config, **overrides)
        self.name = name or f"pool-{next(_core.pool_numbers)}"
        self._conninfo = cfg.session_conninfo()
        self._secrets = secrets_of(cfg.conninfo)
        self._core = _new_core(cfg)
        self._lock = Lock()
        self._ref = weakref.ref(self)
        _pools.add(self)
        # Tests freeze races at named hand-off points ("validate", "rollback",
        # "connect", "assign"): name -> callable(entry), awaited if it returns
        # an awaitable. None in production: one attribute test per point.
        self._seams: dict[str, Callable[[Entry], Any]] | None = None
        self._query_timeout = cfg.query_timeout or None
        self._test_on_borrow = cfg.test_on_borrow
        self._reset_query = cfg.reset_query
        self._reset_drops_prepared = bool(_DROPS_PREPARED(cfg.reset_query))
        self._opened = False
        self._reopen_after_fork = False
        self._tasks: set[Any] = set()
        # Background work asked for under the lock, started once it is let go
        # (see _start_spawned): each one's starter, and what it does.
        self._spawns: list[tuple[Callable[[], bool], str]] = []
        self._wakeup: Event | None = None  # nudges the maintenance loop
        # Maintenance runs every WATCH_INTERVAL: the adaptive limit holds back.
        self._watching = False
        self._ready: Event | None = None  # set once min_size connections are open
        self._drained: Event | None = None  # set when the last borrower returns
        # Run the maintenance step often enough for the tightest setting.
        self._tick = min(
            1.0,
            cfg.eviction_interval,
            cfg.idle_timeout / 2,
            cfg.leak_detection_threshold / 4 or 1.0,
        )

    def __repr__(self) -> str:
        core = self._core
        state = "closed" if core.closed else "open" if self._opened else "not open"
        return (
            f"<{type(self).__qualname__} {self.name!r} {state}"
            f" size={core.size} idle={len(core.idle)} in_use={core.busy}"
            f" waiting={core.n_waiting} conninfo={self.config.safe_conninfo!r}>"
        )

    # -- lifecycle ----------------------------------------------------------

    def open(self, wait: bool = False, timeout: float | None = None) -> None:
        """Start the pool: connections are opened in the background.

        With `wait`, return only once `min_size` connections are open, raising
        `PoolTimeout` after `timeout` (default: `connection_timeout`) seconds.
        Opening an open pool does nothing; a closed pool can't be reopened.
        """
        if self._core.closed:
            raise PoolClosed(f"pool {self.name!r} is closed; it can't be reopened")
        if not self._opened:
            self._opened = True
            self._wakeup = Event()
            self._ready = Event()
            self._drained = Event()
            self._spawn(_maintenance_loop, self._ref, name="maintenance")
        if wait:
            self.wait(timeout)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until `min_size` connections are open (`PoolTimeout` if not)."""
        if timeout is None:
            timeout = self.config.connection_timeout
        assert self._ready is not None, "open() the pool first"
        if len(self._core.entries) >= self._core.min_size:
            return
        if not self._ready.wait_timeout(timeout):
            with self._lock:
                core = self._core
                msg = (
                    f"pool {self.name!r} has {len(core.entries)} of min_size"
                    f" {core.min_size} connections open after {timeout:g} s"
                )
                if core.last_error:
                    msg += f"; last connection error: {core.last_error}"
            raise self._timeout(msg, core.last_error)

    def close(self, timeout: float = 5.0) -> None:
        """Close the pool and its connections.

        Callers waiting for a connection get `PoolClosed`. Connections on loan
        are waited for up to `timeout` seconds and closed when given back; any
        still out after that are cut off (their borrowers get an error on their
        next query) and logged. Closing a closed pool does nothing.
        """
        core = self._core
        with self._lock:
            if core.closed:
                return
            waiters = core.close()
            for w in waiters:
                w.error = PoolClosed(f"pool {self.name!r} was closed while waiting")
            to_close = core.pop_to_close()
        for w in waiters:
            w.wake()
        if self._wakeup is not None:
            self._wakeup.set()
        for entry, _ in to_close:
            self._close_conn(entry)
        if core.busy and self._drained is not None:
            self._drained.wait_timeout(timeout)
        with self._lock:
            held = core.held(monotonic())
        for entry in held:
            logger.warning(
                "pool %r closed while a connection (backend pid %s) was still on loan"
                " since %s; cutting it off",
                self.name,
                entry.pid,
                _messages.where(entry),
            )
            shutdown_socket(entry.conn.pgconn)
        self._start_spawned()  # closes asked for by give-backs, to wait for
        gather(self._tasks, _STOP_TIMEOUT)

    def __enter__(self) -> Pool:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.close()

    def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change the pool's sizes while it runs.

        Growing opens connections in the background; shrinking closes idle
        connections at once and borrowed ones when they come back. Lanes must
        still fit: `ConfigError` otherwise.
        """
        if max_size is None:
            max_size = max(min_size, self._core.max_size)
        cfg = self.config.replace(min_size=min_size, max_size=max_size)
        with self._lock:
            self.config = cfg
            served = self._core.resize(cfg.min_size, cfg.max_size, monotonic())
            self._after_change_locked()
        for waiter in served:
            waiter.wake()
        self._start_spawned()

    def stats(self) -> PoolStats:
        """The pool's state and counters now (no I/O; safe from any thread)."""
        now = monotonic()
        with self._lock:
            return snapshot(self._core, self.name, now)

    def describe(self) -> tuple[ConnectionInfo, ...]:
        """Each open connection: backend pid, state, and for those on loan the
        lane, how long held, where acquired and by whom. Longest held first.

        No I/O; safe from any thread. The health monitor joins this with
        `pg_stat_activity` by pid.
        """
        now = monotonic()
        with self._lock:
            return describe(self._core, now)

    def _forget_after_fork(self) -> None:
        """In a forked child: drop what belongs to the parent, touching nothing.

        The parent's connections are forgotten, never closed (closing would end
        the parent's sessions; psycopg doesn't close a connection in a process
        that didn't open it), and its threads and tasks don't exist here. An
        open pool opens again, with new connections, on its first use.
        """
        self._reopen_after_fork = self._opened and not self._core.closed
        self._opened = False
        for entry in self._core.entries:
            if _on_loan(entry):
                _kill(entry.handle)  # the parent's session: not for the child
        rotation = self._core.rotation
        self._core = _new_core(self.config)
        self._core.rotation = rotation
        self._lock = Lock()
        self._tasks = set()
        self._spawns = []
        self._wakeup = self._ready = self._drained = None

    # -- borrowing ----------------------------------------------------------

    def connection(
        self, lane: str | None = None, timeout: float | None = None
    ) -> _ConnectionBlock:
        """Borrow a connection for the duration of an `with` block.

        On a clean exit an open transaction is committed; on an exception
        (cancellation included) it is rolled back. Either way the connection
        goes back to the pool.
        """
        # _ConnectionBlock(self, lane, timeout) would cost a call to
        # __init__ more: this is the hot path.
        block = _new_block(_ConnectionBlock)
        block._pool = self
        block._lane = lane
        block._timeout = timeout
        block._conn = None
        return block

    def getconn(
        self, lane: str | None = None, timeout: float | None = None
    ) -> PooledConnection:
        """Borrow a connection; give it back with `putconn()`.

        `lane` picks the workload's budget (None: the `default` lane);
        `timeout` overrides `connection_timeout` for this call. Raise
        `PoolTimeout` if no connection comes in time, `PoolOverloaded` if
        `max_waiting` callers already wait, `UnknownLane`, `PoolClosed`.
        """
        return self._getconn(lane, timeout, 2)

    def putconn(self, conn: PooledConnection) -> None:
        """Give back a connection from `getconn()`.

        An open transaction is rolled back, never committed. A connection that
        is broken or still running a query is closed and replaced. Giving a
        connection back twice, or to another pool, raises `ConnectionReturned`.
        """
        self._give_back(self._detach(conn), warn=True)

    def _getconn(
        self,
        lane_name: str | None,
        timeout: float | None,
        depth: int,
        block: _ConnectionBlock | None = None,
    ) -> PooledConnection:
        """Borrow for `getconn()` or for a `connection()` block (which keeps
        the handle); `depth`: how many frames up the borrower's code is."""
        core = self._core
        lane = core.default_lane if lane_name is None else core.lanes.get(lane_name)
        if lane is None:
            raise UnknownLane(
                f"pool {self.name!r} has no lane {lane_name!r};"
                f" its lanes are: {', '.join(core.lanes)}"
            )
        if not self._opened or core.closed:
            if not self._reopen_after_fork or core.closed:
                raise PoolClosed(
                    f"pool {self.name!r} is {'closed' if core.closed else 'not open'}"
                )
            self.open()
        holder = current_holder()
        now = started = monotonic()
        lock = self._lock
        while True:
            entry = waiter = None
            changed = False
            # Not `with lock`, which costs twice as much. A KeyboardInterrupt
            # may land next to acquire() or release(), either side: the
            # handler asks the lock who holds it, and gives back what was taken.
            try:
                lock.acquire()
                entry = core.try_acquire(lane, now)
                if entry is None and core.cap < core.max_size:
                    entry = core.try_acquire_exempt(lane, now, holder)
                if entry is None:
                    if timeout is None:
                        timeout = self.config.connection_timeout
                    waiter = self._enqueue(lane, now, started + timeout, started)
                if core._to_close:
                    self._after_change_locked()
                    changed = True
                lock.release()
            except BaseException:
                if lock._is_owned():
                    lock.release()
                if entry is not None:
                    self._release(entry, True)
                elif waiter is not None:
                    self._abandon(waiter)
                raise
            if changed or entry is None:  # connects and closes to start
                try:
                    self._start_spawned()
                except BaseException:  # interrupted: give back what was taken
                    if entry is not None:
                        self._release(entry, True)
                    elif waiter is not None:
                        self._abandon(waiter)
                    raise
            if entry is None:
                assert waiter is not None
                entry = self._wait_for(waiter)
            try:
                if not self._test_on_borrow:
                    break
                # self._alive(entry), inlined: this is the hot path.
                pgconn = entry.conn.pgconn
                try:
                    pgconn.consume_input()
                    alive = (
                        pgconn.transaction_status == _IDLE
                        and pgconn.get_result() is None  # parses; keeps the GIL
                        and not entry.doomed
                    )
                except psycopg.OperationalError:
                    alive = False
                if alive:
                    # Recently used and not suspect: the liveness test is enough.
                    last_ok = entry.last_ok
                    bypass = _core.ALIVE_BYPASS_WINDOW  # module global: tests patch it
                    if now - last_ok <= bypass and last_ok > core.suspect_before:
                        break
                    if timeout is None:
                        timeout = self.config.connection_timeout
                    if self._validate_borrowed(entry, started + timeout):
                        break
                else:
                    self._drop(entry, "dead")
            except BaseException:
                self._interrupted(entry)
                raise
            now = monotonic()
        try:
            # The handle: the connection's last one is reused when only the
            # entry still refers to it (nobody kept the stale one).
            handle: PooledConnection = entry.handle
            if getrefcount(handle) > 3 or getweakrefcount(handle):
                # Held elsewhere, or None; or a weak reference could bring it
                # back to life on the next borrower's loan.
                handle = object.__new__(PooledConnection)
                handle._pgw_entry = None  # readable at once by the maintenance
                entry.handle = handle
            else:
                handle.__class__ = PooledConnection
            handle.__dict__ = entry.conn.__dict__
            handle._pgw_entry = entry  # the loan: claimed back under the lock
            try:
                frame = sys._getframe(depth)
            except ValueError:  # called from the top of a thread
                entry.site = None
            else:
                entry.site = (frame.f_code, frame.f_lasti)  # the line: when needed
            entry.holder = holder
        except BaseException:
            self._interrupted(entry)
            raise
        if block is not None:
            block._conn = handle
        return handle

    def _interrupted(self, entry: Entry) -> None:
        """A borrow was interrupted (KeyboardInterrupt...) before it handed
        `entry` out: close it rather than lose its slot."""
        if entry.state == _core.BUSY:
            if _on_loan(entry):
                _kill(entry.handle)
            self._drop(entry, "cancelled")

    def _enqueue(
        self, lane: Lane, now: float, deadline: float, started: float
    ) -> Waiter:
        """Queue a waiter (under the lock) and ask for the connects it needs."""
        waiter = Waiter(lane)
        waiter.started = started
        try:
            self._core.enqueue(waiter, now, deadline)
        except OverflowError:
            raise PoolOverloaded(
                f"pool {self.name!r} refused a connection at once:"
                f" {self._core.n_waiting} callers already wait"
                f" (max_waiting={self.config.max_waiting})"
            ) from None
        n = self._core.wanted_connects(now)
        self._prepare_connects(n)
        if self._wakeup is not None:
            if not n and self._core.next_connect_at > now:
                # Backing off: have maintenance connect as soon as it ends.
                self._wakeup.set()
            elif not self._watching and self._core.watching:
                self._wake_to_watch()
        return waiter

    def _wake_to_watch(self) -> None:
        """Have maintenance run every WATCH_INTERVAL from now on (under the
        lock): the adaptive limit holds callers back (see _maintain)."""
        if not self._watching and self._wakeup is not None:
            self._watching = True
            self._wakeup.set()

    def _wait_for(self, waiter: Waiter) -> Entry:
        """Wait until `waiter` is served, times out or is cancelled."""
        try:
            while True:
                chunk = _core.wait_chunk(waiter, monotonic())
                if waiter.wait(chunk) or self._expire(waiter):
                    break
        except BaseException:
            self._abandon(waiter)
            raise
        if waiter.error is not None:
            raise waiter.error
        assert waiter.entry is not None
        return waiter.entry

    def _expire(self, waiter: Any) -> bool:
        """A wait chunk ran out: settle the waiter or let it wait on.

        Return True when the waiter is done (served, or failed with
        `PoolTimeout`, which is then set on it and woken).
        """
        now = monotonic()
        with self._lock:
            if waiter.state != _core.WAITING:
                return True
            if not self._core.expire_waiter(waiter, now):
                return False
            try:
                msg = _messages.timeout_message(
                    self._core, self.name, waiter.lane, now - waiter.started, now
                )
            except Exception:  # out of the queue: it must hear of it all the same
                logger.exception("pool %r: describing a timeout failed", self.name)
                msg = (
                    f"no connection from pool {self.name!r} after"
                    f" {now - waiter.started:.2f} s"
                )
            last_error = self._core.last_error
        waiter.error = self._timeout(msg, last_error)
        waiter.wake()
        return True

    def _abandon(self, waiter: Any) -> None:
        """The waiter was cancelled: leave the queue, or give back what it got."""
        with self._lock:
            if self._core.cancel_waiter(waiter):
                return
        if waiter.entry is not None:
            self._release(waiter.entry, True)

    def _alive(self, entry: Entry) -> bool:
        """Cheap liveness test, no round trip.

        A backend that ended (terminated, server restart) left its FATAL
        message or the socket's end of file behind: reading what is pending
        without blocking reveals it.
        """
        pgconn = entry.conn.pgconn
        try:
            pgconn.consume_input()  # the end of file raises
        except psycopg.OperationalError:
            return False
        # An idle connection's transaction status is IDLE: UNKNOWN once it is
        # bad, ACTIVE while a query runs or a result waits, INTRANS or INERROR
        # inside a transaction, all of which fail. Then get_result() parses
        # what came, where a FATAL notice dooms the entry, and returns None at
        # once. (It would wait for a query sent meanwhile by another thread:
        # only this thread uses the connection, an idle one or its own loan.)
        # Not is_busy(), which does the same parse but, in psycopg's C
        # implementation, lets go of the GIL: a thread busy with Python may
        # then keep it for a switch interval (`bench/hotpath.py`: a borrow
        # beside such a thread took 77 µs instead of 7).
        return (
            pgconn.transaction_status == _IDLE
            and pgconn.get_result() is None
            and not entry.doomed
        )

    def _validate_borrowed(self, entry: Entry, deadline: float) -> bool:
        """Prove a borrowed connection works with the validation query."""
        timeout = min(self.config.validation_timeout, max(deadline - monotonic(), 0.01))
        try:
            if self._seams:
                self._at_seam("validate", entry)
            self._run_validation(entry.conn, timeout)
        except Exception as ex:
            self._drop(entry, "invalid", self._redact(" ".join(str(ex).split())))
            return False
        except BaseException:
            # Cancelled mid-check: the connection's state is unknown, but
            # it is no evidence against it or the server.
            self._drop(entry, "cancelled")
            raise
        if entry.state != _core.BUSY:  # dropped as stranded meanwhile: retry
            return False
        entry.last_ok = entry.last_checked = monotonic()
        self._core.validation_passed()
        return True

    def _run_validation(self, conn: PooledConnection, timeout: float) -> None:
        autocommit = conn.autocommit
        conn._pgw_timeout = timeout
        try:
            if not autocommit:
                conn.set_autocommit(True)
            conn.execute(self.config.validation_query)
            if not autocommit:
                conn.set_autocommit(False)
        finally:
            conn._pgw_timeout = self._query_timeout

    def _drop(self, entry: Entry, why: str, error: str = "") -> None:
        """Discard a connection borrowed for a caller who won't get it.

        `why`: "dead" (the liveness test saw its session end), "invalid" (the
        validation query failed: new connections back off) or "cancelled".
        """
        now = monotonic()
        with self._lock:
            core = self._core
            if entry.state == _core.CLOSED:  # dropped as stranded meanwhile
                return
            if why == "dead":
                core.validation_failures_total += 1
                core.lost(now)
            elif why == "invalid":
                core.validation_failed(now, error)
            waiter = core.discard(entry, why, now)
            self._after_change_locked()
        if waiter is not None:
            waiter.wake()
        self._start_spawned()

    # -- giving back --------------------------------------------------------

    def _detach(self, handle: PooledConnection) -> Entry:
        """Take the entry out of a handle and make the handle unusable."""
        if (
            not isinstance(handle, PooledConnection)
            or handle.__dict__.get("_pool") is not self._ref
        ):
            raise self._not_on_loan(handle)
        now = monotonic()
        with self._lock:
            return self._claim(handle, now)

    def _claim(self, handle: PooledConnection, now: float) -> Entry:
        """`_detach()` for a handle of this pool, under the lock: of two
        threads giving the same connection back at once, exactly one gets it."""
        entry = handle._pgw_entry
        if entry is None or entry.handle is not handle:  # returned, or a copy
            raise self._not_on_loan(handle)
        entry.returned_at = now
        handle._pgw_entry = None  # _kill(handle), inlined: the hot path
        handle.__dict__ = {}
        handle.__class__ = ReturnedConnection
        return entry

    def _not_on_loan(self, handle: Any) -> ConnectionReturned:
        pool = getattr(handle, "__dict__", {}).get("_pool")
        if pool is not None and pool is not self._ref:
            return ConnectionReturned(
                f"can't give a connection back to pool {self.name!r}:"
                " it comes from another pool"
            )
        return ConnectionReturned(
            f"can't give {handle!r} back to pool {self.name!r}: it is not on"
            " loan (already given back, or not from a pgwarden pool)"
        )

    def _give_back(self, entry: Entry, warn: bool) -> None:
        """Reset a connection that came back, then release it (always).

        `warn` logs a warning if a transaction was left open.
        """
        status = entry.conn.pgconn.transaction_status
        reusable = False
        try:
            reusable = self._reset(entry, status, warn)
        finally:
            self._release(entry, reusable)

    def _reset(self, entry: Entry, status: int, warn: bool) -> bool:
        """Bring a connection back to IDLE; False if it must be closed."""
        conn = entry.conn
        if status == _ACTIVE:
            # Someone may still be waiting on that query, inside libpq: cut the
            # session off and cancel the query, but don't free it under them.
            logger.warning(
                "connection (backend pid %s) given back to pool %r during a query;"
                " cancelling the query and dropping the connection",
                entry.pid,
                self.name,
            )
            interrupt(conn.pgconn, CANCEL_TIMEOUT)
            entry.abandoned = True
            return False
        if status not in _RESETTABLE:
            if conn.broken and entry.state == _core.BUSY:  # not dropped as stranded
                with self._lock:
                    self._core.lost(monotonic())
            return False
        if warn and status != _IDLE:
            logger.warning(
                "connection (backend pid %s) given back to pool %r inside a%s"
                " transaction (acquired at %s); rolling it back",
                entry.pid,
                self.name,
                "" if status == _INTRANS else " failed",
                _messages.where(entry),
            )
        conn._pgw_timeout = self.config.validation_timeout
        try:
            if status != _IDLE:
                if self._seams:
                    self._at_seam("rollback", entry)
                conn.rollback()
            conn._pgw_restore()
            if self._reset_query:
                conn.set_autocommit(True)
                conn.execute(self._reset_query)
                conn.set_autocommit(False)
                if self._reset_drops_prepared:
                    conn._pgw_forget_prepared()
        except Exception as ex:
            if entry.state == _core.BUSY:  # else dropped as stranded, and reported
                logger.warning(
                    "resetting a connection given back to pool %r failed (%s);"
                    " closing it",
                    self.name,
                    self._redact(str(ex)),
                )
            return False
        finally:
            conn._pgw_timeout = self._query_timeout
        return bool(conn.pgconn.transaction_status == _IDLE)

    def _release(
        self,
        entry: Entry | None,
        reusable: bool,
        handle: PooledConnection | None = None,
    ) -> None:
        """Hand a returned connection to the next waiter or the idle list.

        Given `handle` instead of `entry` (a handle still on loan, its
        connection idle), first claim the loan and undo the client-side
        changes, under the same lock: the common give-back in one step.
        """
        now = monotonic()
        core = self._core
        failure = waiter = woken = None
        changed = False
        lock = self._lock
        try:  # `with lock`, at half the cost: see _getconn()
            lock.acquire()
            if entry is None:
                assert handle is not None
                # entry = self._claim(handle, now), inlined: the hot path.
                entry = handle._pgw_entry
                if entry is None or entry.handle is not handle:
                    raise self._not_on_loan(handle)
                entry.returned_at = now
                handle._pgw_entry = None
                handle.__dict__ = {}
                handle.__class__ = ReturnedConnection
                try:
                    entry.conn._pgw_restore()
                except Exception as ex:  # a psycopg this pool doesn't know
                    failure, reusable = ex, False
            waiter = core.release(entry, now, reusable)
            if waiter is not None and core._woken:  # the adaptive limit rose
                woken = core.pop_woken()
            if core.watch_wanted:  # it fell, with callers queued
                core.watch_wanted = False
                self._wake_to_watch()
            if core._to_close:
                self._after_change_locked()
                changed = True
            drained = core.closed and not core.busy
            lock.release()
        except BaseException:
            if lock._is_owned():
                lock.release()
            if waiter is not None:
                waiter.wake()
            for other in woken or ():
                other.wake()
            raise
        if failure is not None:
            logger.warning(
                "undoing client-side changes on a connection given back to pool"
                " %r failed (%r); closing it",
                self.name,
                failure,
            )
        if waiter is not None:
            if self._seams:
                self._at_seam_now("assign", entry)
            waiter.wake()
            if woken is not None:
                for other in woken:
                    other.wake()
        if changed:  # after the wake-up: its waiter needn't wait for it
            self._start_spawned()
        if entry.leak_reported:
            logger.info("%s", _messages.unleak_message(entry, self.name, now))
        if drained and self._drained is not None:
            self._drained.set()

    def _at_seam(self, name: str, entry: Entry) -> None:
        hook = self._seams.get(name) if self._seams else None
        if hook is None:
            return
        hook(entry)

    def _at_seam_now(self, name: str, entry: Entry) -> None:
        """A seam where the pool can't wait: the hook must not block."""
        hook = self._seams.get(name) if self._seams else None
        if hook is not None:
            hook(entry)

    # -- background work ----------------------------------------------------

    def _after_change_locked(self) -> None:
        """Close what the core discarded and open what it now lacks (under
        the lock: call _start_spawned() once it is let go)."""
        core = self._core
        to_close = core.pop_to_close()
        if to_close:
            self._prepare(_close_entries, self, to_close, name="close")
        self._prepare_connects(core.wanted_connects(monotonic()))

    def _prepare_connects(self, n: int) -> None:
        """Under the lock: have `n` connections opened (see _start_spawned)."""
        for _ in range(n):
            self._prepare(_connect_one, self, name="connect")

    def _prepare(self, func: Callable[..., Any], *args: Any, name: str) -> None:
        """Under the lock: have `func(*args)` run in the background, once
        _start_spawned() is called."""
        start = prepare(func, args, self._tasks, f"pgwarden {self.name} {name}")
        self._spawns.append((start, name))

    def _start_spawned(self) -> None:
        """Start the background work asked for under the lock, which this
        thread no longer holds.

        Not under the lock: starting a thread waits until it runs, which
        takes milliseconds while other threads keep the GIL busy, and every
        borrow and give-back would wait on the lock meanwhile. The caller
        still waits, outside it. Another thread may start the work first.
        """
        spawns = self._spawns
        while spawns:
            try:
                start, name = spawns.pop()
            except IndexError:  # another thread took the last one
                return
            if not start() and name == "connect":  # logged
                with self._lock:
                    self._core.connect_failed(
                        "could not start a thread to connect", monotonic(), False
                    )

    def _spawn(self, func: Callable[..., Any], *args: Any, name: str) -> None:
        spawn(func, args, self._tasks, f"pgwarden {self.name} {name}")

    def _connect(self) -> Entry:
        """Open one connection (without touching the core)."""
        conn = PooledConnection.connect(self._conninfo)
        conn._pgw_entry = None
        conn._pgw_timeout = self._query_timeout
        conn._pgw_pool = self.name
        # psycopg only tests `_pool` for presence (its type depends on whether
        # psycopg_pool is installed); a weak reference avoids a cycle.
        conn.__dict__["_pool"] = self._ref
        # Handles share this dict. Rebuilt as a plain dict, not one sharing its
        # keys with the class: CPython 3.11 has fast attribute access on a
        # shared __dict__ only for the plain kind (3x faster, and psycopg
        # reads hundreds of attributes per query).
        conn.__dict__ = dict(conn.__dict__.items())
        conn._pgw_fresh_adapters()
        entry = self._core.new_entry(conn, conn.info.backend_pid, monotonic())
        conn.add_notice_handler(_doom_on_fatal(entry))
        return entry

    def _close_conn(self, entry: Entry) -> None:
        if entry.abandoned:
            return  # freed by the garbage collector once nobody uses it
        try:
            entry.conn.close()
        except Exception as ex:
            logger.debug("closing a connection failed: %s", self._redact(str(ex)))

    def _check_idle(self, entry: Entry) -> None:
        """Validate an idle connection for the evictor."""
        ok = alive = self._alive(entry)
        if alive:
            try:
                self._run_validation(entry.conn, self.config.validation_timeout)
            except Exception as ex:
                logger.info(
                    "idle connection (backend pid %s) of pool %r failed validation: %s",
                    entry.pid,
                    self.name,
                    self._redact(str(ex)),
                )
                ok = False
        now = monotonic()
        with self._lock:
            waiter = self._core.check_done(entry, now, ok, alive)
            self._after_change_locked()
        if waiter is not None:
            waiter.wake()
        self._start_spawned()

    def _maintain(self) -> float:
        """One maintenance step; return how long to sleep before the next."""
        core = self._core
        now = monotonic()
        with self._lock:
            # Idle connections whose session ended (server restart, a kill,
            # idle_session_timeout) are noticed here without a round trip.
            for entry in [e for e in core.idle if not self._alive(e)]:
                core.lost(now)
                core.discard(entry, "lost", now)
            # A handle dropped on loan (only its entry still refers to it)
            # can't be given back: take its connection back and close it
            # (the server rolls back).
            reclaimed = [
                e
                for e in core.entries
                if e.state == _core.BUSY and _on_loan(e) and getrefcount(e.handle) == 2
            ]
            reports = [_messages.reclaim_message(e, self.name, now) for e in reclaimed]
            served = []
            for entry in reclaimed:
                core.reclaimed_total += 1
                _kill(entry.handle)
                served.append(core.discard(entry, "reclaimed", now))
            # A borrow or give-back stopped halfway (KeyboardInterrupt) left
            # its connection between hands: drop it, don't close it (should
            # its caller still be inside, it fails cleanly on the cut socket).
            limit = _core.STRANDED_AFTER + 2 * self.config.validation_timeout
            stranded = [
                e
                for e in core.entries
                if e.state == _core.BUSY and _stranded(e, now, limit)
            ]
            for entry in stranded:
                reports.append(_messages.stranded_message(entry, self.name, now))
                core.reclaimed_total += 1
                entry.abandoned = True
                entry.leak_reported = False  # reported here: no "came back" later
                served.append(core.discard(entry, "stranded", now))
            act = core.maintain(now)
            self._prepare_connects(act.connects)
            drained = core.closed and not core.busy
            delay = self._tick
            # Slow borrows and stalls (see _core.SLOW_BORROW); _wake_to_watch()
            # wakes this loop up when the limit starts holding callers back.
            self._watching = core.watching
            if self._watching:
                delay = min(delay, _core.WATCH_INTERVAL)
            if (
                core.size < core.min_size or core.n_waiting
            ) and core.next_connect_at > now:
                delay = min(delay, core.next_connect_at - now)
        for entry in stranded:
            shutdown_socket(entry.conn.pgconn)
        for waiter in served:
            if waiter is not None:
                waiter.wake()
        for waiter in act.served:
            waiter.wake()
        self._start_spawned()
        if drained and self._drained is not None:
            self._drained.set()
        for report in reports:
            logger.warning("%s", report)
        for entry in act.leaks:
            logger.warning(
                "%s",
                _messages.leak_message(
                    entry, self.name, self.config.leak_detection_threshold, now
                ),
            )
        for entry, reason in act.close:
            logger.debug(
                "closing connection (backend pid %s) of pool %r: %s",
                entry.pid,
                self.name,
                reason,
            )
            self._close_conn(entry)
        for entry in act.check:
            self._spawn(_check_entry, self, entry, name="check")
        return delay

    def _timeout(self, msg: str, last_error: str | None) -> PoolTimeout:
        err = PoolTimeout(self._redact(msg))
        err.last_error = last_error
        return err

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)


class _ConnectionBlock:
    """What `Pool.connection()` returns: borrow on enter, give back on exit.

    One borrow per block: entered twice (shared by two tasks, say), its exit
    could give back the other borrow's connection, committing half of its
    transaction.
    """

    __slots__ = ("_conn", "_lane", "_pool", "_timeout")

    # Made by Pool.connection(), without __init__.
    _pool: Pool
    _lane: str | None
    _timeout: float | None
    _conn: Any  # None, then _ENTERED, then the handle while on loan, then _ENTERED

    def __enter__(self) -> PooledConnection:
        if self._conn is not None:
            raise _entered_twice()
        self._conn = _ENTERED
        return self._pool._getconn(self._lane, self._timeout, 2, self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        assert conn is not _ENTERED  # entered and lent
        self._conn = _ENTERED
        pool = self._pool
        entry = conn._pgw_entry
        if entry is not None:  # still on loan (claimed below, under the lock)
            status = entry.conn.pgconn.transaction_status
            if exc_type is None and status == _INTRANS:
                try:
                    conn.commit()
                except BaseException:
                    pool._give_back(pool._detach(conn), warn=False)
                    raise
                status = entry.conn.pgconn.transaction_status
            if status == _IDLE and not pool._reset_query:  # the common case
                pool._release(None, True, conn)
                return
        elif exc_type is not None:  # given back inside the block, by putconn()
            return  # the block's own exception says more
        pool._give_back(pool._detach(conn), warn=False)


_ENTERED = object()
_new_block = object.__new__


def _entered_twice() -> RuntimeError:
    return RuntimeError(
        "this pool.connection() block was entered already:"
        " call pool.connection() for each borrow"
    )


# A server that answers a connection with these is there, but not serving yet.
_NOT_READY = (
    "starting up",
    "shutting down",
    "in recovery",
    "not yet accepting connections",
)


def _kill(handle: PooledConnection) -> None:
    """End a loan on the handle's side: any further use raises ConnectionReturned."""
    handle._pgw_entry = None
    handle.__dict__ = {}
    handle.__class__ = ReturnedConnection


def _on_loan(entry: Entry) -> bool:
    """Whether the entry's handle is attached: its borrower has it."""
    return entry.handle is not None and entry.handle._pgw_entry is entry


def _stranded(entry: Entry, now: float, limit: float) -> bool:
    """Whether a borrowed connection has been between hands for over `limit` s."""
    if _on_loan(entry):
        return False
    # Being lent since held_since, or being given back since returned_at.
    return now - max(entry.held_since, entry.returned_at) > limit


def _unreachable(ex: BaseException) -> bool:
    """Whether a failed connect means the server can't be reached.

    A server that answered with an error (too many connections, a bad
    password, no such database) is reachable: callers keep waiting until their
    own deadline. psycopg reports no SQLSTATE for a failed connect, so the
    server's answer is told by its "FATAL:" message (an English-speaking
    server's; other languages count as unreachable).
    """
    sqlstate = getattr(ex, "sqlstate", None)
    if sqlstate:
        return bool(sqlstate.startswith(("08", "57P")))
    text = str(ex)
    return "FATAL:" not in text or any(phrase in text for phrase in _NOT_READY)


def _new_core(cfg: PoolConfig) -> PoolCore:
    adaptive = cfg.adaptive_concurrency
    if adaptive is None:  # auto: on, threads pay for each other in GIL hand-offs
        adaptive = True
    return PoolCore(
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        lanes=cfg.lanes,
        max_waiting=cfg.max_waiting,
        max_lifetime=cfg.max_lifetime,
        idle_timeout=cfg.idle_timeout,
        eviction_interval=cfg.eviction_interval,
        tests_per_eviction_run=cfg.tests_per_eviction_run,
        test_while_idle=cfg.test_while_idle,
        leak_threshold=cfg.leak_detection_threshold,
        adaptive=adaptive,
    )


# Pools alive in this process, to be reset in a child after os.fork().
_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _maintenance_loop(pool_ref: weakref.ref[Pool]) -> None:
    """Run maintenance steps until the pool closes or is garbage collected."""
    while True:
        pool = pool_ref()
        if pool is None or pool._core.closed:
            return
        try:
            delay = pool._maintain()
        except Exception:
            logger.exception("maintenance of pool %r failed", pool.name)
            delay = pool._tick
            pool._watching = False  # the next caller held back wakes it up
        wakeup = pool._wakeup
        del pool
        assert wakeup is not None
        wakeup.wait_timeout(delay)
        wakeup.clear()


def _connect_one(pool: Pool) -> None:
    """Open one connection and give it to the core; report failures."""
    core = pool._core
    entry = None
    try:
        entry = pool._connect()
        if pool._seams:
            pool._at_seam("connect", entry)
    except BaseException as ex:
        if entry is not None:  # made, but the pool can't take it now
            pool._close_conn(entry)
        now = monotonic()
        msg = pool._redact(str(ex).strip() or type(ex).__name__)
        with pool._lock:
            core.connect_failed(msg, now, _unreachable(ex))
        logger.warning("pool %r could not connect: %s", pool.name, msg)
        if pool._wakeup is not None:
            pool._wakeup.set()
        if not isinstance(ex, Exception):
            raise
        return
    now = monotonic()
    with pool._lock:
        waiter = core.connect_succeeded(entry, now)
        pool._after_change_locked()
        ready = len(core.entries) >= core.min_size
    if waiter is not None:
        waiter.wake()
    pool._start_spawned()
    if ready and pool._ready is not None:
        pool._ready.set()


def _close_entries(pool: Pool, entries: list[tuple[Entry, str]]) -> None:
    for entry, _ in entries:
        pool._close_conn(entry)


def _check_entry(pool: Pool, entry: Entry) -> None:
    pool._check_idle(entry)


def _doom_on_fatal(entry: Entry) -> Callable[[psycopg.errors.Diagnostic], None]:
    def on_notice(diag: psycopg.errors.Diagnostic) -> None:
        if diag.severity_nonlocalized in ("FATAL", "PANIC"):
            entry.doomed = True

    return on_notice
