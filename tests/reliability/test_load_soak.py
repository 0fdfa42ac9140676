"""`probe serve` under load and over time, against the real Triton: hundreds of concurrent probes, idle sockets,
and a soak of tens of thousands of requests watching memory, file descriptors and tasks.

What an operator relies on here: a flood of kubelet (or curious) probes never turns into errors, slow answers or
a flood of canaries on the GPU, and a sidecar that runs for weeks does not grow. Every figure the assertions use
is printed (run with -s) so a regression shows its size, not just its existence.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import MODELS, TritonServer
from tests.helpers import DEMO_CANARY, ServeProcess, async_wait_for, free_port, run_cli, wait_for, write_config

pytestmark = pytest.mark.triton

TIMEOUT = 0.8
# Over probe.timeout: the contract's "a few ms", plus an honest allowance for a two-core machine where the load
# generator, the sidecar and Triton (and other test sessions) share the CPUs.
MARGIN = 0.25
CONCURRENCY = 300
LOAD_SECONDS = 5.0
MODEL = "demo_classifier"


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def golden_dir(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo canary's golden, recorded once for the module on a healthy Triton."""
    triton.clear_faults()
    for m in MODELS:
        triton.wait_idle(m)
    directory = tmp_path_factory.mktemp("load-golden")
    rec = run_cli("record", "-c", str(write_config(directory, triton.url, [DEMO_CANARY])))
    assert rec.returncode == 0, rec.stderr
    return directory / "golden"


@pytest.fixture
def serve(
    tmp_path: Path, healthy_triton: TritonServer, golden_dir: Path, serve_process: Callable[..., ServeProcess]
) -> Iterator[Any]:
    """Factory: `probe serve` for the demo canary with the given `probe:` settings; killed after the test."""

    def start(**probe: Any) -> ServeProcess:
        port = free_port()
        cfg = write_config(
            tmp_path,
            healthy_triton.url,
            [DEMO_CANARY],
            listen={"port": port},
            probe={"timeout": TIMEOUT, "interval": 0, **probe},
            golden_dir=str(golden_dir),
        )
        return serve_process(cfg, port)

    yield start


# ---------------------------------------------------------------------------------------------- load generator


@dataclass
class Load:
    """What a load run saw: statuses per path, transport errors, and every answer's latency."""

    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    slowest: list[tuple[float, float, str]] = field(default_factory=list)
    """(latency, sent at seconds into the run, path) of the slowest answers, for the failure message."""
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0

    def summary(self, what: str) -> str:
        statuses = {p: dict(c) for p, c in self.statuses.items()}
        return (
            f"{what}: {self.requests} requests in {self.seconds:.1f}s = {self.requests / self.seconds:.0f} req/s, "
            f"latency p50 {self.quantile(0.5) * 1000:.0f} ms, p99 {self.quantile(0.99) * 1000:.0f} ms, "
            f"max {max(self.latencies, default=0) * 1000:.0f} ms; statuses {statuses}; errors {dict(self.errors)}"
        )

    def herd(self, concurrency: int) -> float:
        """Seconds the sidecar needs to answer `concurrency` probes one after another at the rate measured here:
        what the last of a cohort released together (all waiting on the same canary) waits on top of the run."""
        return concurrency * self.seconds / max(self.requests, 1)

    def late(self, limit: float) -> str:
        """The answers slower than `limit`: how many, and the slowest with when they were sent."""
        late = sorted((s for s in self.slowest if s[0] >= limit), reverse=True)
        shown = ", ".join(f"{p} {lat * 1000:.0f} ms sent at +{at:.2f}s" for lat, at, p in late[:8])
        return f"{sum(1 for x in self.latencies if x >= limit)} answers over {limit * 1000:.0f} ms: {shown}"


