"""A pool used in a child process after fork() never touches the parent's sockets."""

from __future__ import annotations

import os
from typing import Any

import psycopg

from pgwarden import ConnectionReturned, Pool
from tests._util import wait_until
from tests.pool._helpers import backend_pids, unique_app


def run_in_child(pool: Pool) -> str:
    """Fork; in the child borrow from `pool`; return what the child reported."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running any cleanup
        try:
            with pool.connection(timeout=5) as conn:
                conn.execute("SELECT 1")
                os.write(write, str(conn.info.backend_pid).encode())
        except BaseException as ex:
            os.write(write, f"error: {ex!r}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        answer = f.read()
    os.waitpid(pid, 0)
    return answer


def test_child_opens_its_own_connections(dsn: str, admin: Any) -> None:
    app = unique_app()
    with Pool(dsn, min_size=2, max_size=2, application_name=app) as pool:
        pool.wait(5)
        parents = set(backend_pids(admin, app))
        answer = run_in_child(pool)
        assert answer.isdigit(), answer
        assert int(answer) not in parents
        # The child's exit closed its own sessions only: the parent's still work.
        wait_until(lambda: set(backend_pids(admin, app)) == parents)
        for _ in range(2):
            with pool.connection(timeout=5) as conn:
                assert conn.info.backend_pid in parents
                conn.execute("SELECT 1")


def test_child_of_a_closed_pool_gets_pool_closed(dsn: str) -> None:
    pool = Pool(dsn, min_size=1, max_size=1, application_name=unique_app())
    pool.open(wait=True)
    pool.close()
    assert "PoolClosed" in run_in_child(pool)


def test_child_never_uses_or_gives_back_the_parents_loan(dsn: str, admin: Any) -> None:
    app = unique_app()
    with Pool(dsn, min_size=1, max_size=1, application_name=app) as pool:
        pool.wait(5)
        read, write = os.pipe()
        with pool.connection(timeout=5) as conn:
            parent_pid = conn.info.backend_pid
            conn.execute("CREATE TEMP TABLE t (x int)")  # an open transaction
            pid = os.fork()
            if pid == 0:  # the child leaves the block with the parent's loan
                report = ""
                try:
                    with pool.connection(timeout=5):  # its own, new connection
                        pass
                except BaseException as ex:
                    report = f"inner: {ex!r}"
                else:
                    try:
                        conn.execute("SELECT 1")
                        report = "used the parent's session"
                    except ConnectionReturned:
                        report = "refused"
                    except BaseException as ex:
                        report = f"error: {ex!r}"
                finally:
                    os.write(write, report.encode())
                    os._exit(0)
            os.close(write)
            with os.fdopen(read) as f:
                answer = f.read()
            os.waitpid(pid, 0)
            assert answer == "refused", answer
            # The parent's transaction is still its own, still open.
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            assert conn.info.backend_pid == parent_pid
            conn.rollback()
        assert pool.stats().in_use == 0
