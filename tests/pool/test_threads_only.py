"""What only a thread pool must take care of, against a real server: a
borrow keeps the GIL, and no thread is started under the pool's lock.

Each time a thread lets go of the GIL, a thread busy with Python may take it
and keep it for a whole switch interval (5 ms by default): a borrow that let
go of it once (the liveness test did, in psycopg's `is_busy()`) took 77 µs
instead of 7 while another thread ran Python, on 2 vCPUs (`bench/hotpath.py`).

The GIL test needs psycopg's C implementation (its pure Python one lets go
of the GIL on every call into libpq) and a CPython with a GIL.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from pgwarden import Pool, PoolTimeout
from pgwarden.pool import _core
from pgwarden.pool import pool as pool_module
from tests._util import wait_until
from tests.pool._helpers import unique_app

BORROWS = 2000
# Long enough for the borrows (about 10 ms) to fit in one turn of this thread:
# the spinner can take the GIL only if a borrow lets go of it.
SWITCH_INTERVAL = 0.25


@pytest.mark.skipif(
    psycopg.pq.__impl__ == "python",
    reason="psycopg's pure Python implementation lets go of the GIL in every call",
)
@pytest.mark.skipif(
    not getattr(sys, "_is_gil_enabled", lambda: True)(),
    reason="no GIL: the other thread runs beside this one",
)
def test_borrows_let_no_other_thread_run(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No validation query (a round trip waits without the GIL): the liveness
    # test alone, as for a connection used less than 0.5 s ago.
    monkeypatch.setattr(_core, "ALIVE_BYPASS_WINDOW", 60.0)
    with Pool(dsn, min_size=1, max_size=1, application_name=unique_app()) as pool:
        pool.wait(5)
        with pool.connection():
            pass
        stop = False
        loops = 0

        def spin() -> None:
            nonlocal loops
            while not stop:
                loops += 1

        interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        spinner = threading.Thread(target=spin)
        try:
            # Returns once this thread has the GIL back from the spinner, for
            # a turn of SWITCH_INTERVAL unless it lets go of it sooner.
            spinner.start()
            before = loops
            for _ in range(BORROWS):
                with pool.connection():
                    pass
            after = loops
        finally:
            stop = True
            spinner.join()
            sys.setswitchinterval(interval)
    assert after == before, (
        f"another thread ran {after - before} loops during {BORROWS} borrows"
    )


def test_no_thread_is_started_under_the_lock(
    dsn: str, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting a thread waits until it runs: milliseconds while other threads
    keep the GIL busy, during which every borrow and give-back would wait on
    the lock. Connects and closes are started once it is let go."""
    starts: list[tuple[str, bool]] = []
    prepare = pool_module.prepare
    pool = Pool(dsn, min_size=0, max_size=3, application_name=unique_app())

    def watched(func: Any, args: Any, registry: Any, name: str) -> Callable[[], bool]:
        start = prepare(func, args, registry, name)

        def watched_start() -> bool:
            starts.append((name.rsplit(" ", 1)[-1], pool._lock._is_owned()))
            return start()

        return watched_start

    monkeypatch.setattr(pool_module, "prepare", watched)
    with pool:
        # Borrowers that find nothing idle have connections opened for them.
        conns = [pool.getconn(timeout=10) for _ in range(3)]
        # A shrunk pool closes what comes back over its new size.
        pool.resize(0, 1)
        for conn in conns[1:]:
            pool.putconn(conn)
        wait_until(lambda: len(pool._core.entries) == 1, message="two closed")
        # A dead connection found on borrow is replaced.
        pid = conns[0].info.backend_pid
        pool.putconn(conns[0])
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
        with pool.connection(timeout=10) as conn:
            assert conn.info.backend_pid != pid
    names = {name for name, _ in starts}
    assert {"connect", "close"} <= names, starts
    assert not [name for name, locked in starts if locked], starts


def test_a_connect_that_cannot_start_its_thread_fails_as_a_connect(
    dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No thread left (the system's limit): the connect counts as failed, the
    caller times out saying why, and the pool connects once it can again."""
    start = threading.Thread.start

    def refuse(thread: threading.Thread) -> None:
        if thread.name.endswith(" connect"):
            raise RuntimeError("can't start new thread")
        start(thread)

    with Pool(dsn, min_size=0, max_size=1, application_name=unique_app()) as pool:
        monkeypatch.setattr(threading.Thread, "start", refuse)
        with pytest.raises(PoolTimeout, match="could not start a thread"):
            pool.getconn(timeout=0.5)
        assert pool._core.opening == 0
        assert "could not start thread" in caplog.text
        monkeypatch.setattr(threading.Thread, "start", start)
        with pool.connection(timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