class ClientConnection:
    """A minimal HTTP/1.1 keep-alive client on one socket: writes a prepared request, reads the answer.

    Cheaper per request than aiohttp's client, so on a small machine the CPU goes to the sidecar under test rather
    than to the load generator, and the latency measured is the sidecar's, not the generator's backlog."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close" or b"Connection: close" in raw:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def prepared(path: str, headers: dict[str, str], *, close: bool) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def hammer(
    port: int,
    paths: list[tuple[str, dict[str, str]]],
    *,
    concurrency: int,
    seconds: float,
    total: int | None = None,
    new_connection_each: bool = False,
) -> Load:
    """`concurrency` clients, each on its own keep-alive connection (or a new connection per request), each
    sending the next request as soon as its answer arrived, until `seconds` pass or `total` requests were sent.
    Transport errors are counted, never raised."""
    load = Load(statuses={p: Counter() for p, _ in paths})
    requests = [(p, prepared(p, h, close=new_connection_each)) for p, h in paths]
    sent = 0
    start = time.monotonic()
    end = start + seconds

    async def client(n: int) -> None:
        nonlocal sent
        conn = ClientConnection(port)
        mine = 0
        try:
            while time.monotonic() < end and (total is None or sent < total):
                path, raw = requests[(n + mine) % len(requests)]
                sent += 1
                mine += 1
                t0 = time.monotonic()
                try:
                    code = await asyncio.wait_for(conn.request(raw), 10)
                    load.statuses[path][code] += 1
                except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                    load.errors[type(e).__name__] += 1
                    conn.close()
                latency = time.monotonic() - t0
                load.latencies.append(latency)
                if latency > 0.5 and len(load.slowest) < 10_000:
                    load.slowest.append((latency, t0 - start, path))
        finally:
            conn.close()

    await asyncio.gather(*(client(n) for n in range(concurrency)))
    load.seconds = time.monotonic() - start
    return load


async def status(session: aiohttp.ClientSession, url: str) -> tuple[int, float]:
    t0 = time.monotonic()
    async with session.get(url) as resp:
        await resp.read()
        return resp.status, time.monotonic() - t0


# ---------------------------------------------------------------------------------------------- process figures


def rss_bytes(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    assert m, text
    return int(m.group(1)) * 1024


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def metric(session: aiohttp.ClientSession, base: str, name: str) -> float | None:
    """A sample of the sidecar's own /metrics, or None when it does not expose that metric."""
    async with session.get(base + "/metrics") as resp:
        text = await resp.text()
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------- load


async def test_300_concurrent_probes_on_a_healthy_model(serve: Any, healthy_triton: TritonServer) -> None:
    """No errors, only 200s, every answer within the deadline, and the canaries Triton saw follow min_interval."""
    min_interval = 1.0
    srv = serve(min_interval=min_interval)
    async with aiohttp.ClientSession() as s:
        assert (await status(s, srv.base + "/ready"))[0] == 200
    before = healthy_triton.inference_count(MODEL)
    load = await hammer(srv.port, [("/ready", {}), ("/live", {})], concurrency=CONCURRENCY, seconds=LOAD_SECONDS)
    canaries = healthy_triton.inference_count(MODEL) - before
    print(f"\n{load.summary('healthy load')}; canaries reaching Triton {canaries}")

    assert not load.errors, load.summary("healthy load")
    assert all(set(c) == {200} for c in load.statuses.values()), load.statuses
    assert load.requests >= CONCURRENCY, "the load generator barely ran"
    assert max(load.latencies) < TIMEOUT + MARGIN, load.late(TIMEOUT + MARGIN)
    # One run per min_interval at most (single-flight plus cache), and results never go stale under load.
    assert 2 <= canaries <= load.seconds / min_interval + 2, canaries


def canary_attempts(seconds: float, *, timeout: float, min_interval: float, hang_backoff: float) -> int:
    """The most canaries the runner's backoff lets reach a hung model in `seconds`: each attempt waits out the
    timeout, then a pause that starts at max(min_interval, 0.1) and doubles up to hang_backoff."""
    t, delay, attempts = 0.0, 0.0, 0
    while t <= seconds:
        attempts += 1
        delay = min(hang_backoff, max(delay * 2, min_interval, 0.1))
        t += timeout + delay
    return attempts


