"""Pairs of primitives with the same interface for asyncio and for threads.

`pool_async.py` uses the `A*`/`a*` names; `tools/async_to_sync.py` renames them
to their sync twins when it generates `pool.py`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from time import monotonic
from typing import TYPE_CHECKING, Any, Protocol

from . import _core

if TYPE_CHECKING:
    from ._core import Entry, Lane

logger = logging.getLogger("pgwarden.pool")


class OwnedLock(Protocol):
    """The pool's lock: a lock that knows whether this thread holds it."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...
    def release(self) -> None: ...
    def _is_owned(self) -> bool: ...
    def __enter__(self) -> bool: ...
    def __exit__(self, *exc: object) -> None: ...


def Lock() -> OwnedLock:
    """A reentrant lock, for its `_is_owned()`: the hot path takes the lock
    without `with`, and an interrupt must learn whether it got it."""
    lock: OwnedLock = threading.RLock()  # type: ignore[assignment]
    return lock


current_thread_ident = threading.get_ident


class _WaiterBase:
    __slots__ = (
        "deadline",
        "entry",
        "error",
        "lane",
        "seq",
        "since",
        "started",
        "state",
    )

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.entry: Entry | None = None
        self.error: BaseException | None = None
        self.seq = 0
        self.since = 0.0  # when it joined the queue
        self.started = 0.0  # when its caller asked for a connection
        self.deadline = 0.0
        self.state = _core.WAITING


class AWaiter(_WaiterBase):
    """A task waiting for a connection: a future the pool resolves."""

    __slots__ = ("check_at", "fut")

    def __init__(self, lane: Lane, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(lane)
        self.fut: asyncio.Future[None] = loop.create_future()
        self.check_at = 0.0  # when the pool's waiter clock looks at it next

    def accepts(self) -> bool:
        return not self.fut.done()

    def wake(self) -> None:
        if not self.fut.done():
            self.fut.set_result(None)


class Waiter(_WaiterBase):
    """A thread waiting for a connection: a lock the pool releases."""

    __slots__ = ("_lock",)

    def __init__(self, lane: Lane) -> None:
        super().__init__(lane)
        self._lock = threading.Lock()
        self._lock.acquire()

    def accepts(self) -> bool:
        return True

    def wake(self) -> None:
        self._lock.release()

    def wait(self, timeout: float) -> bool:
        """Block until woken (True) or `timeout` seconds pass (False)."""
        return self._lock.acquire(timeout=max(timeout, 0.0))


class AEvent:
    """An asyncio event whose wait can time out."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait_timeout(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                await self._event.wait()
        except TimeoutError:
            return False
        return True


class Event:
    """A threading event with the same interface as `AEvent`."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait_timeout(self, timeout: float) -> bool:
        return self._event.wait(max(timeout, 0.0))


def aspawn(
    func: Callable[..., Coroutine[Any, Any, None]],
    args: tuple[Any, ...],
    registry: set[Any],
    name: str,
) -> None:
    """Run `func(*args)` as a task, kept in `registry` until it ends."""
    task = asyncio.get_running_loop().create_task(func(*args), name=name)
    registry.add(task)
    task.add_done_callback(registry.discard)


def spawn(
    func: Callable[..., None], args: tuple[Any, ...], registry: set[Any], name: str
) -> None:
    """Run `func(*args)` in a daemon thread, kept in `registry` until it ends."""
    _registered_thread(func, args, registry, name).start()


def _registered_thread(
    func: Callable[..., None], args: tuple[Any, ...], registry: set[Any], name: str
) -> threading.Thread:
    """A daemon thread, not started, to run `func(*args)`: in `registry`
    from now until it ends."""

    def run() -> None:
        try:
            func(*args)
        finally:
            registry.discard(thread)

    thread = threading.Thread(target=run, name=name, daemon=True)
    registry.add(thread)
    return thread


def aprepare(
    func: Callable[..., Coroutine[Any, Any, None]],
    args: tuple[Any, ...],
    registry: set[Any],
    name: str,
) -> Callable[[], bool]:
    """`aspawn()` now (making a task waits for nothing), and return a
    starter with nothing left to do: see `prepare()`."""
    aspawn(func, args, registry, name)
    return _started


def _started() -> bool:
    return True


def prepare(
    func: Callable[..., None], args: tuple[Any, ...], registry: set[Any], name: str
) -> Callable[[], bool]:
    """A daemon thread to run `func(*args)`, in `registry` already, and the
    function that starts it.

    Starting a thread waits until it runs: milliseconds while other threads
    keep the GIL busy. So the pool prepares threads under its lock, where
    `gather()` can see them, and starts them once it lets go. The starter
    returns False, having logged why, if no thread could be started.
    """
    thread = _registered_thread(func, args, registry, name)

    def start() -> bool:
        try:
            thread.start()
        except Exception:  # the system's limit on threads, say
            registry.discard(thread)
            logger.exception("could not start thread %r", name)
            return False
        return True

    return start


async def agather(registry: set[Any], timeout: float) -> None:
    """Wait for the tasks in `registry` to end, cancelling any left at `timeout`."""
    deadline = monotonic() + timeout
    current = asyncio.current_task()
    while tasks := [t for t in registry if t is not current]:
        remaining = deadline - monotonic()
        if remaining <= 0:
            for t in tasks:
                logger.warning("background task %r did not stop in time", t)
                t.cancel()
            return
        await asyncio.wait(tasks, timeout=remaining)


def gather(registry: set[Any], timeout: float) -> None:
    """Wait for the threads in `registry` to end, at most `timeout` seconds."""
    deadline = monotonic() + timeout
    current = threading.current_thread()
    while threads := [t for t in list(registry) if t is not current]:
        remaining = deadline - monotonic()
        if remaining <= 0:
            for t in threads:
                logger.warning("background thread %r did not stop in time", t.name)
            return
        if threads[0].ident is None:  # spawn() is about to start it
            time.sleep(0.001)
            continue
        threads[0].join(remaining)


def acurrent_holder() -> Any:
    """Who is borrowing: the current task (asyncio) or thread ident (threads)."""
    return asyncio.current_task()


current_holder = current_thread_ident
