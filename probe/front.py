"""A lean HTTP/1.1 front for the kubelet's plain probes; every other request is aiohttp's.

Kubelets, load balancers and load generators send the same few hundred bytes over and over:
`GET /ready HTTP/1.1` with a Host and a User-Agent. Taking those through aiohttp's parser, request objects,
router and response writer costs more CPU than the answer, so this `asyncio.Protocol` answers plain
`GET|HEAD /ready`, `/live` and `/live/ping` itself, from the same `Health` verdicts the app uses.

It is deliberately narrow. Anything it does not recognise hands the connection, with every byte read so far,
to aiohttp's own protocol for the rest of the connection's life: another path or method, a query string, an
Accept that asks for JSON, a request body, HTTP/1.0, an upgrade, an `Expect`, a malformed or oversized head, bare
LF line endings. So every other answer (verbose and JSON views, per-check paths, /metrics, 400, 404, 405, 431)
has exactly one definition, the app's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import socket
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

from aiohttp import web

from probe.server import LIVE, READY, Health

# Heads larger than this, or with more header lines, go to aiohttp (whose limits are 8190 per line, 128 lines).
MAX_HEAD = 8190
MAX_HEADER_LINES = 100
# Unprocessed bytes buffered while an answer is pending before the connection stops reading.
MAX_BUFFER = 65536

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_HANDOFF = frozenset((b"content-length", b"transfer-encoding", b"upgrade", b"expect"))

PING = "ping"
_PATHS = {b"/ready": READY, b"/live": LIVE, b"/live/ping": PING}
_BODIES = {
    (READY, True): b"ok",
    (READY, False): b"ready check failed",
    (LIVE, True): b"ok",
    (LIVE, False): b"live check failed",
    (PING, True): b"ok\n",
}

Handoff = Callable[[], asyncio.Protocol]


class _Date:
    """The IMF-fixdate for the Date header, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


@functools.lru_cache(maxsize=256)  # kubelets and load balancers send the same bytes every time
def parse_head(head: bytes) -> tuple[str, bool, bool] | None:
    """(path kind, HEAD?, close after?) for a plain probe request head (without its final CRLF CRLF), or None
    for anything that aiohttp should answer."""
    lines = head.split(b"\r\n")
    if len(lines) > MAX_HEADER_LINES or len(head) > MAX_HEAD or b"\n" in head.replace(b"\r\n", b""):
        return None
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or parts[0] not in (b"GET", b"HEAD"):
        return None
    kind = _PATHS.get(parts[1])
    if kind is None:
        return None
    close = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
            return None
        lname = name.lower()
        if lname in _HANDOFF:
            return None
        if lname == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if b"upgrade" in tokens:
                return None
            close = close or b"close" in tokens
        elif lname == b"accept" and b"json" in value.lower() and kind != PING:
            return None
    return kind, parts[0] == b"HEAD", close


