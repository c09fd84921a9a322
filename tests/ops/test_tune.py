"""`pgwarden tune`: the rules without a server, the command against real ones.

The session server is only read; `--apply` runs on a throwaway cluster of
this module's own, which the tests restart.
"""

from __future__ import annotations

import importlib
import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgwarden.cli import main
from pgwarden.embedded import EmbeddedPostgres, EmbeddedUnavailable
from pgwarden.ops import tune
from pgwarden.ops.tune import Recommendation, ServerSettings, Setting, recommend
from tests.conftest import PgServer

# Rich would draw for a terminal with these.
_PLAIN = {"FORCE_COLOR": None, "TTY_COMPATIBLE": None, "TTY_INTERACTIVE": None}
_REPORT_FIELDS = {
    "server_version",
    "role",
    "superuser",
    "pool_size",
    "instances",
    "pool_total",
    "memory",
    "memory_source",
    "recommendations",
    "warnings",
    "postgresql_conf",
    "refused",
    "applied",
}
_RECOMMENDATION_FIELDS = {
    "name",
    "current",
    "recommended",
    "unit",
    "reason",
    "needs_restart",
    "pending_restart",
}
_APPLIED_FIELDS = {"name", "value", "unit", "live", "pending_restart"}
_AUTO_CONF_SQL = """\
SELECT name, setting FROM pg_catalog.pg_file_settings
WHERE sourcefile LIKE '%postgresql.auto.conf' ORDER BY seqno"""


def invoke(*args: str, input: str | None = None, **env: str | None) -> Result:
    return CliRunner(env={**_PLAIN, **env}).invoke(main, ["tune", *args], input=input)


def parsed(result: Result) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def by_name(recs: list[Recommendation]) -> dict[str, Recommendation]:
    return {rec.name: rec for rec in recs}


def auto_conf(conninfo: str) -> list[tuple[str, str]]:
    with psycopg.connect(conninfo) as conn:
        return conn.execute(_AUTO_CONF_SQL).fetchall()


def show(conninfo: str, name: str) -> str:
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
        assert row is not None
        return str(row[0])


# -- the rules, without a server -----------------------------------------------

_UNITS = {
    "idle_in_transaction_session_timeout": "ms",
    "idle_session_timeout": "ms",
    "statement_timeout": "ms",
    "tcp_keepalives_idle": "s",
    "tcp_keepalives_interval": "s",
    "work_mem": "kB",
    "shared_buffers": "8kB",
}
_RESTART_ONLY = {
    "max_connections",
    "superuser_reserved_connections",
    "reserved_connections",
    "shared_buffers",
}
_STOCK = {  # PostgreSQL's defaults
    "max_connections": 100,
    "superuser_reserved_connections": 3,
    "reserved_connections": 0,
    "idle_in_transaction_session_timeout": 0,
    "idle_session_timeout": 0,
    "statement_timeout": 0,
    "tcp_keepalives_idle": 0,
    "tcp_keepalives_interval": 0,
    "tcp_keepalives_count": 0,
    "work_mem": 4096,
    "shared_buffers": 16384,
}


def server(
    *,
    version: int = 160000,
    superuser: bool = True,
    may_alter: bool | None = None,
    alter_system_enabled: bool = True,
    missing: tuple[str, ...] = (),
    pending: dict[str, int] | None = None,
    **values: int | None,
) -> ServerSettings:
    """Stock settings, changed by `values`; `pending` values wait for a restart."""
    pending = pending or {}
    settings = {
        name: Setting(
            name=name,
            value=values.get(name, stock),
            unit=_UNITS.get(name),
            context="postmaster" if name in _RESTART_ONLY else "user",
            pending_restart=name in pending,
            pending_value=pending.get(name),
            may_alter=superuser if may_alter is None else may_alter,
        )
        for name, stock in _STOCK.items()
        if name not in missing
    }
    return ServerSettings(
        server_version=version,
        role="app" if not superuser else "postgres",
        superuser=superuser,
        alter_system_enabled=alter_system_enabled,
        settings=settings,
    )


