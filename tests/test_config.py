"""PoolConfig: defaults, environment, coercion, validation, secrets (no database)."""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgwarden._conninfo import conninfo_problem, mask_conninfo, redact, secrets_of
from pgwarden.config import ENV_VARS, LaneSpec, PoolConfig, parse_duration
from pgwarden.errors import ConfigError, PgwardenError

SECRET = "S3cr3t-pw-XYZ"

DEFAULTS: dict[str, Any] = {
    "conninfo": "",
    "max_size": 40,
    "min_size": 5,
    "idle_timeout": 30.0,
    "connection_timeout": 10.0,
    "query_timeout": 30.0,
    "statement_timeout": 30.0,
    "idle_in_transaction_timeout": 300.0,
    "eviction_interval": 10.0,
    "tests_per_eviction_run": 3,
    "test_on_borrow": True,
    "test_while_idle": True,
    "validation_query": "SELECT 1",
    "validation_timeout": 5.0,
    "max_lifetime": 1800.0,
    "leak_detection_threshold": 60.0,
    "max_waiting": 0,
    "adaptive_concurrency": None,
    "lanes": (),
    "application_name": "pgwarden",
    "reset_query": "",
}

CONNINFO_VARS = ["DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD"]
PG_VARS = ["PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGSSLMODE"]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's variables or a stray .env file."""
    for var in [*ENV_VARS.values(), *CONNINFO_VARS, "DB_SSLMODE", *PG_VARS]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("PGOPTIONS", raising=False)
    monkeypatch.chdir(tmp_path)


def make(**kwargs: Any) -> PoolConfig:
    """PoolConfig(...) with values of any type, as the coercion accepts."""
    return PoolConfig(**kwargs)


def env(**variables: str) -> PoolConfig:
    return PoolConfig.from_env(variables, env_file=None)


