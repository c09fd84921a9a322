"""A throwaway PostgreSQL server on 127.0.0.1, for `pgwarden demo` and the tests.

The binaries come from the pgserver wheel (``pip install 'pgwarden[embedded]'``);
pgserver's own server class is not used: it only listens on a Unix socket.
POSIX only.

Each cluster lives in ``<tmp>/pgwarden-pg-<pid>-<random>``, where ``<pid>`` is
the Python process that owns it. `EmbeddedPostgres.cleanup` (also run at exit)
stops the server and deletes that directory; any later `EmbeddedPostgres.start`
reaps the clusters whose owner died without cleaning up.

As root: PostgreSQL refuses to run as root, so it runs as the user named by
``PGWARDEN_EMBEDDED_USER`` (default ``pgwarden``, created with ``useradd
--system`` if missing, else ``nobody``). If that user cannot run the binaries
where pip put them (say under /root), they are copied once to
``<tmp>/pgwarden-bin-<version>-<arch>``.

With the default ``auth="trust"``, any local user can connect as superuser.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from psycopg.conninfo import make_conninfo

from pgwarden.errors import PgwardenError

__all__ = [
    "DEFAULT_SETTINGS",
    "EmbeddedError",
    "EmbeddedPostgres",
    "EmbeddedUnavailable",
]

Setting = str | int | bool
Ids = tuple[int, int] | None  # (uid, gid) to run PostgreSQL as, when we are root
Run = tuple[int, str]  # exit status and output of a command

#: Settings for a fast throwaway cluster: durability is off on purpose.
DEFAULT_SETTINGS: Mapping[str, Setting] = {
    "max_connections": 300,
    "shared_buffers": "32MB",
    "fsync": False,
    "synchronous_commit": False,
    "full_page_writes": False,
    "log_min_messages": "warning",
    "unix_socket_directories": "",
}
_AUTH_METHODS = ("trust", "scram-sha-256", "md5", "password")
_STOP_SIGNALS = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}
_PREFIX = "pgwarden-pg-"


class EmbeddedError(PgwardenError, RuntimeError):
    """The embedded server failed to start or stop; the message ends with its log."""

    __module__ = "pgwarden"


class EmbeddedUnavailable(EmbeddedError):
    """The embedded server cannot run here, most often as pgserver is missing."""

    __module__ = "pgwarden"


class EmbeddedPostgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 from the pgserver wheel's binaries.

    ``port`` defaults to a free port chosen at the first `start` and kept by
    restarts. ``settings`` are added to `DEFAULT_SETTINGS` (change them later
    with ALTER SYSTEM). ``auth`` is the pg_hba method for TCP; with any method
    but ``trust`` the superuser gets a random `password`, which `dsn` includes.
    Use it as a context manager, or call `start` and then `cleanup`.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        port: int | None = None,
        settings: Mapping[str, Setting] | None = None,
        base_dir: Path | None = None,
        superuser: str = "postgres",
        auth: str = "trust",
    ) -> None:
        if auth not in _AUTH_METHODS:
            raise ValueError(f"auth={auth!r}: expected one of {_AUTH_METHODS}")
        for name in settings or {}:
            if name in ("port", "listen_addresses"):
                raise ValueError(f"{name} is managed by EmbeddedPostgres")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name):
                raise ValueError(f"invalid setting name {name!r}")
        self._settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._port = port
        self._fixed_port = port is not None
        self._base_dir = Path(base_dir or tempfile.gettempdir()).absolute()
        self.superuser = superuser
        self._auth = auth
        self.password = None if auth == "trust" else secrets.token_urlsafe(18)
        self._ids = _run_as_ids()
        self._bin = Path()
        self._run_dir: Path | None = None
        self._owner_pid = os.getpid()
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self._env.update(TZ="UTC", LC_ALL="C")

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedError("the embedded server has not been started")
        return self._port

    @property
    def data_dir(self) -> Path:
        if self._run_dir is None:
            raise EmbeddedError("the embedded server has not been started")
        return self._run_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / "postgres.log"

    def dsn(
        self, dbname: str = "postgres", user: str | None = None, **params: Setting
    ) -> str:
        """A libpq connection string to ``dbname`` over TCP, as superuser by default."""
        kwargs: dict[str, Setting | None] = {"host": self.host, "port": self.port}
        kwargs.update(dbname=dbname, user=user or self.superuser)
        kwargs["password"] = self.password if user is None else None
        kwargs.update(params)
        return make_conninfo("", **kwargs)

    def start(self) -> None:
        """Create the cluster (first call only) and start it; no-op if it runs."""
        if self._run_dir is None:
            self._create()
        elif self.is_running():
            return
        attempts = 1 if self._fixed_port else 3
        for attempt in range(1, attempts + 1):
            self._port = self._port or _free_port()
            conf = {**self._settings, "listen_addresses": self.host, "port": self.port}
            lines = (f"{k} = {_quote(v)}\n" for k, v in conf.items())
            self._write(self.data_dir / "pgwarden.conf", "".join(lines))
            log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self._run("pg_ctl", "start", "-w", "-t", "60", "-l", self.log_path)
                return
            except EmbeddedError:
                with open(self.log_path, errors="replace") as log:
                    log.seek(log_size)
                    if (
                        attempt == attempts
                        or "Address already in use" not in log.read()
                    ):
                        raise
            self._port = None  # taken since we picked it: pick another

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate); no-op if stopped."""
        if mode not in _STOP_SIGNALS:
            raise ValueError(f"mode={mode!r}: expected one of {list(_STOP_SIGNALS)}")
        if self._run_dir and not _stop_postmaster(self.data_dir, _STOP_SIGNALS[mode]):
            raise EmbeddedError(
                f"the server did not stop within 60 s\n"
                f"--- last lines of {self.log_path} ---\n{self.log_tail()}"
            )

    def restart(self, mode: str = "fast") -> None:
        """Stop (``fast`` or ``immediate``) and start again, on the same port."""
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        return self._run_dir is not None and _postmaster_pid(self.data_dir) is not None

    def cleanup(self) -> None:
        """Stop the server if it runs and delete all its files. Idempotent."""
        if self._run_dir is None:
            return
        atexit.unregister(self._atexit)
        try:
            _kill_postmaster(self.data_dir)
        finally:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server log ('' if there is none)."""
        if self._run_dir is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    def _atexit(self) -> None:
        if os.getpid() == self._owner_pid:  # not in a forked child
            self.cleanup()

    def _create(self) -> None:
        self._bin = _binaries(self._ids, self._env)
        _reap_stale(self._base_dir, self._ids)
        prefix = f"{_PREFIX}{os.getpid()}-"
        self._run_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=self._base_dir))
        atexit.register(self._atexit)
        try:
            if self._ids:
                os.chown(self._run_dir, *self._ids)
            args = ["-U", self.superuser, "-E", "UTF8", "--no-locale", "--no-sync"]
            if self.password is not None:
                self._write(self._run_dir / "pwfile", self.password + "\n")
                args += ["--pwfile", str(self._run_dir / "pwfile")]
            self._run("initdb", "--no-instructions", *args)
            (self._run_dir / "pwfile").unlink(missing_ok=True)
            with open(self.data_dir / "postgresql.conf", "a") as conf:
                conf.write("\ninclude = 'pgwarden.conf'\n")
            hba = (
                f"host all all {net} {self._auth}\n"
                for net in ("127.0.0.1/32", "::1/128")
            )
            self._write(self.data_dir / "pg_hba.conf", "".join(hba))
        except BaseException:
            self.cleanup()
            raise

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        if self._ids:
            os.chown(path, *self._ids)

    def _run(self, exe: str, *args: str | Path) -> None:
        cmd = [str(a) for a in ("-D", self.data_dir, *args)]
        rc, output = _run_binary(self._bin / exe, cmd, self._ids, self._env)
        if rc != 0:
            what = f"pg_ctl {args[0]}" if exe == "pg_ctl" else exe
            raise EmbeddedError(
                f"{what} failed (exit {rc}): {output}\n"
                f"--- last lines of {self.log_path} ---\n{self.log_tail()}"
            )


def _quote(value: Setting) -> str:
    if isinstance(value, bool):
        value = "on" if value else "off"
    return "'" + str(value).replace("'", "''") + "'"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((EmbeddedPostgres.host, 0))
        return int(sock.getsockname()[1])


def _run_binary(exe: Path, args: list[str], ids: Ids, env: Mapping[str, str]) -> Run:
    uid, gid, groups = (ids[0], ids[1], ()) if ids else (None, None, None)
    # A file, not a pipe: the postmaster that pg_ctl starts could keep a pipe open.
    with tempfile.TemporaryFile("w+") as out:
        cmd = [str(exe), *args]
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            cwd="/",
            env=env,
            timeout=180,
            user=uid,
            group=gid,
            extra_groups=groups,
        )
        out.seek(0)
        return proc.returncode, out.read().strip()


def _run_as_ids() -> Ids:
    if os.geteuid() != 0:
        return None
    import pwd

    name = os.environ.get("PGWARDEN_EMBEDDED_USER", "pgwarden")
    try:
        pwd.getpwnam(name)
    except KeyError:
        cmd = ["useradd", "--system", "--no-create-home", "--user-group", name]
        with contextlib.suppress(OSError):  # a concurrent run may create it too
            subprocess.run([*cmd, "--shell", "/usr/sbin/nologin"], capture_output=True)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:  # no useradd here (e.g. busybox)
        entry = pwd.getpwnam("nobody")
    if entry.pw_uid == 0:
        raise EmbeddedError(f"PGWARDEN_EMBEDDED_USER={name!r} is root")
    return entry.pw_uid, entry.pw_gid


def _binaries(ids: Ids, env: Mapping[str, str]) -> Path:
    """The bin directory to use, copied where the run-as user can reach it if needed."""
    spec = importlib.util.find_spec("pgserver")
    locations = list(spec.submodule_search_locations or []) if spec else []
    package = Path(locations[0]) if locations else Path("/nonexistent")
    if not (package / "pginstall" / "bin" / "postgres").exists():
        raise EmbeddedUnavailable(
            "the embedded PostgreSQL needs the pgserver package: "
            "pip install 'pgwarden[embedded]'"
        )

    def problem(bin_dir: Path) -> str | None:
        for exe in ("postgres", "initdb"):  # initdb loads the wheel's vendored libpq
            try:
                rc, output = _run_binary(bin_dir / exe, ["--version"], ids, env)
            except OSError as exc:
                return str(exc)
            if rc != 0:
                return output
        return None

    if ids is None or problem(package / "pginstall" / "bin") is None:
        return package / "pginstall" / "bin"
    version = importlib.metadata.version("pgserver")
    cache = Path(tempfile.gettempdir(), f"pgwarden-bin-{version}-{platform.machine()}")
    if not cache.exists():
        # Keep the site-packages layout: the binaries find pgserver.libs by rpath.
        tmp = Path(tempfile.mkdtemp(prefix=f"{cache.name}.tmp-", dir=cache.parent))
        skip = shutil.ignore_patterns("include", "__pycache__", "*.py")
        shutil.copytree(package, tmp / "pgserver", symlinks=True, ignore=skip)
        if (package.parent / "pgserver.libs").is_dir():
            shutil.copytree(package.parent / "pgserver.libs", tmp / "pgserver.libs")
        for root, _, files in os.walk(tmp):  # readable by all, as pip would leave it
            for path in [Path(root), *(Path(root, name) for name in files)]:
                if not path.is_symlink():
                    mode = path.stat().st_mode
                    path.chmod(mode | 0o444 | (0o111 if mode & 0o100 else 0))
        try:
            tmp.rename(cache)  # atomic; fails if a concurrent run did it first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    bin_dir = cache / "pgserver" / "pginstall" / "bin"
    st = cache.lstat()  # in a shared temp dir: trust it only if no one else can write
    unsafe = st.st_uid != 0 or st.st_mode & 0o022
    if why := "owned or writable by others" if unsafe else problem(bin_dir):
        raise EmbeddedError(f"cannot use the PostgreSQL binaries in {cache}: {why}")
    return bin_dir


def _cmdline(pid: int) -> str:
    """The command line of process ``pid``, '' if there is none (dead or zombie)."""
    if Path("/proc/self").exists():
        try:
            return (
                Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            )
        except (OSError, UnicodeDecodeError):
            return ""
    cmd = ["ps", "-o", "command=", "-p", str(pid)]
    return subprocess.run(cmd, capture_output=True, text=True).stdout


def _postmaster_pid(data_dir: Path) -> int | None:
    """The pid of the live postmaster of ``data_dir``, checked on its command line."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    cmd = _cmdline(pid)
    return pid if "postgres" in cmd and str(data_dir) in cmd else None