def test_max_connections_is_raised_to_three_times_the_pools_and_headroom() -> None:
    rec = by_name(recommend(server(), pool_size=40))["max_connections"]
    # 3 x 40 + 3 superuser_reserved + 10 headroom = 133, rounded up to tens
    assert (rec.current, rec.recommended, rec.needs_restart) == (100, 140, True)
    assert "= 133" in rec.reason


def test_max_connections_counts_instances_and_both_reserves() -> None:
    settings = server(superuser_reserved_connections=5, reserved_connections=7)
    rec = by_name(recommend(settings, pool_size=25, instances=2))["max_connections"]
    assert rec.recommended == 180  # 3 x 50 + 5 + 7 + 10 = 172


def test_max_connections_is_never_lowered() -> None:
    rec = by_name(recommend(server(max_connections=500), pool_size=5))[
        "max_connections"
    ]
    assert rec.recommended is None
    assert rec.current == 500


def test_a_value_waiting_for_a_restart_that_suffices_is_not_recommended_again() -> None:
    settings = server(max_connections=50, pending={"max_connections": 140})
    rec = by_name(recommend(settings, pool_size=40))["max_connections"]
    assert rec.recommended is None
    assert rec.pending_restart
    assert rec.warning and "restart" in rec.warning


def test_a_lower_value_waiting_for_a_restart_is_caught() -> None:
    settings = server(max_connections=500, pending={"max_connections": 50})
    rec = by_name(recommend(settings, pool_size=40))["max_connections"]
    assert rec.recommended == 500
    assert "a restart would set 50" in rec.reason


def test_reserved_connections_before_16_counts_as_none() -> None:
    recs = by_name(
        recommend(server(version=150000, missing=("reserved_connections",)), 40)
    )
    assert "reserved_connections" not in recs
    assert recs["max_connections"].recommended == 140


def test_idle_in_transaction_timeout_is_recommended_when_off() -> None:
    rec = by_name(recommend(server(), 40))["idle_in_transaction_session_timeout"]
    assert (rec.current, rec.recommended, rec.unit) == (0, 300_000, "ms")
    assert not rec.needs_restart
    kept = by_name(recommend(server(idle_in_transaction_session_timeout=60_000), 40))
    assert kept["idle_in_transaction_session_timeout"].recommended is None


def test_idle_session_timeout_is_never_set_and_warned_about_when_set() -> None:
    off = by_name(recommend(server(), 40))["idle_session_timeout"]
    assert off.recommended is None and off.warning is None
    on = by_name(recommend(server(idle_session_timeout=600_000), 40))
    assert on["idle_session_timeout"].recommended is None
    assert "pool" in (on["idle_session_timeout"].warning or "")


def test_statement_timeout_is_never_set_server_wide() -> None:
    off = by_name(recommend(server(), 40))["statement_timeout"]
    assert off.recommended is None and off.warning is None
    assert "per role" in off.reason
    on = by_name(recommend(server(statement_timeout=30_000), 40))["statement_timeout"]
    assert on.recommended is None
    assert on.warning and "30s" in on.warning


def test_a_value_hidden_from_the_role_is_kept_and_said_so() -> None:
    rec = by_name(recommend(server(statement_timeout=None), 40))["statement_timeout"]
    assert (rec.current, rec.recommended) == (None, None)
    assert "not visible" in rec.reason


def test_keepalives_left_to_the_os_are_recommended_in_their_units() -> None:
    recs = by_name(recommend(server(), 40))
    got = {
        name: (recs[name].recommended, recs[name].unit)
        for name in ("tcp_keepalives_idle", "tcp_keepalives_interval")
    }
    assert got == {
        "tcp_keepalives_idle": (60, "s"),
        "tcp_keepalives_interval": (10, "s"),
    }
    assert recs["tcp_keepalives_count"].recommended == 6
    set_ = by_name(recommend(server(tcp_keepalives_idle=300), 40))
    assert set_["tcp_keepalives_idle"].recommended is None


