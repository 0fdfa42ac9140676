"""The wire to Triton against a scripted peer: canary reply decoding, retries, aborts, caps, encodings and TLS.

The peer is an asyncio server on 127.0.0.1:0 that answers each request with exactly the bytes a test scripted,
so every malformed, oversized or compressed reply here is what `TritonClient` sees on the wire. The oversized
cases are the red-team's (issue 11, "Bounds, both ways"): each is refused fast, with little memory, and the
peer sees the connection closed rather than drained.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import resource
import ssl
import subprocess
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from probe import __version__
from probe.checks.canary import CanaryCheck, GoldenStore, reply_cap
from probe.config import CanaryConfig, ConfigError, TlsConfig, parse_config
from probe.environment import EnvironmentProbe
from probe.golden import Golden, LatencyBaseline, OutputGolden, Record, write_golden
from probe.saturation import Saturation
from probe.tensors import build_inputs, digest, input_digest
from probe.triton import JSON_CAP, METRICS_CAP, ReplyTooLarge, TritonClient, TritonRequestError, TritonUnreachable
from probe.triton_metrics import MetricsPage
from tests.helpers import DEMO_CANARY

MiB = 1024 * 1024
GiB = 1024 * MiB
OUTPUTS = ("PROBS", "LABEL")
PROBE_TIMEOUT = 0.8  # the production default: a refused reply must fail well inside it
# Peak memory a refused reply may add. Reading any of these replies whole would take hundreds of MiB.
RSS_BUDGET_MIB = 48
# A regression reads on rather than refusing: stop it here, before it takes the machine's memory.
BOUND_S = 2.0

# ---------------------------------------------------------------------------------------------- the peer

CLOSE = "close"
"""Close the connection (after the bytes before it)."""
HANG = "hang"
"""Send nothing more; wait until the client closes the connection."""
STOP = "stop"
"""Close the connection and stop listening: the next connect is refused."""


@dataclass(frozen=True)
class Endless:
    """Write `chunk` again and again, until the client stops reading or `limit` bytes went out."""

    chunk: bytes
    limit: int


Step = bytes | str | Endless


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    connection: int


@dataclass
class ScriptedPeer:
    """An HTTP peer that answers the n-th request with the n-th script (then closes on any further request)."""

    scripts: list[Sequence[Step]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    sent: int = 0
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answer(self, *steps: Step) -> None:
        self.scripts.append(steps)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        try:
            while True:
                seen = await _read_request(reader, conn)
                if seen is None:
                    return
                self.seen.append(seen)
                steps = self.scripts.pop(0) if self.scripts else (CLOSE,)
                for step in steps:
                    if isinstance(step, bytes):
                        await self._write(writer, step)
                    elif isinstance(step, Endless):
                        await self._endless(writer, step)
                    elif step == HANG:
                        await self._until_closed(reader)
                        return
                    elif step == STOP:
                        await self.close()
                        return
                    else:
                        return
        except ConnectionError:
            self.closed_by_client.set()
        finally:
            writer.close()

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        # In slices: a large body written at once would sit in the transport's buffer, on this process's RSS.
        for at in range(0, len(data), 65536):
            writer.write(data[at : at + 65536])
            await writer.drain()
            self.sent += min(65536, len(data) - at)

    async def _endless(self, writer: asyncio.StreamWriter, step: Endless) -> None:
        while self.sent < step.limit:
            writer.write(step.chunk)
            await writer.drain()  # raises once the client has closed: what a refused reply must do
            self.sent += len(step.chunk)

    async def _until_closed(self, reader: asyncio.StreamReader) -> None:
        async with asyncio.timeout(30):  # a bound for the test, far beyond any deadline here
            while await reader.read(65536):
                pass
        self.closed_by_client.set()


async def _read_request(reader: asyncio.StreamReader, conn: int) -> Seen | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    return Seen(method, target, headers, conn)


@pytest.fixture
async def peer() -> AsyncIterator[ScriptedPeer]:
    p = ScriptedPeer()
    await p.start()
    yield p
    await p.close()


@pytest.fixture
async def client(peer: ScriptedPeer) -> AsyncIterator[TritonClient]:
    async with TritonClient(peer.url) as c:
        yield c


def http(status: int, body: bytes = b"", *headers: str, length: bool = True) -> bytes:
    """An HTTP/1.1 answer head (with Content-Length unless `length` is False) and body."""
    lines = [f"HTTP/1.1 {status} X", *headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def infer_reply(outputs: dict[str, np.ndarray[Any, Any]]) -> tuple[bytes, int]:
    """Triton's binary inference reply for `outputs`: (body, JSON header length)."""
    header = {
        "model_name": "demo_classifier",
        "model_version": "1",
        "outputs": [
            {
                "name": name,
                "datatype": {"float32": "FP32", "int64": "INT64"}[arr.dtype.name],
                "shape": list(arr.shape),
                "parameters": {"binary_data_size": arr.nbytes},
            }
            for name, arr in outputs.items()
        ],
    }
    head = json.dumps(header).encode()
    return head + b"".join(arr.tobytes() for arr in outputs.values()), len(head)


