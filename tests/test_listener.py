"""The listener of `probe serve` against raw sockets: its own answers, Host rules, head deadlines, slowloris.

The pod IP is reachable by anything in the cluster, so what is tested here is what a hostile or broken client
sees (issue 11, "Bounds, both ways"): every answer says `Server: probe/<version>` and echoes nothing of the
request, a request head must arrive whole within the head deadline, and at the fd limit the kubelet's probes
keep getting through while the log stays a few lines long.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from probe import __version__
from probe.checks.base import CheckResult, Kind, failed, passed
from probe.server import ACCEPT_BURST, FD_RESERVE, Health, Serving, quiet_accept_errors, serve
from tests.helpers import REPO, async_wait_for, free_port, wired, write_config

SERVER = f"probe/{__version__}"
MARKER = "Zq7marker"
"""Sent in paths, headers and garbage: an answer that holds it echoed the request."""


class PassingCheck:
    names = ("triton",)
    timeout: float | None = None

    async def run(self) -> Sequence[CheckResult]:
        return [passed("triton", Kind.SERVER)]

    def timed_out(self, after: float) -> Sequence[CheckResult]:
        return [failed("triton", Kind.SERVER, "timed out", restart_worthy=True)]


def _metrics(environment: bool) -> tuple[bytes, str]:
    return b"probe_ready 1.0\n", "text/plain; version=0.0.4; charset=utf-8"


def _env() -> dict[str, str]:
    """The environment for a child process that imports this checkout's `probe` and `tests`."""
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