def test_work_mem_times_connections_over_a_quarter_of_memory_is_a_warning() -> None:
    gib = 1024**3
    # 4MB x 140 (the recommended max_connections) = 560MB
    small = by_name(recommend(server(), 40, memory=1 * gib))["work_mem"]
    assert small.recommended is None
    assert small.warning and "560MB" in small.warning and "55%" in small.warning
    large = by_name(recommend(server(), 40, memory=64 * gib))["work_mem"]
    assert large.warning is None
    unknown = by_name(recommend(server(), 40))["work_mem"]
    assert unknown.warning is None and "unknown" in unknown.reason


def test_shared_buffers_is_only_reported() -> None:
    rec = by_name(recommend(server(), 40, memory=64 * 1024**3))["shared_buffers"]
    assert rec.recommended is None
    assert "25%" in rec.reason


def test_settings_are_read_and_written_in_their_units() -> None:
    assert tune.parse_value("5min", "ms") == 300_000
    assert tune.parse_value("128MB", "8kB") == 16384
    assert tune.parse_value("1GB", "kB") == 1024**2
    assert tune.parse_value("300000", "ms") == 300_000
    assert tune.parse_value("1GB", "ms") is None
    assert tune.setting_text(16384, "8kB") == "128MB"
    assert tune.setting_text(300_000, "ms") == "5min"
    assert tune.setting_text(1500, "ms") == "1500ms"
    assert tune.setting_text(60, "s") == "1min"
    assert tune.setting_text(0, "ms") == "0"
    assert tune.to_base(16384, "8kB") == ("memory", 128 * 1024**2)
    assert tune.parse_memory("8GB") == tune.parse_memory("8 GiB") == 8 * 1024**3
    assert tune.parse_memory("512m") == 512 * 1024**2
    for bad in ("8", "lots", "0GB"):
        with pytest.raises(ValueError):
            tune.parse_memory(bad)


def test_the_config_snippet_holds_only_the_changes() -> None:
    recs = recommend(server(max_connections=500), 40)
    assert tune.config_snippet(recs) == (
        "idle_in_transaction_session_timeout = 5min\n"
        "tcp_keepalives_idle = 1min\n"
        "tcp_keepalives_interval = 10s\n"
        "tcp_keepalives_count = 6\n"
    )


def test_apply_is_refused_without_the_right_to_alter_system() -> None:
    changes = [rec for rec in recommend(server(), 40) if rec.is_change]
    assert tune.apply_refusal(server(), changes) is None
    not_super = tune.apply_refusal(server(superuser=False), changes)
    assert not_super and "superuser" in not_super and "max_connections" in not_super
    granted = server(superuser=False, may_alter=True)
    assert tune.apply_refusal(granted, changes) is None
    disabled = tune.apply_refusal(server(alter_system_enabled=False), changes)
    assert disabled and "allow_alter_system" in disabled


def test_memory_of_this_machine_counts_only_for_a_local_server() -> None:
    assert tune.local_memory("127.0.0.1")
    assert tune.local_memory("/var/run/postgresql")
    assert tune.local_memory("db.example.com") is None


# -- the command, against the session server (read only) -----------------------


def test_json_output_keeps_its_documented_fields(dsn: str) -> None:
    result = invoke("--json", "--dsn", dsn, "--pool-size", "10", "--instances", "2")
    data = parsed(result)
    assert set(data) == _REPORT_FIELDS
    assert data["pool_total"] == 20
    assert data["applied"] is None and data["refused"] is None
    names = [rec["name"] for rec in data["recommendations"]]
    assert names[0] == "max_connections"
    assert set(names) <= set(tune.SETTINGS)
    for rec in data["recommendations"]:
        assert set(rec) == _RECOMMENDATION_FIELDS
    changes = [r for r in data["recommendations"] if r["recommended"] is not None]
    pending = [r for r in data["recommendations"] if r["pending_restart"]]
    assert result.exit_code == (1 if changes or pending else 0)