def _stop_postmaster(data_dir: Path, sig: int, timeout: float = 60) -> bool:
    """Signal the postmaster of ``data_dir`` if it runs; True once it is gone."""
    # As pg_ctl stop does, but polling faster than its 100 ms.
    if (pid := _postmaster_pid(data_dir)) is None:
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while _postmaster_pid(data_dir) == pid:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _kill_postmaster(data_dir: Path) -> None:
    if not _stop_postmaster(data_dir, signal.SIGQUIT, timeout=5):  # immediate
        _stop_postmaster(data_dir, signal.SIGKILL, timeout=5)


def _reap_stale(base_dir: Path, ids: Ids) -> None:
    """Stop and delete our clusters in ``base_dir`` whose owning process is gone."""
    owners = {os.geteuid(), ids[0] if ids else -1}
    for path in base_dir.glob(f"{_PREFIX}*"):
        match = re.fullmatch(rf"{_PREFIX}(\d+)-[a-z0-9_]+", path.name)
        if not match or _cmdline(int(match[1])):  # not ours, or its owner is alive
            continue
        with contextlib.suppress(OSError):
            st = path.lstat()
            if stat.S_ISDIR(st.st_mode) and st.st_uid in owners:
                _kill_postmaster(path / "data")
                shutil.rmtree(path, ignore_errors=True)
