"""`pgwarden monitor` as a real process: it serves, answers, and stops cleanly on
SIGTERM and SIGINT; an unreachable database is reported, not fatal."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import make_conninfo

from pgwarden.cli import main
from tests._util import wait_until

PASSWORD = "S3cret-cli-91be"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class MonitorProcess:
    """`python -m pgwarden monitor` in a subprocess, serving on a free port."""

    def __init__(self, dsn: str, cwd: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "pgwarden", "monitor", "--dsn", dsn),
                *("--listen", self.url.removeprefix("http://"), "--interval", "1"),
            ],
            cwd=cwd,  # no .env from the project
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout = self.stderr = ""

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=5)

    def wait_serving(self) -> None:
        def healthy() -> bool:
            if self.process.poll() is not None:
                self.stop(signal.SIGTERM)
                raise AssertionError(f"monitor exited early:\n{self.stderr}")
            try:
                return self.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=15, interval=0.05, message="/healthz 200")

    def stop(self, sig: signal.Signals) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.stdout, self.stderr = self.process.communicate(timeout=5)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[[str], MonitorProcess]]:
    """Start monitors; any still running at the end of the test is killed."""
    started: list[MonitorProcess] = []

    def start(dsn: str) -> MonitorProcess:
        started.append(MonitorProcess(dsn, tmp_path))
        return started[-1]

    yield start
    for process in started:
        process.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_serves_then_stops_cleanly(
    spawn: Callable[[str], MonitorProcess], dsn: str, sig: signal.Signals
) -> None:
    monitor = spawn(make_conninfo(dsn, password=PASSWORD))
    monitor.wait_serving()

    assert monitor.get("/readyz").json() == {"ready": True, "reason": "ok"}
    metrics = monitor.get("/metrics")
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(metrics.text)
        for s in family.samples
        if not s.labels
    }
    assert samples["pgwarden_server_up"] == 1
    assert samples["pgwarden_monitor_check_interval_seconds"] == 1
    status = monitor.get("/status").json()
    assert status["ready"] is True
    assert status["server"]["max_connections"] > 0

    assert monitor.stop(sig) == 0
    assert "Traceback" not in monitor.stderr
    assert "pgwarden monitor: checking" in monitor.stderr
    assert "serving http://127.0.0.1:" in monitor.stderr
    assert PASSWORD not in monitor.stdout + monitor.stderr
    assert "password=***" in monitor.stderr


def test_unreachable_database_is_reported_not_fatal(
    spawn: Callable[[str], MonitorProcess], dsn: str
) -> None:
    closed = make_conninfo(dsn, host="127.0.0.1", port=free_port(), password=PASSWORD)
    monitor = spawn(closed)
    monitor.wait_serving()

    ready = monitor.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["reason"].startswith("database unreachable: ")
    assert monitor.get("/status").json()["server"] is None
    bodies = [monitor.get(p).text for p in ("/healthz", "/readyz", "/status")]

    assert monitor.stop(signal.SIGTERM) == 0
    assert "Traceback" not in monitor.stderr
    notes = [
        line
        for line in monitor.stderr.splitlines()
        if line.startswith("pgwarden monitor: the database is unreachable")
    ]
    assert len(notes) == 1
    assert "ALERT server.unreachable (critical)" in monitor.stderr
    assert PASSWORD not in monitor.stdout + monitor.stderr + "".join(bodies)


def test_bad_listen_address() -> None:
    result = CliRunner().invoke(main, ["monitor", "--listen", "9187"])
    assert result.exit_code == 2
    assert "'9187' is not HOST:PORT" in result.output


def test_port_in_use(dsn: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            main, ["monitor", "--dsn", dsn, "--listen", f"127.0.0.1:{port}"]
        )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"Error: can't listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_bad_interval(dsn: str) -> None:
    result = CliRunner().invoke(main, ["monitor", "--dsn", dsn, "--interval", "soon"])
    assert result.exit_code == 2
    assert result.output.startswith("Error: ")
    assert len(result.output.strip().splitlines()) == 1