def test_the_pool_size_defaults_to_db_max_connections(dsn: str) -> None:
    data = parsed(invoke("--json", "--dsn", dsn, DB_MAX_CONNECTIONS="12"))
    assert (data["pool_size"], data["pool_total"]) == (12, 12)


def test_only_restricts_what_is_shown(dsn: str) -> None:
    result = invoke(
        "--json", "--dsn", dsn, "--only", "work_mem", "--only", "max_connections"
    )
    names = [rec["name"] for rec in parsed(result)["recommendations"]]
    assert names == ["max_connections", "work_mem"]


def test_human_output_is_a_table_with_the_reasons(dsn: str) -> None:
    result = invoke("--dsn", dsn, "--pool-size", "1000", "--memory", "8GB")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("PostgreSQL ") and "server memory 8GB" in lines[0]
    assert any(line.split()[:1] == ["max_connections"] for line in lines)
    assert "recommended. Apply with `pgwarden tune --apply`" in result.stdout
    assert "\x1b[" not in result.stdout  # no colour off a terminal


def test_a_role_that_may_not_alter_system_is_told_what_to_do_instead(
    pg_server: PgServer, dsn: str, admin: psycopg.Connection[tuple[Any, ...]]
) -> None:
    role = f"pgw_tune_{uuid.uuid4().hex[:8]}"
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        before = auto_conf(dsn)
        settings_sql = (
            "SELECT name, reset_val, pending_restart FROM pg_settings"
            " WHERE name = ANY(%s) ORDER BY name"
        )
        settings_before = admin.execute(settings_sql, [list(tune.SETTINGS)]).fetchall()
        as_role = make_conninfo(dsn, user=role)
        # --pool-size 1000: there is always max_connections to raise
        human = invoke("--apply", "--yes", "--dsn", as_role, "--pool-size", "1000")
        assert human.exit_code == 1, human.output
        assert f"Cannot apply: role '{role}' may not change max_connections" in (
            human.stdout
        )
        assert "Nothing was changed. Put these lines in postgresql.conf" in human.stdout
        assert "    max_connections = 3020\n" in human.stdout
        data = parsed(
            invoke(
                "--apply", "--yes", "--json", "--dsn", as_role, "--pool-size", "1000"
            )
        )
        assert data["refused"] and data["applied"] is None
        assert "max_connections = 3020\n" in data["postgresql_conf"]
        assert auto_conf(dsn) == before
        after = admin.execute(settings_sql, [list(tune.SETTINGS)]).fetchall()
        assert after == settings_before
    finally:
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_role_that_may_not_reload_changes_nothing(
    dsn: str, admin: psycopg.Connection[tuple[Any, ...]]
) -> None:
    # It may ALTER SYSTEM this setting, but not call pg_reload_conf(): the
    # change would sit in postgresql.auto.conf until some later reload.
    role = f"pgw_tune_{uuid.uuid4().hex[:8]}"
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    for grant in (
        "GRANT ALTER SYSTEM ON PARAMETER max_connections TO {}",
        # To read postgresql.auto.conf, which the undo puts back:
        "GRANT EXECUTE ON FUNCTION pg_show_all_file_settings() TO {}",
        "GRANT SELECT ON pg_file_settings TO {}",
    ):
        admin.execute(sql.SQL(grant).format(sql.Identifier(role)))
    try:
        before = auto_conf(dsn)
        as_role = make_conninfo(dsn, user=role)
        args = ("--apply", "--yes", "--only", "max_connections", "--pool-size", "1000")
        result = invoke(*args, "--dsn", as_role)
        assert result.exit_code == 1, result.output
        assert "may not call pg_reload_conf()" in result.stdout
        assert auto_conf(dsn) == before
        # Had the refusal not caught it: the change written is taken back.
        with psycopg.connect(as_role, autocommit=True) as conn:
            server = tune.read_settings(conn)
            assert not server.may_reload
            recs = [r for r in recommend(server, 1000) if r.name == "max_connections"]
            with pytest.raises(tune.ApplyFailed, match="nothing was changed"):
                tune.apply(conn, replace(server, may_reload=True), recs)
        assert auto_conf(dsn) == before
    finally:
        for revoke in (
            "REVOKE ALTER SYSTEM ON PARAMETER max_connections FROM {}",
            "REVOKE EXECUTE ON FUNCTION pg_show_all_file_settings() FROM {}",
            "REVOKE SELECT ON pg_file_settings FROM {}",
            "DROP ROLE {}",
        ):
            admin.execute(sql.SQL(revoke).format(sql.Identifier(role)))


