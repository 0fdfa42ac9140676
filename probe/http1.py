"""The canary's own HTTP/1.1 connections to Triton: keep-alive, one request at a time each, strict replies.

Why not aiohttp's `ClientSession`, as every other call to Triton uses through `tritonclient.http.aio`: a canary
posts the same bytes on every run, and on a fresh probe the client session's generality (a response object, a
stream reader, a header multidict, cookie and redirect handling, timers) costs 0.4-0.9 ms of CPU per request on
a small machine, next to a few milliseconds of inference: a tenth of the probe's budget. Here the request is
one prebuilt `bytes` write and the reply is parsed in place. `tritonclient.http.aio` still generates the body
and decodes the answer, so the request on the wire and the errors read exactly as its own `infer()`'s.

What a reply must be (anything else is `MalformedReply`, never a guess): `HTTP/1.x NNN` status line, header
lines `name: value` with token names and no control characters in values, no obsolete line folding, a head under
64 KiB, a body framed by one `Content-Length`, by the chunked transfer coding (HTTP/1.1 only, never together with
a `Content-Length`), or, on a plain TCP connection, by the server's orderly close; under `MAX_BODY`. Over TLS a
body framed by a close is refused: a cut-off one could not be told from a whole one. 204 and 304 have no body.
Up to `MAX_INTERIM` interim 1xx heads are skipped; trailers are checked like headers.

A connection is reused only after a complete reply that did not ask to close it, and is dropped as soon as the
server closes it while idle. A request on a reused connection that is lost before any byte of reply (the server
closed it as the request went out) is sent once more on a fresh connection: a canary inference has no side
effects. If no fresh connection can be made, the server is gone, and the error is the lost request's
(`Disconnected`), not the refused connection's. Cancelling a request aborts its connection, so a canary that
missed its deadline leaves nothing queued behind it on this side.
"""

from __future__ import annotations

import asyncio
import re
import ssl as ssl_module
from dataclasses import dataclass