def write_env_file(text: str, name: str = ".env") -> Path:
    path = Path.cwd() / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(build: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        build(*args, **kwargs)
    assert info.value.__cause__ is None
    return str(info.value)


# -- defaults and the environment table ---------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    config = PoolConfig()
    assert {f.name: getattr(config, f.name) for f in dataclasses.fields(config)} == (
        DEFAULTS
    )
    assert env() == config


def test_env_vars_cover_every_field_once() -> None:
    assert list(ENV_VARS) == [f.name for f in dataclasses.fields(PoolConfig)]
    assert len(set(ENV_VARS.values())) == len(ENV_VARS)
    with pytest.raises(TypeError):
        ENV_VARS["max_size"] = "X"  # type: ignore[index]


def test_docstring_lists_every_variable_and_default() -> None:
    doc = PoolConfig.__doc__ or ""
    for name, var in ENV_VARS.items():
        default = "auto" if DEFAULTS[name] is None else repr(DEFAULTS[name])
        assert re.search(rf"{name}\s+{var}\s+{re.escape(default)}", doc)
    assert "DB_HOST" in doc


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        PoolConfig(max_size=0)
    assert issubclass(ConfigError, PgwardenError)


ENV_CASES = [
    ("conninfo", "host=db dbname=app", "host=db dbname=app"),
    ("max_size", "12", 12),
    ("min_size", "2", 2),
    ("idle_timeout", "45s", 45.0),
    ("connection_timeout", "1500ms", 1.5),
    ("query_timeout", "0", 0.0),
    ("statement_timeout", "2m", 120.0),
    ("idle_in_transaction_timeout", "1h", 3600.0),
    ("eviction_interval", "5", 5.0),
    ("tests_per_eviction_run", "7", 7),
    ("test_on_borrow", "false", False),
    ("test_while_idle", "off", False),
    ("validation_query", "SELECT 2", "SELECT 2"),
    ("validation_timeout", "250ms", 0.25),
    ("max_lifetime", "0", 0.0),
    ("leak_detection_threshold", "90", 90.0),
    ("max_waiting", "100", 100),
    ("adaptive_concurrency", "yes", True),
    ("lanes", "a:1:2,b:0:3", (LaneSpec("a", 1, 2), LaneSpec("b", 0, 3))),
    ("application_name", "billing-worker", "billing-worker"),
    ("reset_query", "DISCARD ALL", "DISCARD ALL"),
]


def test_env_cases_cover_every_field() -> None:
    assert [case[0] for case in ENV_CASES] == list(ENV_VARS)


@pytest.mark.parametrize(("field", "raw", "expected"), ENV_CASES)
def test_every_variable_sets_its_field(field: str, raw: str, expected: Any) -> None:
    config = env(**{ENV_VARS[field]: raw})
    assert getattr(config, field) == expected
    others = {name for name in DEFAULTS if name != field}
    assert all(getattr(config, name) == DEFAULTS[name] for name in others)


def test_empty_variables_count_as_unset() -> None:
    assert env(DB_MAX_CONNECTIONS="", DATABASE_URL="", DB_LANES="") == PoolConfig()
    write_env_file("DB_MAX_CONNECTIONS=7\nDB_MIN_CONNECTIONS=\n")
    config = PoolConfig.from_env({"DB_MAX_CONNECTIONS": "", "DB_MIN_CONNECTIONS": "2"})
    assert (config.max_size, config.min_size) == (7, 2)


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_MAX_CONNECTIONS", "9")
    assert PoolConfig.from_env().max_size == 9


# -- the connection string ----------------------------------------------------


def test_database_url_beats_db_parts() -> None:
    config = env(DATABASE_URL="postgresql://u@url-host/app", DB_HOST="part-host")
    assert config.conninfo == "postgresql://u@url-host/app"


def test_db_parts_are_composed() -> None:
    config = env(
        DB_HOST="db.example",
        DB_PORT="6432",
        DB_NAME="app",
        DB_USER="svc",
        DB_PASSWORD="p w'q",
        DB_SSLMODE="require",
    )
    assert conninfo_to_dict(config.conninfo) == {
        "host": "db.example",
        "port": "6432",
        "dbname": "app",
        "user": "svc",
        "password": "p w'q",
        "sslmode": "require",
    }


def test_db_parts_any_subset() -> None:
    assert conninfo_to_dict(env(DB_NAME="app").conninfo) == {"dbname": "app"}


def test_no_connection_variables_leaves_conninfo_to_libpq() -> None:
    assert env(PGHOST="ignored-here").conninfo == ""


def test_env_file_is_read() -> None:
    write_env_file("DB_MAX_CONNECTIONS=7\nDB_LANES='a:1:2'\n# comment\n")
    config = PoolConfig.from_env({})
    assert config.max_size == 7
    assert config.lanes == (LaneSpec("a", 1, 2),)


def test_environment_beats_env_file_and_overrides_beat_both() -> None:
    write_env_file("DB_MAX_CONNECTIONS=7\nDB_MIN_CONNECTIONS=1\nDB_MAX_WAITING=3\n")
    config = PoolConfig.from_env(
        {"DB_MAX_CONNECTIONS": "8", "DB_MIN_CONNECTIONS": "2"}, min_size=4
    )
    assert (config.max_size, config.min_size, config.max_waiting) == (8, 4, 3)


def test_env_file_none_skips_it_and_missing_file_is_fine() -> None:
    write_env_file("DB_MAX_CONNECTIONS=7\n")
    assert PoolConfig.from_env({}, env_file=None).max_size == 40
    assert PoolConfig.from_env({}, env_file="nope.env") == PoolConfig()


def test_env_file_path_can_be_given(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "settings.env"
    path.parent.mkdir()
    path.write_text("DB_MAX_CONNECTIONS=6\n", encoding="utf-8")
    assert PoolConfig.from_env({}, env_file=path).max_size == 6


def test_libpq_variables_from_env_file_become_conninfo() -> None:
    write_env_file(
        f"PGHOST=filehost\nPGPORT=5433\nPGDATABASE=app\nPGUSER=u\n"
        f"PGPASSWORD={SECRET}\nPGSSLMODE=disable\n"
    )
    config = PoolConfig.from_env({"PGPORT": "6000"})
    assert conninfo_to_dict(config.conninfo) == {
        "host": "filehost",
        "port": "6000",  # the environment still wins
        "dbname": "app",
        "user": "u",
        "password": SECRET,
        "sslmode": "disable",
    }
    assert SECRET not in repr(config)


def test_libpq_variables_only_in_the_environment_are_left_to_libpq() -> None:
    assert PoolConfig.from_env({"PGHOST": "h"}).conninfo == ""


def test_libpq_variables_from_env_file_lose_to_db_parts() -> None:
    write_env_file("PGHOST=filehost\nPGUSER=pguser\n")
    config = PoolConfig.from_env({"DB_HOST": "dbhost"})
    assert conninfo_to_dict(config.conninfo) == {"host": "dbhost"}


def test_database_url_from_env_file() -> None:
    write_env_file("DATABASE_URL=postgresql://u@h/app\n")
    assert PoolConfig.from_env({}).conninfo == "postgresql://u@h/app"


# -- durations, numbers, booleans ---------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        (30, 30.0),
        (2.5, 2.5),
        (timedelta(minutes=2), 120.0),
        ("30", 30.0),
        ("1.5", 1.5),
        ("500ms", 0.5),
        ("500MS", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1.5h", 5400.0),
        (" 2 m ", 120.0),
        (".5s", 0.5),
        ("1e3ms", 1.0),
        ("0", 0.0),
        ("-0", 0.0),
    ],
)
def test_duration_forms(raw: object, seconds: float) -> None:
    assert parse_duration(raw, "x") == seconds
    config = make(query_timeout=raw)
    assert config.query_timeout == seconds
    assert isinstance(config.query_timeout, float)


@pytest.mark.parametrize(
    "raw",
    ["10x", "", "ms", "5 mins", "1d", "nan", "inf", "1,5s", "1e400", True, None, [1]],
)
def test_bad_durations(raw: object) -> None:
    if isinstance(raw, str) and raw:  # an empty variable counts as unset
        message = error_of(env, DB_IDLE_TIMEOUT=raw)
        assert message == (
            f"DB_IDLE_TIMEOUT={raw!r} is not a duration; use a number of seconds "
            "or a value like '500ms', '30s', '5m', '1h'"
        )
    message = error_of(PoolConfig, idle_timeout=raw)
    assert message.startswith(f"idle_timeout={raw!r} is not a duration")


@pytest.mark.parametrize("raw", [math.nan, math.inf, -math.inf, 10**400])
def test_non_finite_durations(raw: float) -> None:
    assert "is not a duration" in error_of(PoolConfig, max_lifetime=raw)


@pytest.mark.parametrize(
    "field",
    [
        "query_timeout",
        "statement_timeout",
        "idle_in_transaction_timeout",
        "max_lifetime",
        "leak_detection_threshold",
    ],
)
def test_zero_turns_off_but_negative_is_rejected(field: str) -> None:
    assert getattr(make(**{field: 0}), field) == 0.0
    message = error_of(env, **{ENV_VARS[field]: "-1s"})
    assert message == f"{ENV_VARS[field]}='-1s' is too small; expected a duration >= 0"
    assert "expected a duration >= 0" in error_of(PoolConfig, **{field: -0.5})
    assert "expected a duration >= 0" in error_of(
        PoolConfig, **{field: timedelta(seconds=-1)}
    )


@pytest.mark.parametrize(
    "field",
    ["idle_timeout", "connection_timeout", "eviction_interval", "validation_timeout"],
)
def test_must_be_positive(field: str) -> None:
    message = error_of(env, **{ENV_VARS[field]: "0ms"})
    assert message == f"{ENV_VARS[field]}='0ms' is too small; expected a duration > 0"
    assert f"{field}=-1 is too small" in error_of(PoolConfig, **{field: -1})


@pytest.mark.parametrize("field", ["statement_timeout", "idle_in_transaction_timeout"])
def test_server_timeouts_fit_postgresql(field: str) -> None:
    assert getattr(make(**{field: "596h"}), field) == 596 * 3600
    message = error_of(env, **{ENV_VARS[field]: "30d"})
    assert f"{ENV_VARS[field]}='30d' is not a duration" in message
    message = error_of(PoolConfig, **{field: 2_147_484})
    assert f"{field}=2147484 is too large" in message
    assert "2147483.647 seconds" in message


@given(st.integers(min_value=0, max_value=10**12))
def test_duration_units_round_trip(n: int) -> None:
    assert parse_duration(f"{n}ms", "x") == n / 1000
    assert parse_duration(f"{n}s", "x") == n
    assert parse_duration(f"{n}m", "x") == n * 60
    assert parse_duration(f"{n}H", "x") == n * 3600


@given(st.floats(min_value=0, allow_nan=False, allow_infinity=False))
def test_duration_repr_round_trip(seconds: float) -> None:
    assert parse_duration(repr(seconds), "x") == seconds
    assert parse_duration(seconds, "x") == seconds
    assert parse_duration(f"{seconds!r}s", "x") == seconds


def test_parse_duration_allow_zero() -> None:
    assert parse_duration("0", "MY_SETTING") == 0.0
    assert error_of(parse_duration, "0", "MY_SETTING", allow_zero=False) == (
        "MY_SETTING='0' is too small; expected a duration > 0"
    )


@pytest.mark.parametrize(("raw", "number"), [("12", 12), (" 12 ", 12), ("+3", 3)])
def test_whole_numbers(raw: str, number: int) -> None:
    assert env(DB_MAX_WAITING=raw).max_waiting == number


@pytest.mark.parametrize("raw", ["abc", "1.0", "1e3", "", "0x10", "1_000", "9" * 5000])
def test_bad_whole_numbers(raw: str) -> None:
    if raw:
        assert error_of(env, DB_MAX_CONNECTIONS=raw) == (
            f"DB_MAX_CONNECTIONS={raw!r} is not a whole number; "
            "expected an integer >= 1"
        )
    assert "is not a whole number" in error_of(PoolConfig, max_size=raw)


@pytest.mark.parametrize("raw", [True, False, 5.0, None])
def test_numbers_reject_other_types(raw: object) -> None:
    message = error_of(PoolConfig, max_waiting=raw)
    assert message == (
        f"max_waiting={raw!r} is not a whole number; expected an integer >= 0"
    )


@pytest.mark.parametrize(
    ("field", "minimum"),
    [
        ("max_size", 1),
        ("min_size", 0),
        ("tests_per_eviction_run", 0),
        ("max_waiting", 0),
    ],
)
def test_number_minimums(field: str, minimum: int) -> None:
    assert getattr(make(**{field: minimum, "min_size": 0}), field) == minimum
    message = error_of(env, **{ENV_VARS[field]: str(minimum - 1)})
    assert message == (
        f"{ENV_VARS[field]}='{minimum - 1}' is too small; "
        f"expected an integer >= {minimum}"
    )


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("On", True),
        (" on ", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("OFF", False),
        (True, True),
        (False, False),
    ],
)
def test_booleans(raw: object, value: bool) -> None:
    assert make(test_on_borrow=raw).test_on_borrow is value


