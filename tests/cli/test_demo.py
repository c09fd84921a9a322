"""`pgwarden demo` and the command line around it, against the real server."""

from __future__ import annotations

import io
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from pgwarden import Pool, __version__
from pgwarden.cli import main
from pgwarden.cli._demo_story import DemoResult, Tick, run_demo
from pgwarden.cli.demo import _Show
from tests._util import wait_until

Conn = psycopg.Connection[tuple[Any, ...]]

# Rich would draw a live table for these, as on a terminal.
_PLAIN = {"FORCE_COLOR": None, "TTY_COMPATIBLE": None, "TTY_INTERACTIVE": None}


def invoke(*args: str, **env: str | None) -> Result:
    return CliRunner(env={**_PLAIN, **env}).invoke(main, list(args))


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgwarden", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def demo_sessions(admin: Conn) -> int:
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgwarden-demo'"
    ).fetchone()
    assert row is not None
    return int(row[0])


# -- the demo ----------------------------------------------------------------


@pytest.mark.slow
def test_demo_tells_the_story_in_plain_lines_off_a_terminal(
    dsn: str, admin: Conn
) -> None:
    admin.execute("CREATE TABLE pgwarden_demo_mine (note text)")
    admin.execute("INSERT INTO pgwarden_demo_mine VALUES ('not the demo''s')")

    result = invoke("demo", "--dsn", dsn, "--duration", "3")

    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    out = result.stdout
    assert "\x1b[" not in out  # no colour, no cursor moves
    stats_lines = [line for line in out.splitlines() if " | borrowed " in line]
    assert len(stats_lines) >= 3  # one a second
    for lane in (r"backend \d+/20", r"frontend \d+/15", r"asterisk \d+/10"):
        assert all(re.search(lane, line) for line in stats_lines), lane
    assert any("frontend 15/15 (" in line for line in stats_lines)  # full, queueing
    assert "rush hour" in out and "call storm" in out
    assert "WARNING possible connection leak in pool 'sms-platform'" in out
    assert "by thread 'backend-stuck'" in out and "in _hang_in_transaction" in out
    assert "The holder is now at" not in out  # the stack is left out
    assert "rolling it back" in out
    summary = out[out.index("Summary:") :]
    assert " 0 errors" in summary
    for lane in ("backend", "frontend", "asterisk"):
        assert f"\n{lane} " in summary
    assert "asterisk's 5 reserved connections served" in summary

    # The demo dropped its own tables, and left everything else alone.
    tables = admin.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    ).fetchall()
    assert tables == [("pgwarden_demo_mine",)]
    assert admin.execute("SELECT * FROM pgwarden_demo_mine").fetchall() == [
        ("not the demo's",)
    ]
    wait_until(lambda: demo_sessions(admin) == 0, message="the pool's sessions end")


@pytest.mark.slow
def test_asterisk_is_served_at_once_while_the_frontend_floods_its_lane(
    dsn: str,
) -> None:
    events: list[str] = []
    ticks: list[Tick] = []

    result = run_demo(
        dsn, 3, on_event=lambda _, text: events.append(text), on_tick=ticks.append
    )

    assert isinstance(result, DemoResult)
    assert result.errors == 0, result.first_error
    assert result.stats.timeouts_total == 0
    assert all(lane.operations > 0 for lane in result.lanes.values())
    front, star = result.storm["frontend"], result.storm["asterisk"]
    # The flood filled the frontend lane and queued behind its limit...
    assert (front.peak_in_use, front.limit) == (15, 15)
    assert front.peak_waiting > 0 and front.worst_wait > 0.1
    # ...while Asterisk, within its reservation, kept being served at once.
    assert star.operations >= 20
    assert star.peak_in_use <= star.reserved == 5
    assert star.worst_wait < front.worst_wait / 2
    assert result.storm_seconds > 0.3
    # The stuck handler was reported, then gave its connection back.
    assert result.leak_reported and result.leak_held >= 2.0
    assert result.stats.leaks_total == 1
    # The pool's stats were reported about every TICK seconds from the start.
    assert len(ticks) >= 10 and ticks[0].elapsed < 0.1
    assert ticks[-1].stats.in_use == 0
    assert any(text.startswith("rush hour") for text in events)