PROBS = np.linspace(0.0, 1.0, 10, dtype=np.float32).reshape(1, 10)
LABEL = np.array([9], dtype=np.int64)


def good_reply() -> bytes:
    body, json_size = infer_reply({"PROBS": PROBS, "LABEL": LABEL})
    return http(200, body, f"Inference-Header-Content-Length: {json_size}", "Content-Type: application/octet-stream")


def demo_canary(tmp_path: Path, url: str = "127.0.0.1:8000") -> CanaryConfig:
    return parse_config({"triton": {"url": url}, "canaries": [DEMO_CANARY]}, tmp_path / "probe.yaml").canaries[0]


async def infer(client: TritonClient, canary: CanaryConfig, *, max_reply: int = 64 * MiB) -> Any:
    return await client.infer(canary, build_inputs(canary), OUTPUTS, max_reply=max_reply)


def demo_golden(canary: CanaryConfig) -> Golden:
    """What `probe record` writes for the demo canary: PROBS FP32 [1, 10] and LABEL INT64 [1]."""
    record = Record(
        environment={"triton": "2.51.0"},
        recorded_at="2026-11-01T00:00:00Z",
        tool_version=__version__,
        outputs={
            "PROBS": OutputGolden("FP32", (1, 10), digest("FP32", PROBS)),
            "LABEL": OutputGolden("INT64", (1,), digest("INT64", LABEL)),
        },
        latency=LatencyBaseline.from_samples([0.002, 0.002, 0.002]),
    )
    inputs = build_inputs(canary)
    return Golden(canary.name, canary.model, "", input_digest(canary, inputs), "exact", (record,))


# ---------------------------------------------------------------------------------------------- measuring


@dataclass
class Cost:
    seconds: float = 0.0
    peak_mib: float = 0.0
    """Peak resident memory above the start of the block."""


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.MULTILINE)
    assert m is not None
    return int(m.group(1))