@pytest.mark.parametrize("raw", ["maybe", "", "2", 1, 0, None])
def test_bad_booleans(raw: object) -> None:
    message = error_of(PoolConfig, test_while_idle=raw)
    assert message == (
        f"test_while_idle={raw!r} is not a boolean; use true/false, yes/no, on/off, 1/0"
    )
    if isinstance(raw, str) and raw:
        assert error_of(env, DB_TEST_ON_BORROW=raw).startswith(
            f"DB_TEST_ON_BORROW={raw!r} is not a boolean"
        )


@pytest.mark.parametrize(
    ("raw", "value"), [("auto", None), (" AUTO ", None), (None, None), ("on", True)]
)
def test_adaptive_concurrency_may_be_left_to_the_pool(
    raw: object, value: object
) -> None:
    assert make(adaptive_concurrency=raw).adaptive_concurrency is value
    if isinstance(raw, str):
        assert env(DB_ADAPTIVE_CONCURRENCY=raw).adaptive_concurrency is value
    assert PoolConfig().adaptive_concurrency is None


@pytest.mark.parametrize("raw", ["maybe", "", 1])
def test_bad_adaptive_concurrency(raw: object) -> None:
    assert error_of(PoolConfig, adaptive_concurrency=raw) == (
        f"adaptive_concurrency={raw!r} is not a boolean;"
        " use auto, true/false, yes/no, on/off, 1/0"
    )


