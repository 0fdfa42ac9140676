"""(f) The sidecar's resident memory (after warm-up, after load) and its start time (exec to first 200 on /live/ping).

Memory is VmRSS from /proc/<pid>/status of the `probe serve` process (VmHWM is the peak). The load is
sequential fresh canaries plus a burst of concurrent `/ready` requests. Start time is measured from just before
exec to the first 200 on `/live/ping` (the median of several starts), and on to the first 200 on `/ready` (the
first canary has run and matched its golden).

Run alone: python bench/footprint.py
"""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from common import FRESH, SOURCE, Stack, free_port, load, mark, median, run_standalone, table, vm_status

STARTS = 5
RSS_TARGET_MB = 80.0
START_TARGET_S = 1.0  # exec -> first 200 on /live/ping, median
WARMUP = 20
SEQUENTIAL = 300
BURST_S = 3.0
MB = 1e6


@dataclass
class Footprint:
    warm: dict[str, int]
    loaded: dict[str, int]
    load_requests: int
    ping_s: list[float] = field(default_factory=list)
    ready_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return max(self.warm["VmRSS"], self.loaded["VmRSS"]) / MB <= RSS_TARGET_MB

    @property
    def start_ok(self) -> bool:
        return median(self.ping_s) <= START_TARGET_S

    def report(self) -> str:
        def row(label: str, vm: dict[str, int]) -> list[object]:
            return [label, *(f"{vm.get(k, 0) / MB:.1f}" for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"))]

        rows = [row("after warm-up", self.warm), row(f"after load ({self.load_requests:,} requests)", self.loaded)]
        starts = ", ".join(f"{s * 1000:.0f}" for s in self.ping_s)
        return "\n".join(
            [
                "== sidecar footprint ==",
                table(rows, ["probe serve", "VmRSS MB", "VmHWM MB", "of it anon", "of it files"]),
                f"target: VmRSS <= {RSS_TARGET_MB:g} MB -> {mark(self.ok)}",
                f"exec -> first 200 on /live/ping: median {median(self.ping_s) * 1000:.0f} ms of {STARTS} starts"
                f" ({starts} ms); target <= {START_TARGET_S:g} s -> {mark(self.start_ok)}",
                f"exec -> first 200 on /ready (first canary matched): median {median(self.ready_s) * 1000:.0f} ms",
            ]
        )

    def summary(self) -> list[tuple[str, str, str, bool | None]]:
        peak = max(self.warm["VmRSS"], self.loaded["VmRSS"]) / MB
        return [
            (
                "(f) sidecar VmRSS (warm, after load)",
                f"{self.warm['VmRSS'] / MB:.1f} MB, {peak:.1f} MB",
                f"<= {RSS_TARGET_MB:g} MB",
                self.ok,
            ),
            (
                f"(f) exec -> first /live/ping 200 (median of {STARTS})",
                f"{median(self.ping_s) * 1000:.0f} ms",
                f"<= {START_TARGET_S * 1000:.0f} ms",
                self.start_ok,
            ),
        ]


def _status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def _start_once(stack: Stack, n: int) -> tuple[float, float]:
    port = free_port()
    cfg = stack.config(f"start{n}", {**FRESH, "drain": 0}, port)
    env = {**os.environ, "PYTHONPATH": str(SOURCE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(cfg.parent / "serve.log", "wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "probe", "serve", "-c", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=SOURCE,  # `python -m` looks in the working directory first
    )
    log.close()
    try:
        ping = ready = 0.0
        deadline = t0 + 60
        while not ping:
            if proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"probe serve did not come up: {(cfg.parent / 'serve.log').read_text()[-1000:]}")
            if _status(port, "/live/ping") == 200:
                ping = time.perf_counter() - t0
            else:
                time.sleep(0.002)
        while not ready:
            if time.perf_counter() > deadline:
                raise RuntimeError("probe serve never became ready")
            if _status(port, "/ready") == 200:
                ready = time.perf_counter() - t0
            else:
                time.sleep(0.002)
        return ping, ready
    finally:
        proc.send_signal(signal.SIGTERM)  # our own child, by pid
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def _load(port: int) -> int:
    for _ in range(SEQUENTIAL):
        if _status(port, "/ready") != 200:
            raise RuntimeError("/ready failed during the footprint load")
    burst = await load(f"http://127.0.0.1:{port}/ready", concurrency=32, seconds=BURST_S)
    if burst.errors:
        raise RuntimeError(f"{burst.errors} failed /ready answers during the footprint load")
    return SEQUENTIAL + burst.requests


def measure(stack: Stack) -> Footprint:
    proc = stack.serve("footprint", FRESH)
    try:
        for _ in range(WARMUP):
            _status(proc.port, "/ready")
        warm = vm_status(proc.process.pid)
        requests = asyncio.run(_load(proc.port))
        loaded = vm_status(proc.process.pid)
    finally:
        stack.stop(proc)
    result = Footprint(warm=warm, loaded=loaded, load_requests=requests)
    for n in range(STARTS):
        ping, ready = _start_once(stack, n)
        result.ping_s.append(ping)
        result.ready_s.append(ready)
    return result


if __name__ == "__main__":
    run_standalone(measure)
