"""The asyncio pool's wait timer (`Alarm`), on a real event loop, no server."""

from __future__ import annotations

import asyncio

from psycopg.waiting import READY_NONE, READY_R

from pgwarden.pool._waiting import Alarm


async def test_a_later_wait_keeps_the_armed_timer_and_gets_its_full_time() -> None:
    loop = asyncio.get_running_loop()
    alarm = Alarm()
    first = loop.create_future()
    alarm.set(loop, first, loop.time() + 0.2)
    first.set_result(READY_R)  # the socket was ready first
    alarm.clear()
    timer = alarm._timer

    second = loop.create_future()
    t0 = loop.time()
    alarm.set(loop, second, t0 + 0.6)
    assert alarm._timer is timer  # not rescheduled
    assert await second == READY_NONE
    assert loop.time() - t0 >= 0.6 - 0.01  # the early ring re-armed it
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
    fut = loop.create_future()
    alarm.set(loop, fut, loop.time() + 0.05)
    alarm.clear()  # the wait ended (cancelled, say) before its deadline
    await asyncio.sleep(0.15)
    assert not fut.done()
    assert alarm._timer is None  # rang, and did not re-arm for nobody