# -- sizes and lanes ----------------------------------------------------------


def test_min_size_may_equal_max_size() -> None:
    assert PoolConfig(max_size=5, min_size=5).min_size == 5


def test_min_size_above_max_size_names_both() -> None:
    assert error_of(PoolConfig, min_size=50) == (
        "min_size=50 is greater than max_size=40; expected min_size <= max_size"
    )
    message = error_of(env, DB_MIN_CONNECTIONS="10", DB_MAX_CONNECTIONS="8")
    assert message.startswith(
        "DB_MIN_CONNECTIONS=10 is greater than DB_MAX_CONNECTIONS=8"
    )


def test_lanes_string_form_keeps_order() -> None:
    config = env(DB_LANES="backend:15:20, frontend:10:15 ,asterisk:5:10")
    assert config.lanes == (
        LaneSpec("backend", 15, 20),
        LaneSpec("frontend", 10, 15),
        LaneSpec("asterisk", 5, 10),
    )
    assert make(lanes="").lanes == ()


def test_lanes_mapping_and_lanespec_forms() -> None:
    expected = (LaneSpec("b", 1, 2), LaneSpec("a", 0, 1))
    assert make(lanes={"b": (1, 2), "a": [0, 1]}).lanes == expected
    assert make(lanes={"b": LaneSpec("b", 1, 2), "a": (0, 1)}).lanes == expected
    assert make(lanes=list(expected)).lanes == expected
    assert make(lanes=iter(expected)).lanes == expected
    assert PoolConfig(lanes=expected).lanes == expected
    assert isinstance(make(lanes=list(expected)).lanes, tuple)


