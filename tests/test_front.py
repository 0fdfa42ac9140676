"""The probe front over real sockets: plain probes answered by it, everything else by the app, in order.

Each test starts `probe.front.serve` (the same wiring `probe serve` uses) on 127.0.0.1 and talks raw HTTP to it,
so pipelining, keep-alive, half-closed sockets and handoffs mid-connection are exercised as a kubelet or a load
balancer would. The differential test holds the front to the app's own answers for the same requests.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from probe.checks.base import CheckResult, failed, passed
from probe.checks.lifecycle import Lifecycle, PingCheck, ShutdownCheck
from probe.front import MAX_HEAD, Serving, parse_head, serve
from probe.runner import Liveness, Run, Runner
from probe.server import Health, make_app
from tests.helpers import async_wait_for


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async def check() -> bool:
        return predicate()

    await async_wait_for(check, timeout)


class GateCheck:
    """A check whose result the test sets, and which can be held open until the test releases it."""

    timeout: float | None = None
    derived = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.result: CheckResult = passed(name)
        self.gate: asyncio.Event | None = None
        self.runs = 0

    async def run(self) -> CheckResult:
        self.runs += 1
        if self.gate is not None:
            await self.gate.wait()
        return self.result


@dataclass
class Stack:
    serving: Serving
    canary: GateCheck
    lifecycle: Lifecycle
    runner: Runner

    @property
    def port(self) -> int:
        return self.serving.port


async def start(*, min_interval: float = 0.0, timeout: float = 2.0, keepalive: float = 15.0) -> Stack:
    canary = GateCheck("canary/demo")
    lifecycle = Lifecycle()
    runner = Runner(
        [GateCheck("triton"), canary, ShutdownCheck(lifecycle), PingCheck()],
        timeout=timeout,
        min_interval=min_interval,
    )
    liveness = Liveness(after=0, startup=600)
    runner.add_listener(liveness.observe)
    health = Health(runner, liveness, timeout=timeout)
    app = make_app(health, metrics=lambda: (b"probe_runs_total 1\n", "text/plain"), server_header="probe/test")
    serving = await serve(app, health, "127.0.0.1", 0, keepalive=keepalive, server_header="probe/test")
    return Stack(serving, canary, lifecycle, runner)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    s = await start()
    yield s
    await s.serving.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class Conn:
    """A raw client connection that reads answers one at a time (Content-Length framed)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def answer(self, *, head_only: bool = False, timeout: float = 5.0) -> Answer:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        length = 0 if head_only else int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(length), timeout) if length else b""
        return Answer(status, headers, body)

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        return await asyncio.wait_for(self.reader.read(), timeout) == b""

    def close(self) -> None:
        self.writer.close()


def get(path: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("head", "want"),
    [
        (b"GET /ready HTTP/1.1\r\nHost: x", ("ready", False, False)),
        (b"HEAD /live HTTP/1.1\r\nHost: x", ("live", True, False)),
        (b"GET /live/ping HTTP/1.1\r\nAccept: application/json", ("ping", False, False)),
        (b"GET /ready HTTP/1.1\r\nConnection: keep-alive, Close", ("ready", False, True)),
        (b"GET /ready HTTP/1.1\r\nAccept: */*\r\nUser-Agent: kube-probe/1.31", ("ready", False, False)),
    ],
)
def test_plain_probe_heads_are_the_fronts(head: bytes, want: tuple[str, bool, bool]) -> None:
    assert parse_head(head) == want


@pytest.mark.parametrize(
    "head",
    [
        b"GET /ready?verbose HTTP/1.1\r\nHost: x",  # a query: the app's views
        b"GET /ready/gpu HTTP/1.1\r\nHost: x",  # per-check path
        b"GET /metrics HTTP/1.1\r\nHost: x",
        b"POST /ready HTTP/1.1\r\nHost: x",  # the app answers 405
        b"GET /ready HTTP/1.0\r\nHost: x",  # HTTP/1.0 keep-alive rules: the app's
        b"GET /ready HTTP/1.1\r\nAccept: application/health+json",  # JSON view
        b"GET /ready HTTP/1.1\r\nContent-Length: 3",  # a body
        b"GET /ready HTTP/1.1\r\nTransfer-Encoding: chunked",
        b"GET /ready HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket",
        b"GET /ready HTTP/1.1\r\nExpect: 100-continue",
        b"GET /ready HTTP/1.1\r\nBad Header: x",  # not a token
        b"GET /ready HTTP/1.1\r\nX: a\x00b",  # control character in a value
        b"GET /ready HTTP/1.1\r\n folded: x",  # obsolete line folding
        b"GET  /ready HTTP/1.1\r\nHost: x",  # two spaces
        b"GET /ready HTTP/1.1\nHost: x",  # bare LF
        b"get /ready HTTP/1.1\r\nHost: x",
        b"GET /ready HTTP/1.1\r\n" + b"X-Pad: y\r\n" * 120,  # too many lines
        b"GET /ready HTTP/1.1\r\nX-Big: " + b"y" * MAX_HEAD,  # too big
    ],
)
def test_anything_else_goes_to_the_app(head: bytes) -> None:
    assert parse_head(head) is None


