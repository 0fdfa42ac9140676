"""What every benchmark shares: a local Triton, recorded goldens, `probe serve` processes, and small stats.

The Triton launcher and the `probe serve` harness are the test suite's own (demo/launcher.py, demo/harness.py), so
the benchmarks run against exactly the server the integration tests use: the demo models on nvidia-pytriton, CPU
only, on 127.0.0.1.
Every process started here is stopped here, by its own pid or process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/, not the repo root, on sys.path
    sys.path.insert(0, str(REPO))

from demo.harness import DEMO_CANARY, ServeProcess, run_cli, write_config  # noqa: E402
from demo.launcher import BENCH_MODELS, TritonServer, start_triton, stop_triton  # noqa: E402
from demo.launcher import free_port as free_port  # noqa: E402  (re-exported for the benchmark scripts)
from demo.launcher import wait_for as wait_for  # noqa: E402

# PROBE_BENCH_SOURCE=DIR runs every `probe serve` from DIR's `probe` package instead of this tree's (an older
# version, for a before/after table); Triton, the goldens (`probe record`) and the clients stay this tree's.
SOURCE = Path(os.environ.get("PROBE_BENCH_SOURCE") or REPO).resolve()
MODEL = str(DEMO_CANARY["model"])
LLM_MODEL = "demo_llm"
"""The decoupled demo model the streaming benchmark talks to."""
# The demo classifier with a fixed 20 ms service time: what a canary adds to a GPU-sized inference.
PACED_CANARY: dict[str, Any] = {**DEMO_CANARY, "name": "paced", "model": "demo_classifier_20ms"}
# One FP32 [4194304] output, 16 MiB: what reading, decoding and digesting a large reply costs.
LARGE_CANARY: dict[str, Any] = {
    "name": "large",
    "model": "demo_large_output",
    "inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "fill": "zeros"}],
}
# 16 canaries of the demo classifier in one probe: one /ready sends 16 inferences at once.
FANOUT_CANARIES: list[dict[str, Any]] = [{**DEMO_CANARY, "name": f"demo{i:02d}"} for i in range(16)]
ALL_CANARIES = [DEMO_CANARY, PACED_CANARY, LARGE_CANARY, *FANOUT_CANARIES]
# A fresh canary on every request, and no background loop competing with the measurement.
FRESH = {"timeout": 0.8, "min_interval": 0, "interval": 0}
# Every answer after the first comes from the cache.
CACHED = {"timeout": 0.8, "min_interval": 3600, "interval": 0}
# What a deployment runs with (deploy/kubernetes/configmap.yaml).
PRODUCTION = {"timeout": 0.8, "min_interval": 1.0, "interval": 10.0}

Summary = list[tuple[str, str, str, bool | None]]
"""(figure, measured, target, passed or None for information) rows for run_all's table."""


# ---------------------------------------------------------------------------------------------- stats


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    s = sorted(values)
    if not s:
        return math.nan
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A compact left-aligned text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# ---------------------------------------------------------------------------------------------- machine


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = "n/a"
    with contextlib.suppress(OSError):
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "cpus": str(os.cpu_count() or 0),
        "affinity": str(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else "n/a",
        "cpu": cpu,
        "python": platform.python_version(),
        "load": load,
    }


def print_machine() -> None:
    m = machine()
    print(f"machine: {m['cpus']} CPUs ({m['affinity']} usable), {m['cpu']}, Python {m['python']}, load {m['load']}")
    if SOURCE != REPO:
        print(f"probe serve runs from {SOURCE} (PROBE_BENCH_SOURCE), not this tree")


# ---------------------------------------------------------------------------------------------- processes