def test_lane_named_default_is_allowed() -> None:
    assert make(lanes="default:2:10").lanes == (LaneSpec("default", 2, 10),)


def test_lanespec_checks_itself() -> None:
    assert LaneSpec("x", 0, 1) == LaneSpec("x", 0, 1)
    assert "lane 'x' limit=0 is too small" in error_of(LaneSpec, "x", 0, 0)
    assert "lane name 'a b' is not allowed" in error_of(LaneSpec, "a b", 0, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        LaneSpec("x", 0, 1).limit = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("backend:15", "'backend:15', which is not name:reserved:limit"),
        ("a:1:2:3", "'a:1:2:3', which is not name:reserved:limit"),
        ("a:1:2,b", "'b', which is not name:reserved:limit"),
        (":1:2", "lane name '' is not allowed"),
        ("a b:1:2", "lane name 'a b' is not allowed"),
        ("é:1:2", "lane name 'é' is not allowed"),
        ("a:x:2", "lane 'a' reserved='x' is not a whole number"),
        ("a:1:2.5", "lane 'a' limit='2.5' is not a whole number"),
        ("a:-1:2", "lane 'a' reserved='-1' is too small; expected an integer >= 0"),
        ("a:0:0", "lane 'a' limit='0' is too small; expected an integer >= 1"),
        ("a:5:3", "lane 'a' limit=3 is less than its reserved=5"),
        ("a:1:2,a:1:2", "lane 'a' is defined twice"),
        ("a:1:41", "lane 'a' has limit=41, more than max_size=40"),
        ("a:20:30,b:25:30", "lane reservations add up to 45, more than max_size=40"),
        ("a:20:30,b:20:30,c:0:5", "so lane 'c', which reserves none, could never"),
    ],
)
def test_bad_lanes(raw: str, expected: str) -> None:
    message = error_of(env, DB_LANES=raw)
    assert message.startswith("DB_LANES")
    assert expected in message
    assert expected in error_of(PoolConfig, lanes=raw)


def test_lanes_errors_name_the_other_field() -> None:
    message = error_of(env, DB_LANES="a:20:30,b:25:30", DB_MAX_CONNECTIONS="44")
    assert message == (
        "DB_LANES: lane reservations add up to 45, more than DB_MAX_CONNECTIONS=44; "
        "the reservations must fit in the pool"
    )
    message = error_of(PoolConfig, lanes="a:0:10", max_size=5, min_size=1)
    assert "lanes: lane 'a' has limit=10, more than max_size=5" in message


@pytest.mark.parametrize(
    "raw",
    [{"a": 3}, {"a": (1, 2, 3)}, {"a": LaneSpec("b", 0, 1)}, ["a:1:2"], 5, b"a:1:2"],
)
def test_bad_lane_shapes(raw: object) -> None:
    assert error_of(PoolConfig, lanes=raw).startswith("lanes")


def test_lanes_checked_again_when_max_size_shrinks() -> None:
    config = env(DB_LANES="a:10:20")
    message = error_of(config.replace, max_size=15, min_size=0)
    assert message.startswith("DB_LANES: lane 'a' has limit=20, more than max_size=15")


# -- strings and the connection string ----------------------------------------


def test_application_name_rules() -> None:
    assert PoolConfig(application_name="a" * 63).application_name == "a" * 63
    allowed = "expected 1 to 63 printable ASCII characters"
    assert error_of(PoolConfig, application_name="a" * 64) == (
        f"application_name={'a' * 64!r} is 64 bytes long; {allowed}"
    )
    assert error_of(env, DB_APPLICATION_NAME="café") == (
        f"DB_APPLICATION_NAME='café' is not printable ASCII; {allowed}"
    )
    assert "is not printable ASCII" in error_of(PoolConfig, application_name="a\nb")
    assert error_of(PoolConfig, application_name="") == (
        f"application_name='' is not allowed; {allowed}"
    )
    assert "is not allowed" in error_of(PoolConfig, application_name=None)