# ---------------------------------------------------------------------------------------------- answers


async def test_front_answers_like_the_app_would(stack: Stack) -> None:
    """The same probe through the front and, forced through the app by HTTP/1.0, gives the same answer."""
    for failing in (False, True):
        name = "canary/demo"
        stack.canary.result = failed(name, "mismatch", restart_worthy=True) if failing else passed(name)
        for path in ("/ready", "/live", "/live/ping"):
            conn = await Conn.open(stack.port)
            try:
                await conn.send(get(path))
                front = await conn.answer()
            finally:
                conn.close()
            conn = await Conn.open(stack.port)
            try:
                await conn.send(get(path).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
                app = await conn.answer()
            finally:
                conn.close()
            assert (front.status, front.body) == (app.status, app.body), (path, failing)
            assert front.headers["content-type"] == app.headers["content-type"] == "text/plain; charset=utf-8"
            assert front.headers["server"] == app.headers["server"] == "probe/test"
            assert front.headers["date"].endswith(" GMT")
    assert stack.canary.runs >= 8  # min_interval 0: every /ready and /live above ran the checks


async def test_pipelined_requests_are_answered_in_order_across_a_handoff(stack: Stack) -> None:
    conn = await Conn.open(stack.port)
    try:
        await conn.send(
            get("/live/ping") + get("/ready") + get("/ready?verbose") + get("/live") + get("/nope") + get("/ready")
        )
        answers = [await conn.answer() for _ in range(6)]
    finally:
        conn.close()
    assert [a.status for a in answers] == [200, 200, 200, 200, 404, 200]
    assert answers[0].body == b"ok\n" and answers[1].body == b"ok"
    assert answers[2].body.decode().endswith("ready check passed\n")  # the app's verbose view
    assert answers[3].body == b"ok"


async def test_head_has_headers_and_no_body(stack: Stack) -> None:
    conn = await Conn.open(stack.port)
    try:
        await conn.send(get("/ready", method="HEAD") + get("/live/ping"))
        head = await conn.answer(head_only=True)
        after = await conn.answer()  # the next answer starts right after the head: no stray body bytes
    finally:
        conn.close()
    assert head.status == 200 and head.headers["content-length"] == "2" and head.body == b""
    assert after.body == b"ok\n"


async def test_connection_close_is_honoured(stack: Stack) -> None:
    conn = await Conn.open(stack.port)
    try:
        await conn.send(get("/ready", "Connection: close"))
        answer = await conn.answer()
        assert answer.headers["connection"] == "close"
        assert await conn.closed_by_server()
    finally:
        conn.close()


async def test_a_head_split_across_packets_is_answered(stack: Stack) -> None:
    conn = await Conn.open(stack.port)
    try:
        raw = get("/ready")
        for i in range(0, len(raw), 3):
            await conn.send(raw[i : i + 3])
        assert (await conn.answer()).status == 200
    finally:
        conn.close()


async def test_bad_and_oversized_heads_get_the_apps_refusal(stack: Stack) -> None:
    for raw in (
        b"GET /ready HTTP/1.1\r\nX-Big: " + b"y" * 9000 + b"\r\n\r\n",
        b"GET /ready HTTP/1.1\r\nX-Big: " + b"y" * 20000,  # no end of head at all
        b"GET /ready HTTP/1.1\r\nBad Header: x\r\n\r\n",
    ):
        conn = await Conn.open(stack.port)
        try:
            await conn.send(raw)
            assert (await conn.answer()).status in (400, 431), raw[:60]
        finally:
            conn.close()


async def test_waiting_probes_share_one_run_and_keep_their_order(stack: Stack) -> None:
    stack.canary.gate = asyncio.Event()
    conns = [await Conn.open(stack.port) for _ in range(20)]
    try:
        for c in conns:
            await c.send(get("/ready") + get("/live/ping"))
        await until(lambda: stack.canary.runs == 1, timeout=5)
        pending = [asyncio.ensure_future(c.answer()) for c in conns]
        done, _ = await asyncio.wait(pending, timeout=0.05)
        assert not done  # everyone waits on the one run; the pipelined ping waits behind its /ready
        stack.canary.gate.set()
        firsts = await asyncio.gather(*pending)
        seconds = [await c.answer() for c in conns]
    finally:
        for c in conns:
            c.close()
    assert stack.canary.runs == 1
    assert all(a.status == 200 and a.body == b"ok" for a in firsts)
    assert all(a.body == b"ok\n" for a in seconds)


async def test_a_client_that_half_closes_still_gets_its_answer(stack: Stack) -> None:
    stack.canary.gate = asyncio.Event()
    conn = await Conn.open(stack.port)
    try:
        await conn.send(get("/ready"))
        conn.writer.write_eof()
        await until(lambda: stack.canary.runs == 1, timeout=5)
        stack.canary.gate.set()
        assert (await conn.answer()).status == 200
        assert await conn.closed_by_server()
    finally:
        conn.close()


async def test_probes_waiting_on_a_cancelled_run_are_answered(stack: Stack) -> None:
    """A run cancelled before its done hook (the runner stopping under it) still answers whoever waited."""
    stack.canary.gate = asyncio.Event()
    ready_conn, live_conn = await Conn.open(stack.port), await Conn.open(stack.port)
    try:
        await ready_conn.send(get("/ready"))
        await live_conn.send(get("/live"))
        await until(lambda: stack.canary.runs == 1)
        await asyncio.sleep(0)  # let the second probe's bytes reach the front too
        loop = asyncio.get_running_loop()
        started = loop.time()
        await stack.runner.stop()
        ready, live = await ready_conn.answer(timeout=5), await live_conn.answer(timeout=5)
        assert loop.time() - started < 1.0  # answered by the cancellation, not by the 2 s guard
    finally:
        ready_conn.close()
        live_conn.close()
    assert (ready.status, live.status) == (503, 200)
    assert stack.canary.runs == 1


async def test_shutdown_fails_ready_from_the_cache() -> None:
    s = await start(min_interval=3600)
    try:
        conn = await Conn.open(s.port)
        await conn.send(get("/ready"))
        assert (await conn.answer()).status == 200
        s.lifecycle.begin_shutdown("SIGTERM")
        await conn.send(get("/ready") + get("/live"))
        ready, live = await conn.answer(), await conn.answer()
        conn.close()
        assert (ready.status, ready.body) == (503, b"ready check failed")
        assert (live.status, live.body) == (200, b"ok")  # draining must not restart the container
        assert s.canary.runs == 1  # both answered from the cached run
    finally:
        await s.serving.close()


async def test_idle_connections_are_closed_after_keepalive() -> None:
    s = await start(keepalive=0.3)
    try:
        conn = await Conn.open(s.port)
        await conn.send(get("/live/ping"))
        assert (await conn.answer()).status == 200
        assert await conn.closed_by_server(timeout=5)
        await until(lambda: not s.serving.front.connections, timeout=5)
    finally:
        await s.serving.close()


async def test_a_client_that_never_reads_does_not_grow_the_server_without_bound(stack: Stack) -> None:
    """Thousands of pipelined probes from a client that reads nothing: the front stops reading once its write
    buffer is full, then answers them all once the client reads."""
    sock = socket.create_connection(("127.0.0.1", stack.port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    n = 20000
    try:
        await loop.sock_sendall(sock, get("/live/ping") * n)
        received = b""
        while received.count(b"HTTP/1.1 200 OK") < n:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10)
            assert chunk, "server closed the connection"
            received += chunk
    finally:
        sock.close()
    assert received.count(b"\r\n\r\nok\n") == n


async def test_close_stops_listening_and_ends_its_connections() -> None:
    s = await start()
    conn = await Conn.open(s.port)
    await conn.send(get("/live/ping"))
    await conn.answer()
    port = s.port
    await s.serving.close()
    assert await conn.closed_by_server()
    conn.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


# ---------------------------------------------------------------------------------------------- the guard


class NeverRunner:
    """A runner whose run never finishes: only the Health guard can answer."""

    def __init__(self) -> None:
        self.future: asyncio.Future[Run] = asyncio.get_running_loop().create_future()

    def cached(self) -> None:
        return None

    def add_done_hook(self, fn: Any) -> None:
        pass

    def instant_passing(self) -> bool:
        return True

    def run_future(self) -> asyncio.Future[Run]:
        return self.future


async def test_a_run_that_never_finishes_is_answered_at_the_timeout() -> None:
    runner: Any = NeverRunner()
    health = Health(runner, Liveness(after=0, startup=600), timeout=0.2)
    got: dict[str, bool] = {}
    loop = asyncio.get_running_loop()
    started = loop.time()
    health.later("ready", lambda ok: got.setdefault("ready", ok))
    health.later("live", lambda ok: got.setdefault("live", ok))
    await until(lambda: len(got) == 2, timeout=5)
    assert got == {"ready": False, "live": True}  # readiness fails; liveness holds, as for any run not finished
    assert 0.2 <= loop.time() - started < 2.0
    runner.future.cancel()
