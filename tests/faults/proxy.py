"""An in-process TCP proxy that injects network faults between a client and a server.

`Proxy` listens on 127.0.0.1 and forwards every connection it accepts to the
target. Its event loop runs in a thread of its own, so it behaves the same
whether the test drives a thread pool or an asyncio one (the test's loop never
runs proxy code). A mode switch takes effect on the live connections and on
new ones, and has taken effect when the call returns:

* `pass_()`: forward everything, as fast as it comes.
* `close_all(rst=False)`: close every live connection pair, both sides, with a
  FIN (or with an RST: ``SO_LINGER`` 0); from then on, close each new connection
  as soon as it is accepted, until another mode is set.
* `blackhole()`: keep every socket open but forward nothing in either direction,
  and accept new connections without forwarding anything on them either: a
  half-open network. Nothing is lost: what was sent meanwhile stays queued
  (as TCP would keep retransmitting it) and flows once forwarding resumes,
  closes included.
* `deaf()`: accept no new connection; the listening socket's backlog shrinks
  to 0, so the first connection attempt completes TCP's handshake and then hears
  nothing, and later ones hang in SYN-SENT (psycopg's ``deaf_listen``). Live
  connections keep flowing. When the proxy listens again, a connection still
  queued in the backlog is accepted and served late, as a real server would.
* `latency(seconds)`: forward everything, each chunk `seconds` after it was
  read (in both directions, so a round trip costs twice that).

Typical use::

    with Proxy("127.0.0.1", 5432) as proxy:
        conn = psycopg.connect(proxy.dsn(dsn))
        proxy.blackhole()
        ...
        proxy.pass_()
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Literal, Self

from psycopg.conninfo import make_conninfo

__all__ = ["Mode", "Proxy"]

Mode = Literal["pass", "close", "blackhole", "deaf", "latency"]

_BACKLOG = 128
_CHUNK = 65536
# How long a caller waits for the proxy thread to apply a change.
_CALL_TIMEOUT = 10.0


class Proxy:
    """A TCP proxy from 127.0.0.1:`port` to `target_host`:`target_port`.

    The listening socket is bound in the constructor, so `port` and `dsn()` can
    be used at once; `start()` (or entering the context manager) starts
    forwarding, `stop()` closes every socket and joins the thread.
    """

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1"
    ) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(_BACKLOG)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._mode: Mode = "pass"
        self._delay = 0.0
        self._rst = False
        self._pairs: set[_Pair] = set()
        self._accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"fault proxy :{self.port}", daemon=True
        )
        self._flowing: asyncio.Event | None = None
        self._accepter: asyncio.Task[None] | None = None
        self._stopped = False

    def __repr__(self) -> str:
        target = f"{self.target[0]}:{self.target[1]}"
        return (
            f"<Proxy :{self.port} -> {target} mode={self.mode}"
            f" connections={self.connections}>"
        )

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> Self:
        """Start accepting and forwarding (in pass mode); once only."""
        if self._stopped:
            raise RuntimeError(f"the proxy on port {self.port} was stopped")
        if not self._thread.is_alive():
            self._thread.start()
            self._call(self._start())
        return self

    def stop(self) -> None:
        """Close every connection and the listening socket; join the thread.

        Idempotent. Live connections are closed with a FIN.
        """
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            try:
                self._call(self._shutdown())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(_CALL_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()
        self._listener.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what the tests see --------------------------------------------------

    @property
    def mode(self) -> Mode:
        """The current mode."""
        return self._mode

    @property
    def connections(self) -> int:
        """How many connection pairs are open now."""
        return len(self._pairs)

    @property
    def accepted(self) -> int:
        """How many connections were accepted since the start (closed ones too)."""
        return self._accepted

    def dsn(self, conninfo: str) -> str:
        """`conninfo` with its host and port replaced by the proxy's."""
        return make_conninfo(conninfo, host=self.host, hostaddr=None, port=self.port)

    # -- modes ---------------------------------------------------------------

    def pass_(self) -> None:
        """Forward everything (resume after any other mode)."""
        self._call(self._set("pass"))

    def close_all(self, rst: bool = False) -> None:
        """Close every live connection, and every new one as soon as accepted.

        With `rst`, close with a reset (``SO_LINGER`` 0) instead of a FIN.
        """
        self._call(self._set("close", rst=rst))

    def blackhole(self) -> None:
        """Forward nothing and close nothing, on live and new connections."""
        self._call(self._set("blackhole"))

    def deaf(self) -> None:
        """Accept no new connection; live ones keep flowing."""
        self._call(self._set("deaf"))

    def latency(self, seconds: float) -> None:
        """Forward everything, each chunk `seconds` late."""
        if seconds < 0:
            raise ValueError(f"latency must be >= 0, not {seconds!r}")
        self._call(self._set("latency", delay=seconds))

    # -- inside the proxy's thread -------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the proxy's loop and wait until it is done."""
        if not self._thread.is_alive():
            coro.close()
            state = "stopped" if self._stopped else "not started: call start()"
            raise RuntimeError(f"the proxy on port {self.port} is {state}")
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CALL_TIMEOUT)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._listen()

    def _listen(self) -> None:
        if self._accepter is None:
            self._listener.listen(_BACKLOG)
            self._accepter = asyncio.get_running_loop().create_task(self._accept())

    async def _unlisten(self) -> None:
        if self._accepter is not None:
            self._accepter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepter
            self._accepter = None
        self._listener.listen(0)

    async def _set(self, mode: Mode, *, delay: float = 0.0, rst: bool = False) -> None:
        assert self._flowing is not None
        self._mode, self._delay, self._rst = mode, delay, rst
        if mode == "blackhole":
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode == "deaf":
            await self._unlisten()
        else:
            self._listen()
        if mode == "close":
            await asyncio.gather(*(pair.close(rst) for pair in list(self._pairs)))

    async def _shutdown(self) -> None:
        await self._unlisten()
        await asyncio.gather(*(pair.close(False) for pair in list(self._pairs)))

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            client, _ = await loop.sock_accept(self._listener)
            self._accepted += 1
            if self._mode == "close":
                _close(client, self._rst)
                continue
            pair = _Pair(self, client)
            self._pairs.add(pair)
            pair.task = loop.create_task(pair.run())

    def _forget(self, pair: _Pair) -> None:
        self._pairs.discard(pair)


