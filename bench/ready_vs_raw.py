"""`/ready` with a fresh canary on every request vs a raw `tritonclient.http.aio` inference of the same input.

`probe serve` runs with `min_interval: 0`, so each `/ready` runs every check (Triton live+ready, model ready,
the canary inference and its digest comparison) before it answers. The raw side sends the same model the same
tensor and decodes the same outputs, on its own warm connection. Requests are sequential and interleaved
(ready, raw, ping; raw, ping, ready; ...) so drift from other load on the machine hits all sides alike.
`/live/ping` runs no check: it is the sidecar's HTTP round trip alone. (raw + ping) / raw is what a sidecar scores
whose inference costs what the raw client's does; the canary's own HTTP client (`probe.http1`) costs less than
tritonclient's aiohttp session, which is how `/ready` can come in under it.
The sidecar's CPU time is read from /proc around each `/ready` only.

It runs ROUNDS rounds, each against a freshly started `probe serve`, and pools them: on a 2-core machine where
Triton's threads, its Python-backend stub, the sidecar and this process share the cores, where the scheduler puts
one sidecar process shifts its ratio by up to +-0.04 against another process running the same code. Each round's
own ratio is printed too.

Run alone: python bench/ready_vs_raw.py
"""

from __future__ import annotations

import asyncio
import gc
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from common import (
    FRESH,
    RawInference,
    Stack,
    cpu_seconds,
    mark,
    median,
    percentile,
    run_standalone,
    table,
    timed_get,
    vm_status,
)

N = 200
WARMUP = 20
ROUNDS = 3
TARGET = 1.25  # /ready p50 and p90 at most this many times the raw inference's


@dataclass
class ReadyVsRaw:
    ready_ms: list[float]
    raw_ms: list[float]
    ping_ms: list[float]
    """The sidecar's own HTTP round trip (/live/ping runs no check): what any sidecar answer pays on top."""
    canary_runs: int
    sidecar_canary_ms: float
    """Mean canary inference time as the sidecar itself measured it (from its /metrics histogram)."""
    rounds: list[float] = field(default_factory=list)
    """p50 ratio of each round (one sidecar process each)."""
    sidecar_rss: int = 0
    sidecar_cpu_s: float = 0.0
    """CPU seconds the sidecar process ran while answering the measured /ready requests."""
    raw_cpu_s: float = 0.0
    """CPU seconds this process ran for the raw inferences (the client side of the same inference)."""

    @property
    def p50_ratio(self) -> float:
        return median(self.ready_ms) / median(self.raw_ms)

    @property
    def p90_ratio(self) -> float:
        return percentile(self.ready_ms, 90) / percentile(self.raw_ms, 90)

    @property
    def hop_ratio(self) -> float:
        return (median(self.raw_ms) + median(self.ping_ms)) / median(self.raw_ms)

    @property
    def ok(self) -> bool:
        return self.p50_ratio <= TARGET and self.p90_ratio <= TARGET

    def report(self) -> str:
        def row(label: str, ms: list[float]) -> list[object]:
            return [label, len(ms), f"{median(ms):.2f}", f"{percentile(ms, 90):.2f}", f"{min(ms):.2f}"]

        rows: list[list[object]] = [
            row("/ready (fresh canary)", self.ready_ms),
            row("raw tritonclient.aio infer", self.raw_ms),
            row("/live/ping (the HTTP hop alone)", self.ping_ms),
            ["ratio", "", f"{self.p50_ratio:.2f}x", f"{self.p90_ratio:.2f}x", ""],
        ]
        lines = [
            "== /ready with a fresh canary vs a raw inference (sequential, interleaved) ==",
            table(rows, ["", "n", "p50 ms", "p90 ms", "min ms"]),
            f"p50 ratio of each round (a fresh sidecar process each): {', '.join(f'{r:.2f}x' for r in self.rounds)}",
            f"canary runs behind those /ready answers: {self.canary_runs} (every request ran the canary)"
            if self.canary_runs >= len(self.ready_ms)
            else f"WARNING: only {self.canary_runs} canary runs for {len(self.ready_ms)} /ready answers",
            f"the sidecar's own mean canary inference time (its /metrics histogram): {self.sidecar_canary_ms:.2f} ms"
            f" (raw inference mean {sum(self.raw_ms) / len(self.raw_ms):.2f} ms)",
            f"the hop on top of a raw inference, (raw + ping) / raw at p50: {self.hop_ratio:.2f}x"
            " (the canary's own client is leaner than the raw one's: /ready can come in under this)",
            f"CPU per answer: sidecar {self.sidecar_cpu_s / len(self.ready_ms) * 1e6:.0f} us per fresh /ready,"
            f" raw client {self.raw_cpu_s / len(self.raw_ms) * 1e6:.0f} us per inference;"
            f" sidecar VmRSS after the run: {self.sidecar_rss / 1e6:.1f} MB",
            f"target: p50 and p90 ratio <= {TARGET}x -> {mark(self.ok)}",
        ]
        return "\n".join(lines)

    def summary(self) -> list[tuple[str, str, str, bool | None]]:
        return [
            (
                f"/ready fresh canary vs raw infer (p50, p90; {len(self.rounds)} rounds pooled)",
                f"{self.p50_ratio:.2f}x, {self.p90_ratio:.2f}x (rounds {', '.join(f'{r:.2f}' for r in self.rounds)})",
                f"<= {TARGET}x",
                self.ok,
            )
        ]