Start = Callable[..., Awaitable[Serving]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Factory: a real `serve()` on 127.0.0.1:0 over one passing check; closed after the test."""
    started: list[Serving] = []

    async def go(*, head_deadline: float = 5.0, metrics: Callable[[bool], tuple[bytes, str]] = _metrics) -> Serving:
        w = wired([PassingCheck()])
        health = Health(w.runner, w.liveness, timeout=0.5)
        serving = await serve(health, "127.0.0.1", 0, metrics=metrics, max_connections=64, head_deadline=head_deadline)
        started.append(serving)
        return serving

    yield go
    for s in started:
        await s.close()


@dataclass
class Answer:
    raw: bytes
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def parse_answer(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), f"not an HTTP answer: {raw[:200]!r}"
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.append((k.strip(), v.strip()))
    return Answer(raw, int(lines[0].split()[1]), headers, body)


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> Answer:
    """Send `data` on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            raw = await reader.read(-1)
    finally:
        writer.close()
    return parse_answer(raw)


def request(target: str = "/ready", method: str = "GET", *headers: str, version: str = "1.1") -> bytes:
    lines = [f"{method} {target} HTTP/{version}", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


HOST = "Host: 127.0.0.1"

# name -> (request bytes, expected status); each holds MARKER where a careless server would echo it back.
REQUESTS: dict[str, tuple[bytes, int]] = {
    "ready": (request("/ready", "GET", HOST, f"X-Trace: {MARKER}"), 200),
    "ping": (request("/live/ping", "GET", HOST), 200),
    "head": (request("/ready", "HEAD", HOST), 200),
    "metrics": (request("/metrics", "GET", HOST), 200),
    "unknown path": (request(f"/{MARKER}/<script>alert(1)</script>", "GET", HOST), 404),
    "unknown check": (request(f"/ready/{MARKER}", "GET", HOST), 404),
    "long unknown path": (request("/" + MARKER * 700, "GET", HOST), 404),
    "post": (request("/ready", "POST", HOST, "Content-Length: 9") + MARKER.encode(), 405),
    "delete": (request("/live", "DELETE", HOST), 405),
    "unsupported method": (request("/ready", "PROPFIND", HOST, f"Depth: {MARKER}"), 405),
    "unknown method": (request("/ready", MARKER.upper(), HOST), 400),
    "garbage": (f"\x16\x03\x01{MARKER}\x00\x01\r\n\r\n".encode("latin-1"), 400),
    "bad request line": (f"GET /{MARKER} HTTP/1.1 extra\r\n{HOST}\r\n\r\n".encode(), 400),
    "bad header line": (f"GET / HTTP/1.1\r\n{HOST}\r\n{MARKER} no colon\r\n\r\n".encode(), 400),
    "space before colon": (f"GET / HTTP/1.1\r\n{HOST}\r\nX-{MARKER} : v\r\n\r\n".encode(), 400),
    "bad version": (f"GET /{MARKER} HTTP/9.{MARKER}\r\n{HOST}\r\n\r\n".encode(), 400),
    "bad content-length": (request("/ready", "GET", HOST, f"Content-Length: {MARKER}"), 400),
    "smuggling framing": (
        request("/ready", "POST", HOST, "Content-Length: 4", "Transfer-Encoding: chunked") + b"0\r\n\r\n",
        400,
    ),
    "oversized URL": (request("/ready?x=" + MARKER * 1200, "GET", HOST), 400),
    "oversized header": (request("/ready", "GET", HOST, "X-Big: " + MARKER * 1200), 400),
    "no Host": (request("/ready", "GET"), 400),
    "two Host": (request("/ready", "GET", HOST, f"Host: {MARKER}"), 400),
}


@pytest.mark.parametrize("case", list(REQUESTS))
async def test_every_answer_is_probes_own_and_echoes_nothing(start: Start, case: str) -> None:
    data, status = REQUESTS[case]
    serving = await start()
    answer = await exchange(serving.port, data)
    assert answer.status == status, answer.raw[:300]
    assert answer.header("Server") == [SERVER]
    assert answer.header("X-Content-Type-Options") == ["nosniff"]
    text = answer.raw.decode("latin-1").lower()
    assert MARKER.lower() not in text, answer.raw[:500]
    assert "aiohttp" not in text and "python" not in text
    if status == 400:
        assert answer.body == b"400 Bad Request\n"


async def test_a_handler_that_raises_answers_500_as_probe(start: Start) -> None:
    def broken(environment: bool) -> tuple[bytes, str]:
        raise RuntimeError(f"metrics broke near {MARKER}")

    serving = await start(metrics=broken)
    answer = await exchange(serving.port, request("/metrics", "GET", HOST))
    assert (answer.status, answer.body) == (500, b"500 Internal Server Error\n")
    assert answer.header("Server") == [SERVER] and answer.header("X-Content-Type-Options") == ["nosniff"]
    assert MARKER.lower() not in answer.raw.decode("latin-1").lower()


@pytest.mark.parametrize("target", ["/ready", "/live/ping", "/metrics", "/nope"])
@pytest.mark.parametrize(
    ("headers", "version"),
    [((), "1.1"), ((HOST, "Host: other"), "1.1"), ((HOST, "host: 127.0.0.1"), "1.1"), ((HOST, "Host: x"), "1.0")],
    ids=["none", "two", "two-same-value", "two-http1.0"],
)
async def test_a_request_without_one_host_is_400_everywhere(
    start: Start, target: str, headers: tuple[str, ...], version: str
) -> None:
    """RFC 9112 §3.2: 400 for an HTTP/1.1 request without Host, and for any request with more than one."""
    serving = await start()
    answer = await exchange(serving.port, request(target, "GET", *headers, version=version))
    assert answer.status == 400
    assert answer.header("Server") == [SERVER]


async def test_http_1_0_needs_no_host(start: Start) -> None:
    serving = await start()
    answer = await exchange(serving.port, request("/live/ping", "GET", version="1.0"))
    assert (answer.status, answer.body) == (200, b"ok\n")


# ---------------------------------------------------------------------------------------------- deadlines

DEADLINE = 0.5
SLACK = 1.0  # how late past the deadline the close may come on a shared, busy machine


async def _closed_after(reader: asyncio.StreamReader) -> tuple[float, bytes]:
    """Seconds until the server closes the connection, and anything it sent before."""
    t0 = time.monotonic()
    got = b""
    async with asyncio.timeout(DEADLINE + SLACK + 5):
        while chunk := await reader.read(65536):
            got += chunk
    return time.monotonic() - t0, got


async def test_an_idle_keep_alive_connection_is_closed_after_the_head_deadline(start: Start) -> None:
    serving = await start(head_deadline=DEADLINE)
    reader, writer = await asyncio.open_connection("127.0.0.1", serving.port)
    try:
        writer.write(b"GET /live/ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            assert b" 200 " in head.split(b"\r\n")[0] and b"Connection: close" not in head
            assert await reader.readexactly(3) == b"ok\n"
        after, rest = await _closed_after(reader)  # the timer restarts with the answer
    finally:
        writer.close()
    assert rest == b""
    assert DEADLINE * 0.8 <= after <= DEADLINE + SLACK, after


async def test_a_connection_that_sends_nothing_is_closed_at_the_head_deadline(start: Start) -> None:
    serving = await start(head_deadline=DEADLINE)
    reader, writer = await asyncio.open_connection("127.0.0.1", serving.port)
    try:
        after, got = await _closed_after(reader)
    finally:
        writer.close()
    assert got == b"" and DEADLINE * 0.8 <= after <= DEADLINE + SLACK, after


async def test_a_request_head_dripped_one_byte_at_a_time_is_cut_at_the_deadline(start: Start) -> None:
    """The head deadline runs from the connection's start: bytes that keep arriving do not extend it."""
    serving = await start(head_deadline=DEADLINE)
    head = b"GET /live/ping HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: " + b"x" * 40 + b"\r\n\r\n"
    every = 0.05  # the whole head would take ~4 s at this pace
    reader, writer = await asyncio.open_connection("127.0.0.1", serving.port)
    t0 = time.monotonic()
    sent = 0
    closed = False
    try:
        while sent < len(head) and time.monotonic() - t0 < DEADLINE + SLACK + 5:
            try:
                writer.write(head[sent : sent + 1])
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            sent += 1
            try:  # the pace of the drip, and the moment the server closes
                got = await asyncio.wait_for(reader.read(65536), every)
            except TimeoutError:
                continue
            assert got == b"", f"answered a head that never arrived whole: {got[:200]!r}"
            closed = True
            break
    finally:
        writer.close()
    after = time.monotonic() - t0
    assert closed and sent < len(head), (sent, after)
    assert DEADLINE * 0.8 <= after <= DEADLINE + SLACK, after


# ---------------------------------------------------------------------------------------------- the cap


class HeldCheck:
    """A check that does not finish until the test lets it: a /ready waiting on a run."""

    names = ("triton",)
    timeout: float | None = None

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def run(self) -> Sequence[CheckResult]:
        self.started.set()
        await self.release.wait()
        return [passed("triton", Kind.SERVER)]

    def timed_out(self, after: float) -> Sequence[CheckResult]:
        return [failed("triton", Kind.SERVER, "timed out", restart_worthy=True)]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _logger(name: str) -> tuple[logging.Logger, Lines]:
    logger = logging.getLogger(name)
    logger.propagate = False
    lines = Lines()
    logger.handlers[:] = [lines]
    return logger, lines


async def _is_closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 0.01) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def test_at_the_cap_the_oldest_idle_connection_goes_and_a_request_in_progress_stays() -> None:
    held = HeldCheck()
    w = wired([held], timeout=5.0)
    logger, lines = _logger("probe.test.cap")
    serving = await serve(Health(w.runner, w.liveness, timeout=5.0), "127.0.0.1", 0, max_connections=3, logger=logger)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        busy = await asyncio.open_connection("127.0.0.1", serving.port)
        busy[1].write(request("/ready", "GET", HOST))
        async with asyncio.timeout(5):
            await held.started.wait()  # the oldest connection now has a request in progress
        for _ in range(5):
            conns.append(await asyncio.open_connection("127.0.0.1", serving.port))

        async def evicted() -> bool:
            return [await _is_closed(r) for r, _ in conns] == [True, True, True, False, False]

        deadline = time.monotonic() + 5
        while not await evicted():
            assert time.monotonic() < deadline, "the oldest idle connections were not closed"
        held.release.set()
        async with asyncio.timeout(5):
            answer = parse_answer(await busy[0].read(-1))
        assert (answer.status, answer.body) == (200, b"ok")
        busy[1].close()
    finally:
        for _, writer in conns:
            writer.close()
        await serving.close()
    assert serving.server.evicted_total == 3
    assert lines.messages == ["connection limit reached: closed the oldest connections"]  # one per interval


def test_accept_failures_log_one_line_per_interval() -> None:
    """EMFILE at accept: asyncio reports every failed accept(); the log gets one line per interval."""
    logger, lines = _logger("probe.test.accept")
    loop = asyncio.new_event_loop()
    try:
        quiet_accept_errors(logger, loop)
        for _ in range(1000):
            exc = OSError(24, "Too many open files")
            loop.call_exception_handler({"message": "socket.accept() out of system resource", "exception": exc})
    finally:
        loop.close()
    assert lines.messages == ["cannot accept connections"]


@pytest.mark.parametrize(("soft", "hard", "cap"), [(256, 256, 144), (256, 1024, 912), (64, 64, 8)])
def test_connection_cap_raises_the_soft_fd_limit_and_keeps_a_reserve(soft: int, hard: int, cap: int) -> None:
    code = (
        "import resource as r; from probe.server import connection_cap as c; print(c(), *r.getrlimit(r.RLIMIT_NOFILE))"
    )

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(), preexec_fn=limit, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(cap), str(hard), str(hard)]
    assert cap == max(8, hard - FD_RESERVE - 3 * ACCEPT_BURST)


# ---------------------------------------------------------------------------------------------- slowloris

FD_LIMIT = 256
ATTACKERS = 300
ATTACK_S = 8.0
DRIP_EVERY_S = 1.0
KUBELET_EVERY_S = 0.25
PROBE_TIMEOUT = 0.8
MARGIN = 0.2


@dataclass
class Probe:
    path: str
    seconds: float
    status: int | None
    error: str = ""


TRITON_READY_S = 0.3


async def _fake_triton() -> tuple[web.ServerRunner, int]:
    """A Triton that is live and ready, answering `{}` to everything, its readiness after TRITON_READY_S: a fresh
    /ready waits that long on its run, as one does on a canary, while the flood goes on."""

    async def handle(request: web.BaseRequest) -> web.Response:
        if request.path == "/v2/health/ready":
            await asyncio.sleep(TRITON_READY_S)  # the scripted peer's own slowness
        return web.Response(text="{}", content_type="application/json")

    runner = web.ServerRunner(web.Server(handle), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


async def _attacker(port: int, stop: float, counts: dict[str, int]) -> None:
    """Opens a connection and drips a request head into it, one byte per DRIP_EVERY_S; reconnects when closed."""
    head = b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 4000
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["refused"] += 1
            await asyncio.sleep(DRIP_EVERY_S)  # the attacker's pace, not a wait for the code under test
            continue
        counts["connections"] += 1
        try:
            for byte in head:
                if time.monotonic() >= stop:
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                try:  # the drip's pace, and noticing the server closed it
                    if await asyncio.wait_for(reader.read(65536), DRIP_EVERY_S) == b"":
                        counts["closed"] += 1
                        break
                except TimeoutError:
                    pass
        except OSError:
            counts["closed"] += 1
        finally:
            writer.close()


def attack(port: int, seconds: float, connections: int) -> None:
    """The slowloris, run as its own process (as an attacker pod would be): prints its counts as JSON at the end."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < connections + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def run() -> dict[str, int]:
        counts = {"connections": 0, "closed": 0, "refused": 0}
        stop = time.monotonic() + seconds
        await asyncio.gather(*(_attacker(port, stop, counts) for _ in range(connections)))
        return counts

    print(json.dumps(asyncio.run(run())), flush=True)


async def _kubelet(port: int, path: str) -> Probe:
    """What the kubelet's httpGet probe does: a fresh connection, one GET, read to the end."""
    data = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: kube-probe/1.30\r\nAccept: */*\r\n"
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(PROBE_TIMEOUT + 1.0):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write((data + "Connection: close\r\n\r\n").encode())
                await writer.drain()
                raw = await reader.read(-1)
            finally:
                writer.close()
        return Probe(path, time.monotonic() - t0, parse_answer(raw).status)
    except (OSError, TimeoutError, AssertionError) as e:
        return Probe(path, time.monotonic() - t0, None, f"{type(e).__name__}: {e}".splitlines()[0])


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _serve_with_fd_limit(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """`probe serve` as a process whose fd limit is FD_LIMIT, soft and hard: connection_cap cannot raise it."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "probe", "serve", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
            preexec_fn=_limit_fds,
        )


def _start_attack(port: int) -> subprocess.Popen[str]:
    code = f"from tests.test_listener import attack; attack({port}, {ATTACK_S}, {ATTACKERS})"
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


LIMIT_LINE = "connection limit reached: closed the oldest connections"


async def test_slowloris_at_the_fd_limit_leaves_kubelet_probes_answered_and_the_log_short(tmp_path: Path) -> None:
    """300 connections dripping request heads at a probe whose fd limit is 256 (issue 11: every kubelet probe timed
    out for 40 s, and the log grew by 160-230 MB of EMFILE tracebacks)."""
    triton, triton_port = await _fake_triton()
    port = free_port()
    config = write_config(
        tmp_path,
        f"127.0.0.1:{triton_port}",
        [],
        listen={"host": "127.0.0.1", "port": port},
        probe={"timeout": PROBE_TIMEOUT, "min_interval": 1.0, "interval": 0},
    )
    log_path = tmp_path / "serve.log"
    serve_proc = _serve_with_fd_limit(config, log_path)
    attacker: subprocess.Popen[str] | None = None
    probes: list[Probe] = []
    try:

        async def serving() -> bool:
            assert serve_proc.poll() is None, log_path.read_text()[-2000:]
            return (await _kubelet(port, "/live/ping")).status == 200

        await async_wait_for(serving, 30, "probe serve to start", every=0.05)
        assert (await _kubelet(port, "/ready")).status == 200

        attacker = _start_attack(port)

        async def capped() -> bool:  # the attack has filled the connection cap
            assert attacker is not None and attacker.poll() is None, "the attacker exited"
            return LIMIT_LINE in log_path.read_text()

        await async_wait_for(capped, 30, "the attack to reach the cap", every=0.05)
        next_at = time.monotonic()
        while attacker.poll() is None:
            probes += await asyncio.gather(_kubelet(port, "/ready"), _kubelet(port, "/live/ping"))
            next_at += KUBELET_EVERY_S
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))  # the kubelet's period
        out, err = attacker.communicate(timeout=10)
        assert attacker.returncode == 0, err[-2000:]
        counts = json.loads(out)
        assert serve_proc.poll() is None, log_path.read_text()[-2000:]
    finally:
        for proc in (attacker, serve_proc):
            if proc is not None:
                _stop(proc)
        await triton.cleanup()

    bad = [p for p in probes if p.status != 200 or p.seconds > PROBE_TIMEOUT + MARGIN]
    fresh = [p for p in probes if p.path == "/ready" and p.seconds >= TRITON_READY_S]
    ready = sorted(p.seconds for p in probes if p.path == "/ready")
    ping = sorted(p.seconds for p in probes if p.path == "/live/ping")
    figures = (
        f"{len(probes)} probes; /ready median {ready[len(ready) // 2] * 1000:.1f} ms, max {ready[-1] * 1000:.1f} ms; "
        f"/live/ping max {ping[-1] * 1000:.1f} ms; attack {counts}"
    )
    print(figures)
    assert not bad, f"{len(bad)} of {len(probes)} probes failed or were late, e.g. {bad[:3]} ({figures})"
    assert len(probes) >= ATTACK_S / KUBELET_EVERY_S, figures  # probed throughout the attack
    assert len(fresh) >= 3, f"no /ready waited on a run during the attack: {figures}"
    assert counts["closed"] >= ATTACKERS, f"the attack was not cut back: {figures}"

    lines = log_path.read_text().splitlines()
    assert len(lines) <= 12, lines[:20]
    assert not any("Traceback" in ln or "Errno 24" in ln for ln in lines), lines[:20]
    entries = [json.loads(ln) for ln in lines]  # every line is one JSON object
    limit = [e for e in entries if e["msg"] == LIMIT_LINE]
    assert 1 <= len(limit) <= 2, entries
    assert limit[0]["limit"] == FD_LIMIT - FD_RESERVE - 3 * ACCEPT_BURST