def test_a_role_that_may_run_the_file_function_but_not_read_the_view(
    dsn: str, admin: psycopg.Connection[tuple[Any, ...]]
) -> None:
    role = f"pgw_tune_{uuid.uuid4().hex[:8]}"
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    grant = "GRANT EXECUTE ON FUNCTION pg_show_all_file_settings() TO {}"
    admin.execute(sql.SQL(grant).format(sql.Identifier(role)))
    try:
        result = invoke("--json", "--dsn", make_conninfo(dsn, user=role))
        assert result.exit_code in (0, 1), result.output
        assert parsed(result)["recommendations"]
    finally:
        revoke = "REVOKE EXECUTE ON FUNCTION pg_show_all_file_settings() FROM {}"
        admin.execute(sql.SQL(revoke).format(sql.Identifier(role)))
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_an_unreachable_server_is_one_line_and_exit_2_without_the_password() -> None:
    dsn = f"host=127.0.0.1 port={closed_port()} user=x password=s3cret-pw-9 dbname=x"
    proc = subprocess.run(
        [sys.executable, "-m", "pgwarden", "tune", "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("Error: ")
    assert "Traceback" not in proc.stderr and "s3cret-pw-9" not in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("--memory", "lots"),
        ("--only", "fsync"),
        ("--pool-size", "0"),
        ("--pool-size", "300000"),  # more than any server's max_connections
    ],
    ids=["memory", "only", "pool-size", "pool-size-too-big"],
)
def test_bad_options_are_usage_errors(args: tuple[str, str]) -> None:
    result = invoke(*args, "--dsn", "host=127.0.0.1 port=1")
    assert result.exit_code == 2
    assert f"Invalid value for '{args[0]}'" in result.stderr  # not the server
    assert "Traceback" not in result.output


# -- --apply, on a throwaway cluster ---------------------------------------------


@pytest.fixture(scope="module")
def throwaway() -> Iterator[EmbeddedPostgres]:
    """A cluster of this module's own, with a password and max_connections 50."""
    cluster = EmbeddedPostgres(settings={"max_connections": 50}, auth="scram-sha-256")
    try:
        cluster.start()
    except EmbeddedUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield cluster
    finally:
        cluster.cleanup()


def test_a_wrong_password_is_one_line_and_exit_2(throwaway: EmbeddedPostgres) -> None:
    dsn = make_conninfo(throwaway.dsn(), password="wrong-pw-7")
    result = invoke("--dsn", dsn)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "password authentication failed" in result.stderr
    assert "wrong-pw-7" not in result.stderr