MAX_HEAD = 64 * 1024
MAX_BODY = 1 << 30
MAX_INTERIM = 8  # 1xx heads before the final one

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9]\d\d)(?: [^\r\n]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class MalformedReply(ValueError):
    """The peer's bytes are not an HTTP/1.1 reply this client accepts."""


class Disconnected(ConnectionError):
    """The connection ended before a whole reply arrived."""


@dataclass(slots=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header's values joined with ", "
    body: bytes


def parse_head(head: bytes) -> tuple[int, dict[str, str], bool]:
    """A reply head (without its blank line) -> status, headers, and whether it lets the connection live on."""
    lines = head.split(b"\r\n")
    m = _STATUS_LINE.fullmatch(lines[0])
    if m is None:
        raise MalformedReply(f"bad status line {lines[0][:80]!r}")
    headers = _fields(lines[1:])
    if m.group(1) == b"0" and "transfer-encoding" in headers:
        raise MalformedReply("transfer coding in an HTTP/1.0 reply")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in tokens if m.group(1) == b"1" else "keep-alive" in tokens
    return int(m.group(2)), headers, keep_alive


def _fields(lines: list[bytes]) -> dict[str, str]:
    """Header (or trailer) lines -> lower-case name: value, repeated names joined with ", "."""
    fields: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None or _CONTROL.search(value) is not None:
            raise MalformedReply(f"bad header line {line[:80]!r}")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        fields[key] = f"{fields[key]}, {text}" if key in fields else text
    return fields


class _Connection(asyncio.Protocol):
    """One connection: send a whole request, wait for its reply; parse as the bytes arrive."""

    def __init__(self, *, tls: bool = False) -> None:
        self.tls = tls
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = False
        self.heard = False  # any byte of the current request's reply arrived
        self._waiter: asyncio.Future[Reply] | None = None
        self._buf = bytearray()
        self._status = 0
        self._headers: dict[str, str] = {}
        self._keep_alive = False
        self._framing = ""  # "" (reading the head) | "length" | "chunked" | "close"
        self._length = 0
        self._trailers = -1  # chunked: -1 while chunks arrive, then the bytes of trailers read so far
        self._interim = 0
        self._body = bytearray()

    # ------------------------------------------------------------------------------------------- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self._abort()  # bytes nobody asked for: this connection can no longer be trusted
            return
        self.heard = True
        self._buf += data
        try:
            self._parse()
        except MalformedReply as e:
            self._fail(e)

    def eof_received(self) -> bool:
        # Only the server's orderly close ends a close-framed body; a local close or a reset fails it below.
        if self._framing == "close" and self._waiter is not None and not self._waiter.done():
            self._keep_alive = False
            self._body += self._buf
            self._buf.clear()
            self._finish(bytes(self._body))
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(Disconnected("Server disconnected"))

    # ------------------------------------------------------------------------------------------- requests

    def send(self, message: bytes) -> asyncio.Future[Reply]:
        """Write one whole request; the future resolves with its reply or fails with why there is none."""
        assert self.transport is not None
        self.reusable = False
        self.heard = False
        self._framing = ""
        self._interim = 0
        self._buf.clear()
        self._body.clear()
        waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        if self.closed or self.transport.is_closing():
            waiter.set_exception(Disconnected("Server disconnected"))
        else:
            self.transport.write(message)
        return waiter

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.close()

    def _abort(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        self._abort()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    def _finish(self, body: bytes) -> None:
        waiter, self._waiter = self._waiter, None
        self.reusable = self._keep_alive and not self.closed and not self._buf
        if not self.reusable:
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(Reply(self._status, self._headers, body))

    # ------------------------------------------------------------------------------------------- parsing

    def _parse(self) -> None:
        buf = self._buf
        while not self._framing:  # the head, after any interim 1xx heads
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise MalformedReply(f"reply head over {MAX_HEAD} bytes")
                return
            if end > MAX_HEAD:
                raise MalformedReply(f"reply head over {MAX_HEAD} bytes")
            status, headers, keep_alive = parse_head(bytes(buf[:end]))
            del buf[: end + 4]
            if status < 200:
                if status == 101:
                    raise MalformedReply("the server switched protocols")
                self._interim += 1
                if self._interim > MAX_INTERIM:
                    raise MalformedReply(f"more than {MAX_INTERIM} interim 1xx replies")
                continue
            self._status, self._headers, self._keep_alive = status, headers, keep_alive
            self._framing = self._framing_of(status, headers)
        if self._framing == "length":
            if len(buf) < self._length:
                return
            body = bytes(buf[: self._length])
            del buf[: self._length]
            self._finish(body)
        elif self._framing == "chunked":
            self._parse_chunks()
        elif len(buf) > MAX_BODY:
            raise MalformedReply(f"reply body over {MAX_BODY} bytes")

    def _framing_of(self, status: int, headers: dict[str, str]) -> str:
        coding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if coding is not None and length is not None:
            raise MalformedReply("reply has both a transfer coding and a content-length")
        if status in (204, 304):  # never a body, whatever the headers say
            self._length = 0
            return "length"
        if coding is not None:
            if coding.strip().lower() != "chunked":
                raise MalformedReply(f"unsupported transfer coding {coding!r}")
            self._trailers = -1
            return "chunked"
        if length is not None:
            values = {v.strip() for v in length.split(",")}
            value = values.pop()
            if values or not value.isdigit() or not value.isascii():
                raise MalformedReply(f"bad content-length {length[:80]!r}")
            value = value.lstrip("0") or "0"
            if len(value) > 18 or int(value) > MAX_BODY:
                raise MalformedReply(f"reply body over {MAX_BODY} bytes")
            self._length = int(value)
            return "length"
        if self.tls:
            raise MalformedReply("reply over TLS has no content-length and is not chunked")
        self._keep_alive = False
        return "close"

    def _parse_chunks(self) -> None:
        buf = self._buf
        while True:
            if self._trailers >= 0:  # after the last chunk: trailer lines, then a blank line
                end = buf.find(b"\r\n")
                while end > 0:
                    self._trailers += end + 2
                    _fields([bytes(buf[:end])])
                    del buf[: end + 2]
                    end = buf.find(b"\r\n")
                if end < 0:
                    if self._trailers + len(buf) > MAX_HEAD:
                        raise MalformedReply(f"reply trailers over {MAX_HEAD} bytes")
                    return
                del buf[:2]
                self._finish(bytes(self._body))
                return
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 1024:
                    raise MalformedReply("bad chunk size line")
                return
            m = _CHUNK_SIZE.fullmatch(bytes(buf[:end]))
            if m is None:
                raise MalformedReply(f"bad chunk size line {bytes(buf[:end])[:80]!r}")
            size = int(m.group(1), 16)
            if size == 0:
                del buf[: end + 2]
                self._trailers = 0
                continue
            if len(self._body) + size > MAX_BODY:
                raise MalformedReply(f"reply body over {MAX_BODY} bytes")
            start = end + 2
            if len(buf) < start + size + 2:
                return
            if buf[start + size : start + size + 2] != b"\r\n":
                raise MalformedReply("chunk not followed by CRLF")
            self._body += buf[start : start + size]
            del buf[: start + size + 2]


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to one host:port, for whole prebuilt requests.

    `request()` raises `MalformedReply`, `Disconnected`, or `OSError` (cannot connect); cancelling it aborts
    the connection it was using. At most `idle_limit` connections are kept between requests.
    """

    def __init__(self, host: str, port: int, *, ssl: ssl_module.SSLContext | None = None, idle_limit: int = 16):
        self.host = host
        self.port = port
        self._ssl = ssl
        self._idle: list[_Connection] = []
        self._idle_limit = idle_limit
        self._busy: set[_Connection] = set()
        self._closed = False

    async def _connect(self) -> _Connection:
        if self._closed:
            raise Disconnected("the client is closed")
        loop = asyncio.get_running_loop()
        tls = self._ssl is not None
        host = self.host if tls else None
        _, conn = await loop.create_connection(
            lambda: _Connection(tls=tls), self.host, self.port, ssl=self._ssl, server_hostname=host
        )
        if self._closed:  # closed while connecting
            conn.close()
            raise Disconnected("the client is closed")
        return conn

    async def _exchange(self, conn: _Connection, message: bytes) -> Reply:
        self._busy.add(conn)
        try:
            return await conn.send(message)
        except BaseException:
            conn._abort()  # cancelled, or failed: the connection's state is unknown
            raise
        finally:
            self._busy.discard(conn)

    async def request(self, message: bytes) -> Reply:
        conn = None
        while self._idle:
            candidate = self._idle.pop()
            if candidate.reusable:
                conn = candidate
                break
        if conn is None:
            conn = await self._connect()
            reply = await self._exchange(conn, message)
        else:
            try:
                reply = await self._exchange(conn, message)
            except Disconnected as lost:
                if conn.heard:
                    raise
                # Closed by the server as the request went out: once more, on a new connection. If none can be
                # made, the server is gone, and the lost request is what this request saw.
                try:
                    conn = await self._connect()
                except OSError:
                    raise lost from None
                reply = await self._exchange(conn, message)
        self._idle = [c for c in self._idle if c.reusable]
        if conn.reusable and not self._closed and len(self._idle) < self._idle_limit:
            self._idle.append(conn)
        else:
            conn.close()
        return reply

    def close(self) -> None:
        """Close every connection, idle or busy (a busy request then fails with `Disconnected`), for good."""
        self._closed = True
        for conn in [*self._idle, *self._busy]:
            conn.close()
        self._idle.clear()