@contextmanager
def cost() -> Iterator[Cost]:
    """Wall time and peak RSS growth of the block. Linux resets the peak (VmHWM) on writing 5 to clear_refs;
    where it cannot, the process's lifetime peak stands in, which only over-counts."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start_kib = _status_kib("VmRSS")
        peak: Callable[[], int] = lambda: _status_kib("VmHWM")  # noqa: E731
    except OSError:
        start_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    c = Cost()
    t0 = time.perf_counter()
    yield c
    c.seconds = time.perf_counter() - t0
    c.peak_mib = max(0, peak() - start_kib) / 1024


async def closed_by_client(peer: ScriptedPeer) -> None:
    async with asyncio.timeout(5):
        await peer.closed_by_client.wait()


# ---------------------------------------------------------------------------------------------- decoding


async def test_a_good_reply_decodes_as_views_and_the_canary_asks_for_identity(
    tmp_path: Path, peer: ScriptedPeer, client: TritonClient
) -> None:
    peer.answer(good_reply())
    canary = demo_canary(tmp_path, peer.url)
    outcome = await infer(client, canary)
    probs_dt, probs = outcome.outputs["PROBS"]
    assert probs_dt == "FP32" and probs.shape == (1, 10) and np.array_equal(probs, PROBS)
    assert not probs.flags.owndata and not probs.flags.writeable  # a view on the reply's buffer, not a copy
    assert outcome.outputs["LABEL"][0] == "INT64" and outcome.outputs["LABEL"][1].tolist() == [9]
    seen = peer.seen[0]
    assert (seen.method, seen.target) == ("POST", "/v2/models/demo_classifier/infer")
    assert seen.headers["accept-encoding"] == "identity"
    assert seen.headers["user-agent"] == f"probe/{__version__}"


async def test_every_get_asks_for_identity_as_probe(peer: ScriptedPeer, client: TritonClient) -> None:
    meta = {"name": "m", "versions": ["1"], "inputs": [], "outputs": []}
    peer.answer(http(200))
    peer.answer(http(200, json.dumps(meta).encode()))
    peer.answer(http(200, b"{}"))
    peer.answer(http(200, b'{"model_stats": []}'))
    peer.answer(http(200, b"# HELP x\nx 1\n"))
    assert await client.live()
    assert (await client.model_info("m")).name == "m"
    assert await client.statistics("m") == {"model_stats": []}
    assert await client.metrics_page(f"http://{peer.url}/metrics") == "# HELP x\nx 1\n"
    targets = [s.target for s in peer.seen]
    assert targets == ["/v2/health/live", "/v2/models/m", "/v2/models/m/config", "/v2/models/m/stats", "/metrics"]
    for seen in peer.seen:
        assert seen.headers["accept-encoding"] == "identity", seen.target
        assert seen.headers["user-agent"] == f"probe/{__version__}", seen.target


def _cut_chunked() -> list[Step]:
    body, json_size = infer_reply({"PROBS": PROBS, "LABEL": LABEL})
    head = http(200, b"", f"Inference-Header-Content-Length: {json_size}", "Transfer-Encoding: chunked", length=False)
    return [head + chunk(body[:30]), CLOSE]


def _binary(announced: int, sent: bytes) -> list[Step]:
    header = json.dumps(
        {
            "outputs": [
                {"name": "PROBS", "datatype": "FP32", "shape": [1, 10], "parameters": {"binary_data_size": announced}}
            ]
        }
    ).encode()
    return [http(200, header + sent, f"Inference-Header-Content-Length: {len(header)}")]


MALFORMED: dict[str, tuple[list[Step], str]] = {
    "truncated body": ([good_reply()[:-20], CLOSE], "reply cut short"),
    "disconnect mid-body": (_cut_chunked(), "reply cut short"),
    "bad JSON": ([http(200, b'{"outputs": [')], "Parse error at offset 13: Invalid value."),
    "JSON that is not an object": ([http(200, b"[1, 2]")], "'list' object has no attribute 'get'"),
    "output without shape": ([http(200, b'{"outputs": [{"name": "PROBS", "datatype": "FP32"}]}')], "'shape'"),
    "binary output shorter than announced": (_binary(40, b"\0" * 12), "output PROBS: 40 bytes announced, 12 sent"),
    "unasked gzip": (
        [http(200, gzip.compress(b'{"outputs": []}'), "Content-Encoding: gzip")],
        "Content-Encoding 'gzip', which probe did not ask for",
    ),
    "broken deflate": (
        [http(200, zlib.compress(b'{"outputs": []}')[:-6] + b"junk", "Content-Encoding: deflate")],
        "Content-Encoding 'deflate', which probe did not ask for",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_reply_is_one_line_and_counts_as_a_failure(
    tmp_path: Path, peer: ScriptedPeer, client: TritonClient, case: str
) -> None:
    steps, detail = MALFORMED[case]
    peer.answer(*steps)
    with pytest.raises(TritonUnreachable) as e:
        await infer(client, demo_canary(tmp_path, peer.url))
    assert str(e.value) == f"canary demo inference: malformed reply from {peer.url}: {detail}"
    assert client.failures == 1


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (400, b'{"error": "unexpected shape for input \'IMAGE\'"}', "[400] unexpected shape for input 'IMAGE'"),
        (
            500,
            b'{"error": "CUDA error: an illegal memory access\\nmore"}',
            "[500] CUDA error: an illegal memory access",
        ),
        (500, b"", "[500] empty answer"),
        (503, b"<html>overloaded</html>", "[503] <html>overloaded</html>"),
    ],
)
async def test_an_error_answer_quotes_triton(
    tmp_path: Path, peer: ScriptedPeer, client: TritonClient, status: int, body: bytes, reason: str
) -> None:
    peer.answer(http(status, body, "Content-Type: application/json"))
    with pytest.raises(TritonRequestError) as e:
        await infer(client, demo_canary(tmp_path, peer.url))
    assert str(e.value) == f"canary demo inference: {reason}"


# ---------------------------------------------------------------------------------------------- connections


async def test_a_stale_keep_alive_connection_is_retried_once(
    tmp_path: Path, peer: ScriptedPeer, client: TritonClient
) -> None:
    canary = demo_canary(tmp_path, peer.url)
    peer.answer(good_reply())
    peer.answer(CLOSE)  # the reused connection is closed with the request in flight, before any reply byte
    peer.answer(good_reply())
    await infer(client, canary)
    outcome = await infer(client, canary)
    assert np.array_equal(outcome.outputs["PROBS"][1], PROBS)
    assert [s.connection for s in peer.seen] == [1, 1, 2]
    assert client.failures == 0


async def test_a_lost_request_whose_retry_cannot_connect_says_server_disconnected(
    tmp_path: Path, peer: ScriptedPeer, client: TritonClient
) -> None:
    url = peer.url
    canary = demo_canary(tmp_path, url)
    peer.answer(good_reply())
    peer.answer(STOP)
    await infer(client, canary)
    with pytest.raises(TritonUnreachable) as e:
        await infer(client, canary)
    assert str(e.value) == f"canary demo inference: cannot connect to Triton at {url}: Server disconnected"
    assert len(peer.seen) == 2


async def test_a_request_lost_twice_is_not_retried_again(
    tmp_path: Path, peer: ScriptedPeer, client: TritonClient
) -> None:
    peer.answer(CLOSE)
    peer.answer(CLOSE)
    peer.answer(good_reply())
    with pytest.raises(TritonUnreachable) as e:
        await infer(client, demo_canary(tmp_path, peer.url))
    assert str(e.value) == f"canary demo inference: cannot connect to Triton at {peer.url}: Server disconnected"
    assert len(peer.seen) == 2


@pytest.mark.parametrize("where", ["before the answer", "mid-body"])
async def test_a_timed_out_canary_closes_its_connection(
    tmp_path: Path, peer: ScriptedPeer, client: TritonClient, where: str
) -> None:
    if where == "mid-body":
        peer.answer(good_reply()[:-30], HANG)
    else:
        peer.answer(HANG)
    canary = demo_canary(tmp_path, peer.url)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await infer(client, canary)
    await closed_by_client(peer)  # not left queued on a pooled connection behind the hung inference
    assert client.failures == 1
    peer.answer(good_reply())
    await infer(client, canary)
    assert [s.connection for s in peer.seen] == [1, 2]


# ---------------------------------------------------------------------------------------------- bounds


ZEROS = b"\0" * MiB


async def test_a_declared_gigabyte_is_refused_before_reading(
    tmp_path: Path, peer: ScriptedPeer, client: TritonClient
) -> None:
    peer.answer(http(200, b"", f"Content-Length: {GiB}", length=False), Endless(ZEROS, GiB))
    with cost() as c, pytest.raises(ReplyTooLarge) as e:
        async with asyncio.timeout(BOUND_S):
            await infer(client, demo_canary(tmp_path, peer.url), max_reply=64 * MiB)
    assert str(e.value) == f"canary demo inference: reply too large ({GiB} bytes > limit {64 * MiB})"
    await closed_by_client(peer)
    print(
        f"Content-Length 1 GiB: {c.seconds * 1000:.1f} ms, +{c.peak_mib:.1f} MiB, peer sent {peer.sent / MiB:.0f} MiB"
    )
    assert c.seconds < PROBE_TIMEOUT / 4 and c.peak_mib < RSS_BUDGET_MIB
    assert peer.sent < 256 * MiB


async def test_an_endless_chunked_canary_reply_is_stopped_at_the_cap(
    tmp_path: Path, peer: ScriptedPeer, client: TritonClient
) -> None:
    head = http(200, b"", "Transfer-Encoding: chunked", length=False)
    peer.answer(head, Endless(chunk(ZEROS), GiB))
    with cost() as c, pytest.raises(ReplyTooLarge) as e:
        async with asyncio.timeout(BOUND_S):
            await infer(client, demo_canary(tmp_path, peer.url), max_reply=4 * MiB)
    assert str(e.value) == f"canary demo inference: reply too large (over limit {4 * MiB} bytes)"
    await closed_by_client(peer)
    print(
        f"endless chunked canary: {c.seconds * 1000:.1f} ms, +{c.peak_mib:.1f} MiB, peer sent {peer.sent / MiB:.0f} MiB"
    )
    assert c.seconds < PROBE_TIMEOUT / 2 and c.peak_mib < RSS_BUDGET_MIB


@pytest.mark.parametrize("call", ["statistics", "metrics_page"])
async def test_an_endless_stats_or_metrics_page_is_stopped_at_its_cap(
    peer: ScriptedPeer, client: TritonClient, call: str
) -> None:
    head = http(200, b"", "Transfer-Encoding: chunked", length=False)
    peer.answer(head, Endless(chunk(b"x" * 65536), GiB))
    with cost() as c, pytest.raises(ReplyTooLarge) as e:
        async with asyncio.timeout(BOUND_S):
            if call == "statistics":
                await client.statistics("m")
            else:
                await client.metrics_page(f"http://{peer.url}/metrics")
    cap, what = (JSON_CAP, "model m statistics") if call == "statistics" else (METRICS_CAP, "Triton metrics")
    assert str(e.value) == f"{what}: reply too large (over limit {cap} bytes)"
    await closed_by_client(peer)
    print(f"endless chunked {call}: {c.seconds * 1000:.1f} ms, +{c.peak_mib:.1f} MiB")
    assert c.seconds < PROBE_TIMEOUT / 2 and c.peak_mib < RSS_BUDGET_MIB


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """1 GiB of zeros as gzip, about 1 MB: 16 members of 64 MiB each (one gzip stream, as any decoder reads it)."""
    member = gzip.compress(b"\0" * (64 * MiB), compresslevel=9)
    return member * 16


async def test_a_gzip_bomb_is_refused_without_decompressing(
    tmp_path: Path, peer: ScriptedPeer, client: TritonClient, gzip_bomb: bytes
) -> None:
    assert len(gzip_bomb) < 2 * MiB
    peer.answer(http(200, gzip_bomb, "Content-Encoding: gzip", "Content-Type: application/json"))
    peer.answer(http(200, gzip_bomb, "Content-Encoding: gzip", "Content-Type: application/json"))
    with cost() as c, pytest.raises(TritonUnreachable) as e:
        async with asyncio.timeout(BOUND_S):
            await infer(client, demo_canary(tmp_path, peer.url))
    assert str(e.value).endswith(
        "malformed reply from " + peer.url + ": Content-Encoding 'gzip', which probe did not ask for"
    )
    print(f"gzip bomb ({len(gzip_bomb) / MiB:.1f} MB on the wire): {c.seconds * 1000:.1f} ms, +{c.peak_mib:.1f} MiB")
    assert c.seconds < PROBE_TIMEOUT / 4 and c.peak_mib < RSS_BUDGET_MIB
    with cost() as c, pytest.raises(TritonUnreachable, match="Content-Encoding 'gzip'"):
        async with asyncio.timeout(BOUND_S):
            await client.statistics("m")
    assert c.seconds < PROBE_TIMEOUT / 4 and c.peak_mib < RSS_BUDGET_MIB


def _json_reply(size: int) -> bytes:
    """A JSON inference reply of about `size` bytes: one output sent as JSON numbers, not binary."""
    n = size // 2
    head = b'{"outputs": [{"name": "PROBS", "datatype": "FP32", "shape": [1, %d], "data": [' % n
    return head + b"0," * (n - 1) + b"0]}]}"


async def test_a_40_mb_json_reply_is_refused_within_the_probe_timeout(
    tmp_path: Path, peer: ScriptedPeer, client: TritonClient
) -> None:
    canary = demo_canary(tmp_path, peer.url)
    body = _json_reply(40_000_000)
    peer.answer(http(200, body, "Content-Type: application/json"))
    peer.answer(http(200, body, "Content-Type: application/json"))
    cap = reply_cap(demo_golden(canary), 64 * MiB)
    with cost() as c, pytest.raises(ReplyTooLarge) as e:
        async with asyncio.timeout(BOUND_S):
            await infer(client, canary, max_reply=cap)
    assert str(e.value) == f"canary demo inference: reply too large ({len(body)} bytes > limit {cap})"
    print(f"40 MB JSON, golden cap: {c.seconds * 1000:.1f} ms, +{c.peak_mib:.1f} MiB")
    assert c.seconds < PROBE_TIMEOUT / 4
    # Without a golden to size it (the fallback cap holds 40 MB), the JSON header's own cap refuses it unparsed.
    with cost() as c, pytest.raises(ReplyTooLarge) as e:
        async with asyncio.timeout(BOUND_S):
            await infer(client, canary, max_reply=64 * MiB)
    assert str(e.value) == f"canary demo inference: reply too large (JSON header of {len(body)} bytes)"
    print(f"40 MB JSON, fallback cap: {c.seconds * 1000:.1f} ms, +{c.peak_mib:.1f} MiB")
    assert c.seconds < PROBE_TIMEOUT / 2


async def _max_loop_gap(stop: asyncio.Event) -> float:
    """The longest the event loop went without running this task, until `stop` is set."""
    gap, last = 0.0, time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.005)
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
    return gap


def _bytes_reply(elements: int) -> bytes:
    """An inference reply whose BYTES output S holds `elements` empty strings: 4 bytes each on the wire."""
    data = b"\0" * (4 * elements)
    header = json.dumps(
        {
            "outputs": [
                {"name": "S", "datatype": "BYTES", "shape": [elements], "parameters": {"binary_data_size": len(data)}}
            ]
        }
    ).encode()
    return http(200, header + data, f"Inference-Header-Content-Length: {len(header)}")


async def test_a_bytes_output_of_millions_of_elements_neither_blocks_the_loop_nor_outlives_the_deadline(
    tmp_path: Path, peer: ScriptedPeer, client: TritonClient
) -> None:
    """Within the fallback cap (BYTES outputs have no size in the golden) 4 Mi empty strings are 16 MiB: seconds of
    decoding, which must yield to the loop (/live/ping is answered meanwhile) and end at the canary's deadline."""
    peer.answer(_bytes_reply(4 * 1024 * 1024))
    stop = asyncio.Event()
    ticker = asyncio.create_task(_max_loop_gap(stop))
    t0 = time.perf_counter()
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(PROBE_TIMEOUT):
                await infer(client, demo_canary(tmp_path, peer.url))
    finally:
        took = time.perf_counter() - t0
        stop.set()
        gap = await ticker
    print(f"4 Mi BYTES elements: cancelled after {took * 1000:.0f} ms, longest loop stall {gap * 1000:.1f} ms")
    assert took < PROBE_TIMEOUT + 0.1 and gap < 0.1