def test_validation_query_must_not_be_empty() -> None:
    assert "validation_query='  ' is not allowed" in error_of(
        PoolConfig, validation_query="  "
    )


@pytest.mark.parametrize(
    "conninfo",
    [
        "host=db port=5432 dbname=app",
        "postgresql://u@db:5432/app?sslmode=require",
        "postgres://db/app",
        "",
    ],
)
def test_valid_conninfo(conninfo: str) -> None:
    assert PoolConfig(conninfo=conninfo).conninfo == conninfo


@pytest.mark.parametrize(
    ("conninfo", "reason"),
    [
        ("host", 'missing "=" after "host"'),
        ("nonsense=1", 'invalid connection option "nonsense"'),
        ("postgresql://h/d?bad=1", 'invalid URI query parameter: "bad"'),
        ("host=a\0b", "NUL character"),
        ("host=\udcff", "cannot be encoded as UTF-8"),
    ],
)
def test_invalid_conninfo(conninfo: str, reason: str) -> None:
    message = error_of(PoolConfig, conninfo=conninfo)
    assert "is not a valid connection string" in message
    assert reason in message
    assert "expected a libpq key=value string" in message
    assert error_of(env, DATABASE_URL=conninfo).startswith("DATABASE_URL=")


def test_conninfo_must_be_a_string() -> None:
    assert error_of(PoolConfig, conninfo=b"host=x").startswith("conninfo is a bytes")


# -- building -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "kwargs"),
    [
        (PoolConfig, {"max_sise": 1}),
        (PoolConfig.coerce, {"max_sise": 1}),
        (PoolConfig().replace, {"max_sise": 1}),
        (env, {}),
    ],
)
def test_unknown_keyword_suggests_a_name(build: Any, kwargs: dict[str, Any]) -> None:
    if build is env:
        build, kwargs = PoolConfig.from_env, {"max_sise": 1, "env_file": None}
    assert error_of(build, **kwargs) == (
        "unknown setting 'max_sise' (did you mean 'max_size'?)"
    )


def test_unknown_keyword_variants() -> None:
    assert error_of(dataclasses.replace, PoolConfig(), max_sise=1).startswith(
        "unknown setting 'max_sise'"
    )
    assert error_of(PoolConfig, DB_MAX_CONNECTIONS=5) == (
        "unknown setting 'DB_MAX_CONNECTIONS' (did you mean 'max_size'?)"
    )
    message = error_of(PoolConfig, zzz=1)
    assert message.startswith("unknown setting 'zzz'; the settings are: conninfo,")


