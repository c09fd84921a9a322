"""The asyncio pool's wait (`wait_async`, `Alarm`, `Reader`) on a real event
loop and a socket pair; no server."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket
from collections.abc import Generator, Iterator
from typing import Any

import pytest
from psycopg import errors as e
from psycopg.waiting import READY_NONE, READY_R, WAIT_R

from pgwarden.pool._waiting import Alarm, Reader, wait_async
from tests.pool._helpers import closed, socket_of


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def read_one(sock: socket.socket) -> Generator[int, int, bytes]:
    """A psycopg-style generator: wait until readable, then read."""
    while not (yield WAIT_R):
        pass
    return sock.recv(10)


def count_timers(loop: asyncio.AbstractEventLoop, alarm: Alarm) -> list[float]:
    """Record the timers `alarm` schedules on `loop` from now on."""
    calls: list[float] = []
    call_at = loop.call_at

    def counting(when: float, callback: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(callback, "__self__", None) is alarm:
            calls.append(when)
        return call_at(when, callback, *args, **kwargs)

    loop.call_at = counting  # type: ignore[method-assign]
    return calls


def still_watched(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bool:
    return loop.remove_reader(sock.fileno())


async def test_a_wait_returns_what_the_generator_returns(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    a, b = sockets
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, b.send, b"hi")
    assert await wait_async(read_one(a), a.fileno(), Alarm(), 5.0) == b"hi"
    assert not still_watched(loop, a)


async def test_a_wait_times_out_and_leaves_nothing_behind(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    a, _ = sockets
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(e._WaitTimeout):
        await wait_async(read_one(a), a.fileno(), Alarm(), 0.2)
    assert 0.2 - 0.01 <= loop.time() - t0 < 2
    assert not still_watched(loop, a)


async def test_a_cancelled_wait_leaves_nothing_behind(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    a, _ = sockets
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(wait_async(read_one(a), a.fileno(), Alarm(), 30))
    await asyncio.sleep(0)  # one step: the task registers its reader and waits
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not still_watched(loop, a)


async def test_a_failing_generator_and_a_bad_state_raise(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    a, b = sockets
    loop = asyncio.get_running_loop()

    def fails() -> Generator[int, int, None]:
        yield WAIT_R
        raise ValueError("boom")

    def bad_state() -> Generator[int, int, None]:
        yield 0

    b.send(b"x")
    with pytest.raises(ValueError, match="boom"):
        await wait_async(fails(), a.fileno(), Alarm(), 5.0)
    assert not still_watched(loop, a)
    with pytest.raises(e.InternalError, match="bad poll status"):
        await wait_async(bad_state(), a.fileno(), Alarm(), None)


async def test_a_later_wait_keeps_the_armed_timer_and_gets_its_full_time() -> None:
    loop = asyncio.get_running_loop()
    alarm = Alarm()
    timers = count_timers(loop, alarm)
    first = loop.create_future()
    alarm.set(loop, first, loop.time() + 0.2)
    first.set_result(READY_R)  # the socket was ready first
    alarm.clear()
    assert len(timers) == 1

    second = loop.create_future()
    t0 = loop.time()
    alarm.set(loop, second, t0 + 0.6)
    assert len(timers) == 1  # not rescheduled
    assert await second == READY_NONE
    assert loop.time() - t0 >= 0.6 - 0.01  # the early ring re-armed it
    assert len(timers) == 2
    assert first.result() == READY_R


async def test_a_sooner_deadline_replaces_the_armed_timer() -> None:
    loop = asyncio.get_running_loop()
    alarm = Alarm()
    first = loop.create_future()
    alarm.set(loop, first, loop.time() + 30)
    first.set_result(READY_R)
    alarm.clear()

    second = loop.create_future()
    t0 = loop.time()
    alarm.set(loop, second, t0 + 0.2)
    assert await asyncio.wait_for(second, 5) == READY_NONE
    assert loop.time() - t0 < 5


async def test_a_ring_after_the_wait_ended_changes_nothing() -> None:
    loop = asyncio.get_running_loop()
    alarm = Alarm()
    timers = count_timers(loop, alarm)
    fut = loop.create_future()
    alarm.set(loop, fut, loop.time() + 0.05)
    alarm.clear()  # the wait ended (cancelled, say) before its deadline
    await asyncio.sleep(0.15)
    assert not fut.done()
    assert len(timers) == 1  # rang, and did not re-arm for nobody


def test_an_alarm_moves_to_another_loop() -> None:
    alarm = Alarm()

    async def times_out(seconds: float) -> float:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        t0 = loop.time()
        alarm.set(loop, fut, t0 + seconds)
        assert await asyncio.wait_for(fut, 5) == READY_NONE
        alarm.clear()
        return loop.time() - t0

    assert asyncio.run(times_out(0.1)) < 5
    # The timer armed on the first loop died with it; the second loop arms its own.
    assert asyncio.run(times_out(0.1)) < 5


# -- Reader: the socket stays registered between waits -----------------------


async def test_a_reader_serves_wait_after_wait_with_one_registration(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    a, b = sockets
    loop = asyncio.get_running_loop()
    reader, alarm = Reader(), Alarm()
    added = []
    add_reader = loop.add_reader

    def counting(fd: int, callback: Any, *args: Any) -> Any:
        added.append(fd)
        return add_reader(fd, callback, *args)

    loop.add_reader = counting  # type: ignore[method-assign]
    try:
        for i in range(5):
            loop.call_later(0.01, b.send, b"%d" % i)
            got = await wait_async(read_one(a), a.fileno(), alarm, 5.0, reader)
            assert got == b"%d" % i
            assert reader.registered
    finally:
        loop.add_reader = add_reader  # type: ignore[method-assign]
    assert len(added) == 1 and added[0] != a.fileno()  # a duplicate, once
    # Nothing is read twice or early: events left from earlier waits don't
    # wake a wait with nothing to read.
    with pytest.raises(e._WaitTimeout):
        await wait_async(read_one(a), a.fileno(), alarm, 0.2, reader)
    duplicate = socket_of(reader)
    reader.stop()
    assert not reader.registered and closed(*duplicate)


async def test_data_while_nobody_waits_ends_the_registration(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    a, b = sockets
    reader = Reader()
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, b.send, b"x")
    assert await wait_async(read_one(a), a.fileno(), Alarm(), 5.0, reader) == b"x"
    b.send(b"unasked")  # a notification, say: nobody reads it now
    deadline = loop.time() + 5.0
    while reader.registered and loop.time() < deadline:
        await asyncio.sleep(0.001)
    assert not reader.registered
    # The next wait registers again and gets what came meanwhile.
    assert await wait_async(read_one(a), a.fileno(), Alarm(), 5.0, reader) == b"unasked"
    reader.stop()


async def test_stopping_wakes_the_wait_in_progress(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    a, _ = sockets
    reader = Reader()
    loop = asyncio.get_running_loop()
    polls = []

    def count_wakes() -> Generator[int, int, int]:
        while True:
            ready = yield WAIT_R
            polls.append(ready)
            if len(polls) == 1:
                return ready

    loop.call_later(0.05, reader.stop)
    assert await wait_async(count_wakes(), a.fileno(), Alarm(), 5.0, reader) == READY_R
    assert not reader.registered


async def test_libpq_closing_its_socket_leaves_no_number_watched(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    # The hazard the duplicate avoids: asyncio, still registered for a closed
    # socket's number, would not watch a new socket given the same number.
    a, b = sockets
    loop = asyncio.get_running_loop()
    reader = Reader()
    loop.call_later(0.01, b.send, b"x")
    await wait_async(read_one(a), a.fileno(), Alarm(), 5.0, reader)
    number = a.fileno()
    a.close()  # as libpq does when the connection is lost
    reused, d = socket.socketpair()
    try:
        if reused.fileno() != number:  # give the new socket the old number
            os.dup2(reused.fileno(), number)
            reused.close()
            reused = socket.socket(fileno=number)
        reused.setblocking(False)
        loop.call_later(0.01, d.send, b"new")
        got = await wait_async(read_one(reused), number, Alarm(), 5.0)
        assert got == b"new"
    finally:
        reused.close()
        d.close()
        reader.stop()


def test_a_reader_moves_to_another_loop(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    a, b = sockets
    reader, alarm = Reader(), Alarm()
    for _ in range(2):
        loop = asyncio.new_event_loop()
        try:
            loop.call_later(0.01, b.send, b"x")
            got = loop.run_until_complete(
                wait_async(read_one(a), a.fileno(), alarm, 5.0, reader)
            )
            assert got == b"x" and reader.registered
        finally:
            loop.close()
    reader.stop()
    assert not reader.registered


async def test_out_of_file_descriptors_a_reader_falls_back_to_registering(
    sockets: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = sockets
    loop = asyncio.get_running_loop()
    reader = Reader()

    def no_more(fd: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "dup", no_more)
    loop.call_later(0.01, b.send, b"x")
    assert await wait_async(read_one(a), a.fileno(), Alarm(), 5.0, reader) == b"x"
    assert not reader.registered and not still_watched(loop, a)


def test_a_reader_left_on_a_closed_loop_closes_its_duplicate(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    a, b = sockets
    loop = asyncio.new_event_loop()
    reader = Reader()
    loop.call_later(0.01, b.send, b"x")
    loop.run_until_complete(wait_async(read_one(a), a.fileno(), Alarm(), 5.0, reader))
    duplicate = socket_of(reader)
    loop.close()  # never stopped: a pool that was not closed
    del reader
    gc.collect()
    assert closed(*duplicate)