def vm_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM / VmSize, and RssAnon / RssFile (what VmRSS is made of), in bytes, from /proc/<pid>/status.

    RssFile is the mapped pages of the interpreter and the extension libraries: the same files can count a few
    MB more or less depending on how the kernel's page cache holds them (freshly written files, as in a new
    virtualenv, are often mapped in larger folios). RssAnon is the process's own memory."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "VmSize", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    """CPU seconds a process's threads have run, from /proc/<pid>/task/*/schedstat (nanosecond precision)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def stat_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/<pid>/stat, in seconds (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Stack:
    """A Triton with the demo classifier, its golden recorded, and `probe serve` processes pointed at it."""

    tmp: Path
    triton: TritonServer
    serves: list[ServeProcess] = field(default_factory=list)

    @property
    def triton_url(self) -> str:
        return f"http://{self.triton.url}"

    def config(
        self,
        name: str,
        probe: dict[str, Any],
        port: int = 0,
        canaries: list[dict[str, Any]] | None = None,
        **sections: Any,
    ) -> Path:
        """A probe.yaml in its own directory that shares the one recorded golden directory."""
        d = self.tmp / name
        d.mkdir(exist_ok=True)
        path: Path = write_config(
            d,
            self.triton.url,
            canaries if canaries is not None else [DEMO_CANARY],
            probe=probe,
            listen={"port": port},
            golden_dir=str(self.tmp / "golden"),
            **sections,
        )
        return path

    def serve(
        self, name: str, probe: dict[str, Any], canaries: list[dict[str, Any]] | None = None, **sections: Any
    ) -> ServeProcess:
        """Start `probe serve` on a free port and wait until it answers /live/ping."""
        port = free_port()
        proc = ServeProcess(self.config(name, probe, port, canaries, **sections), port, source=SOURCE)
        self.serves.append(proc)
        proc.wait_up(60)
        return proc

    def stop(self, proc: ServeProcess) -> None:
        proc.stop()
        with contextlib.suppress(ValueError):
            self.serves.remove(proc)


@contextlib.contextmanager
def stack() -> Iterator[Stack]:
    """Start Triton (the demo classifier, demo_llm for the streaming benchmark, and the benchmark models), record
    every canary's golden; tear everything down on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="probe-bench-"))
    t0 = time.perf_counter()
    triton = start_triton(tmp, models=(MODEL, LLM_MODEL, *BENCH_MODELS))
    s = Stack(tmp, triton)
    try:
        rec = run_cli("record", "-c", str(s.config("record", FRESH, canaries=ALL_CANARIES)), timeout=180)
        if rec.returncode != 0:
            raise RuntimeError(f"probe record failed ({rec.returncode}): {rec.stderr.strip()}")
        print(f"setup: Triton + {len(ALL_CANARIES)} goldens in {time.perf_counter() - t0:.1f}s")
        yield s
    finally:
        for proc in list(s.serves):
            s.stop(proc)
        stop_triton(triton)
        shutil.rmtree(tmp, ignore_errors=True)


def run_standalone(main: Any) -> None:
    """Entry point of a single benchmark script: one stack, one measurement, exit 0."""
    print_machine()
    with stack() as s:
        result = main(s)
    print(result.report())


# ---------------------------------------------------------------------------------------------- HTTP


@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def add(self, other: LoadResult) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.seconds += other.seconds


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)")


class _LoadConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that sends the next GET as soon as the previous answer is complete.

    Callback-driven with minimal parsing (status line and Content-Length), so the generator spends as little of
    the shared CPU as an asyncio client can: no coroutine, header dict or response object per request.
    """

    def __init__(self, request: bytes, deadline: float, result: LoadResult, done: asyncio.Future[None]) -> None:
        self.request = request
        self.deadline = deadline
        self.result = result
        self.done = done
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            m = _CONTENT_LENGTH.search(head)
            if m is None:
                raise RuntimeError(f"load generator: answer without Content-Length: {head[:200]!r}")
            total = end + 4 + int(m.group(1))
            if len(self.buf) < total:
                return
            if head[9:12] == b"200":
                self.result.requests += 1
            else:
                self.result.errors += 1
            del self.buf[:total]
            if time.perf_counter() >= self.deadline:
                self._finish()
                return
            assert self.transport is not None
            self.transport.write(self.request)

    def _finish(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def load(url: str, *, concurrency: int, seconds: float) -> LoadResult:
    """GET `url` on `concurrency` keep-alive connections for `seconds`; counts completed 200s and errors."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    assert u.hostname == "127.0.0.1" and u.port is not None, "benchmarks only talk to 127.0.0.1:<port>"
    port = u.port
    request = f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\nUser-Agent: probe-bench\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    result = LoadResult()
    start = time.perf_counter()
    deadline = start + seconds
    dones: list[asyncio.Future[None]] = []
    for _ in range(concurrency):
        done: asyncio.Future[None] = loop.create_future()
        dones.append(done)
        await loop.create_connection(
            lambda d=done: _LoadConnection(request, deadline, result, d),  # type: ignore[misc]
            u.hostname,
            port,
        )
    await asyncio.gather(*dones)
    result.seconds = time.perf_counter() - start
    return result


def wrk(url: str, *, concurrency: int, seconds: float) -> LoadResult:
    """The same measurement with wrk (only used when it is installed)."""
    exe = shutil.which("wrk")
    assert exe is not None
    out = subprocess.run(
        [exe, "-t2", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out)
    if m is None:
        raise RuntimeError(f"cannot parse wrk output: {out[-500:]}")
    secs = float(m.group(2)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m.group(3)]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    return LoadResult(requests=int(m.group(1)) - errors, errors=errors, seconds=secs)


# ---------------------------------------------------------------------------------------------- timed requests


class RawInference:
    """A raw `tritonclient.http.aio` inference of the config's first canary, as any client would send it: new
    InferInput objects each time, binary data, every recorded output decoded. Calling it times one inference."""

    def __init__(self, config_path: str, triton_url: str) -> None:
        from probe.config import load_config
        from probe.golden import load_golden
        from probe.tensors import build_inputs

        cfg = load_config(config_path)
        self.canary = cfg.canaries[0]
        self.inputs = build_inputs(self.canary)
        self.outputs = list(load_golden(cfg.golden_path(self.canary.name)).records[0].outputs)
        self.url = triton_url.removeprefix("http://")
        self.client: Any = None

    async def __aenter__(self) -> RawInference:
        import tritonclient.http.aio as aio

        self.client = aio.InferenceServerClient(self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    async def __call__(self) -> float:
        import tritonclient.http as http

        t = time.perf_counter()
        req = []
        for spec in self.canary.inputs:
            inp = http.InferInput(spec.name, list(self.inputs[spec.name].shape), spec.datatype)
            inp.set_data_from_numpy(self.inputs[spec.name], binary_data=True)
            req.append(inp)
        out = [http.InferRequestedOutput(o, binary_data=True) for o in self.outputs]
        result = await self.client.infer(self.canary.model, req, outputs=out)
        for o in self.outputs:
            result.as_numpy(o)
        return time.perf_counter() - t


class LeanInference:
    """The leanest raw client of the config's first canary: the request body generated once (tritonclient's
    `generate_request_body`), keep-alive aiohttp connections, `Accept-Encoding: identity`, the reply read into one
    buffer of its Content-Length and its binary outputs decoded as views on it. What any client must do at the
    least. Calling it times one."""

    def __init__(self, config_path: str, triton_url: str) -> None:
        import tritonclient.http as http
        import tritonclient.http.aio as aio
        from tritonclient.utils import triton_to_np_dtype

        from probe.config import load_config
        from probe.golden import load_golden
        from probe.tensors import build_inputs

        cfg = load_config(config_path)
        canary = cfg.canaries[0]
        inputs = build_inputs(canary)
        outputs = list(load_golden(cfg.golden_path(canary.name)).records[0].outputs)
        req = []
        for spec in canary.inputs:
            inp = http.InferInput(spec.name, list(inputs[spec.name].shape), spec.datatype)
            inp.set_data_from_numpy(inputs[spec.name], binary_data=True)
            req.append(inp)
        out = [http.InferRequestedOutput(o, binary_data=True) for o in outputs]
        body, json_size = aio.InferenceServerClient.generate_request_body(req, outputs=out)
        self.body = body if isinstance(body, bytes) else body.encode()
        self.headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(json_size)}
        self.url = f"{triton_url}/v2/models/{canary.model}/infer"
        self.np_dtype = triton_to_np_dtype
        self.session: Any = None

    async def __aenter__(self) -> LeanInference:
        import aiohttp

        self.session = aiohttp.ClientSession(auto_decompress=False, headers={"Accept-Encoding": "identity"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def __call__(self) -> float:
        import json

        import numpy as np

        t = time.perf_counter()
        async with self.session.post(self.url, data=self.body, headers=self.headers) as r:
            if r.status != 200 or r.content_length is None:
                raise RuntimeError(f"lean inference answered {r.status}: {(await r.read())[:200]!r}")
            # Into one buffer of the announced size, as each chunk arrives: `await r.read()` would hold every
            # chunk and their join at once (twice the reply), and glibc hands that back to the kernel after each
            # call, so each call page-faults it in again (8,000 faults, 10+ ms, for a 16 MiB reply here).
            data = bytearray(r.content_length)
            view = memoryview(data)
            got = 0
            while got < len(data):
                chunk = await r.content.readany()
                if not chunk:
                    raise RuntimeError("lean inference: reply cut short")
                view[got : got + len(chunk)] = chunk
                got += len(chunk)
            header_length = int(r.headers["Inference-Header-Content-Length"])
        offset = header_length
        for o in json.loads(data[:header_length])["outputs"]:
            size = int(o["parameters"]["binary_data_size"])
            dtype = np.dtype(self.np_dtype(o["datatype"]))
            np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=offset).reshape(o["shape"])
            offset += size
        return time.perf_counter() - t


Step = Callable[[], Awaitable[float]]


async def interleave(steps: dict[str, Step], n: int, warmup: int) -> dict[str, list[float]]:
    """Each step `warmup` times, then `n` times more, timed (ms). Each turn rotates the order, so drift on the
    machine hits every side alike and no side always runs right after another."""
    ms: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps.items())
    for i in range(warmup + n):
        k = i % len(order)
        for name, step in order[k:] + order[:k]:
            seconds = await step()
            if i >= warmup:
                ms[name].append(seconds * 1000)
    return ms


async def timed_get(session: Any, url: str, *, must_pass: bool = True) -> float:
    """Seconds for one GET of `url` on `session`, body read; raises unless it answered 200 (when `must_pass`)."""
    t = time.perf_counter()
    async with session.get(url) as r:
        await r.read()
        if must_pass and r.status != 200:
            raise RuntimeError(f"{url} answered {r.status}: {await r.text()}")
    return time.perf_counter() - t