def test_frozen_hashable_and_picklable() -> None:
    config = env(DB_LANES="a:1:2", DATABASE_URL="host=x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_size = 3  # type: ignore[misc]
    assert hash(config) == hash(make(lanes="a:1:2", conninfo="host=x"))
    assert pickle.loads(pickle.dumps(config)) == config
    assert dataclasses.replace(config, max_size=50).max_size == 50


def test_direct_construction_coerces() -> None:
    config = make(max_size="10", idle_timeout="1m", lanes="a:1:2")
    assert (config.max_size, config.idle_timeout) == (10, 60.0)
    assert config.lanes == (LaneSpec("a", 1, 2),)


def test_replace_validates_and_keeps_the_rest() -> None:
    config = PoolConfig(max_size=10, min_size=2)
    assert config.replace(max_size="20").max_size == 20
    assert config.replace(max_size=20).min_size == 2
    assert config.replace() == config
    assert "min_size=2 is greater than max_size=1" in error_of(
        config.replace, max_size=1
    )
    assert "is too small" in error_of(dataclasses.replace, config, max_size=0)


def test_coerce() -> None:
    config = PoolConfig(max_size=10)
    assert PoolConfig.coerce(config) is config
    assert PoolConfig.coerce(config, max_size=12) == PoolConfig(max_size=12)
    assert PoolConfig.coerce("host=x", max_size=3, min_size=1) == PoolConfig(
        conninfo="host=x", max_size=3, min_size=1
    )
    assert PoolConfig.coerce("host=x", conninfo="host=y").conninfo == "host=y"
    assert PoolConfig.coerce() == PoolConfig()
    assert PoolConfig.coerce(None, max_waiting="5").max_waiting == 5
    assert error_of(PoolConfig.coerce, 42) == (
        "config must be a PoolConfig, a connection string or None, not int"
    )
    assert "min_size=5 is greater than max_size=2" in error_of(
        PoolConfig.coerce, "host=x", max_size=2
    )


# -- passwords ----------------------------------------------------------------

SECRET_CONNINFOS = [
    f"postgresql://user:{SECRET}@db.example:5432/app?sslmode=require",
    f"postgres://user:{SECRET}@db/app",
    f"postgresql://db/app?user=u&password={SECRET}",
    f"postgresql://user:other@db/app?password={SECRET}",
    f"postgresql://user:{SECRET}@db/app?password=other",
    f"host=db user=u password={SECRET} dbname=app",
    f"host=db password = '{SECRET}' dbname=app",
    f"host=db sslpassword={SECRET}",
]
MALFORMED_CONNINFOS = [
    f"host=db password={SECRET} bogus",
    f"host=db password={SECRET} trailing words",
    f"host=db password='{SECRET}",
    f"host=db password '{SECRET}'",
    f"postgresql://user:{SECRET}@db/app?bad=1",
    f"postgresql://user:{SECRET}@[db/app",
    f"postgresql://user:{SECRET}%zz@db/app",
    f"postgresql://user:{SECRET}@db/app?password",
    f"postgresql+psycopg://user:{SECRET}@db/app",
    f"postgresql://u@db/app?password={SECRET}%",
    f"host=db\0 password={SECRET}",
]


@pytest.mark.parametrize("conninfo", SECRET_CONNINFOS)
def test_password_never_in_repr_or_str(conninfo: str) -> None:
    config = PoolConfig(conninfo=conninfo)
    for text in (repr(config), str(config), config.safe_conninfo):
        assert SECRET not in text
        assert "***" in text
    # psycopg needs the password libpq would use.
    password = conninfo_to_dict(conninfo).get("password")
    assert conninfo_to_dict(config.session_conninfo()).get("password") == password


@pytest.mark.parametrize("conninfo", SECRET_CONNINFOS)
def test_password_not_in_errors_about_other_fields(conninfo: str) -> None:
    message = error_of(env, DATABASE_URL=conninfo, DB_MAX_CONNECTIONS="x")
    assert SECRET not in message
    config = PoolConfig(conninfo=conninfo)
    assert SECRET not in error_of(config.replace, max_size=0)


@pytest.mark.parametrize("conninfo", MALFORMED_CONNINFOS)
def test_password_never_in_conninfo_errors(conninfo: str) -> None:
    for message in (
        error_of(PoolConfig, conninfo=conninfo),
        error_of(env, DATABASE_URL=conninfo),
    ):
        assert SECRET not in message
        assert "is not a valid connection string" in message


def test_password_from_db_password_is_hidden() -> None:
    config = env(DB_HOST="db", DB_PASSWORD=SECRET)
    assert SECRET not in repr(config)
    assert conninfo_to_dict(config.conninfo)["password"] == SECRET
    message = error_of(env, DB_HOST="db", DB_PASSWORD=SECRET, DB_MIN_CONNECTIONS="-1")
    assert SECRET not in message


def test_mask_conninfo_keeps_the_rest() -> None:
    assert mask_conninfo(f"host=db password={SECRET} port=5") == (
        "host=db password=*** port=5"
    )
    assert mask_conninfo(f"host=db password='{SECRET} x' port=5") == (
        "host=db password=*** port=5"
    )
    assert mask_conninfo(f"postgresql://u:{SECRET}@db/app?password=x&sslmode=a") == (
        "postgresql://u:***@db/app?password=***&sslmode=a"
    )
    assert mask_conninfo("postgresql://u@db/app") == "postgresql://u@db/app"
    assert mask_conninfo("host=db") == "host=db"
    # Unescaped "@", "/" or "?" in a URI password: hide it whole.
    for password in ("p@ss", "pa/ss", "pa?ss"):
        assert mask_conninfo(f"postgresql://u:{password}@db/app?sslmode=a") == (
            "postgresql://u:***@db/app?sslmode=a"
        )
    # ... but an "@" in the query string is not a password.
    for uri in (
        "postgresql://db:5432/app?application_name=me@laptop",
        "postgresql://u@db/app?application_name=me@laptop",
    ):
        assert mask_conninfo(uri) == uri
    assert mask_conninfo("postgresql://u:pw@db/app?application_name=me@laptop") == (
        "postgresql://u:***@db/app?application_name=me@laptop"
    )
    # Malformed: an unquoted password with a space is hidden up to the next key.
    assert mask_conninfo("host=db password=ab cd port=5") == (
        "host=db password=*** port=5"
    )


@given(
    st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=16),
    st.sampled_from(["pairs", "uri", "query", "raw pairs", "raw uri", "raw pg"]),
    st.text(max_size=8),
)
def test_no_password_survives(suffix: str, form: str, tail: str) -> None:
    password = "Zq9" + suffix  # "Zq9" appears nowhere else
    # Written raw, a trailing backslash escapes what follows: libpq's password is
    # then another string, and "Zq9\\" alone is no secret.
    assume(not (form == "raw pairs" and password.endswith("\\")))
    written = {
        "pairs": make_conninfo("", host="db", password=password, dbname="app"),
        "uri": f"postgresql://u:{quote(password, safe='')}@db/app",
        "query": f"postgresql://u@db/app?password={quote(password, safe='')}&x={tail}",
        "raw pairs": f"host=db password={password} {tail}",
        "raw uri": f"postgresql://u:{password}@db/app{tail}",
        "raw pg": f"postgresql+psycopg://u:{password}@db/app{tail}",
    }[form]
    try:
        texts = [repr(PoolConfig(conninfo=written))]
    except ConfigError as exc:
        texts = [str(exc)]
    texts += [mask_conninfo(written), redact(f"<{password}>", secrets_of(written))]
    for text in texts:
        assert password not in text
        assert quote(password, safe="") not in text