def test_the_live_view_draws_the_lanes_on_a_terminal(dsn: str) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    lanes = "backend:15:20,frontend:10:15,asterisk:5:10"
    with Pool(dsn, name="sms-platform", lanes=lanes, min_size=1) as pool:
        pool.wait()
        with pool.connection("asterisk"):
            stats = pool.stats()
    record = logging.LogRecord(
        "pgwarden.pool", logging.WARNING, __file__, 1, "leak!\nstack", None, None
    )
    with _Show(console) as show:
        show.event(0.0, "steady traffic")
        show.tick(Tick(0.25, "steady", stats))
        show.log(record)
        show.tick(Tick(0.5, "call storm", stats))
        assert show.live is not None
    text = out.getvalue()
    assert "\x1b[" in text  # styled
    assert "pool 'sms-platform'" in text and "call storm" in text
    assert "asterisk" in text and "reserved" in text
    assert "default" not in text  # the unused implicit lane is left out
    assert "WARNING" in text and "leak!" in text and "stack" not in text


# -- the command line --------------------------------------------------------


def test_version() -> None:
    result = invoke("--version")
    assert (result.exit_code, result.stdout) == (0, f"pgwarden {__version__}\n")
    script = Path(sys.executable).with_name("pgwarden")
    if script.exists():  # the console script of an installed pgwarden
        done = subprocess.run([script, "--version"], capture_output=True, text=True)
        assert (done.returncode, done.stdout) == (0, f"pgwarden {__version__}\n")


def test_python_m_pgwarden_help() -> None:
    done = run_cli("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: python -m pgwarden [OPTIONS] COMMAND")
    assert "demo " in done.stdout and "--version" in done.stdout
    done = run_cli("demo", "--help")
    assert done.returncode == 0, done.stderr
    assert "--duration SECONDS" in done.stdout and "--dsn CONNINFO" in done.stdout


def test_an_unreachable_server_is_one_line_on_stderr_and_exit_2() -> None:
    port = closed_port()
    done = run_cli("demo", "--dsn", f"host=127.0.0.1 port={port} user=nobody")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: ") and f"port {port}" in lines[0]


def test_a_malformed_dsn_is_a_config_error() -> None:
    result = invoke("demo", "--dsn", "host=127.0.0.1 port")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert "connection string" in result.stderr


def test_without_pgserver_the_demo_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pgserver", None)  # as if not installed
    result = invoke("demo")
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: the embedded PostgreSQL needs the pgserver package:"
        " pip install 'pgwarden[embedded]'; or give the demo a server with --dsn\n"
    )


def test_too_short_a_duration_is_a_usage_error() -> None:
    result = invoke("demo", "--duration", "1")
    assert result.exit_code == 2
    assert "Invalid value for '--duration'" in result.stderr


# -- Ctrl-C ------------------------------------------------------------------


def _read_lines(proc: subprocess.Popen[str], into: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        into.put(line)


def _is_postgres(pid: int) -> bool:
    try:
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_removes_the_embedded_server() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgwarden", "demo", "--duration", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # Run from a background job, the suite's children ignore SIGINT, and
        # so would the demo (Python keeps an ignored SIGINT ignored).
        preexec_fn=_default_sigint,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc, lines), daemon=True).start()
    try:
        stats_lines = 0
        while stats_lines < 2:  # the workload has run for a second
            stats_lines += " | borrowed " in lines.get(timeout=30)
        (run_dir,) = Path(tempfile.gettempdir()).glob(f"pgwarden-pg-{proc.pid}-*")
        postmaster = int((run_dir / "data" / "postmaster.pid").read_text().split()[0])

        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert proc.stderr is not None
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == 130
    assert stderr.strip() == "Interrupted.", stderr
    assert not run_dir.exists()
    assert not _is_postgres(postmaster)