_METRIC = re.compile(r'^probe_(canary_latency_seconds_(?:sum|count)|runs_total)(?:\{canary="demo"\})? (\S+)$', re.M)


async def _metrics(session: Any, base: str) -> dict[str, float]:
    async with session.get(base + "/metrics") as r:
        text = await r.text()
    return {m.group(1): float(m.group(2)) for m in _METRIC.finditer(text)}


async def _measure(base: str, triton_url: str, config_path: str, pid: int) -> ReadyVsRaw:
    import aiohttp

    ready_s: list[float] = []
    raw_s: list[float] = []
    ping_s: list[float] = []
    cpu = raw_cpu = 0.0
    async with aiohttp.ClientSession() as session, RawInference(config_path, triton_url) as raw:

        async def fresh() -> None:
            nonlocal cpu
            before = cpu_seconds(pid)
            ready_s.append(await timed_get(session, base + "/ready"))
            cpu += cpu_seconds(pid) - before

        async def direct() -> None:
            nonlocal raw_cpu
            before = time.process_time()
            raw_s.append(await raw())
            raw_cpu += time.process_time() - before

        async def hop() -> None:
            ping_s.append(await timed_get(session, base + "/live/ping", must_pass=False))

        order = [fresh, direct, hop]
        for _ in range(WARMUP):
            for step in order:
                await step()
        for samples in (ready_s, raw_s, ping_s):
            samples.clear()
        cpu = raw_cpu = 0.0
        before = await _metrics(session, base)
        gc.collect()
        for i in range(N):  # rotate the order, so no side always runs right after another
            for step in order[i % 3 :] + order[: i % 3]:
                await step()
        after = await _metrics(session, base)
    runs = int(after.get("runs_total", 0) - before.get("runs_total", 0))
    count = after.get("canary_latency_seconds_count", 0) - before.get("canary_latency_seconds_count", 0)
    total = after.get("canary_latency_seconds_sum", 0) - before.get("canary_latency_seconds_sum", 0)
    return ReadyVsRaw(
        ready_ms=[s * 1000 for s in ready_s],
        raw_ms=[s * 1000 for s in raw_s],
        ping_ms=[s * 1000 for s in ping_s],
        canary_runs=runs,
        sidecar_canary_ms=total / count * 1000 if count else float("nan"),
        sidecar_cpu_s=cpu,
        raw_cpu_s=raw_cpu,
    )


def _round(stack: Stack) -> ReadyVsRaw:
    proc = stack.serve("fresh", FRESH)
    try:
        cfg = stack.tmp / "fresh" / "probe.yaml"
        result = asyncio.run(_measure(proc.base, stack.triton_url, str(cfg), proc.process.pid))
        result.sidecar_rss = vm_status(proc.process.pid)["VmRSS"]
        return result
    finally:
        stack.stop(proc)


def measure(stack: Stack) -> ReadyVsRaw:
    parts = [_round(stack) for _ in range(ROUNDS)]
    runs = sum(p.canary_runs for p in parts)
    canary_ms = sum(p.sidecar_canary_ms * p.canary_runs for p in parts if p.canary_runs) / runs if runs else math.nan
    return ReadyVsRaw(
        ready_ms=[v for p in parts for v in p.ready_ms],
        raw_ms=[v for p in parts for v in p.raw_ms],
        ping_ms=[v for p in parts for v in p.ping_ms],
        canary_runs=runs,
        sidecar_canary_ms=canary_ms,
        rounds=[p.p50_ratio for p in parts],
        sidecar_rss=max(p.sidecar_rss for p in parts),
        sidecar_cpu_s=sum(p.sidecar_cpu_s for p in parts),
        raw_cpu_s=sum(p.raw_cpu_s for p in parts),
    )


if __name__ == "__main__":
    run_standalone(measure)