def test_secrets_of_and_redact() -> None:
    uri = "postgresql://u:p%40ss@db/app?password=q%20r"
    assert set(secrets_of(uri)) >= {"q r", "p%40ss", "p@ss", "q%20r"}
    assert secrets_of("host=db") == ()
    assert secrets_of("host=db password=''") == ()
    assert "pw'1" in secrets_of(r"host=db password='pw\'1'")
    assert SECRET in secrets_of(f"host=db password={SECRET} bogus")
    text = f"failed for p@ss and p%40ss and {SECRET}"
    assert redact(text, [*secrets_of(uri), SECRET, ""]) == (
        "failed for *** and *** and ***"
    )
    assert redact("nothing", []) == "nothing"


def test_conninfo_problem() -> None:
    assert conninfo_problem("host=db") is None
    problem = conninfo_problem(f"host=db password={SECRET} {SECRET}")
    assert problem is not None
    assert SECRET not in problem
    assert problem.startswith('missing "=" after ')


# -- what psycopg is given ----------------------------------------------------


def test_session_conninfo_defaults() -> None:
    params = conninfo_to_dict(PoolConfig(conninfo="host=db").session_conninfo())
    assert params == {
        "host": "db",
        "application_name": "pgwarden",
        "options": "-c statement_timeout=30000 "
        "-c idle_in_transaction_session_timeout=300000",
        "connect_timeout": "10",
    }


def test_session_conninfo_keeps_the_users_settings() -> None:
    config = make(
        conninfo="postgresql://u@db/app?application_name=mine&options=-c%20search_path%3Dx"
        "&connect_timeout=3",
        statement_timeout="1.5s",
        idle_in_transaction_timeout=0,
        application_name="ignored",
    )
    params = conninfo_to_dict(config.session_conninfo())
    assert params["application_name"] == "mine"
    assert params["options"] == "-c search_path=x -c statement_timeout=1500"
    assert params["connect_timeout"] == "3"
    assert (params["user"], params["dbname"]) == ("u", "app")


def test_session_conninfo_edge_values(monkeypatch: pytest.MonkeyPatch) -> None:
    config = PoolConfig(
        statement_timeout=0, idle_in_transaction_timeout=0, connection_timeout=0.2
    )
    assert conninfo_to_dict(config.session_conninfo()) == {
        "application_name": "pgwarden",
        "connect_timeout": "2",
    }
    params = conninfo_to_dict(
        PoolConfig(statement_timeout=0.0001, connection_timeout=2.1).session_conninfo()
    )
    assert str(params["options"]).startswith("-c statement_timeout=1 ")
    assert params["connect_timeout"] == "3"
    monkeypatch.setenv("PGOPTIONS", "-c work_mem=64MB")
    params = conninfo_to_dict(PoolConfig().session_conninfo())
    assert str(params["options"]).startswith(
        "-c work_mem=64MB -c statement_timeout=30000"
    )
