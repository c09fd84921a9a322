"""Pool settings: `PoolConfig`, built from keyword arguments or the environment.

Also `parse_duration`, for other settings written like the pool's durations,
and `ENV_VARS`, the environment variable of each `PoolConfig` field.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Final, Self

from psycopg.conninfo import make_conninfo

from pgwarden._conninfo import conninfo_problem, mask_conninfo, with_session
from pgwarden.errors import ConfigError

__all__ = ["ENV_VARS", "LaneSpec", "PoolConfig", "parse_duration"]

ENV_VARS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "conninfo": "DATABASE_URL",
        "max_size": "DB_MAX_CONNECTIONS",
        "min_size": "DB_MIN_CONNECTIONS",
        "idle_timeout": "DB_IDLE_TIMEOUT",
        "connection_timeout": "DB_CONNECTION_TIMEOUT",
        "query_timeout": "DB_QUERY_TIMEOUT",
        "statement_timeout": "DB_STATEMENT_TIMEOUT",
        "idle_in_transaction_timeout": "DB_IDLE_IN_TRANSACTION_TIMEOUT",
        "eviction_interval": "DB_EVICTION_INTERVAL",
        "tests_per_eviction_run": "DB_TESTS_PER_EVICTION_RUN",
        "test_on_borrow": "DB_TEST_ON_BORROW",
        "test_while_idle": "DB_TEST_WHILE_IDLE",
        "validation_query": "DB_VALIDATION_QUERY",
        "validation_timeout": "DB_VALIDATION_TIMEOUT",
        "max_lifetime": "DB_MAX_LIFETIME",
        "leak_detection_threshold": "DB_LEAK_DETECTION_THRESHOLD",
        "max_waiting": "DB_MAX_WAITING",
        "adaptive_concurrency": "DB_ADAPTIVE_CONCURRENCY",
        "lanes": "DB_LANES",
        "application_name": "DB_APPLICATION_NAME",
        "reset_query": "DB_RESET_QUERY",
    }
)
"""The environment variable `PoolConfig.from_env` reads for each field."""

# When DATABASE_URL is not set: (conninfo key, our variable, libpq's variable).
_CONNINFO_PARTS: Final = (
    ("host", "DB_HOST", "PGHOST"),
    ("port", "DB_PORT", "PGPORT"),
    ("dbname", "DB_NAME", "PGDATABASE"),
    ("user", "DB_USER", "PGUSER"),
    ("password", "DB_PASSWORD", "PGPASSWORD"),
    ("sslmode", "DB_SSLMODE", "PGSSLMODE"),
)

_INT_MINIMUMS: Final = dict(
    max_size=1, min_size=0, tests_per_eviction_run=0, max_waiting=0
)
_POSITIVE_DURATIONS: Final = (
    "idle_timeout",
    "connection_timeout",
    "eviction_interval",
    "validation_timeout",
)
_OPTIONAL_DURATIONS: Final = (  # 0 turns these off
    "query_timeout",
    "statement_timeout",
    "idle_in_transaction_timeout",
    "max_lifetime",
    "leak_detection_threshold",
)
_BOOLS: Final = ("test_on_borrow", "test_while_idle")
# Fields sent to the server as settings, and the largest value it accepts.
_SERVER_SETTINGS: Final = {
    "statement_timeout": "statement_timeout",
    "idle_in_transaction_timeout": "idle_in_transaction_session_timeout",
}
_MAX_SERVER_MS: Final = 2**31 - 1

_DURATION = re.compile(
    r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]+)?)\s*(ms|s|m|h)?",
    re.IGNORECASE,
)
_UNIT_SECONDS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_HINT: Final = (
    "use a number of seconds or a value like '500ms', '30s', '5m', '1h'"
)
_INTEGER = re.compile(r"[+-]?[0-9]+")
_BOOL_WORDS: Final = {
    **dict.fromkeys(("true", "1", "yes", "on"), True),
    **dict.fromkeys(("false", "0", "no", "off"), False),
}
_LANE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_LANES_EXAMPLE: Final = "'backend:15:20,frontend:10:15'"


def _bad(source: str, value: object, problem: str, allowed: str) -> ConfigError:
    return ConfigError(f"{source}={value!r} {problem}; {allowed}")


def parse_duration(value: object, source: str, *, allow_zero: bool = True) -> float:
    """Read a duration and return it in seconds.

    Accepts a number of seconds, a `timedelta`, or a string: a number with an
    optional unit ``ms``, ``s``, ``m`` or ``h`` (``"500ms"``, ``"30s"``,
    ``"1.5h"``, ``"30"``). `source` names the setting in the `ConfigError`
    raised for anything else, for negative, NaN or infinite durations, and for
    0 unless `allow_zero`.
    """
    seconds: float | None = None
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, timedelta):
            seconds = value.total_seconds()
        elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
            number, unit = float(match[1]), (match[2] or "s").lower()
            seconds = number / 1000 if unit == "ms" else number * _UNIT_SECONDS[unit]
    except OverflowError:
        seconds = None
    if seconds is None or not math.isfinite(seconds):
        raise _bad(source, value, "is not a duration", _DURATION_HINT)
    if seconds < 0 or (seconds == 0 and not allow_zero):
        expected = "expected a duration " + (">= 0" if allow_zero else "> 0")
        raise _bad(source, value, "is too small", expected)
    return abs(seconds)  # abs() turns -0.0 into 0.0


def _parse_int(value: object, source: str, minimum: int) -> int:
    expected = f"expected an integer >= {minimum}"
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        try:
            number = int(value)
        except ValueError:  # more digits than int() accepts
            number = None
    if number is None:
        raise _bad(source, value, "is not a whole number", expected)
    if number < minimum:
        raise _bad(source, value, "is too small", expected)
    return number


def _parse_bool(value: object, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise _bad(source, value, "is not a boolean", "use true/false, yes/no, on/off, 1/0")


def _parse_auto_bool(value: object, source: str) -> bool | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        return _parse_bool(value, source)
    except ConfigError:
        allowed = "use auto, true/false, yes/no, on/off, 1/0"
        raise _bad(source, value, "is not a boolean", allowed) from None


@dataclass(frozen=True, slots=True)
class LaneSpec:
    """A lane: a named share of the pool for one workload.

    `reserved` connections can only be used by this lane, and the lane never
    holds more than `limit` at once (``0 <= reserved <= limit``). Names use
    letters, digits, ``_``, ``.`` and ``-``.
    """

    name: str
    reserved: int
    limit: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _LANE_NAME.fullmatch(self.name):
            raise ConfigError(
                f"lane name {self.name!r} is not allowed; "
                "expected letters, digits, '_', '.' or '-'"
            )
        reserved = _parse_int(self.reserved, f"lane {self.name!r} reserved", 0)
        limit = _parse_int(self.limit, f"lane {self.name!r} limit", 1)
        if limit < reserved:
            raise ConfigError(
                f"lane {self.name!r} limit={limit} is less than its "
                f"reserved={reserved}; expected reserved <= limit"
            )
        object.__setattr__(self, "reserved", reserved)
        object.__setattr__(self, "limit", limit)


def _lane(source: str, name: Any, reserved: Any, limit: Any) -> LaneSpec:
    try:
        return LaneSpec(name, reserved, limit)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _lanes_from_text(text: str, source: str) -> list[LaneSpec]:
    lanes = []
    for item in filter(str.strip, text.split(",")):
        parts = [part.strip() for part in item.split(":")]
        if len(parts) != 3:
            problem = f"has {item.strip()!r}, which is not name:reserved:limit"
            raise _bad(source, text, problem, f"expected e.g. {_LANES_EXAMPLE}")
        lanes.append(_lane(source, *parts))
    return lanes


def _parse_lanes(
    value: object, source: str, max_size: int, max_label: str
) -> tuple[LaneSpec, ...]:
    if isinstance(value, str):
        lanes = _lanes_from_text(value, source)
    elif isinstance(value, Mapping):
        lanes = []
        for name, spec in value.items():
            if isinstance(spec, LaneSpec) and spec.name == name:
                lanes.append(spec)
            elif isinstance(spec, tuple | list) and len(spec) == 2:
                lanes.append(_lane(source, name, *spec))
            else:
                raise ConfigError(
                    f"{source}: lane {name!r} maps to {spec!r}; expected a "
                    f"(reserved, limit) pair or a LaneSpec named {name!r}"
                )
    elif isinstance(value, Iterable) and not isinstance(value, bytes):
        lanes = list(value)
        for lane in lanes:
            if not isinstance(lane, LaneSpec):
                raise ConfigError(f"{source}: {lane!r} is not a LaneSpec")
    else:
        allowed = f"expected {_LANES_EXAMPLE}, {{name: (reserved, limit)}} or LaneSpecs"
        raise _bad(source, value, "is not a list of lanes", allowed)
    seen: set[str] = set()
    for lane in lanes:
        if lane.name in seen:
            raise ConfigError(
                f"{source}: lane {lane.name!r} is defined twice; "
                "lane names must be unique"
            )
        seen.add(lane.name)
        if lane.limit > max_size:
            raise ConfigError(
                f"{source}: lane {lane.name!r} has limit={lane.limit}, more than "
                f"{max_label}={max_size}; expected limit <= {max_label}"
            )
    reserved = sum(lane.reserved for lane in lanes)
    if reserved > max_size:
        raise ConfigError(
            f"{source}: lane reservations add up to {reserved}, more than "
            f"{max_label}={max_size}; the reservations must fit in the pool"
        )
    if reserved == max_size:
        starved = [lane.name for lane in lanes if not lane.reserved]
        if starved:
            raise ConfigError(
                f"{source}: lane reservations add up to {max_label}={max_size},"
                f" so lane {starved[0]!r}, which reserves none, could never get"
                " a connection; reserve one for it or leave room"
            )
    return tuple(lanes)


def _check_conninfo(value: object, source: str) -> str:
    allowed = (
        "expected a libpq key=value string such as 'host=db dbname=app' "
        "or a URI such as 'postgresql://user@db/app'"
    )
    if not isinstance(value, str):
        raise ConfigError(f"{source} is a {type(value).__name__}; {allowed}")
    problem = conninfo_problem(value)
    if problem is not None:
        problem = f"is not a valid connection string ({problem})"
        raise _bad(source, mask_conninfo(value), problem, allowed)
    return value


def _check_application_name(value: object, source: str) -> str:
    allowed = "expected 1 to 63 printable ASCII characters"
    if not isinstance(value, str) or not value:
        raise _bad(source, value, "is not allowed", allowed)
    if not all(" " <= char <= "~" for char in value):
        raise _bad(source, value, "is not printable ASCII", allowed)
    if len(value) > 63:  # PostgreSQL truncates names to NAMEDATALEN - 1 bytes
        raise _bad(source, value, f"is {len(value)} bytes long", allowed)
    return value


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000)) if seconds > 0 else 0


def _validate(raw: Mapping[str, Any], sources: Mapping[str, str]) -> dict[str, Any]:
    """Coerce and check every field; `sources` names where a value came from."""

    def label(name: str) -> str:
        return sources.get(name, name)

    out = dict(raw)
    out["conninfo"] = _check_conninfo(raw["conninfo"], label("conninfo"))
    for name, minimum in _INT_MINIMUMS.items():
        out[name] = _parse_int(raw[name], label(name), minimum)
    for name in _POSITIVE_DURATIONS:
        out[name] = parse_duration(raw[name], label(name), allow_zero=False)
    for name in _OPTIONAL_DURATIONS:
        out[name] = parse_duration(raw[name], label(name))
    for name in _SERVER_SETTINGS:
        if _milliseconds(out[name]) > _MAX_SERVER_MS:
            allowed = f"expected at most {_MAX_SERVER_MS / 1000} seconds (24.8 days)"
            raise _bad(label(name), raw[name], "is too large", allowed)
    for name in _BOOLS:
        out[name] = _parse_bool(raw[name], label(name))
    out["adaptive_concurrency"] = _parse_auto_bool(  # None, "auto": the pool decides
        raw["adaptive_concurrency"], label("adaptive_concurrency")
    )
    query = raw["validation_query"]
    if not isinstance(query, str) or not query.strip():
        allowed = "expected an SQL statement such as 'SELECT 1'"
        raise _bad(label("validation_query"), query, "is not allowed", allowed)
    if not isinstance(raw["reset_query"], str):
        allowed = "expected an SQL statement such as 'DISCARD ALL', or ''"
        raise _bad(label("reset_query"), raw["reset_query"], "is not allowed", allowed)
    out["application_name"] = _check_application_name(
        raw["application_name"], label("application_name")
    )
    if out["min_size"] > out["max_size"]:
        raise ConfigError(
            f"{label('min_size')}={out['min_size']} is greater than "
            f"{label('max_size')}={out['max_size']}; "
            f"expected {label('min_size')} <= {label('max_size')}"
        )
    out["lanes"] = _parse_lanes(
        raw["lanes"], label("lanes"), out["max_size"], label("max_size")
    )
    return out


def _unknown_setting(name: str) -> ConfigError:
    from difflib import get_close_matches  # rare: not worth importing up front

    by_variable = {var.lower(): field for field, var in ENV_VARS.items()}
    guess = by_variable.get(name.lower()) or next(
        iter(get_close_matches(name, _FIELD_NAMES, n=1)), None
    )
    if guess:
        return ConfigError(f"unknown setting {name!r} (did you mean {guess!r}?)")
    return ConfigError(
        f"unknown setting {name!r}; the settings are: {', '.join(_FIELD_NAMES)}"
    )


def _reject_unknown(names: Iterable[str]) -> None:
    for name in names:
        if name not in _FIELD_NAMES:
            raise _unknown_setting(name)


def read_environment(
    environ: Mapping[str, str] | None, from_file: Mapping[str, str]
) -> dict[str, str]:
    """The variables set in `environ` (default: `os.environ`) over `from_file`.

    Variables set to an empty string count as not set.
    """
    process = os.environ if environ is None else environ
    return {**from_file, **{key: value for key, value in process.items() if value}}


def _read_env_file(path: str | os.PathLike[str] | None) -> dict[str, str]:
    if path is None or not Path(path).is_file():
        return {}
    from dotenv import dotenv_values  # only when there is a .env file

    values = dotenv_values(path, encoding="utf-8")
    return {key: value for key, value in values.items() if value}


@dataclass(frozen=True, repr=False, kw_only=True)
class PoolConfig:
    """Settings of a pool: a frozen value, checked when it is built.

    Build it with keywords (``PoolConfig(max_size=20)``), from the environment
    with `from_env`, or with `coerce`. A bad value raises `ConfigError`, an
    unknown keyword too. Durations are seconds; they also accept a `timedelta`
    or a string such as ``"500ms"``, ``"30s"``, ``"5m"`` or ``"1.5h"``.

    Fields:
        conninfo: libpq key=value string or ``postgresql://`` URI; "" leaves
            everything to libpq's defaults and PG* variables.
        max_size: most connections open at once (>= 1).
        min_size: connections kept open while idle (<= max_size).
        idle_timeout: an idle connection beyond min_size is closed after this.
        connection_timeout: longest wait for a connection.
        query_timeout: client-side limit on one query; 0 = off.
        statement_timeout: the server's statement_timeout; 0 = off.
        idle_in_transaction_timeout: the server's
            idle_in_transaction_session_timeout; 0 = off.
        eviction_interval: time between checks of the idle connections.
        tests_per_eviction_run: idle connections validated per check.
        test_on_borrow: validate a connection before handing it out.
        test_while_idle: validate idle connections during the checks.
        validation_query: the query that validates a connection.
        validation_timeout: longest time a validation may take.
        max_lifetime: a connection older than this is replaced; 0 = off.
        leak_detection_threshold: report a connection held longer; 0 = off.
        max_waiting: callers that may wait at once, more are refused (but
            not within their lane's reservation); 0 = no bound.
        adaptive_concurrency: while callers queue, lend one connection at a
            time if that is measured to raise throughput (see
            `pgwarden.pool._adaptive`); reservations are never held back.
            None ("auto", the default): on for `Pool`, whose threads pay
            for each other's queries in GIL hand-offs; off for `AsyncPool`,
            where it measured no gain.
        lanes: LaneSpecs, ``{name: (reserved, limit)}`` or the string
            ``"name:reserved:limit,..."``; a lane named ``default`` serves
            the borrows that name no lane. The sum of the reservations and
            every limit must fit in max_size.
        application_name: shown in pg_stat_activity, unless conninfo sets one;
            at most 63 printable ASCII characters.
        reset_query: run (outside a transaction) each time a connection comes
            back, e.g. "DISCARD ALL" to drop a borrower's SET, temporary tables,
            advisory locks and LISTEN; "" (the default) runs nothing and costs
            no round trip.
    """

    conninfo: str = ""
    max_size: int = 40
    min_size: int = 5
    idle_timeout: float = 30.0
    connection_timeout: float = 10.0
    query_timeout: float = 30.0
    statement_timeout: float = 30.0
    idle_in_transaction_timeout: float = 300.0
    eviction_interval: float = 10.0
    tests_per_eviction_run: int = 3
    test_on_borrow: bool = True
    test_while_idle: bool = True
    validation_query: str = "SELECT 1"
    validation_timeout: float = 5.0
    max_lifetime: float = 1800.0
    leak_detection_threshold: float = 60.0
    max_waiting: int = 0
    adaptive_concurrency: bool | None = None
    lanes: tuple[LaneSpec, ...] = ()
    application_name: str = "pgwarden"
    reset_query: str = ""

    # Where each value came from (field -> environment variable), for messages.
    _sources: ClassVar[Mapping[str, str]] = {}

    if not TYPE_CHECKING:  # type checkers should keep seeing __init__'s keywords

        def __new__(cls, *args, **kwargs):
            # The generated __init__ would raise a bare TypeError instead.
            _reject_unknown(kwargs)
            return super().__new__(cls)

    def __post_init__(self) -> None:
        for name, value in _validate(self._values(), {}).items():
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        values = self._values() | {"conninfo": self.safe_conninfo}
        args = ", ".join(f"{name}={value!r}" for name, value in values.items())
        return f"{type(self).__name__}({args})"

    @property
    def safe_conninfo(self) -> str:
        """`conninfo` with any password replaced by ``***``."""
        return mask_conninfo(self.conninfo)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        env_file: str | os.PathLike[str] | None = ".env",
        **overrides: Any,
    ) -> Self:
        """Read the settings from the environment (variables in `ENV_VARS`).

        `environ` defaults to `os.environ`. The `env_file` (``.env`` in the
        current directory by default; None skips it) fills in what the
        environment does not set, and keyword `overrides` win over both.
        Variables set to an empty string count as not set.

        The connection string is DATABASE_URL or, failing that, is built from
        DB_HOST, DB_PORT, DB_NAME, DB_USER, DB_PASSWORD and DB_SSLMODE. Without
        any of those, libpq's PGHOST ... PGSSLMODE found in the `env_file` are
        put into it, since libpq itself only reads the process environment.
        """
        _reject_unknown(overrides)
        from_file = _read_env_file(env_file)
        env = read_environment(environ, from_file)
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name, var in ENV_VARS.items():
            if var in env:
                values[name], sources[name] = env[var], var
        if "conninfo" not in values:
            parts = {key: var for key, var, _ in _CONNINFO_PARTS if var in env}
            if not parts:  # libpq's variables, when the file sets them
                parts = {key: pg for key, _, pg in _CONNINFO_PARTS if pg in from_file}
            if parts:  # values from env: the environment still beats the file
                params = {key: env[var] for key, var in parts.items()}
                values["conninfo"] = make_conninfo("", **params)
                sources["conninfo"] = ", ".join(parts.values())
        for name, value in overrides.items():
            values[name] = value
            sources.pop(name, None)
        return cls._make(values, sources)

    @classmethod
    def coerce(
        cls, config: PoolConfig | str | None = None, **overrides: Any
    ) -> PoolConfig:
        """Turn what a pool was given into a `PoolConfig`.

        `config` is a `PoolConfig` (returned with `overrides` applied), a
        connection string or None (the defaults); keyword `overrides` win.
        """
        if isinstance(config, PoolConfig):
            return config.replace(**overrides) if overrides else config
        if isinstance(config, str):
            return cls._make({"conninfo": config, **overrides}, {})
        if config is None:
            return cls._make(overrides, {})
        raise ConfigError(
            "config must be a PoolConfig, a connection string or None, "
            f"not {type(config).__name__}"
        )

    def replace(self, **changes: Any) -> Self:
        """Return a checked copy with `changes` applied."""
        sources = {k: v for k, v in self._sources.items() if k not in changes}
        return self._make(self._values() | changes, sources)

    def session_conninfo(self) -> str:
        """The connection string the pool gives psycopg.

        `conninfo` plus application_name (unless it sets one), connect_timeout
        (unless it sets one) and, in options, the server-side timeouts that
        are not 0, after the options it already has (or PGOPTIONS, which
        libpq would otherwise stop reading).
        """
        return with_session(
            self.conninfo,
            application_name=self.application_name,
            settings={
                setting: _milliseconds(getattr(self, name))
                for name, setting in _SERVER_SETTINGS.items()
                if getattr(self, name) > 0
            },
            connect_timeout=max(2, math.ceil(self.connection_timeout)),
        )

    def _values(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in fields(self)}

    @classmethod
    def _make(cls, values: Mapping[str, Any], sources: Mapping[str, str]) -> Self:
        _reject_unknown(values)
        # Checked here first so that errors name the environment variables.
        checked = _validate({**_DEFAULTS, **values}, sources)
        config = cls(**checked)
        object.__setattr__(config, "_sources", dict(sources))
        return config


_FIELD_NAMES: Final = tuple(field.name for field in fields(PoolConfig))
_DEFAULTS: Final = {field.name: field.default for field in fields(PoolConfig)}


def _environment_table() -> str:
    rows = [("field", "environment variable", "default")]
    rows += [
        (
            name,
            ENV_VARS[name],
            "auto" if _DEFAULTS[name] is None else repr(_DEFAULTS[name]),
        )
        for name in _FIELD_NAMES
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows]
    db_vars = ", ".join(var for _, var, _ in _CONNINFO_PARTS)
    note = f"Without DATABASE_URL, conninfo is built from {db_vars}."
    return (
        "\n\n    Environment (`from_env`):\n\n"
        + "".join(f"        {line}\n" for line in lines)
        + "\n"
        + textwrap.indent(textwrap.fill(note, 74), "    ")
        + "\n"
    )


if PoolConfig.__doc__:  # None under python -OO
    PoolConfig.__doc__ = PoolConfig.__doc__.rstrip() + _environment_table()