def test_apply_sets_max_connections_for_the_next_restart(
    throwaway: EmbeddedPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = throwaway.dsn()
    audit = tmp_path / "audit.jsonl"
    before = auto_conf(dsn)
    only = (
        "--only",
        "max_connections",
        "--only",
        "idle_in_transaction_session_timeout",
    )
    args = ("--apply", "--dsn", dsn, "--pool-size", "40", *only)

    refused = invoke(*args, "--audit-log", str(audit))
    assert refused.exit_code == 2
    assert "without --yes (not a terminal)" in refused.stderr
    # The package's `tune` is the command: reach the module by its full name.
    command_module = importlib.import_module("pgwarden.cli.tune")
    monkeypatch.setattr(command_module, "stdin_is_terminal", lambda: True)
    declined = invoke(*args, input="n\n")
    assert declined.exit_code == 1
    assert "Apply these 2 changes?" in declined.stderr
    assert auto_conf(dsn) == before and not audit.exists()

    applied = invoke(*args, "--yes", "--audit-log", str(audit))
    assert applied.exit_code == 0, applied.output
    assert "ALTER SYSTEM SET \"max_connections\" = '140';" in applied.stdout
    assert (
        "max_connections = 140 is set but needs a server restart to take effect:"
        " run `pg_ctl restart` or restart the service." in applied.stdout
    )
    assert "live: idle_in_transaction_session_timeout = 5min" in applied.stdout
    assert throwaway.password and throwaway.password not in applied.output

    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(e["action"], e["setting"], e["value"]) for e in lines] == [
        ("alter_system", "max_connections", "140"),
        ("alter_system", "idle_in_transaction_session_timeout", "5min"),
    ]
    assert throwaway.password not in audit.read_text()

    assert show(dsn, "idle_in_transaction_session_timeout") == "5min"  # live
    assert show(dsn, "max_connections") == "50"
    with psycopg.connect(dsn) as conn:  # SHOW would give the OS's count over TCP
        untouched = conn.execute(
            "SELECT reset_val FROM pg_settings WHERE name = 'tcp_keepalives_count'"
        ).fetchone()
    assert untouched == ("0",)  # --only: left alone
    waiting = parsed(invoke("--json", "--dsn", dsn, "--pool-size", "40", *only))
    recs = {rec["name"]: rec for rec in waiting["recommendations"]}
    assert recs["max_connections"]["pending_restart"] is True
    assert recs["max_connections"]["recommended"] is None

    throwaway.restart()
    assert show(dsn, "max_connections") == "140"
    settled = invoke("--json", "--dsn", dsn, "--pool-size", "40", *only)
    assert settled.exit_code == 0
    assert all(r["recommended"] is None for r in parsed(settled)["recommendations"])


def test_apply_reports_in_json_what_is_live(throwaway: EmbeddedPostgres) -> None:
    dsn = throwaway.dsn()
    keepalives = [f"tcp_keepalives_{part}" for part in ("idle", "interval", "count")]
    only = [arg for name in keepalives for arg in ("--only", name)]
    result = invoke("--apply", "--yes", "--json", "--dsn", dsn, *only)
    assert result.exit_code == 0, result.output
    applied = parsed(result)["applied"]
    assert [set(a) for a in applied] == [_APPLIED_FIELDS] * 3
    assert [(a["name"], a["value"], a["live"]) for a in applied] == [
        ("tcp_keepalives_idle", 60, True),
        ("tcp_keepalives_interval", 10, True),
        ("tcp_keepalives_count", 6, True),
    ]
    again = invoke("--apply", "--yes", "--dsn", dsn, *only)
    assert again.exit_code == 0
    assert "Nothing to change." in again.stdout


def test_a_failing_change_puts_back_the_ones_before_it(
    throwaway: EmbeddedPostgres,
) -> None:
    dsn = throwaway.dsn()
    before = auto_conf(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        settings = tune.read_settings(conn)
        fine, too_many = (
            Recommendation(name, 0, value, unit, "test", needs_restart=False)
            for name, value, unit in (
                ("statement_timeout", 123_000, "ms"),
                ("max_connections", 10**7, None),  # over the server's limit
            )
        )
        with pytest.raises(tune.ApplyFailed, match="nothing was changed"):
            tune.apply(conn, settings, [fine, too_many])
    assert auto_conf(dsn) == before


def test_an_audit_log_that_cannot_be_written_stops_before_any_change(
    throwaway: EmbeddedPostgres, tmp_path: Path
) -> None:
    dsn = throwaway.dsn()
    before = auto_conf(dsn)
    bad_log = tmp_path / "no such dir" / "audit.jsonl"
    args = ("--apply", "--yes", "--dsn", dsn, "--pool-size", "1000")
    result = invoke(*args, "--only", "max_connections", "--audit-log", str(bad_log))
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: cannot write the audit log")
    assert auto_conf(dsn) == before