async def test_300_concurrent_probes_on_a_hung_model(serve: Any, healthy_triton: TritonServer) -> None:
    """Every /ready is a 503 within the deadline, /live stays 200 (a fresh failure), and backoff keeps the hung
    model from being fed a canary per min_interval."""
    min_interval, hang_backoff = 1.0, 10.0
    srv = serve(min_interval=min_interval, hang_backoff=hang_backoff)
    async with aiohttp.ClientSession() as s:
        assert (await status(s, srv.base + "/ready"))[0] == 200
        before = healthy_triton.inference_count(MODEL)
        healthy_triton.fault(MODEL, "hang")
        hung_at = time.monotonic()

        async def failing() -> bool:
            return (await status(s, srv.base + "/ready"))[0] == 503

        await async_wait_for(failing, 10, "/ready to fail once the model hangs")
    load = await hammer(srv.port, [("/ready", {}), ("/live", {})], concurrency=CONCURRENCY, seconds=LOAD_SECONDS)
    hung_for = time.monotonic() - hung_at
    healthy_triton.fault(MODEL, "ok")
    healthy_triton.wait_idle(MODEL)
    # The hung requests finish once the fault clears; wait until Triton's count settles before reading it.
    counts: list[int] = []

    def settled() -> bool:
        counts.append(healthy_triton.inference_count(MODEL))
        return len(counts) >= 5 and len(set(counts[-5:])) == 1

    wait_for(settled, 15, "Triton's inference count to settle", every=0.1)
    canaries = counts[-1] - before
    bound = canary_attempts(hung_for, timeout=TIMEOUT, min_interval=min_interval, hang_backoff=hang_backoff)
    limit = TIMEOUT + MARGIN + load.herd(CONCURRENCY)
    print(
        f"\n{load.summary('hung load')}; latency limit {limit * 1000:.0f} ms (herd {load.herd(CONCURRENCY) * 1000:.0f}"
        f" ms); canaries reaching Triton {canaries} in {hung_for:.1f}s (bound {bound})"
    )

    assert not load.errors, load.summary("hung load")
    assert set(load.statuses["/ready"]) == {503}, load.statuses
    assert set(load.statuses["/live"]) == {200}, "a hang younger than liveness.after must not fail /live"
    # All 300 clients wait on the same hung canary and are released together at the deadline; the last of them is
    # answered after the other 299, so its bound adds one cohort's worth of answers at the measured rate.
    assert max(load.latencies) < limit, load.late(limit)
    # Without backoff it would be about hung_for / min_interval (6 or more); with it, a handful.
    assert canaries <= bound + 1, (canaries, bound)


# ---------------------------------------------------------------------------------------------- idle sockets


async def test_300_idle_connections_do_not_delay_a_real_probe(serve: Any) -> None:
    """Connections that send nothing, or half a request line, or half the headers, hold no probe back."""
    srv = serve(min_interval=0.0)
    pid = srv.process.pid
    baseline = open_fds(pid)
    partial = [b"", b"GET /rea", b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\n"]
    idle: list[socket.socket] = []
    try:
        for i in range(CONCURRENCY):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            idle.append(sock)
            if partial[i % 3]:
                sock.sendall(partial[i % 3])
        # The sidecar really holds them: each accepted connection is a file descriptor of its own.
        wait_for(lambda: open_fds(pid) >= baseline + CONCURRENCY - 10, 10, "the sidecar to accept the idle sockets")
        held = open_fds(pid)
        answers = []
        async with aiohttp.ClientSession() as s:
            for path in ("/ready", "/live", "/ready?verbose", "/live/ping", "/ready"):
                answers.append((path, *(await status(s, srv.base + path))))
        print(f"\nidle sockets: fds {baseline} -> {held} while held; probes {answers}")
        for path, code, elapsed in answers:
            assert code == 200, (path, code)
            assert elapsed < TIMEOUT + MARGIN, (path, elapsed)
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: open_fds(pid) <= baseline + 2, 10, "the sidecar to release the closed idle sockets")


# ---------------------------------------------------------------------------------------------- soak