class ProbeFront:
    """The listening socket: plain probes answered here, everything else handed to `handoff()`'s protocol."""

    def __init__(
        self, health: Health, handoff: Handoff, *, keepalive: float = 15.0, server_header: str = "probe"
    ) -> None:
        self.health = health
        self.handoff = handoff
        self.keepalive = keepalive
        self.server_header = server_header.encode()
        self.date = _Date()
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._responses: dict[tuple[str, bool, bool, bool], bytes] = {}
        self._responses_date = b""

    async def start(self, host: str, port: int, *, backlog: int = 1024) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, backlog=backlog, reuse_address=True
        )
        return self._server

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._server.sockets) if self._server is not None else []

    async def close(self) -> None:
        """Stop listening and close the connections still answered here (handed-off ones are aiohttp's)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    def answer_now(self, kind: str) -> bool | None:
        """The verdict without waiting, or None when it needs a run."""
        return True if kind == PING else self.health.now(kind)

    def response(self, kind: str, ok: bool, head_only: bool, close: bool) -> bytes:
        """The whole answer, built once per second per variant (only the Date header changes)."""
        date = self.date()
        if date is not self._responses_date:
            self._responses.clear()
            self._responses_date = date
        key = (kind, ok, head_only, close)
        cached = self._responses.get(key)
        if cached is None:
            cached = self._responses[key] = self._build(kind, ok, head_only, close, date)
        return cached

    def _build(self, kind: str, ok: bool, head_only: bool, close: bool, date: bytes) -> bytes:
        body = _BODIES[(kind, ok)]
        status = 200 if ok else 503
        parts = [
            b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode()),
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
            b"Date: " + date + b"\r\nServer: " + self.server_header + b"\r\n",
        ]
        if close:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        if not head_only:
            parts.append(body)
        return b"".join(parts)


class _Connection(asyncio.Protocol):
    """One client connection while the front answers it."""

    def __init__(self, front: ProbeFront) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False  # an answer that needs a run is pending; later requests wait their turn
        self.write_paused = False
        self.read_paused = False
        self.eof = False
        self.last_active = 0.0
        self._idle: asyncio.TimerHandle | None = None

    # --------------------------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # not isinstance: uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.front.connections.add(self)
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        if self.front.keepalive > 0:
            self._idle = loop.call_at(self.last_active + self.front.keepalive, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.last_active = asyncio.get_running_loop().time()
        if self.busy or self.write_paused:
            if len(self.buf) > MAX_BUFFER and not self.read_paused and self.transport is not None:
                self.read_paused = True
                self.transport.pause_reading()
            return
        self._process()

    def eof_received(self) -> bool | None:
        self.eof = True
        if not self.busy:
            self._process()
        return True if self.busy else None  # keep the socket open to write the pending answer

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.busy:
            self._process()

    # ------------------------------------------------------------------------------------------ requests

    def _process(self) -> None:
        t = self.transport
        while t is not None and not t.is_closing() and not self.busy and not self.write_paused:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD or (b"\n" in self.buf and self.buf.count(b"\n") != self.buf.count(b"\r\n")):
                    self._hand_off()
                elif self.eof:
                    t.close()
                return
            parsed = parse_head(bytes(self.buf[:end]))
            if parsed is None:
                self._hand_off()
                return
            del self.buf[: end + 4]
            kind, head_only, close = parsed
            ok = self.front.answer_now(kind)
            if ok is None:
                self.busy = True
                self.front.health.later(kind, functools.partial(self._deliver, kind, head_only, close))
                return
            self._send(kind, ok, head_only, close)
        if self.read_paused and t is not None and not self.busy and len(self.buf) <= MAX_BUFFER:
            self.read_paused = False
            t.resume_reading()

    def _deliver(self, kind: str, head_only: bool, close: bool, ok: bool) -> None:
        """The pending answer, once the run it waited for is done."""
        self.busy = False
        if self.transport is None or self.transport.is_closing():
            return
        self._send(kind, ok, head_only, close)
        self._process()

    def _send(self, kind: str, ok: bool, head_only: bool, close: bool) -> None:
        assert self.transport is not None
        self.transport.write(self.front.response(kind, ok, head_only, close))
        self.last_active = asyncio.get_running_loop().time()
        if close or (self.eof and not self.buf):
            self.transport.close()

    def _hand_off(self) -> None:
        """From here on this connection is aiohttp's: its protocol gets the transport and the unread bytes."""
        t = self.transport
        assert t is not None
        self._forget()
        self.transport = None
        if self.read_paused:
            t.resume_reading()
        proto = self.front.handoff()
        t.set_protocol(proto)
        proto.connection_made(t)
        if self.buf:
            proto.data_received(bytes(self.buf))
        self.buf = bytearray()
        if self.eof:
            proto.eof_received()

    # ------------------------------------------------------------------------------------------ lifetime

    def _check_idle(self) -> None:
        self._idle = None
        t = self.transport
        if t is None or t.is_closing():
            return
        loop = asyncio.get_running_loop()
        due = self.last_active + self.front.keepalive
        if self.busy or loop.time() < due:
            self._idle = loop.call_at(max(due, loop.time() + 0.1), self._check_idle)
            return
        t.close()  # idle past keep-alive, like aiohttp's own keepalive_timeout

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._forget()

    def _forget(self) -> None:
        self.front.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None


class Serving:
    """The app's runner and the front listening before it; `close()` stops both, front first."""

    def __init__(self, runner: web.AppRunner, front: ProbeFront) -> None:
        self.runner = runner
        self.front = front

    @property
    def port(self) -> int:
        return int(self.front.sockets[0].getsockname()[1])

    async def close(self) -> None:
        await self.front.close()
        await self.runner.cleanup()


async def serve(
    app: web.Application,
    health: Health,
    host: str,
    port: int,
    *,
    keepalive: float = 15.0,
    server_header: str = "probe",
    backlog: int = 1024,
) -> Serving:
    """Start the app (its startup hooks run here) and listen on host:port with the front before it."""
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, keepalive_timeout=keepalive, shutdown_timeout=2.0
    )
    await runner.setup()
    server = runner.server
    assert server is not None
    # aiohttp's low-level web.Server is itself the protocol factory loop.create_server would be given.
    front = ProbeFront(health, server, keepalive=keepalive, server_header=server_header)
    try:
        await front.start(host, port, backlog=backlog)
    except BaseException:
        await runner.cleanup()
        raise
    return Serving(runner, front)