async def test_a_bytes_output_decodes_as_tritonclient_does(
    tmp_path: Path, peer: ScriptedPeer, client: TritonClient
) -> None:
    words = [b"hello", "w\u00f6rld".encode(), b"", b"x" * 300]
    data = b"".join(len(w).to_bytes(4, "little") + w for w in words)
    header = json.dumps(
        {
            "outputs": [
                {"name": "S", "datatype": "BYTES", "shape": [2, 2], "parameters": {"binary_data_size": len(data)}}
            ]
        }
    ).encode()
    peer.answer(http(200, header + data, f"Inference-Header-Content-Length: {len(header)}"))
    outcome = await infer(client, demo_canary(tmp_path, peer.url))
    datatype, arr = outcome.outputs["S"]
    assert datatype == "BYTES" and arr.dtype == np.object_ and arr.shape == (2, 2)
    assert arr.reshape(-1).tolist() == words


@pytest.mark.parametrize(
    ("shape", "data", "detail"),
    [
        ([3], b"\0\0\0\0", "output S: 3 BYTES elements announced in 4 bytes"),
        ([2], b"\x04\0\0\0abcd", "output S: 2 BYTES elements announced, 1 sent"),
        ([1], b"\x09\0\0\0abc", "output S: a BYTES element runs past the output"),
        ([1], b"\0\0\0\0\0\0\0\0", "output S: 4 bytes beyond its 1 BYTES elements"),
        ([1000000000000], b"\0\0\0\0", "output S: 1000000000000 BYTES elements announced in 4 bytes"),
    ],
)
async def test_a_bytes_output_that_does_not_add_up_is_malformed(
    tmp_path: Path, peer: ScriptedPeer, client: TritonClient, shape: list[int], data: bytes, detail: str
) -> None:
    header = json.dumps(
        {"outputs": [{"name": "S", "datatype": "BYTES", "shape": shape, "parameters": {"binary_data_size": len(data)}}]}
    ).encode()
    peer.answer(http(200, header + data, f"Inference-Header-Content-Length: {len(header)}"))
    with pytest.raises(TritonUnreachable) as e:
        await infer(client, demo_canary(tmp_path, peer.url))
    assert str(e.value) == f"canary demo inference: malformed reply from {peer.url}: {detail}"


