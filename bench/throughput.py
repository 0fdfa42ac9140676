"""(b) Cached `/ready` requests per second vs Triton's own `/v2/health/ready`, with one load generator for both.

`probe serve` runs with a large `min_interval`, so after the first answer every `/ready` is served from the
cached run (plus the instant shutdown/ping checks). Both targets get the same generator, concurrency and time,
in alternating rounds (A B B A ...) so machine drift hits both alike. A third, informational target is a
minimal aiohttp app answering "ok": the ceiling for any aiohttp handler on this machine, so the gap between it
and the probe is what the probe's own code costs. The generator is `wrk` when installed, else an asyncio
keep-alive HTTP/1.1 client in this process; either way it competes with the servers for the same CPUs, which
caps the fastest side most.

Run alone: python bench/throughput.py
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

from common import CACHED, LoadResult, Stack, cpu_seconds, free_port, load, mark, run_standalone, table, vm_status, wrk

CONCURRENCY = 32
SECONDS = 5.0  # per target, split into ROUNDS rounds
ROUNDS = 4
WARMUP_S = 0.5
TARGET = 0.25  # cached /ready at least this fraction of Triton's health endpoint

_MINIMAL_APP = """
import sys
from aiohttp import web
async def ok(request): return web.Response(text="ok")
app = web.Application()
app.router.add_get("/ready", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


@dataclass
class Throughput:
    generator: str
    probe: LoadResult = field(default_factory=LoadResult)
    triton: LoadResult = field(default_factory=LoadResult)
    minimal: LoadResult = field(default_factory=LoadResult)
    rounds: list[tuple[str, float]] = field(default_factory=list)
    sidecar_cpu_s: float = 0.0
    """CPU seconds the sidecar ran during its measured rounds."""
    minimal_cpu_s: float = 0.0
    sidecar_rss: int = 0

    @property
    def ratio(self) -> float:
        return self.probe.rps / self.triton.rps if self.triton.rps else float("nan")

    @property
    def ok(self) -> bool:
        return self.ratio >= TARGET and self.probe.errors == 0 and self.triton.errors == 0

    def report(self) -> str:
        def row(label: str, r: LoadResult, cpu_s: float | None = None) -> list[object]:
            per = f"{cpu_s / max(r.requests, 1) * 1e6:.0f}" if cpu_s is not None else ""
            ratio = f"{r.rps / self.triton.rps:.2f}x" if self.triton.rps else ""
            return [label, r.requests, r.errors, f"{r.seconds:.1f}", f"{r.rps:,.0f}", ratio, per]

        rows = [
            row("probe /ready (cached)", self.probe, self.sidecar_cpu_s),
            row("Triton /v2/health/ready", self.triton),
            row("minimal aiohttp app (ceiling)", self.minimal, self.minimal_cpu_s),
        ]
        per_round = ", ".join(f"{name} {rps:,.0f}" for name, rps in self.rounds)
        return "\n".join(
            [
                f"== cached /ready throughput vs Triton's health endpoint ({CONCURRENCY} connections) ==",
                table(rows, ["", "requests", "errors", "s", "req/s", "vs Triton", "server CPU us/answer"]),
                f"rounds (req/s): {per_round}",
                f"sidecar: {self.sidecar_cpu_s / max(self.probe.seconds, 1e-9):.0%} of one core during its rounds;"
                f" VmRSS after: {self.sidecar_rss / 1e6:.1f} MB",
                f"load generator: {self.generator}; it shares the machine's CPUs with the servers, so it caps the"
                " fastest side most",
                f"target: probe/Triton >= {TARGET}x -> {mark(self.ok)}",
            ]
        )

    def summary(self) -> list[tuple[str, str, str, bool | None]]:
        return [
            (
                "(b) cached /ready req/s vs Triton /v2/health/ready req/s",
                f"{self.ratio:.2f}x ({self.probe.rps:,.0f} vs {self.triton.rps:,.0f})",
                f">= {TARGET}x",
                self.ok,
            ),
            (
                "minimal aiohttp app req/s vs Triton (ceiling); cached /ready vs the minimal app",
                f"{self.minimal.rps / self.triton.rps:.2f}x ({self.minimal.rps:,.0f}); "
                f"{self.probe.rps / self.minimal.rps:.2f}x"
                if self.triton.rps and self.minimal.rps
                else "n/a",
                "(info)",
                None,
            ),
        ]


async def _round(url: str, seconds: float, use_wrk: bool) -> LoadResult:
    if use_wrk:
        return await asyncio.to_thread(wrk, url, concurrency=CONCURRENCY, seconds=seconds)
    return await load(url, concurrency=CONCURRENCY, seconds=seconds)


@contextlib.contextmanager
def minimal_app() -> Iterator[tuple[str, int]]:
    """A hello-world aiohttp server on 127.0.0.1: (url, pid); stopped by its pid."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _MINIMAL_APP, str(port)])
    url = f"http://127.0.0.1:{port}/ready"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the minimal aiohttp app did not start") from None
                time.sleep(0.05)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def _measure(targets: dict[str, str], pids: dict[str, int]) -> Throughput:
    use_wrk = shutil.which("wrk") is not None
    result = Throughput(
        generator=f"wrk ({shutil.which('wrk')})"
        if use_wrk
        else "asyncio keep-alive HTTP/1.1 client in the benchmark process (wrk is not installed)"
    )
    for url in targets.values():
        await _round(url, WARMUP_S if not use_wrk else 1.0, use_wrk)
    names = list(targets)
    order = (names + names[::-1]) * (ROUNDS // 2)
    totals = {"probe": result.probe, "triton": result.triton, "minimal": result.minimal}
    for name in order:
        pid = pids.get(name)
        cpu = cpu_seconds(pid) if pid else 0.0
        r = await _round(targets[name], SECONDS / ROUNDS, use_wrk)
        if name == "probe" and pid:
            result.sidecar_cpu_s += cpu_seconds(pid) - cpu
        if name == "minimal" and pid:
            result.minimal_cpu_s += cpu_seconds(pid) - cpu
        result.rounds.append((name, r.rps))
        totals[name].add(r)
    return result


def measure(stack: Stack) -> Throughput:
    proc = stack.serve("cached", CACHED)
    try:
        with minimal_app() as (minimal_url, minimal_pid):
            pid = proc.process.pid
            targets = {
                "probe": proc.base + "/ready",
                "triton": stack.triton_url + "/v2/health/ready",
                "minimal": minimal_url,
            }
            result = asyncio.run(_measure(targets, {"probe": pid, "minimal": minimal_pid}))
        result.sidecar_rss = vm_status(pid)["VmRSS"]
        return result
    finally:
        stack.stop(proc)


if __name__ == "__main__":
    run_standalone(measure)
