"""The canary's HTTP/1.1 client (`probe.http1`) against scripted peers on real sockets, and its parser fed in pieces.

A scripted peer is an asyncio server on 127.0.0.1:0 that reads each whole request (head and Content-Length body)
and answers with the bytes the test gives it, or misbehaves as the scenario says: closes, stays silent, sends
bytes nobody asked for. Each test asserts what the client returned or raised and what the peer saw (how many
connections, whether one was closed), so reuse, retry and abort are checked on the wire, not assumed.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from probe.config import CanaryConfig, InputSpec
from probe.http1 import (
    MAX_BODY,
    MAX_HEAD,
    MAX_INTERIM,
    ConnectionPool,
    Disconnected,
    MalformedReply,
    _Connection,
    parse_head,
)
from probe.tensors import build_inputs
from probe.triton import TritonClient, TritonRequestError, TritonUnreachable
from tests.helpers import MemoryTransport, async_wait_for

REQUEST = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nBODY"


def ok(body: bytes = b"hello", *extra: str) -> bytes:
    head = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# What the peer does with the n-th request it reads (counted over all connections): bytes to write, or an
# action. "close": close without a word; "silent": never answer; ("reply-close", bytes): answer, then close.
Script = Callable[[int], "bytes | str | tuple[str, bytes]"]


class ScriptedPeer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_client = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.requests.append(head + await reader.readexactly(length))
                action = self.script(len(self.requests))
                if action == "close":
                    break
                if action == "silent":
                    await reader.read()  # until the client goes away
                    self.closed_by_client += 1
                    break
                if isinstance(action, tuple):
                    writer.write(action[1])
                    await writer.drain()
                    break
                assert isinstance(action, bytes)
                writer.write(action)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client += 1
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


MakePeer = Callable[[Script], Awaitable[tuple[ScriptedPeer, ConnectionPool]]]


@pytest.fixture
async def peer_factory() -> AsyncIterator[MakePeer]:
    peers: list[ScriptedPeer] = []
    pools: list[ConnectionPool] = []

    async def make(script: Script) -> tuple[ScriptedPeer, ConnectionPool]:
        peer = ScriptedPeer(script)
        await peer.start()
        peers.append(peer)
        pool = ConnectionPool("127.0.0.1", peer.port)
        pools.append(pool)
        return peer, pool

    yield make
    for pool in pools:
        pool.close()
    for peer in peers:
        await peer.stop()


# ------------------------------------------------------------------------------------------------ wire


async def test_keep_alive_reuses_one_connection(peer_factory: MakePeer) -> None:
    peer, pool = await peer_factory(lambda n: ok(f"reply {n}".encode(), "Inference-Header-Content-Length: 3"))
    for n in (1, 2, 3):
        reply = await pool.request(REQUEST)
        assert (reply.status, reply.body) == (200, f"reply {n}".encode())
        assert reply.headers["inference-header-content-length"] == "3"
    assert peer.connections == 1
    assert peer.requests == [REQUEST] * 3


async def test_chunked_reply_with_extensions_and_trailers(peer_factory: MakePeer) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=x\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: yes\r\n\r\n"
    )
    peer, pool = await peer_factory(lambda n: chunked)
    assert (await pool.request(REQUEST)).body == b"hello 0123456789"
    assert (await pool.request(REQUEST)).body == b"hello 0123456789"
    assert peer.connections == 1


async def test_reply_framed_by_close_is_read_to_the_end_and_not_reused(peer_factory: MakePeer) -> None:
    peer, pool = await peer_factory(lambda n: ("reply-close", b"HTTP/1.1 200 OK\r\n\r\nuntil the end"))
    assert (await pool.request(REQUEST)).body == b"until the end"
    assert (await pool.request(REQUEST)).body == b"until the end"
    assert peer.connections == 2


async def test_connection_close_header_is_honoured(peer_factory: MakePeer) -> None:
    peer, pool = await peer_factory(lambda n: ok(b"x", "Connection: close"))
    for _ in range(2):
        assert (await pool.request(REQUEST)).body == b"x"
    assert peer.connections == 2


async def test_http10_reply_is_not_reused(peer_factory: MakePeer) -> None:
    peer, pool = await peer_factory(lambda n: b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx")
    for _ in range(2):
        assert (await pool.request(REQUEST)).body == b"x"
    assert peer.connections == 2


async def test_interim_1xx_and_bodiless_204(peer_factory: MakePeer) -> None:
    replies = {1: b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after"), 2: b"HTTP/1.1 204 No Content\r\n\r\n"}
    peer, pool = await peer_factory(lambda n: replies[n])
    assert (await pool.request(REQUEST)).body == b"after"
    reply = await pool.request(REQUEST)
    assert (reply.status, reply.body) == (204, b"")
    assert peer.connections == 1


async def test_bodiless_statuses_ignore_their_framing_headers(peer_factory: MakePeer) -> None:
    replies = {
        1: b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\n\r\n",
        2: b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
        3: ok(b"then this"),
        4: b"HTTP/1.1 200 OK\r\nContent-Length: 0004\r\n\r\nfour",
    }
    peer, pool = await peer_factory(lambda n: replies[n])
    assert [(r.status, r.body) for r in [await pool.request(REQUEST) for _ in range(4)]] == [
        (304, b""),
        (204, b""),
        (200, b"then this"),
        (200, b"four"),
    ]
    assert peer.connections == 1


async def test_closed_pool_refuses_and_keeps_nothing(peer_factory: MakePeer) -> None:
    peer, pool = await peer_factory(lambda n: ok())
    await pool.request(REQUEST)
    pool.close()
    with pytest.raises(Disconnected, match="closed"):
        await pool.request(REQUEST)
    assert peer.connections == 1


async def test_error_status_is_a_reply_not_an_exception(peer_factory: MakePeer) -> None:
    _, pool = await peer_factory(lambda n: b'HTTP/1.1 400 Bad Request\r\nContent-Length: 13\r\n\r\n{"error":"x"}')
    reply = await pool.request(REQUEST)
    assert (reply.status, reply.body) == (400, b'{"error":"x"}')


async def test_server_closing_idle_connections_costs_nothing(peer_factory: MakePeer) -> None:
    # Every reply claims keep-alive, then the server closes the connection anyway (an idle timeout, a restart).
    peer, pool = await peer_factory(lambda n: ("reply-close", ok(b"fine")))
    for _ in range(4):
        assert (await pool.request(REQUEST)).body == b"fine"
    assert peer.connections == 4


async def test_reused_connection_lost_before_any_reply_is_retried_once(peer_factory: MakePeer) -> None:
    # Request 2 arrives on the kept connection and the server drops it unanswered: sent again on a new one.
    peer, pool = await peer_factory(lambda n: "close" if n == 2 else ok(b"fine"))
    assert (await pool.request(REQUEST)).body == b"fine"
    assert (await pool.request(REQUEST)).body == b"fine"
    assert len(peer.requests) == 3 and peer.connections == 2


async def test_fresh_connection_lost_is_not_retried(peer_factory: MakePeer) -> None:
    peer, pool = await peer_factory(lambda n: "close")
    with pytest.raises(Disconnected, match="Server disconnected"):
        await pool.request(REQUEST)
    assert len(peer.requests) == 1


async def test_retry_happens_only_once(peer_factory: MakePeer) -> None:
    peer, pool = await peer_factory(lambda n: ok(b"fine") if n == 1 else "close")
    await pool.request(REQUEST)
    with pytest.raises(Disconnected):
        await pool.request(REQUEST)
    assert len(peer.requests) == 3


async def test_server_gone_after_losing_a_request_reports_the_lost_request(peer_factory: MakePeer) -> None:
    # Triton killed while the canary was in it: the retry cannot connect, and what the canary saw is the loss.
    def script(n: int) -> bytes | str:
        if n == 1:
            return ok(b"fine")
        assert peer.server is not None
        peer.server.close()  # stop listening; the open connection lives on until the script drops it
        return "close"

    peer, pool = await peer_factory(script)
    await pool.request(REQUEST)
    with pytest.raises(Disconnected, match="Server disconnected"):
        await pool.request(REQUEST)
    assert len(peer.requests) == 2 and peer.connections == 1


async def test_reply_cut_short_is_not_retried(peer_factory: MakePeer) -> None:
    peer, pool = await peer_factory(lambda n: ok(b"fine") if n == 1 else ("reply-close", ok(b"full body")[:-3]))
    await pool.request(REQUEST)
    with pytest.raises(Disconnected):
        await pool.request(REQUEST)
    assert len(peer.requests) == 2


async def test_cancelling_a_request_aborts_its_connection(peer_factory: MakePeer) -> None:
    peer, pool = await peer_factory(lambda n: "silent" if n == 1 else ok(b"later"))
    task = asyncio.create_task(pool.request(REQUEST))

    async def arrived() -> bool:
        return len(peer.requests) == 1

    await async_wait_for(arrived, 5, "the request to reach the peer")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def dropped() -> bool:
        return peer.closed_by_client == 1

    await async_wait_for(dropped, 5, "the peer to see the connection closed")
    assert (await pool.request(REQUEST)).body == b"later"
    assert peer.connections == 2


async def test_unsolicited_bytes_drop_an_idle_connection(peer_factory: MakePeer) -> None:
    peer, pool = await peer_factory(lambda n: ok(b"one") + b"HTTP/1.1 200 OK\r\n" if n == 1 else ok(b"two"))
    assert (await pool.request(REQUEST)).body == b"one"
    assert (await pool.request(REQUEST)).body == b"two"
    assert peer.connections == 2


async def test_pool_close_closes_idle_connections(peer_factory: MakePeer) -> None:
    peer, pool = await peer_factory(lambda n: ok())
    await pool.request(REQUEST)
    pool.close()

    async def closed() -> bool:
        return peer.closed_by_client == 1

    await async_wait_for(closed, 5, "the peer to see the idle connection closed")


async def test_connection_refused_is_an_oserror() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        await ConnectionPool("127.0.0.1", port).request(REQUEST)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"HTTP/2 200 OK\r\n\r\n", "bad status line"),
        (b"garbage\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 99 Odd\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length : 1\r\n\r\nx", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\nContent-Length: 1\r\n\r\nx", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx", "bad content-length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad content-length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: \xd9\xa1\r\n\r\n", "bad content-length"),
        (f"HTTP/1.1 200 OK\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode(), "reply body over"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "unsupported transfer coding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size line"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", "chunk not followed by CRLF"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", "reply head over"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1" + b"0" * 5000 + b"\r\n\r\n", "reply body over"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", "both a transfer coding"),
        (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "transfer coding in an HTTP/1.0"),
        (b"HTTP/1.1 200 OK\r\nX: a\nContent-Length: 99\r\nContent-Length: 1\r\n\r\nx", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 1\r\n\r\nx", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;a\x01\r\nx\r\n0\r\n\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n<html>\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: " + b"a" * MAX_HEAD, "trailers over"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * (MAX_INTERIM + 1) + ok(), "interim 1xx"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
async def test_malformed_replies_fail_with_a_reason_and_drop_the_connection(
    peer_factory: MakePeer, reply: bytes, message: str
) -> None:
    peer, pool = await peer_factory(lambda n: reply if n == 1 else ok(b"next"))
    with pytest.raises(MalformedReply, match=message):
        await pool.request(REQUEST)
    assert (await pool.request(REQUEST)).body == b"next"
    assert peer.connections == 2


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    peer = ScriptedPeer(lambda n: ok(b"secret"))
    await peer.start(server_ctx)
    pool = ConnectionPool("127.0.0.1", peer.port, ssl=ssl.create_default_context(cafile=str(cert)))
    untrusting = ConnectionPool("127.0.0.1", peer.port, ssl=ssl.create_default_context())
    try:
        assert (await pool.request(REQUEST)).body == b"secret"
        assert (await pool.request(REQUEST)).body == b"secret"
        assert peer.connections == 1
        with pytest.raises(ssl.SSLCertVerificationError):
            await untrusting.request(REQUEST)
    finally:
        pool.close()
        untrusting.close()
        await peer.stop()


# ------------------------------------------------------------------------------------------------ parser


REPLIES = [
    ok(b"0123456789", "Server: triton"),
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 503 Unavailable\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno",
]


@pytest.mark.parametrize("raw", REPLIES)
async def test_every_split_of_a_reply_parses_the_same(raw: bytes) -> None:
    expected = None
    for cut in range(1, len(raw)):
        conn = _Connection()
        transport = MemoryTransport()
        conn.connection_made(transport)
        waiter = conn.send(REQUEST)
        conn.data_received(raw[:cut])
        assert not waiter.done()
        conn.data_received(raw[cut:])
        reply = await waiter
        got = (reply.status, reply.body, conn.reusable)
        expected = expected or got
        assert got == expected, cut
    assert expected is not None and expected[0] in (200, 503)
    assert expected[2] is (b"Connection: close" not in raw)


async def test_close_framed_body_ends_only_with_the_servers_close() -> None:
    head = b"HTTP/1.1 200 OK\r\n\r\npart"
    # The server's orderly close: the body is what came before it.
    conn = _Connection()
    conn.connection_made(MemoryTransport())
    waiter = conn.send(REQUEST)
    conn.data_received(head)
    conn.eof_received()
    conn.connection_lost(None)
    assert (await waiter).body == b"part"
    # Closed from this side (the client shutting down) or reset: the body is cut off, not complete.
    for exc in (None, ConnectionResetError()):
        conn = _Connection()
        conn.connection_made(MemoryTransport())
        waiter = conn.send(REQUEST)
        conn.data_received(head)
        conn.connection_lost(exc)
        with pytest.raises(Disconnected):
            await waiter
    # Over TLS an orderly-looking close cannot be told from a cut, so such a reply is refused outright.
    conn = _Connection(tls=True)
    conn.connection_made(MemoryTransport())
    waiter = conn.send(REQUEST)
    conn.data_received(head)
    with pytest.raises(MalformedReply, match="over TLS"):
        await waiter


def test_parse_head_joins_repeated_headers_and_reads_keep_alive() -> None:
    status, headers, keep = parse_head(b"HTTP/1.1 200 OK\r\nX-A: 1\r\nx-a: 2\r\nConnection: Keep-Alive, Close")
    assert (status, headers["x-a"], keep) == (200, "1, 2", False)
    assert parse_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive")[2] is True
    assert parse_head(b"HTTP/1.1 404")[:2] == (404, {})


# ------------------------------------------------------------------------------------------------ TritonClient


def gzipped(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


JSON_OUT = b'{"model_name":"m","outputs":[{"name":"OUT","datatype":"FP32","shape":[2],"data":[1.5,2.5]}]}'


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        (ok(JSON_OUT, "Content-Type: application/json"), "OUT=[1.5, 2.5]"),
        (ok(gzipped(JSON_OUT), "Content-Encoding: gzip"), "OUT=[1.5, 2.5]"),
        (ok(b"not deflated", "Content-Encoding: deflate"), "unreachable: malformed reply"),
        (ok(gzipped(JSON_OUT)[:-9], "Content-Encoding: gzip"), "unreachable: malformed reply"),
        (ok(b"[1]"), "unreachable: malformed reply"),
        (ok(b'{"outputs": 3}'), "unreachable: malformed reply"),
        (b'HTTP/1.1 400 Bad Request\r\nContent-Length: 16\r\n\r\n{"error":"boom"}', "request error: [400] boom"),
        (b"HTTP/1.1 500 Oops\r\nContent-Length: 5\r\n\r\nOops!", "request error: [500] an exception occurred"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "unreachable: malformed reply"),
        (("reply-close", ok(b"cut")[:-1]), "unreachable: cannot connect"),
    ],
    ids=[
        "json",
        "gzip",
        "bad-deflate",
        "cut-gzip",
        "json-list",
        "outputs-not-a-list",
        "400",
        "500-not-json",
        "bad-length",
        "cut",
    ],
)
async def test_triton_client_maps_every_reply_to_outputs_or_a_reason(
    peer_factory: MakePeer, reply: bytes | tuple[str, bytes], outcome: str
) -> None:
    peer, _ = await peer_factory(lambda n: reply)
    canary = CanaryConfig(name="c", model="m", inputs=(InputSpec("IN", "FP32", (2,), "ones"),))
    async with TritonClient(f"127.0.0.1:{peer.port}") as client:
        try:
            got = await client.infer(canary, build_inputs(canary), ("OUT",))
            seen = ",".join(f"{k}={v[1].tolist()}" for k, v in got.outputs.items())
        except TritonUnreachable as e:
            seen = f"unreachable: {str(e).split(': ', 1)[1]}"
        except TritonRequestError as e:
            seen = f"request error: {str(e).split(': ', 1)[1]}"
    assert seen.startswith(outcome), seen
    request = peer.requests[0]
    assert request.startswith(b"POST /v2/models/m/infer HTTP/1.1\r\n"), request
    assert b"\r\nUser-Agent: probe/" in request and b"\r\nInference-Header-Content-Length: " in request


async def test_canary_request_names_an_internationalised_host_in_ascii() -> None:
    canary = CanaryConfig(name="c", model="módel", inputs=(InputSpec("IN", "FP32", (2,), "ones"),), version="2")
    async with TritonClient("bücher.example:8000") as client:
        message = client._request(canary, build_inputs(canary), ("OUT",)).message
    assert message.startswith(b"POST /v2/models/m%C3%B3del/versions/2/infer HTTP/1.1\r\n")
    assert b"\r\nHost: xn--bcher-kva.example:8000\r\n" in message