def test_the_golden_sizes_the_canary_cap(tmp_path: Path) -> None:
    golden = demo_golden(demo_canary(tmp_path))
    assert reply_cap(golden, 64 * MiB) == 2 * (10 * 4 + 8) + JSON_CAP
    bytes_record = Record(
        environment={},
        recorded_at="2026-11-01T00:00:00Z",
        tool_version=__version__,
        outputs={"S": OutputGolden("BYTES", (2,), "xxh3_128:" + "0" * 32)},
        latency=LatencyBaseline.from_samples([0.001]),
    )
    with_bytes = Golden("demo", "m", "", golden.input_digest, "exact", (*golden.records, bytes_record))
    assert reply_cap(with_bytes, 64 * MiB) == 64 * MiB  # a BYTES output's size is not in the golden


@pytest.mark.parametrize("framing", ["Content-Length", "chunked"])
async def test_a_512_mib_binary_output_is_refused_by_the_golden_cap(
    tmp_path: Path, peer: ScriptedPeer, framing: str
) -> None:
    """Through the canary check itself: the cap comes from the golden, and the failure is restart-worthy."""
    canary = demo_canary(tmp_path, peer.url)
    golden_path = tmp_path / "golden" / "demo.json"
    golden_path.parent.mkdir()
    write_golden(golden_path, demo_golden(canary))
    meta = {
        "name": "demo_classifier",
        "versions": ["1"],
        "inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [-1, 3, 8, 8]}],
        "outputs": [
            {"name": "PROBS", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "LABEL", "datatype": "INT64", "shape": [-1]},
        ],
    }
    size = 512 * MiB
    header = json.dumps(
        {
            "outputs": [
                {"name": "PROBS", "datatype": "FP32", "shape": [1, size // 4], "parameters": {"binary_data_size": size}}
            ]
        }
    ).encode()
    peer.answer(http(200, json.dumps(meta).encode()))
    peer.answer(http(200, b'{"backend": "python"}'))
    if framing == "chunked":
        head = http(
            200, b"", f"Inference-Header-Content-Length: {len(header)}", "Transfer-Encoding: chunked", length=False
        )
        peer.answer(head + chunk(header), Endless(chunk(ZEROS), size))
    else:
        head = http(
            200,
            b"",
            f"Inference-Header-Content-Length: {len(header)}",
            f"Content-Length: {len(header) + size}",
            length=False,
        )
        peer.answer(head + header, Endless(ZEROS, size))
    async with TritonClient(peer.url) as client:
        check = CanaryCheck(
            client,
            canary,
            GoldenStore(golden_path),
            EnvironmentProbe(client, None),
            probe_timeout=PROBE_TIMEOUT,
            max_reply=64 * MiB,
            saturation=Saturation(client, MetricsPage(client, f"http://{client.url}/metrics"), drain_limit=60).canary(
                "demo", "demo_classifier"
            ),
        )
        with cost() as c:
            async with asyncio.timeout(PROBE_TIMEOUT):
                _, result, _ = await check.run()
    cap = 2 * (10 * 4 + 8) + JSON_CAP
    over = f"({len(header) + size} bytes > limit {cap})" if framing == "Content-Length" else f"(over limit {cap} bytes)"
    assert result.reason == f"canary demo inference: reply too large {over}"
    # Triton answered, far more than the golden holds: a changed model, which a restart would not cure.
    assert not result.ok and not result.restart_worthy
    await closed_by_client(peer)
    print(f"512 MiB binary output ({framing}): {c.seconds * 1000:.1f} ms, +{c.peak_mib:.1f} MiB")
    assert c.seconds < PROBE_TIMEOUT / 2 and c.peak_mib < RSS_BUDGET_MIB


# ---------------------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert.pem, key.pem)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@pytest.fixture
async def tls_triton(certificate: tuple[Path, Path]) -> AsyncIterator[str]:
    """An https:// server answering Triton's health endpoints with 200: its host:port."""

    async def handle(request: web.BaseRequest) -> web.Response:
        return web.Response(status=200 if request.path == "/v2/health/live" else 404)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    runner = web.ServerRunner(web.Server(handle), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield f"127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_tls_is_trusted_through_ca_file(tls_triton: str, certificate: tuple[Path, Path]) -> None:
    async with TritonClient(tls_triton, ssl=True, tls=TlsConfig(ca_file=certificate[0])) as client:
        assert await client.live()


async def test_tls_without_the_ca_names_the_setting(tls_triton: str) -> None:
    async with TritonClient(tls_triton, ssl=True) as client:
        with pytest.raises(TritonUnreachable) as e:
            await client.live()
    reason = str(e.value)
    assert reason.startswith(f"server live: TLS certificate of Triton at {tls_triton} not trusted (")
    assert reason.endswith("); set triton.tls.ca_file, or triton.tls.verify: false")


async def test_tls_verify_false_accepts_a_self_signed_triton(tls_triton: str) -> None:
    async with TritonClient(tls_triton, ssl=True, tls=TlsConfig(verify=False)) as client:
        assert await client.live()


def test_tls_settings_reach_the_client_config(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    (tmp_path / "ca.pem").write_bytes(certificate[0].read_bytes())
    raw = {"triton": {"url": "https://triton:8000", "tls": {"ca_file": "ca.pem"}}, "canaries": [DEMO_CANARY]}
    cfg = parse_config(raw, tmp_path / "probe.yaml")
    assert cfg.triton.ssl and cfg.triton.tls == TlsConfig(ca_file=tmp_path / "ca.pem", verify=True)


@pytest.mark.parametrize(
    ("url", "tls", "message"),
    [
        ("https://triton:8000", {"ca_file": "missing.pem"}, "triton.tls.ca_file: no such file: {dir}/missing.pem"),
        ("https://triton:8000", {"ca_file": 5}, "triton.tls.ca_file: expected a file path, got integer"),
        ("https://triton:8000", {"verify": "no"}, "triton.tls.verify: expected true or false, got string"),
        ("https://triton:8000", {"insecure": True}, "triton.tls.insecure: unknown key"),
        ("http://triton:8000", {"verify": False}, "triton.tls: set, but triton.url is not https://"),
        ("triton:8000", {"ca_file": "ca.pem"}, "triton.tls: set, but triton.url is not https://"),
    ],
)
def test_tls_config_errors_name_the_setting(tmp_path: Path, url: str, tls: dict[str, Any], message: str) -> None:
    raw = {"triton": {"url": url, "tls": tls}, "canaries": [DEMO_CANARY]}
    with pytest.raises(ConfigError) as e:
        parse_config(raw, tmp_path / "probe.yaml")
    assert str(e.value) == message.format(dir=tmp_path)


def test_a_ca_file_that_is_not_pem_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    raw = {"triton": {"url": "https://triton:8000", "tls": {"ca_file": "ca.pem"}}, "canaries": [DEMO_CANARY]}
    with pytest.raises(ConfigError) as e:
        parse_config(raw, tmp_path / "probe.yaml")
    # The rest is OpenSSL's own words, which differ between its versions.
    assert str(e.value).startswith(f"triton.tls.ca_file: not a readable PEM CA bundle: {tmp_path / 'ca.pem'}: ")
    assert len(str(e.value).splitlines()) == 1
