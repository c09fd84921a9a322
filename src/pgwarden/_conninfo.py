"""Keeping passwords out of connection strings we show, log or raise about.

libpq reads a password from a ``password`` (or ``sslpassword``) key in a
key=value string, and from the userinfo or the query string of a
``postgresql://`` URI. These helpers hide all of them, and still hide them
when the string is malformed and libpq cannot parse it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = [
    "conninfo_problem",
    "mask_conninfo",
    "redact",
    "secrets_of",
    "with_session",
]

MASK = "***"

# Any scheme, so that SQLAlchemy-style "postgresql+psycopg://" URLs are masked too.
_URI = re.compile(r"[a-z][a-z0-9+.-]*://", re.IGNORECASE)
# libpq ends the userinfo at the first "@" before the first "/", but passwords
# with an unescaped "@", "/" or "?" are common: mask up to the last "@" before
# the query string or, if libpq still sees a password, up to the last "@".
_USERINFO = (
    re.compile(r"(?P<head>://[^:@/?]*:)(?P<secret>[^?]*)@"),
    re.compile(r"(?P<head>://[^:@/]*:)(?P<secret>.*)@", re.DOTALL),
)
_QUERY_PASSWORD = re.compile(
    r"(?P<head>[?&][^=&#]*password[^=&#]*=)(?P<secret>[^&#]*)", re.IGNORECASE
)
_PAIRS = (
    # One key=value pair as libpq reads it: an unquoted value ends at
    # whitespace, a quoted one at the first unescaped quote.
    re.compile(
        r"(?P<head>[^\s=]+\s*=\s*)(?P<secret>'(?:[^'\\]|\\.)*'|(?:[^\s\\]|\\.)*)",
        re.DOTALL,
    ),
    # Malformed strings: a password runs up to the next "key=" (an unquoted
    # password containing a space must not be half shown), even without "=".
    re.compile(
        r"(?P<head>[\w-]*password[\w-]*(?:\s*=)?\s*)"
        r"(?P<secret>'(?:[^'\\]|\\.)*'(?=\s|$)|.*?(?=\s+[^\s=']+\s*=|$))",
        re.IGNORECASE | re.DOTALL,
    ),
)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_QUOTED = re.compile(r'"([^"]*)"')


def _parse(conninfo: str) -> dict[str, object] | None:
    if "\0" in conninfo:  # libpq would silently cut the string there
        return None
    try:
        return dict(conninfo_to_dict(conninfo))
    except (psycopg.Error, UnicodeError):
        return None


def _is_secret_key(key: str) -> bool:
    return "password" in key.lower()


def _unescape(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        raw = raw[1:-1]
    return _ESCAPE.sub(r"\1", raw)


def _hides_passwords(masked: str) -> bool:
    params = _parse(masked)
    return params is not None and all(
        value == MASK for key, value in params.items() if _is_secret_key(key)
    )


def _apply(patterns: Iterable[re.Pattern[str]], text: str) -> tuple[str, list[str]]:
    """Mask what each pattern matches; also return the masked parts."""
    found: list[str] = []

    def mask(match: re.Match[str]) -> str:
        if not _is_secret_key(match["head"]) and "://" not in match["head"]:
            return match[0]
        found.append(match["secret"])
        return match["head"] + MASK + match[0][match.end("secret") - match.start() :]

    for pattern in patterns:
        text = pattern.sub(mask, text)
    return text, found


def _mask(conninfo: str) -> tuple[str, list[str]]:
    """The masked string, and the passwords as written in `conninfo`."""
    readings: list[tuple[re.Pattern[str], ...]]
    if _URI.match(conninfo.lstrip()):
        readings = [(userinfo, _QUERY_PASSWORD) for userinfo in _USERINFO]
    else:
        readings = [(pair,) for pair in _PAIRS]
    params = _parse(conninfo)
    if params is None:  # nothing to check against: the most cautious reading
        return _apply(readings[-1], conninfo)
    for patterns in readings:  # the first reading that hides what libpq reads
        masked, found = _apply(patterns, conninfo)
        if _hides_passwords(masked):
            return masked, found
    return MASK, [str(v) for k, v in params.items() if _is_secret_key(k)]


def mask_conninfo(conninfo: str) -> str:
    """Return `conninfo` with every password replaced by ``***``.

    Works on key=value strings and URIs, well formed or not. The rest of the
    string is kept as written, so the result is still useful in messages.
    """
    return _mask(conninfo)[0]


def secrets_of(conninfo: str) -> tuple[str, ...]:
    """Return the passwords found in `conninfo`, for scrubbing other texts.

    Both the value libpq would use and the form written in the string are
    returned (a URI password may be percent-encoded, a quoted one escaped).
    """
    params = _parse(conninfo)
    found = [str(v) for k, v in (params or {}).items() if _is_secret_key(k)]
    decode = unquote if _URI.match(conninfo.lstrip()) else _unescape
    for raw in _mask(conninfo)[1]:
        if decode(raw):
            found += [raw, decode(raw)]
            if params is None:  # where the value ends is a guess: add its words
                found += raw.split()
                # ... and, in a URI's userinfo, every cut at an "@"
                found += [raw[:i] for i, char in enumerate(raw) if char == "@"]
    return tuple(dict.fromkeys(secret for secret in found if secret))


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of each secret (or its URL-quoted form) by ``***``."""
    variants = {
        form
        for secret in secrets
        if secret
        for form in (secret, quote(secret, safe=""), quote(secret), quote_plus(secret))
    }
    for variant in sorted(variants, key=len, reverse=True):
        text = text.replace(variant, MASK)
    return text


def conninfo_problem(conninfo: str) -> str | None:
    """Say why libpq cannot parse `conninfo`, or return None if it can.

    The explanation never contains a password: libpq quotes pieces of the
    string in its messages, and only those that appear in the masked string
    (or single characters, libpq's own syntax) are kept.
    """
    if "\0" in conninfo:
        return "it contains a NUL character"
    try:
        conninfo_to_dict(conninfo)
    except UnicodeError:
        return "it contains characters that cannot be encoded as UTF-8"
    except psycopg.Error as exc:
        message = str(exc).strip()
    else:
        return None
    masked = mask_conninfo(conninfo)
    message = redact(message, secrets_of(conninfo))
    return _QUOTED.sub(
        lambda m: m[0] if len(m[1]) <= 1 or m[1] in masked else '"..."', message
    ).removesuffix(" in connection info string")


def with_session(
    conninfo: str,
    *,
    application_name: str,
    force_name: bool = False,
    settings: dict[str, int] | None = None,
    connect_timeout: int,
) -> str:
    """`conninfo` for one of pgwarden's sessions.

    Adds `application_name` (over the conninfo's own only with `force_name`),
    `connect_timeout` (unless the conninfo sets one) and the server `settings`
    as ``-c name=value`` in ``options``, after the options the conninfo
    already has (or ``PGOPTIONS``, which libpq stops reading once ``options``
    is set).
    """
    params = conninfo_to_dict(conninfo)
    extra: dict[str, str] = {}
    if force_name or "application_name" not in params:
        extra["application_name"] = application_name
    if settings:
        existing = str(params.get("options", os.environ.get("PGOPTIONS", "")))
        flags = [f"-c {name}={value}" for name, value in settings.items()]
        extra["options"] = " ".join(filter(None, [existing.strip(), *flags]))
    if "connect_timeout" not in params:
        extra["connect_timeout"] = str(connect_timeout)
    return make_conninfo(conninfo, **extra)