SOAK_PATHS: list[tuple[str, dict[str, str]]] = [
    ("/ready", {}),
    ("/ready", {}),
    ("/live", {}),
    ("/ready?verbose", {}),
    ("/ready/canary/demo", {}),
    ("/ready?exclude=gpu", {"Accept": "application/json"}),
]
SOAK_REQUESTS = 25_000
CHURN_REQUESTS = 3_000
WARMUP_REQUESTS = 3_000
RSS_GROWTH_LIMIT = 30 * 1024**2
FD_GROWTH_LIMIT = 20
TASK_GROWTH_LIMIT = 20
POLL_S = 0.05


def settled_fds(pid: int, at_most: int, timeout: float = 10.0) -> int:
    """The sidecar's fd count once the connections a load closed are released (it handles their EOF a moment
    later), or whatever it is when `timeout` passes: the caller asserts, so the figures are printed either way."""
    deadline = time.monotonic() + timeout
    while (n := open_fds(pid)) > at_most and time.monotonic() < deadline:
        time.sleep(POLL_S)  # a poll with a deadline, not a fixed wait
    return n


async def test_soak_keeps_memory_fds_and_tasks_flat(serve: Any) -> None:
    """Tens of thousands of probes (with a run every few ms) and thousands of fresh connections leave the
    sidecar's RSS, file descriptors and asyncio tasks where they were after warm-up."""
    srv = serve(min_interval=0.02)
    pid = srv.process.pid
    idle_fds = open_fds(pid)

    async with aiohttp.ClientSession() as s:
        warm = await hammer(srv.port, SOAK_PATHS, concurrency=50, seconds=20, total=WARMUP_REQUESTS)
        assert not warm.errors, warm.summary("warm-up")
        # +1: this session's own keep-alive connection for /metrics, open from here on.
        fds0 = settled_fds(pid, idle_fds + 1)
        runs0 = await metric(s, srv.base, "probe_runs_total")
        tasks0 = await metric(s, srv.base, "probe_asyncio_tasks")
        rss0 = rss_bytes(pid)

        soak = await hammer(srv.port, SOAK_PATHS, concurrency=100, seconds=40, total=SOAK_REQUESTS)
        churn = await hammer(
            srv.port, [("/ready", {})], concurrency=20, seconds=15, total=CHURN_REQUESTS, new_connection_each=True
        )
        fds1 = settled_fds(pid, fds0)
        runs1 = await metric(s, srv.base, "probe_runs_total")
        tasks1 = await metric(s, srv.base, "probe_asyncio_tasks")
        rss1 = rss_bytes(pid)

    assert runs0 is not None and runs1 is not None
    print(f"\n{warm.summary('soak warm-up')}")
    print(soak.summary("soak keep-alive"))
    print(churn.summary("soak new connection per probe"))
    print(
        f"soak: RSS {rss0 / 1024**2:.1f} -> {rss1 / 1024**2:.1f} MiB ({(rss1 - rss0) / 1024**2:+.1f}), "
        f"fds {fds0} -> {fds1}, runs {runs1 - runs0:.0f}, asyncio tasks "
        + (f"{tasks0:.0f} -> {tasks1:.0f}" if tasks0 is not None and tasks1 is not None else "not exposed by /metrics")
    )

    for load, what in ((soak, "soak"), (churn, "churn")):
        assert not load.errors, load.summary(what)
        assert all(set(c) == {200} for c in load.statuses.values()), load.summary(what)
        assert max(load.latencies) < TIMEOUT + MARGIN, load.late(TIMEOUT + MARGIN)
    assert soak.requests >= 10_000, "the soak must be long enough to show a leak"
    assert runs1 - runs0 >= 100, "the soak must make the sidecar run its checks, not only serve the cache"
    assert rss1 - rss0 < RSS_GROWTH_LIMIT, (rss0, rss1)
    assert fds1 - fds0 < FD_GROWTH_LIMIT, (fds0, fds1)
    if tasks0 is not None and tasks1 is not None:  # probe_asyncio_tasks: the sidecar's own count of its tasks
        assert tasks1 - tasks0 < TASK_GROWTH_LIMIT, (tasks0, tasks1)
