"""What the fault matrix drives and observes: `probe serve` as a timed HTTP client sees it, a misbehaving peer
where Triton should be, and a model hang whose moment of arrival the test can see.

Everything listens on and talks to 127.0.0.1 only. Waits poll a condition with a deadline, never sleep blindly.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from demo.nvml_fakes import FakeNvmlState
from tests.conftest import TritonServer, start_triton, stop_triton
from tests.helpers import ServeProcess, wait_for

# Short deadlines keep the matrix fast; min_interval 0 makes every probe a fresh run, so a fault shows at once.
TIMEOUT = 0.5
PROBE: dict[str, Any] = {"timeout": TIMEOUT, "min_interval": 0.0, "interval": 0, "hang_backoff": 0.2}
# liveness.after 0: a restart-worthy failure fails /live at once, so each row shows whether its fault is one.
LIVENESS: dict[str, Any] = {"after": 0}
# Every answer must come within probe.timeout plus this: the contract's "a few ms", with an honest margin for a
# loaded two-core machine running other test sessions at the same time.
SLACK = 0.15


@dataclass(frozen=True)
class Answer:
    status: int
    body: str
    elapsed: float


def http(url: str, *, method: str = "GET", body: bytes | None = None, timeout: float = 10.0) -> Answer:
    """One request on a fresh connection; any HTTP status is an answer, not an exception."""
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, data = int(r.status), r.read()
    except urllib.error.HTTPError as e:
        status, data = int(e.code), e.read()
    return Answer(status, data.decode("utf-8", "replace"), time.monotonic() - start)


@dataclass(frozen=True)
class Expect:
    """What a fault must look like from outside: the status of /ready and /live, the failing check and its full
    reason (a regular expression that must match all of `/ready/<check>`'s reason), and checks that must keep
    passing (the fault must not be blamed on them)."""

    ready: int
    live: int
    check: str
    reason: str
    passing: tuple[str, ...] = ()


@dataclass
class Sidecar:
    """`probe serve` under test. Every answer is timed against probe.timeout; `sound()` is the no-crash rule."""

    serve: ServeProcess
    timeout: float
    config: Path
    golden: Path

    @property
    def base(self) -> str:
        return self.serve.base

    def get(self, path: str) -> Answer:
        answer = http(self.base + path)
        assert answer.elapsed <= self.timeout + SLACK, f"GET {path} took {answer.elapsed:.3f}s: {answer.body!r}"
        return answer

    def sound(self) -> None:
        """Still running, and no Python traceback anywhere in its log."""
        assert self.serve.process.poll() is None, f"probe serve exited: {self.serve.logs()[-2000:]}"
        logs = self.serve.logs()
        assert "Traceback" not in logs, logs[-4000:]

    def expect(self, e: Expect, within: float = 15.0) -> None:
        """Wait until `e.check` fails with `e.reason`, then hold every other part of the expectation."""
        pattern = re.compile(f"{re.escape(e.check)} failed: (?:{e.reason})\n")
        last: list[Answer] = []

        def failing_as_expected() -> bool:
            last[:] = [self.get(f"/ready/{e.check}")]
            return last[0].status == 503 and pattern.fullmatch(last[0].body) is not None

        try:
            wait_for(failing_as_expected, within, f"{e.check} to fail", every=0.05)
        except AssertionError:
            raise AssertionError(f"{e.check}: expected 503 {pattern.pattern!r}, last answer {last}") from None
        ready, live = self.get("/ready"), self.get("/live?verbose")
        assert ready.status == e.ready, ready
        assert live.status == e.live, live
        for name in e.passing:
            answer = self.get(f"/ready/{name}")
            assert answer.status == 200, (name, answer)
        self.sound()

    def passes(self, check: str, within: float = 30.0) -> None:
        """Healthy: /ready, /live and `check` pass (before a fault, and again once it clears, without a restart)."""
        wait_for(lambda: self.get("/ready").status == 200, within, f"/ready to pass ({check})", every=0.05)
        assert self.get("/live").status == 200
        answer = self.get(f"/ready/{check}")
        assert answer.status == 200 and answer.body.startswith("ok"), answer
        self.sound()


StartSidecar = Callable[..., Sidecar]


@dataclass
class PrivateTriton:
    """A Triton of its own for the scenarios that kill it or unload its model; a restart keeps the HTTP port."""

    directory: Path
    server: TritonServer

    def start(self) -> None:
        self.server.fault("demo_classifier", "ok")  # the fault file outlives the process
        self.server = start_triton(self.directory, ("demo_classifier",), http_port=self.server.http_port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_triton(self.server, sig)
        # pytriton leaves its shared-memory segments behind when stopped (4 MiB each); sweep this instance's own.
        for segment in Path("/dev/shm").glob(f"pytrtion{self.server.process.pid}-*"):
            segment.unlink(missing_ok=True)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()


@dataclass(frozen=True)
class FakeDriver:
    """What a `probe serve` process needs to load the fake NVML: its environment, and the state to drive it."""

    state: FakeNvmlState
    env: dict[str, str]


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.writing")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- a model hang


class ModelHang:
    """Hang `model` with a FIFO as its fault file, so the test can see the very moment a request is stuck inside.

    The demo server opens its fault file on every request. Opening a FIFO for reading blocks until a writer
    comes, and our non-blocking open for writing fails with ENXIO until a reader is there: when it succeeds, a
    canary is inside the model. We keep that write end open, so the reader stays blocked in read(). `release()`
    puts a regular "ok" file back first (new requests pass), then closes the write end (blocked readers read EOF,
    i.e. "ok") and sweeps up any reader that was still opening the old FIFO through a second link to it.
    """

    def __init__(self, server: TritonServer, model: str) -> None:
        self._path = server.fault_dir / model
        self._link = server.fault_dir / f".{model}.fifo"
        self._writer: int | None = None
        tmp = server.fault_dir / f".{model}.fifo-new"
        os.mkfifo(tmp)
        os.link(tmp, self._link)
        os.replace(tmp, self._path)

    def _open_writer(self) -> int | None:
        try:
            return os.open(self._link, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no reader yet
                return None
            raise

    def wait_entered(self, within: float = 10.0) -> None:
        """Return once a request is blocked inside the model."""

        def entered() -> bool:
            self._writer = self._open_writer()
            return self._writer is not None

        wait_for(entered, within, "a request to be stuck inside the model", every=0.005)

    def release(self) -> None:
        write_atomic(self._path, b"ok")
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None
        while (fd := self._open_writer()) is not None:  # a late reader of the old FIFO: give it EOF too
            os.close(fd)
        self._link.unlink()


@contextlib.contextmanager
def model_hang(server: TritonServer, model: str) -> Iterator[ModelHang]:
    hang = ModelHang(server, model)
    try:
        yield hang
    finally:
        hang.release()


# ---------------------------------------------------------------------------------------------- a faulty peer

GARBAGE = b"\x16\x03\x01\x02\x00 SPDY/9.9 \xff\xfe not an HTTP answer\r\n\x00\r\n\r\n"
BAD_JSON = b'{"name": "demo_classifier", "versions": ["1"'  # a reply cut short: HTTP is fine, JSON is not


@dataclass
class FaultyPeer:
    """A TCP server on 127.0.0.1 (own thread and event loop) standing where Triton should be.

    Modes: `proxy` relays bytes to the real Triton on `upstream_port` (the healthy state); `silent` accepts
    connections and requests and never answers (a wedged HTTP frontend); `garbage` answers any request with bytes
    that are not HTTP; `bad_json` speaks valid HTTP/1.1 and answers every request
    (/v2/health/*, /v2/models/* and the rest) with 200 and a body that is not JSON. Changing the mode drops open
    connections, so the sidecar's pooled keep-alive connections meet the new behaviour at once.
    """

    upstream_port: int
    port: int = 0
    mode: str = "proxy"
    _loop: asyncio.AbstractEventLoop | None = None
    _server: asyncio.Server | None = None
    _thread: threading.Thread | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _handlers: set[asyncio.Task[Any]] = field(default_factory=set)

    def start(self) -> FaultyPeer:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="faulty-peer", daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in self._handlers:
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(5)
        self._loop.close()
        self._loop = None

    def set_mode(self, mode: str) -> None:
        assert mode in ("proxy", "silent", "garbage", "bad_json"), mode

        async def switch() -> None:
            self.mode = mode
            for w in list(self._writers):
                w.close()

        self._call(switch())

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            if self.mode == "proxy":
                await self._relay(reader, writer)
            elif self.mode == "silent":
                while await reader.read(65536):  # accept the request, never answer, until the client gives up
                    pass
            elif self.mode == "garbage":
                await reader.read(65536)
                writer.write(GARBAGE)
                await writer.drain()
            else:
                await self._bad_json(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _bad_json(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if length:
                await reader.readexactly(int(length.group(1)))
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(BAD_JSON)}\r\n\r\n".encode()
                + BAD_JSON
            )
            await writer.drain()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.add(up_writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self._writers.discard(up_writer)
            up_writer.close()