class _Pair:
    """One client connection and its connection to the target."""

    def __init__(self, proxy: Proxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.client.setblocking(False)
        self.upstream: socket.socket | None = None
        self.task: asyncio.Task[None] | None = None
        self._closing = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            upstream.setblocking(False)
            self.upstream = upstream
            try:
                await loop.sock_connect(upstream, self.proxy.target)
            except OSError:
                return  # the target is down: the client sees its connection close
            for sock in (self.client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._direction(self.client, upstream))
                tg.create_task(self._direction(upstream, self.client))
        except* OSError:
            pass  # a reset from either side ends the pair
        finally:
            if not self._closing:
                self._closing = True
                self._close_sockets(rst=False)

    async def _direction(self, src: socket.socket, dst: socket.socket) -> None:
        """Forward `src` to `dst`: a reader and a writer joined by a queue,
        so that latency delays each chunk without slowing the reading."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._read(src, queue))
            tg.create_task(self._write(dst, queue))

    async def _read(
        self, src: socket.socket, queue: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        loop = asyncio.get_running_loop()
        flowing = self.proxy._flowing
        assert flowing is not None
        while True:
            # In blackhole mode, stop reading: the peer's data stays queued
            # in the kernel, as on a network that silently drops packets.
            await flowing.wait()
            data = await loop.sock_recv(src, _CHUNK)
            queue.put_nowait((time.monotonic() + self.proxy._delay, data))
            if not data:
                return

    async def _write(
        self, dst: socket.socket, queue: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        loop = asyncio.get_running_loop()
        flowing = self.proxy._flowing
        assert flowing is not None
        while True:
            due, data = await queue.get()
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            await flowing.wait()
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            await loop.sock_sendall(dst, data)

    async def close(self, rst: bool) -> None:
        """Close both sides now, with a FIN or an RST."""
        if self._closing:
            return
        self._closing = True
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self._close_sockets(rst)

    def _close_sockets(self, rst: bool) -> None:
        _close(self.client, rst)
        if self.upstream is not None:
            _close(self.upstream, rst)
        self.proxy._forget(self)


def _close(sock: socket.socket, rst: bool) -> None:
    """Close `sock`; with `rst`, make the kernel send a reset, not a FIN."""
    with contextlib.suppress(OSError):
        if rst:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        sock.close()
